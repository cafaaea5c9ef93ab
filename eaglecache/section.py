"""Base class of every config section, and the one rule for which settings identify an artifact.

Fields are declared once, with their type, default, unit and a one-line
description; ``eaglecache config show`` prints each key with its description
from here. Unknown keys are errors, types are checked.

Identity: every artifact (a cache, a run, a bench result) records a fingerprint of
the settings that made it, and a resume or a join refuses one that differs. A
section lists in ``RUNTIME_ONLY`` the fields that change how a stage runs (memory
sizing, parallelism of the writer, logging, launching) but never a value it writes;
``identity()`` is the section without them, recursively. That is the only rule:
every fingerprint is built from ``identity()`` (eaglecache/config.py ``Config.fingerprint``).
"""

from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict


def strictly_ascending(layer_ids: Optional[list[int]]) -> Optional[list[int]]:
    """Aux layer ids as vLLM orders them: it concatenates the aux states in ascending layer order, so a
    draft trained on any other order (or a repeated layer) gets a permutation of what serving feeds it.
    A field validator of precompute.aux_layer_ids and train.draft.aux_layer_ids."""
    if layer_ids is not None and any(a >= b for a, b in zip(layer_ids, layer_ids[1:])):
        raise ValueError(f"layer ids must be strictly ascending (vLLM concatenates aux states in that order), "
                         f"e.g. {sorted(set(layer_ids))}")
    return layer_ids


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # fields that never change what a stage writes; each section says why next to its list
    RUNTIME_ONLY: ClassVar[tuple[str, ...]] = ()
    # fields added after a release: they enter the identity only when set off their default, so an
    # artifact made before they existed keeps its fingerprint (and a run of that release resumes)
    IDENTITY_WHEN_SET: ClassVar[tuple[str, ...]] = ()

    def identity(self, drop: tuple[str, ...] = ()) -> dict[str, Any]:
        """The settings that identify what this section produces: all fields but RUNTIME_ONLY (and ``drop``)."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            if name in self.RUNTIME_ONLY or name in drop:
                continue
            value = getattr(self, name)
            if name in self.IDENTITY_WHEN_SET and value == type(self).model_fields[name].get_default(
                    call_default_factory=True):
                continue
            out[name] = value.identity() if isinstance(value, Section) else self.model_dump(
                mode="json", include={name})[name]
        return out
