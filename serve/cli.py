"""``eaglecache export|bench|serve|demo``: the serve stage's commands; each unpacks its flags into a typed call."""

from eaglecache import outputs
from eaglecache.cli import add_command
from eaglecache.flags import add_flag


def _export(config, args):
    from eaglecache.serve.export import export

    export(config, run_dir=args.run_dir, output=args.output, overwrite=args.overwrite)
    return 0


def _bench(config, args):
    from eaglecache.serve.bench import bench

    return bench(config, drafts=args.draft, prompt_sets=args.prompts, output=args.output,
                 untrained_baseline=args.untrained_baseline, overwrite=args.overwrite)


def _serve(config, args):
    from eaglecache.serve.server import serve

    return serve(config, draft=args.draft, port=args.port, host=args.host)


# The demo's draft family when neither --config nor an override names one: the family that measured best at
# the demo's budget (README, "Draft families from one cache"). The packaged configs keep EAGLE3, the family of
# the model card's figures.
DEMO_FAMILY = "eagle3.1"


def demo_config(config, config_path, overrides):
    """The demo's config: ``DEMO_FAMILY`` unless the config file or an override chose the family."""
    from eaglecache.config import parse_override, with_overrides

    if config_path is None and all(parse_override(o)[0] != "train.draft.family" for o in overrides):
        return with_overrides(config, [f"train.draft.family={DEMO_FAMILY}"])
    return config


def _demo(config, args):
    from eaglecache.serve.demo import demo

    config = demo_config(config, args.config, args.overrides)
    return demo(config, output=args.output, overwrite=args.overwrite, verbose=args.verbose)


def register(subparsers) -> None:
    p = add_command(subparsers, "export", _export, "Turn a training checkpoint into a draft directory vLLM loads.")
    add_flag(p, "--run-dir", aliases=("--checkpoint",), required=True, metavar="DIR",
             help="Training run directory (from `eaglecache train`), or its final/.")
    p.add_argument("--output", required=True, metavar="DIR", help="Draft directory to write.")
    outputs.add_overwrite_flag(p)
    p = add_command(subparsers, "bench", _bench,
                    "Measure acceptance (mean accept length, draft accept rate, per-position rate) in vLLM.")
    p.add_argument("--draft", nargs="+", required=True, metavar="DIR",
                   help="Exported draft directories; several share one target-alone baseline and one table "
                        "(rows labelled by directory name).")
    p.add_argument("--prompts", nargs="+", required=True, metavar="SET",
                   help="Prompt sets: 'humaneval', 'sharegpt-heldout', or JSONL files of prompts/messages.")
    p.add_argument("--output", required=True, metavar="DIR", help="Where results.md, results.json and the plot go.")
    outputs.add_overwrite_flag(p)
    p.add_argument("--untrained-baseline", action="store_true",
                   help="Also benchmark a randomly initialised draft of the (first) draft's shape and family "
                        "(the no-training reference).")
    p = add_command(subparsers, "serve", _serve, "Start `vllm serve` for the target with the draft.")
    p.add_argument("--draft", required=True, metavar="DIR", help="Exported draft directory.")
    p.add_argument("--port", type=int, default=8000, metavar="N", help="Port to listen on.")
    p.add_argument("--host", default=None, help="Address to bind (default serve.host, loopback).")
    p = add_command(subparsers, "demo", _demo,
                    "End to end on the embedded tiny target: data, regenerate, precompute, train, export, bench.",
                    description="End to end on the embedded tiny target: data, regenerate, precompute, train, "
                    f"export, bench. Trains EAGLE 3.1 (train.draft.family={DEMO_FAMILY}: the family that measured "
                    "best at the demo's budget, see README) unless --config or a train.draft.family=... override "
                    "names the family.")
    p.add_argument("--output", required=True, metavar="DIR", help="Working directory for every stage's output.")
    outputs.add_overwrite_flag(p)
