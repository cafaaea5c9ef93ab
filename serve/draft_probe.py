"""Record what vLLM's drafter computes while it serves: the check that an exported draft is the trained one.

An exported draft can load without error and still compute something else than the
trainer did (a norm in the wrong place, a carried state taken before instead of after the
final norm, a permuted aux layer): vLLM then serves it, greedy outputs stay correct, and
only the acceptance rate says something is off. ``DraftProbe`` is a vLLM worker extension
(``worker_extension_cls``) that, once armed through ``LLM.collective_rpc``, records every
drafter forward of the engine's own generation: the raw target states handed to the draft
(before its input norms and ``fc``), the token ids and positions of each forward, and both
states the forward returns (the normed one the LM head reads and the one carried to the
next step). The trainer's forward on the same inputs must give the same values
(tests/test_vllm_draft_forward.py). Nothing of vLLM is replaced: the hooks only copy.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

_PROBE_ATTR = "_eaglecache_probe"


class _Recorder:
    """Hooks on one drafter model; ``records`` is the list of forwards since arming."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.records: list[dict[str, Any]] = []
        self.pending_aux: Optional[torch.Tensor] = None
        self.combine = model.combine_hidden_states
        # the raw aux states exist only as the argument of combine_hidden_states, a plain method
        model.combine_hidden_states = self._combine
        self.handle = model.register_forward_hook(self._after_forward, with_kwargs=True)

    def _combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.pending_aux = hidden_states.detach().float().cpu().clone()
        return self.combine(hidden_states)

    def _after_forward(self, module, args, kwargs, output) -> None:
        names = ("input_ids", "positions", "hidden_states")
        inputs = dict(zip(names, args)) | {k: kwargs[k] for k in names if k in kwargs}
        normed, carried = output if isinstance(output, tuple) else (output, output)
        record = {name: inputs[name].detach().cpu().clone() for name in names if inputs.get(name) is not None}
        record["normed"] = normed.detach().float().cpu().clone()
        record["carried"] = carried.detach().float().cpu().clone()
        record["aux"], self.pending_aux = self.pending_aux, None  # set only on a first (prefill) pass
        self.records.append(record)

    def remove(self) -> None:
        self.handle.remove()
        self.model.combine_hidden_states = self.combine


class DraftProbe:
    """Worker methods (``LLM(worker_extension_cls="eaglecache.serve.draft_probe.DraftProbe")``)."""

    def eaglecache_probe_arm(self) -> bool:
        """Start recording this worker's drafter forwards; False on a worker without a drafter."""
        drafter = getattr(getattr(self, "model_runner", None), "drafter", None)
        model = getattr(drafter, "model", None)
        if model is None:
            return False
        if getattr(self, _PROBE_ATTR, None) is not None:
            getattr(self, _PROBE_ATTR).remove()
        setattr(self, _PROBE_ATTR, _Recorder(model))
        return True

    def eaglecache_probe_dump(self, path: str) -> int:
        """Write the records to ``path`` (torch.save), stop recording; the number of forwards recorded."""
        recorder = getattr(self, _PROBE_ATTR, None)
        if recorder is None:
            return 0
        recorder.remove()
        setattr(self, _PROBE_ATTR, None)
        torch.save(recorder.records, path)
        return len(recorder.records)
