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


def _demo(config, args):
    from eaglecache.serve.demo import demo

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
                    "End to end on the embedded tiny target: data, regenerate, precompute, train, export, bench.")
    p.add_argument("--output", required=True, metavar="DIR", help="Working directory for every stage's output.")
    outputs.add_overwrite_flag(p)
