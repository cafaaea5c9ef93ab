"""Adapters that let benchmarks/peers.py run the peers' own code on this machine: file layouts and readers.

Nothing of the peers is copied here: each adapter writes the peer's documented on-disk layout from
our states, or calls the peer's own reader / model. ``peer_versions`` says which peers are
installed; a missing peer is reported, not faked.

- speculators 0.9.0 (with hs-connectors 0.9.0): one ``hs_<idx>.safetensors`` per sample holding
  ``hidden_states`` [seq, 4, H] bf16 (the aux layers and the final layer stacked) and
  ``token_ids``; read by ``hs_connectors.FileTransfer.get_cached`` (``safetensors`` ``load_file``),
  what ``speculators.train.data.ArrowDataset`` calls.
- SpecForge 0.2.0: one ``torch.save`` dict per sample at ``rows_<k>-<k+2000>/data_<idx>.ckpt``
  (``input_ids``, ``loss_mask``, ``aux_hidden_state`` [1, S, 3H], ``hidden_state`` [1, S, H]);
  read by ``specforge.runtime.data_plane.feature_store.load_feature_file``, which maps the file
  (``torch.load(mmap=True)``): the adapter copies each tensor out, so its pages are really read,
  as a batch collate would.

Training step (``bench_train``): each model's own forward + loss, ``backward`` and a
``torch.optim.AdamW`` step, parameters in the dtype measured, on one random batch:

- ours: ``eaglecache.train.draft.Eagle3Draft`` with the TTT loss of train/ttt.py, attention
  ``auto`` (the trainer's CPU default, ``split``), the teacher (final norm + LM head) inside the step.
- SpecForge: ``OnlineEagle3Model`` over ``LlamaForCausalLMEagle3`` (``attention_backend="sdpa"``);
  its loss is a Triton kernel that cannot run on CPU, so ``LogSoftmaxLoss`` is replaced by its
  plain-torch reference ``specforge.core.loss._compute_loss`` (same loss); the teacher logits
  (target norm + LM head, no grad) are computed inside the step, as its offline trainer does.
- speculators: ``Eagle3DraftModel`` (one layer, sdpa) with its ``eager`` KL loss (its fused loss
  is Triton too), given the final states as ``verifier_last_hidden_states``.
"""

from __future__ import annotations

import statistics
import time
from importlib import metadata
from pathlib import Path

import torch

from bench_train import matmul_peak, step_flops  # noqa: E402  (benchmarks/ is on sys.path)

SPECFORGE_ROWS_PER_DIR = 2000


def peer_versions() -> dict[str, str | None]:
    """Installed version of each peer package, None when it is not installed."""
    out = {}
    for name in ("speculators", "hs-connectors", "specforge"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def speculators_path(root: Path, sample_id: int) -> Path:
    return root / f"hs_{sample_id}.safetensors"


def specforge_path(root: Path, sample_id: int) -> Path:
    k = sample_id // SPECFORGE_ROWS_PER_DIR * SPECFORGE_ROWS_PER_DIR
    return root / f"rows_{k}-{k + SPECFORGE_ROWS_PER_DIR}" / f"data_{sample_id}.ckpt"


def write_speculators_sample(root: Path, sample_id: int, sample: dict) -> None:
    """speculators' layout: the 3 aux states and the final state stacked as [seq, 4, H] bf16."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    hidden = torch.cat([sample["aux"], sample["final"].unsqueeze(1)], dim=1).contiguous()
    save_file({"hidden_states": hidden, "token_ids": torch.from_numpy(sample["input_ids"]).long()},
              str(speculators_path(root, sample_id)))


def write_specforge_sample(root: Path, sample_id: int, sample: dict) -> None:
    """SpecForge's offline layout: aux states concatenated on the feature axis, batch dim 1."""
    path = specforge_path(root, sample_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = len(sample["input_ids"])
    torch.save({"input_ids": torch.from_numpy(sample["input_ids"]).long(),
                "loss_mask": torch.from_numpy(sample["loss_mask"]).long(),
                "aux_hidden_state": sample["aux"].reshape(1, t, -1).contiguous(),
                "hidden_state": sample["final"].unsqueeze(0).contiguous()}, str(path))


def peer_readers(layouts: dict[str, Path]) -> dict[str, tuple[str, object]]:
    """name -> (version label, read(sample_id) -> tokens) of each installed peer's own reader."""
    versions = peer_versions()
    readers = {}
    if versions["speculators"] and versions["hs-connectors"]:
        from hs_connectors import FileTransfer

        transfer = FileTransfer(layouts["speculators"])

        def speculators_read(sample_id: int) -> int:
            # copied out as a collate does: safetensors maps the file, and an untouched tensor is never read
            tensors = {k: v.clone() for k, v in transfer.get_cached(sample_id).items()}
            return len(tensors["token_ids"])

        readers["speculators FileTransfer (safetensors per sample)"] = (
            f"speculators {versions['speculators']}, hs-connectors {versions['hs-connectors']}", speculators_read)
    if versions["specforge"]:
        from specforge.runtime.data_plane.feature_store import load_feature_file

        root = layouts["specforge"]

        def specforge_read(sample_id: int) -> int:
            tensors = {k: v.clone() for k, v in load_feature_file(str(specforge_path(root, sample_id))).items()}
            return len(tensors["input_ids"])

        readers["specforge load_feature_file (torch.save per sample)"] = (
            f"specforge {versions['specforge']}", specforge_read)
    return readers


# --------------------------------------------------------------------------- (3) training step


def _dims(hidden: int, seq: int) -> dict:
    """bench_train's dimensions, scaled with ``hidden`` (heads keep head size 128 at full size)."""
    return dict(hidden=hidden, intermediate=hidden * 2816 // 1024, heads=8, kv_heads=2,
                vocab=8 * hidden, seq=seq, ttt=7, batch=1)


def _batch(d: dict, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, d["vocab"], (1, d["seq"]), generator=gen),
            "mask": torch.ones(1, d["seq"], dtype=torch.uint8),
            "aux": torch.randn(1, d["seq"], 3, d["hidden"], generator=gen).to(dtype),
            "final": torch.randn(1, d["seq"], d["hidden"], generator=gen).to(dtype)}


def ours_step(d: dict, dtype: torch.dtype):
    from eaglecache.train.attention import resolve_implementation
    from eaglecache.formats.draft import DraftArch
    from eaglecache.train.draft import Eagle3Draft
    from eaglecache.train.target_head import TargetHead
    from eaglecache.train.ttt import TTTSettings

    h, v = d["hidden"], d["vocab"]
    target = {"hidden_size": h, "intermediate_size": d["intermediate"], "num_attention_heads": d["heads"],
              "num_key_value_heads": d["kv_heads"], "head_dim": h // d["heads"], "vocab_size": v,
              "num_hidden_layers": 16, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10000.0}
    arch = DraftArch.from_target(target, [2, 8, 13])
    gen = torch.Generator().manual_seed(0)
    head = TargetHead(torch.randn(v, h, generator=gen) * 0.02, torch.ones(h), torch.randn(v, h, generator=gen) * 0.02,
                      1e-5, dtype)
    torch.manual_seed(0)
    settings = TTTSettings(ttt_length=d["ttt"], attention=resolve_implementation("auto", torch.device("cpu")))
    draft = Eagle3Draft(arch, head, settings)
    draft.init_weights(0)
    draft = draft.to(dtype)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-4)
    b = _batch(d, dtype)

    def step():
        loss, _ = draft(b["ids"], b["mask"], b["aux"], b["final"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def specforge_step(d: dict, dtype: torch.dtype):
    import specforge.algorithms.eagle3.model as sf_model
    from specforge.core.loss import _compute_loss
    from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3
    from transformers import LlamaConfig

    class ReferenceLoss:  # SpecForge's plain-torch reference of its Triton LogSoftmaxLoss
        apply = staticmethod(_compute_loss)

    sf_model.LogSoftmaxLoss = ReferenceLoss
    h, v = d["hidden"], d["vocab"]
    config = LlamaConfig(hidden_size=h, intermediate_size=d["intermediate"], num_attention_heads=d["heads"],
                         num_key_value_heads=d["kv_heads"], head_dim=h // d["heads"], vocab_size=v,
                         draft_vocab_size=v, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         num_hidden_layers=1, pad_token_id=0)
    torch.manual_seed(0)
    draft = LlamaForCausalLMEagle3(config, attention_backend="sdpa")
    draft.t2d.fill_(True)  # full draft vocab: every target token maps to itself
    draft = draft.to(dtype)
    model = sf_model.OnlineEagle3Model(draft, length=d["ttt"], attention_backend="sdpa")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    target_norm = torch.ones(h, dtype=dtype)
    target_head = (torch.randn(v, h) * 0.02).to(dtype)
    b = _batch(d, dtype)
    attention_mask = torch.ones(1, d["seq"], dtype=torch.long)
    loss_mask = b["mask"].unsqueeze(-1).to(dtype)

    def step():
        with torch.no_grad():  # the teacher: target norm + LM head over the final states
            final = b["final"].float()
            normed = (final * torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * target_norm
            logits = normed @ target_head.T
        plosses = model(input_ids=b["ids"], attention_mask=attention_mask, target=logits, loss_mask=loss_mask,
                        hidden_states=b["aux"].flatten(2))[0]
        sum(0.8 ** i * p for i, p in enumerate(plosses)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def speculators_step(d: dict, dtype: torch.dtype):
    from speculators.losses.utils import resolve_loss_config
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
    from transformers import LlamaConfig

    h, v = d["hidden"], d["vocab"]
    layer = LlamaConfig(hidden_size=h, intermediate_size=d["intermediate"], num_attention_heads=d["heads"],
                        num_key_value_heads=d["kv_heads"], head_dim=h // d["heads"], vocab_size=v,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, num_hidden_layers=1)
    layer._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Eagle3DraftModel(Eagle3SpeculatorConfig(transformer_layer_config=layer, draft_vocab_size=v)).to(dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_config = resolve_loss_config("kl_div", implementation="eager")
    b = _batch(d, dtype)
    document_ids = torch.zeros(1, d["seq"], dtype=torch.long)

    def step():
        out = model(hidden_states=b["aux"].flatten(2), input_ids=b["ids"], document_ids=document_ids,
                    loss_mask=b["mask"].to(dtype), verifier_last_hidden_states=b["final"], ttt_steps=d["ttt"],
                    ttt_step_loss_decay=0.8, loss_config=loss_config)
        out[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_train(steps: int = 3, seq: int = 2048, hidden: int = 1024, dtypes=("float32", "bfloat16"),
                include_ours: bool = True) -> tuple[list[dict], dict]:
    """Rows of (3): median step time of ``steps`` timed steps after one warm-up step, per model and dtype;
    the models' timed steps are interleaved."""
    d = _dims(hidden, seq)
    # ours reads the target's LM head, frozen; the peers' drafts train a head of their own (one more weight gradient)
    flops = {True: step_flops(**d, head_trained=True), False: step_flops(**d)}
    versions = peer_versions()
    models = {"eaglecache Eagle3Draft (split attention)": ("this tree", ours_step)} if include_ours else {}
    if versions["specforge"]:
        models["specforge OnlineEagle3Model (sdpa, reference loss)"] = (f"specforge {versions['specforge']}",
                                                                         specforge_step)
    if versions["speculators"]:
        models["speculators Eagle3DraftModel (sdpa, eager loss)"] = (f"speculators {versions['speculators']}",
                                                                    speculators_step)
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        peak = matmul_peak(dtype)[0]
        step_fns = {}
        for name, (version, make) in models.items():
            step_fns[name] = make(d, dtype)
            step_fns[name]()  # warm-up: SpecForge compiles its RoPE and norm here
        # timed steps round-robin over the models, so a change in the machine's load (it may be
        # shared) falls on every model alike instead of on whichever ran last
        times = {name: [] for name in models}
        for _ in range(steps):
            for name in models:
                start = time.perf_counter()
                step_fns[name]()
                times[name].append(time.perf_counter() - start)
        for name, (version, _) in models.items():
            step_s = statistics.median(times[name])
            model_flops = flops[not name.startswith("eaglecache")]
            rows.append({"model": name, "version": version, "dtype": dtype_name, "step_s": step_s,
                         "tokens_per_s": d["seq"] * d["batch"] / step_s, "mfu": model_flops / step_s / peak,
                         "peak_gflops": peak / 1e9})
        del step_fns
        peak_after = matmul_peak(dtype)[0]
        for row in rows:
            if row["dtype"] == dtype_name:  # the higher of the two peaks, as bench_train does
                row["mfu"] *= row["peak_gflops"] * 1e9 / max(peak, peak_after)
                row["peak_gflops"] = max(peak, peak_after) / 1e9
    return rows, d


def print_train_table(result) -> None:
    rows, d = result
    print(f"(3) training step: hidden {d['hidden']}, intermediate {d['intermediate']}, {d['heads']}/{d['kv_heads']} "
          f"heads, vocab {d['vocab']}, seq {d['seq']}, TTT {d['ttt']}, batch {d['batch']}; AdamW; "
          f"{torch.get_num_threads()} threads")
    print(f"  {'model':56s} {'dtype':9s} {'step s':>7s} {'tokens/s':>9s} {'MFU':>6s} {'x best peer':>11s}  version")
    for r in rows:
        peers = [p["tokens_per_s"] for p in rows if p["dtype"] == r["dtype"] and not p["model"].startswith("eaglecache")]
        ratio = f"{r['tokens_per_s'] / max(peers):11.2f}" if peers else f"{'-':>11s}"
        print(f"  {r['model']:56s} {r['dtype']:9s} {r['step_s']:7.2f} {r['tokens_per_s']:9.1f} "
              f"{100 * r['mfu']:5.1f}% {ratio}  {r['version']} (matmul peak {r['peak_gflops']:.0f} GFLOP/s)")
