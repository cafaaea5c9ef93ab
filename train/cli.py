"""``eaglecache train`` (launches the DeepSpeed trainer over the feature cache), ``ablate``, and train's part of
``eaglecache plan``: the training memory per GPU (train/memory.py), printed after precompute's storage plan."""

from eaglecache import outputs
from eaglecache.cli import add_command


def _train(config, args):
    from eaglecache.train.launch import run_train

    return run_train(config, output=args.output, cache=args.cache, data=args.data, vocab=args.vocab,
                     overwrite=args.overwrite)


def _ablate(config, args):
    from eaglecache.train.ablate import parse_grid, run_ablate

    return run_ablate(config, cache=args.cache, output=args.output, grid=parse_grid(args.grid or [], args.grid_file),
                      vocab=args.vocab, parallel=args.parallel, overwrite=args.overwrite,
                      bench_prompts=args.bench)


def _plan_memory(config, args) -> None:
    from eaglecache.errors import UserError
    from eaglecache.target import resolve_target, target_config
    from eaglecache.train.memory import memory_inputs, memory_table

    try:
        target = target_config(resolve_target(config))
    except UserError as exc:  # the storage plan needs sizes only; the memory one needs the whole text config
        print(f"\ntraining memory per GPU: not computed ({exc}; set target.path to a directory with its config.json)")
        return
    launcher = config.train.launcher
    ranks = args.gpus or launcher.num_gpus * launcher.num_nodes
    m = memory_inputs(config, target, ranks)
    print("\n".join(memory_table(m, args.seq_length or config.train_max_seq_length, args.gpu_memory_gib)))


def _extend_plan(subparsers) -> None:
    """``plan`` is precompute's command (registered before this stage's); train adds its flags and prints the
    memory table after the storage plan, so neither stage imports the other."""
    if "plan" not in subparsers.choices:
        raise RuntimeError("eaglecache/cli.py registers precompute's commands before train's")
    p = subparsers.choices["plan"]
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="Ranks ZeRO-3 shards the draft over (default: train.launcher.num_gpus x num_nodes).")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, metavar="G", help="Memory of one GPU, GiB.")
    p.add_argument("--seq-length", type=int, default=None, metavar="T",
                   help="Tokens per micro-batch sequence (default: train.max_seq_length, else data's).")
    storage = p.get_default("handler")

    def plan(config, args):
        status = storage(config, args)
        if not status:
            _plan_memory(config, args)
        return status

    p.set_defaults(handler=plan)


def register(subparsers) -> None:
    _extend_plan(subparsers)
    p = add_command(subparsers, "train", _train,
                    "Train the EAGLE3 draft with DeepSpeed ZeRO-3 and TTT from a feature cache "
                    "(starts the `deepspeed` launcher with train.launcher settings).")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="Feature cache from `eaglecache precompute`: a directory or a URL such as "
                        "s3://bucket/prefix (not needed with train.source=online).")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="Prepared Parquet dataset, for train.source=online.")
    p.add_argument("--output", required=True, metavar="DIR", help="Run directory: checkpoints, logs, final weights.")
    outputs.add_overwrite_flag(p)
    p.add_argument("--vocab", metavar="PATH", default=None, help="Draft vocab mapping from `eaglecache data vocab`.")

    p = add_command(subparsers, "ablate", _ablate,
                    "Train a grid of variants from one cache (read-only), skip finished ones, "
                    "tabulate and plot the results.")
    p.add_argument("--cache", required=True, metavar="DIR", help="Feature cache shared by every variant.")
    p.add_argument("--output", required=True, metavar="DIR", help="One run directory per variant, plus results.")
    outputs.add_overwrite_flag(p)
    p.add_argument("--grid", action="append", metavar="KEY=[V1,V2]",
                   help="A train.* key and its values; repeat for a grid (cartesian product).")
    p.add_argument("--grid-file", metavar="FILE", default=None, help="YAML mapping of train.* keys to value lists.")
    p.add_argument("--vocab", metavar="PATH", default=None, help="Draft vocab mapping, as for train.")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="Variants trained side by side (each its own launcher and port).")
    p.add_argument("--bench", nargs="+", metavar="SET", default=None,
                   help="Then export every variant and measure them together in vLLM on these prompt sets "
                        "('humaneval', 'sharegpt-heldout', or JSONL files), as `eaglecache bench` does; "
                        "the table gains vLLM's accept length per set (serve.* settings apply).")
