"""``eaglecache train``: launches the DeepSpeed trainer over the feature cache."""

from eaglecache.cli import add_command


def _train(config, args):
    from eaglecache.train.launch import run_train

    return run_train(config, args)


def register(subparsers) -> None:
    p = add_command(subparsers, "train", _train,
                    "Train the EAGLE3 draft with DeepSpeed ZeRO-3 and TTT from a feature cache "
                    "(starts the `deepspeed` launcher with train.launcher settings).")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="Feature cache from `eaglecache precompute` (not needed with train.source=online).")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="Prepared Parquet dataset, for train.source=online.")
    p.add_argument("--output", required=True, metavar="DIR", help="Run directory: checkpoints, logs, final weights.")
    p.add_argument("--vocab", metavar="PATH", default=None, help="Draft vocab mapping from `eaglecache data vocab`.")
