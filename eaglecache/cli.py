"""The ``eaglecache`` command line: one subcommand per stage, registered by the stage itself.

Each stage folder has a ``cli.py`` with ``register(subparsers)`` that adds its
subcommands and points them at a handler ``fn(config, args) -> int | None``.
Handlers import their heavy dependencies (vLLM, DeepSpeed) lazily, so
``--help`` stays instant. ``UserError`` becomes one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Callable, Optional

from eaglecache.errors import UserError

Handler = Callable[..., Optional[int]]
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


# Flags with nargs="+" that swallow the KEY=VALUE overrides written after them.
_GREEDY_FLAGS = ("input", "prompts", "draft", "bench")


def _collect_overrides(args: argparse.Namespace) -> None:
    """Move ``a.b=v`` items that a greedy ``nargs='+'`` flag swallowed back into the overrides, and an old
    positional argument the overrides swallowed back to its flag."""
    for name in _GREEDY_FLAGS:
        value = getattr(args, name, None)
        if not isinstance(value, list):
            continue
        moved = [v for v in value if isinstance(v, str) and _OVERRIDE.match(v)]
        if moved:
            setattr(args, name, [v for v in value if v not in moved])
            args.overrides = list(args.overrides) + moved
    # a positional argument that became a flag (eaglecache/flags.py) lands among the overrides: hand it back
    for dest in getattr(args, "positional_aliases", ()):
        stray = [v for v in args.overrides if not _OVERRIDE.match(v)]
        if stray:
            setattr(args, f"{dest}_positional", stray[0])
            args.overrides = [v for v in args.overrides if v is not stray[0]]


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The two arguments every stage takes: a YAML file and dotted overrides."""
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help="YAML config file, or a packaged config by name: tiny (the default: the embedded CPU target) "
             "or minimax_m3 (the seed's production settings).",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="Dotted config overrides, e.g. train.lr=2e-4 target.tensor_parallel_size=4.",
    )


def add_command(subparsers, name: str, handler: Handler, help: str, description: str | None = None):
    """Add a stage subcommand with --config and overrides; returns the parser for its own flags."""
    parser = subparsers.add_parser(
        name, help=help, description=description or help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from eaglecache.data import cli as data_cli
    from eaglecache.precompute import cli as precompute_cli
    from eaglecache.serve import cli as serve_cli
    from eaglecache.train import cli as train_cli
    from eaglecache import config_cli, target_cli

    parser = argparse.ArgumentParser(
        prog="eaglecache",
        description=(
            "Train EAGLE3 draft models offline: vLLM dumps the target's hidden states into sharded "
            "Zarr caches (precompute), DeepSpeed ZeRO-3 trains the draft from them (train), and the "
            "draft is exported to and benchmarked in vLLM (export, bench, serve)."
        ),
        epilog="Every subcommand takes --config FILE and dotted KEY=VALUE overrides; see `eaglecache CMD --help`.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (data_cli, precompute_cli, train_cli, serve_cli, target_cli, config_cli):
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    if hasattr(args, "overrides"):
        _collect_overrides(args)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    # vLLM leaves shared memory to multiprocessing's resource tracker when a command stops on an
    # error; the tracker (its own process, started later with this environment) would print a leak
    # warning after our one error line
    quiet = "ignore:resource_tracker:UserWarning"
    if quiet not in os.environ.get("PYTHONWARNINGS", ""):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), quiet]))
    try:
        from eaglecache.config import load_config

        config = load_config(args.config, args.overrides) if hasattr(args, "overrides") else None
        return int(handler(config, args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `eaglecache ... | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
