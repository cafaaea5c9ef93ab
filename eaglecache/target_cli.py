"""``eaglecache target build``: builds (or finds cached) the embedded tiny target."""

from eaglecache import outputs
from eaglecache.cli import add_command


def _build(config, args):
    from eaglecache.tiny_target.build import run_build

    if args.output:  # here, not in tiny_target/: a change there renames every cached build (its source hash)
        outputs.claim_output(args.output, args.overwrite, "target build", outputs.tiny_target_build)
    return run_build(config, args)


def register(subparsers) -> None:
    target = subparsers.add_parser("target", help="The embedded tiny default target.")
    sub = target.add_subparsers(dest="target_command", metavar="COMMAND", required=True)
    p = add_command(sub, "build", _build,
                    "Build the tiny Llama target (tokenizer, pretraining on ShareGPT); cached after the first call.")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="Where to put it (default: $EAGLECACHE_HOME/tiny-target-<hash>).")
    outputs.add_overwrite_flag(p)
    p.add_argument("--force", action="store_true", help="Rebuild even if cached.")
