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

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # fields that never change what a stage writes; each section says why next to its list
    RUNTIME_ONLY: ClassVar[tuple[str, ...]] = ()

    def identity(self, drop: tuple[str, ...] = ()) -> dict[str, Any]:
        """The settings that identify what this section produces: all fields but RUNTIME_ONLY (and ``drop``)."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            if name in self.RUNTIME_ONLY or name in drop:
                continue
            value = getattr(self, name)
            out[name] = value.identity() if isinstance(value, Section) else self.model_dump(
                mode="json", include={name})[name]
        return out
