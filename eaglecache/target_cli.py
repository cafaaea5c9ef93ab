"""``eaglecache target build``: builds (or finds cached) the embedded tiny target."""

from eaglecache.cli import add_command


def _build(config, args):
    from eaglecache.tiny_target.build import run_build

    return run_build(config, args)


def register(subparsers) -> None:
    target = subparsers.add_parser("target", help="The embedded tiny default target.")
    sub = target.add_subparsers(dest="target_command", metavar="COMMAND", required=True)
    p = add_command(sub, "build", _build,
                    "Build the tiny Llama target (tokenizer, pretraining on ShareGPT); cached after the first call.")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="Where to put it (default: $EAGLECACHE_HOME/tiny-target-<hash>).")
    p.add_argument("--force", action="store_true", help="Rebuild even if cached.")
