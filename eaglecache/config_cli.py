"""``eaglecache config show`` (the resolved config, every key with its one-line doc) and ``config list``
(the configs and job scripts that ship in the package, with their paths)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from eaglecache.cli import add_command


def _describe(model: BaseModel, indent: int = 0) -> list[str]:
    lines = []
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.extend(_describe(value, indent + 1))
            continue
        shown = json.dumps(value if not isinstance(value, tuple) else list(value))
        doc = f"  # {field.description}" if field.description else ""
        lines.append(f"{pad}{name}: {shown}{doc}")
    return lines


def _show(config, args) -> int:
    print("\n".join(_describe(config)))
    return 0


def _list(config, args) -> int:
    from eaglecache.config import CONFIGS_DIR, PACKAGED_CONFIGS

    for name, path in PACKAGED_CONFIGS.items():
        print(f"{name:<12} {path}")
    scripts = sorted(p for p in CONFIGS_DIR.rglob("*") if p.suffix in (".sh", ".sbatch"))
    for path in scripts:
        print(f"{'job script':<12} {path}")
    return 0


def register(subparsers: Any) -> None:
    group = subparsers.add_parser("config", help="Show the resolved configuration.")
    sub = group.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    add_command(sub, "show", _show,
                "Print the resolved config (file + overrides), each key with its documentation.")
    add_command(sub, "list", _list, "List the packaged configs (names --config accepts) and job scripts.")
