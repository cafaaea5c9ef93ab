"""The module DeepSpeed's launcher starts on every rank: ``python -m eaglecache.train.main --run-dir DIR ...``.

``eaglecache train`` (train/launch.py) resolves the config into RUN_DIR/config.yaml
and starts ``deepspeed ... --module eaglecache.train.main``; a user may also start
this module under ``deepspeed`` or ``torchrun`` directly, adding ``--config FILE
[KEY=VALUE ...]``: e.g. ``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module
eaglecache.train.main --config configs/tiny.yaml --run-dir RUN --cache CACHE``.
``train()`` below is the whole run for one rank and is callable in-process
(tests, benchmarks) with any feature source.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from eaglecache.dtypes import TORCH_DTYPES, resolve_dtype
from eaglecache.errors import UserError
from eaglecache.formats import run as run_format
from eaglecache.train import peer_loss
from eaglecache.train.config import PARALLEL_FAMILIES

log = logging.getLogger("eaglecache.train")


def build_draft(config, target_dir: Path, source_metadata: dict[str, Any], vocab_path: Optional[str], dtype,
                device: torch.device = torch.device("cpu")):
    """(draft module built with the TTT settings of train.*, aux indices into the source's aux layers or None
    for all); deterministic in train.seed."""
    from dataclasses import replace

    from eaglecache.formats.draft import DraftArch, default_mask_token_id, embedding_row_is_zero, family_arch
    from eaglecache.target import target_config
    from eaglecache.train.draft import Eagle3Draft
    from eaglecache.train.target_head import TargetHead
    from eaglecache.train.ttt import TTTSettings

    stored = [int(i) for i in source_metadata["aux_layer_ids"]]
    wanted = config.draft_aux_layer_ids(stored)
    indices = aux_indices(wanted, stored)
    d2t = None
    draft_vocab_size = None
    if vocab_path:
        from eaglecache.formats.vocab import read_vocab

        d2t_np, t2d_np, _ = read_vocab(vocab_path)
        d2t = torch.from_numpy(d2t_np).to(torch.int64)
        draft_vocab_size = len(d2t)
    tcfg = target_config(target_dir)
    if d2t is not None and len(t2d_np) != int(tcfg["vocab_size"]):
        raise UserError(f"{vocab_path} maps into a vocab of {len(t2d_np)}, the target has {tcfg['vocab_size']}")
    if int(tcfg["vocab_size"]) != int(source_metadata["vocab_size"]) or \
            int(tcfg["hidden_size"]) != int(source_metadata["hidden_size"]):
        raise UserError(f"target {target_dir} (hidden {tcfg['hidden_size']}, vocab {tcfg['vocab_size']}) does not "
                        f"match the features (hidden {source_metadata['hidden_size']}, "
                        f"vocab {source_metadata['vocab_size']})")
    dc = config.train.draft
    arch = DraftArch.from_target(tcfg, wanted, draft_vocab_size, dc.intermediate_size, dc.num_attention_heads,
                                 dc.num_key_value_heads)
    target = TargetHead.from_target(target_dir, config.target.weights_prefix, dtype)
    mask_token_id = default_mask_token_id(tcfg, dc.family, target.embed_weight) if dc.mask_token_id is None \
        else dc.mask_token_id
    if dc.family in ("peagle", "dflash") and mask_token_id >= arch.vocab_size:
        raise UserError(f"train.draft.mask_token_id {mask_token_id} is outside the target's vocab of {arch.vocab_size}")
    if dc.family == "dflash" and embedding_row_is_zero(target.embed_weight, mask_token_id):
        raise UserError(f"train.draft.mask_token_id {mask_token_id}: the target's embedding row of that token is zero "
                        "(a padding row), so every DFlash mask slot would get the same zero input; pick a token "
                        "with a trained embedding (unset, the target's bos/eos is chosen)")
    arch = replace(arch, **family_arch(dc.family, dc.aux_norm, mask_token_id, dc.num_layers))
    torch.manual_seed(config.train.seed)
    if arch.family == "dflash":
        from eaglecache.train.dflash import DFlashDraft

        draft = DFlashDraft(arch, target, TTTSettings.from_config(config.train, device), d2t)
    else:
        draft = Eagle3Draft(arch, target, TTTSettings.from_config(config.train, device), d2t)
    draft.init_weights(config.train.seed)
    return draft, indices


def aux_indices(wanted: list[int], stored: list[int]) -> Optional[list[int]]:
    """Indices of the resolved ``wanted`` aux layers (Config.draft_aux_layer_ids) among the stored ones (None:
    all of them, in order)."""
    stored = [int(i) for i in stored]
    return None if wanted == stored else [stored.index(i) for i in wanted]


def train(config, run_dir: Path, source, *, target_dir: Path, vocab_path: Optional[str] = None,
          rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """One rank's whole run: model, engine, resume, loop, final weights. Returns the last metrics."""
    from eaglecache.train.checkpoint import choose_resume, load_checkpoint, run_fingerprint, save_final, write_run_json
    from eaglecache.train.deepspeed_engine import create_engine, deepspeed_config
    from eaglecache.train.loader import SamplePlan, StreamingLoader
    from eaglecache.train.loop import run_loop

    tc = config.train
    compute_dtype = resolve_dtype(tc.dtype, "train.dtype", device.type, training=True)
    dtype = TORCH_DTYPES[compute_dtype]
    draft, aux_indices = build_draft(config, target_dir, source.metadata, vocab_path, dtype, device)
    lengths = [source.num_tokens(s) for s in source.sample_ids] if not hasattr(source, "num_tokens_array") \
        else source.num_tokens_array()
    plan = SamplePlan(source.sample_ids, lengths, seed=tc.seed, global_batch_size=tc.global_batch_size,
                      micro_batch_size=tc.micro_batch_size, world_size=world_size,
                      subset_fraction=tc.subset_fraction)
    total_steps = plan.total_steps(tc.epochs, tc.max_steps)
    loader = StreamingLoader(source, plan, rank=rank, max_seq_length=config.train_max_seq_length, total_steps=total_steps,
                             aux_indices=aux_indices,
                             workers=tc.loader_workers, prefetch=tc.prefetch, pin_memory=device.type == "cuda")
    if rank == 0 and tc.draft.family in PARALLEL_FAMILIES and tc.ttt_length != config.serve.num_speculative_tokens:
        log.warning("train.ttt_length %d trains %d parallel slots, and vLLM serves serve.num_speculative_tokens %d: "
                    "the slots past those served share their constant input and take part of the loss (unset "
                    "train.ttt_length to train as many as are served)", tc.ttt_length, tc.ttt_length,
                    config.serve.num_speculative_tokens)
    resume_step, saved_world = choose_resume(run_dir)
    ds_config = deepspeed_config(tc, world_size, total_steps, compute_dtype,
                                 load_universal=saved_world not in (None, world_size))
    engine = create_engine(draft.to(device), ds_config, run_dir)
    start_step = load_checkpoint(engine, loader, run_dir, resume_step, saved_world)
    if rank == 0:
        write_run_json(run_dir, source_fingerprint=source_fingerprint(source), world_size=world_size,
                       total_steps=total_steps, config_hash=run_fingerprint(config))
        log.info("training %d steps from step %d: %d samples, global batch %d, %d rank(s) x GA %d, %s",
                 total_steps, start_step, len(plan.sample_ids), tc.global_batch_size, world_size,
                 plan.accumulation_steps, compute_dtype)
    last = run_loop(engine, loader, run_dir=run_dir, train=tc, start_step=start_step, total_steps=total_steps,
                    device=device, rank=rank, world_size=world_size)
    extra = None
    if draft.arch.reduced_vocab:
        extra = {"d2t": draft.lm_head.d2t.cpu(), "t2d": draft.lm_head.t2d.cpu()}
    provenance = {"source": source_fingerprint(source), "config_hash": run_fingerprint(config),
                  "steps": total_steps, "vocab": str(vocab_path) if vocab_path else None,
                  "compute_dtype": compute_dtype}
    final = save_final(engine, run_dir, draft.arch.to_json(), extra, provenance)
    if rank == 0:
        _print_summary(last, final, total_steps)
    return last


def source_fingerprint(source) -> dict[str, Any]:
    meta = source.metadata
    return {key: meta.get(key) for key in ("dataset_hash", "target_weights_hash", "aux_layer_ids", "dtype",
                                           "source", "num_parts")} | {"num_samples": int(len(source.sample_ids))}


def _print_summary(last: dict[str, Any], final: Optional[Path], total_steps: int) -> None:
    if not last.get("step"):
        print(f"nothing to train: the run already finished its {total_steps} steps; final weights in {final}")
        return
    accs = " ".join(f"{last[k]:.3f}" for k in sorted(k for k in last if k.startswith("acc_")))
    print(f"trained {last['step']}/{total_steps} steps in {last['wall_s']:.0f}s: loss {last['loss']:.4f}, "
          f"accuracy per TTT position {accs}, simulated accept length {last['accept_len_3']:.2f} (3 tokens), "
          f"{last['tokens_per_s']:.0f} tokens/s, data wait {100 * last['data_wait_fraction']:.1f}%, "
          f"peak memory {last.get('peak_memory_gib', 0):.2f} GiB (rank 0); "
          f"final weights in {final}")


def open_source(config, cache: Optional[str], data: Optional[str], target_dir: Path, device: torch.device):
    """The feature source of train.source: the Zarr cache, or the target computing features live."""
    if config.train.source == "online":
        from eaglecache.train.online import OnlineFeatures

        if not data:
            raise UserError("train.source=online needs --data (a prepared data set)")
        return OnlineFeatures(data, target_dir, config, device)
    from eaglecache.formats.cache_reader import open_cache

    if not cache:
        raise UserError("train.source=cache needs --cache (a feature cache from `eaglecache precompute`)")
    return open_cache(cache)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="eaglecache.train.main", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True,
                        help="Run directory; its config.yaml (written by `eaglecache train`) is the config.")
    parser.add_argument("--config", default=None,
                        help="Start without `eaglecache train`: this YAML (plus overrides) is resolved and written "
                             "to RUN_DIR/config.yaml by rank 0.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Dotted overrides, with --config.")
    parser.add_argument("--cache", default=None, help="Feature cache (train.source=cache).")
    parser.add_argument("--data", default=None, help="Prepared data set (train.source=online).")
    parser.add_argument("--vocab", default=None, help="Draft vocab mapping (reduced vocab).")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed passes it
    # started by `eaglecache train`, which prints a lost peer's line (RUN_DIR/failure.txt) as its error line
    parser.add_argument("--under-launcher", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from eaglecache.config import load_config
    from eaglecache.target import resolve_target
    from eaglecache.train.deepspeed_engine import init_distributed

    args = parse_args(argv)
    # DeepSpeed's ZeRO-3 still calls the torch.distributed names torch 2.13 deprecates, once per step
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    run_dir = Path(args.run_dir)
    hosts: list = []
    try:
        # the timeout is needed before the ranks meet: read it from the config they will all read
        settings = load_config(args.config, args.overrides) if args.config else load_config(run_dir / run_format.CONFIG)
        timeout_s = settings.train.launcher.collective_timeout_s
        rank, world_size, device = init_distributed(timeout_s)
        hosts = peer_loss.gather_hosts()
        if rank == 0 and not args.under_launcher:
            peer_loss.clear(run_dir)  # `eaglecache train` clears it before it starts the ranks
        if args.config:  # started under `deepspeed`/`torchrun` directly: resolve the config here
            from eaglecache.train.launch import resolve_config, write_run_config

            config = resolve_config(settings)
            if rank == 0:
                run_dir.mkdir(parents=True, exist_ok=True)
                write_run_config(config, run_dir)
            torch.distributed.barrier()
        config = load_config(run_dir / run_format.CONFIG)
        target_dir = resolve_target(config)
        source = open_source(config, args.cache, args.data, target_dir, device)
        train(config, run_dir, source, target_dir=target_dir, vocab_path=args.vocab, rank=rank,
              world_size=world_size, device=device)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RuntimeError as exc:  # torch.distributed's errors (DistBackendError...) are RuntimeErrors
        line = peer_loss.describe(exc, hosts, timeout_s) if hosts else None
        if line is None:
            raise
        peer_loss.record(run_dir, line)
        if not args.under_launcher:  # torchrun, srun: no launcher of ours to print it
            print(f"error: {line}; start the job again (Slurm: scontrol requeue) to resume from the last checkpoint "
                  f"in {run_dir / run_format.CHECKPOINTS}", file=sys.stderr)
        # the process group is broken: tearing it down would wait on the peer that is gone
        exit_without_teardown(peer_loss.PEER_LOST_EXIT)
    # Only on success: after a failure other ranks may still be inside a collective, and destroying the
    # group would hang (torchtitan #1342).
    torch.distributed.destroy_process_group()
    return 0


def exit_without_teardown(status: int) -> None:
    """End a rank whose run is complete without the interpreter's teardown.

    DeepSpeed's engine and parameters keep references to the process groups, so destroy_process_group
    does not free gloo's C++ threads; when the interpreter tears its modules down they can be destroyed
    while still joinable, and the rank aborts with SIGABRT ("terminate called without an active
    exception") after every output is written: twice in CI, on runs whose weights were complete. All
    files are closed by then (save_final returns after the rename), so exiting here loses nothing.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    status = main()
    if status == 0:
        exit_without_teardown(status)
    sys.exit(status)
