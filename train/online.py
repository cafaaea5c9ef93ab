"""``train.source=online``: the cache's features computed live by the target (transformers) from the data set.

A feature source with the cache reader's API (docs/formats.md section 2), so the
loader and everything after it are the same code for both sources. Per sample it
runs the target once and returns exactly what precompute stores:

- ``aux``: HF ``hidden_states[k]`` for each aux layer id k (= vLLM's layer id k,
  the residual stream after k decoder layers);
- ``final``: the LAST decoder layer's output, PRE final norm. HF's last
  ``hidden_states`` entry has the final norm applied, so it is captured with a
  forward hook on the last layer instead;
- both cast to bf16, as the cache stores them.

For equivalence checks and for users without disk for a cache; the target runs
in ``target.dtype`` (resolved for the training device) one sample at a time under a lock.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch


class OnlineFeatures:
    thread_safe = True  # one model, one lock: loader threads share this object

    def __init__(self, data_dir: str | Path, target_dir: str | Path, config, device: torch.device):
        from transformers import AutoModelForCausalLM

        from eaglecache import target
        from eaglecache.formats.dataset import open_dataset
        from eaglecache.dtypes import TORCH_DTYPES

        self.dataset = open_dataset(data_dir)
        num_layers = target.target_layer_count(target_dir)
        self.aux_layer_ids = config.precompute_aux_layer_ids(num_layers)
        tcfg = target.target_config(target_dir)
        self.device = device
        compute_dtype = config.target.compute_dtype(device.type)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(target_dir), dtype=TORCH_DTYPES[compute_dtype]).to(device).eval()
        self._final: list[torch.Tensor] = []
        self._last_layer(self.model).register_forward_hook(self._capture_final)
        self._lock = threading.Lock()
        self.sample_ids = np.arange(len(self.dataset), dtype=np.int64)
        self._lengths = self.dataset.num_tokens_array()
        self.metadata: dict[str, Any] = {
            "aux_layer_ids": self.aux_layer_ids, "final_layer_id": num_layers, "final_prenorm": True,
            "hidden_size": int(tcfg["hidden_size"]), "vocab_size": int(tcfg["vocab_size"]),
            "dataset_hash": self.dataset.metadata.get("dataset_hash"),
            "target_weights_hash": target.weights_hash(target_dir), "dtype": "bfloat16", "source": "online",
            "compute_dtype": compute_dtype,
        }

    @staticmethod
    def _last_layer(model) -> torch.nn.Module:
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        return base.layers[-1]

    def _capture_final(self, module, inputs, output) -> None:
        self._final.append(output[0] if isinstance(output, tuple) else output)

    def num_tokens_array(self) -> np.ndarray:
        return self._lengths.copy()

    def num_tokens(self, sample_id: int) -> int:
        return int(self._lengths[sample_id])

    @torch.no_grad()
    def read(self, sample_id: int):
        from eaglecache.formats.cache_reader import Sample

        with self._lock:
            row = self.dataset.sample(int(sample_id))
            ids = torch.from_numpy(np.asarray(row["input_ids"], dtype=np.int64))[None].to(self.device)
            self._final.clear()
            out = self.model(input_ids=ids, output_hidden_states=True, use_cache=False)
            aux = torch.stack([out.hidden_states[k][0] for k in self.aux_layer_ids], dim=1)
            final = self._final[-1][0]
        return Sample(input_ids=np.asarray(row["input_ids"], dtype=np.int32),
                      loss_mask=np.asarray(row["loss_mask"], dtype=np.uint8),
                      aux=aux.to(torch.bfloat16).cpu(), final=final.to(torch.bfloat16).cpu(),
                      sample_id=int(sample_id))
