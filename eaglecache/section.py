"""Base class of every config section: unknown keys are errors, types are checked.

Fields are declared once, with their type, default, unit and a one-line
description; ``eaglecache config show`` prints each key with its description
from here.
"""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
