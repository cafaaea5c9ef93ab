"""The vLLM engine of the precompute stage: the target plus hidden-state extraction into the cache.

``build_engine`` starts one ``vllm.LLM`` with the ``extract_hidden_states``
speculative method (the requested aux layer ids plus layer L, which vLLM sorts)
and this project's connector; ``prefill`` sends pre-tokenized prompts with
``max_tokens=1`` (only the prompt's forward pass matters). Prefix caching is
off: a cached prefix is never recomputed, so its states would be missing.
``build_engine(..., extract=False)`` gives the plain engine the benchmark uses
as its baseline.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from eaglecache.errors import UserError
from eaglecache.precompute.connector import CONNECTOR_NAME, MODULE_PATH, WriterRPC

SAMPLE_ID_KEY = "sample_id"
_request_counter = itertools.count()


def cpu_thread_binding(tensor_parallel_size: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND value giving each TP rank its own slice of this process's cores."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tensor_parallel_size:
        raise UserError(f"tensor_parallel_size {tensor_parallel_size} needs at least that many CPU cores "
                        f"(this process may use {len(cores)})")
    per_rank = len(cores) // tensor_parallel_size
    slices = [cores[r * per_rank:(r + 1) * per_rank] for r in range(tensor_parallel_size)]
    return "|".join(",".join(map(str, s)) for s in slices)


def extraction_layer_ids(aux_layer_ids: list[int], num_layers: int) -> list[int]:
    """The ids vLLM is asked for: the aux ids (ascending, distinct, below L) and then L itself."""
    if sorted(set(aux_layer_ids)) != list(aux_layer_ids):
        raise UserError(f"precompute.aux_layer_ids {aux_layer_ids}: must be distinct and ascending "
                        "(vLLM sorts and de-duplicates them)")
    if not aux_layer_ids or aux_layer_ids[0] < 0 or aux_layer_ids[-1] >= num_layers:
        raise UserError(f"precompute.aux_layer_ids {aux_layer_ids}: need at least one id in [0, {num_layers}) "
                        f"(id {num_layers}, the final pre-norm state, is always stored)")
    return list(aux_layer_ids) + [num_layers]


def max_model_len(config) -> int:
    """Context given to vLLM: a prompt of data.max_seq_length tokens plus the one token it must generate."""
    return config.target.max_model_len or config.data.max_seq_length + 1


def check_fits(llm, longest_sample: int) -> None:
    limit = llm.llm_engine.model_config.max_model_len
    if longest_sample + 1 > limit:
        raise UserError(f"a sample has {longest_sample} tokens but vLLM's max_model_len is {limit} "
                        f"(prompt + 1 generated token must fit): raise target.max_model_len")


def enable_malloc_hugepages(env=os.environ) -> None:
    """Let glibc back large allocations with transparent huge pages in processes started from now on.

    The writer (in vLLM's worker) allocates shard-sized buffers; with 4 KiB pages each costs a
    page fault per page, measured here at 2x the CPU of writing the same bytes to disk. The
    tunable exists from glibc 2.35 on and is ignored by older ones.
    """
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"]))


def build_engine(config, target_path, *, aux_layer_ids: list[int] | None = None, num_layers: int | None = None,
                 extract: bool = True):
    """Start vLLM on the target. With ``extract`` the engine dumps ``aux_layer_ids`` + [L] per token."""
    import torch
    from vllm import LLM

    tp = config.precompute.tensor_parallel_size or config.target.tensor_parallel_size
    if not torch.cuda.is_available():
        if tp > 1:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(tp))
        # vLLM reserves one more core per rank whenever a KV connector is configured (for NIXL
        # transfers); ours needs none, and on a small machine that reservation leaves no core free
        # for the scheduler, which then fights the model's OpenMP threads (measured: 2x slower)
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(tp))
    enable_malloc_hugepages()
    kwargs = {}
    if extract:
        layer_ids = extraction_layer_ids(aux_layer_ids, num_layers)
        kwargs = dict(
            speculative_config={
                "method": "extract_hidden_states", "num_speculative_tokens": 1,
                "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": layer_ids}},
            },
            kv_transfer_config={"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": MODULE_PATH,
                                "kv_role": "kv_producer"},
            worker_extension_cls=f"{WriterRPC.__module__}.{WriterRPC.__qualname__}",
        )
    return LLM(
        model=str(target_path),
        # prompts arrive as token ids and nothing is decoded, but vLLM's warm-up wants a tokenizer when there is one
        skip_tokenizer_init=not any((Path(target_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")),
        max_model_len=max_model_len(config),
        enable_prefix_caching=False,
        seed=0,
        **config.target.vllm_engine_args(tp),
        **kwargs,
    )


def _request(sample: dict, extract: bool):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = np.asarray(sample["input_ids"], dtype=np.int32)
    extra = None
    if extract:
        mask = np.asarray(sample["loss_mask"], dtype=np.uint8)
        extra = {"kv_transfer_params": {SAMPLE_ID_KEY: int(sample["sample_id"]), "loss_mask": mask.tobytes()}}
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, extra_args=extra)
    return TokensPrompt(prompt_token_ids=ids.tolist()), params, len(ids)


def prefill(llm, samples: Iterable[dict], extract: bool = True, max_in_flight: int = 64) -> Iterator[int]:
    """Run the forward pass of each sample's tokens, keeping up to ``max_in_flight`` requests in the
    engine so it never drains between batches; yields the token count of each finished request.

    Each sample dict needs ``input_ids`` and, with ``extract``, ``sample_id`` and ``loss_mask``
    (they ride along in ``kv_transfer_params`` to the connector).
    """
    engine = llm.llm_engine
    pending = iter(samples)
    lengths: dict[str, int] = {}
    exhausted = False
    while True:
        while not exhausted and len(lengths) < max_in_flight:
            sample = next(pending, None)
            if sample is None:
                exhausted = True
                break
            prompt, params, num_tokens = _request(sample, extract)
            request_id = f"eaglecache-{next(_request_counter)}"
            engine.add_request(request_id, prompt, params)
            lengths[request_id] = num_tokens
        if not lengths:
            return
        for output in engine.step():
            if output.finished:
                yield lengths.pop(output.request_id)
