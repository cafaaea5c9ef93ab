"""``eaglecache precompute`` and ``eaglecache cache info|verify``: the precompute stage's commands."""

from eaglecache import outputs
from eaglecache.cli import add_command


def _precompute(config, args):
    from eaglecache.precompute.run import run_precompute

    outputs.claim_output(args.output, args.overwrite, "precompute", outputs.feature_cache)
    return run_precompute(config, args)


def _info(config, args):
    from eaglecache.precompute.tools import run_info

    return run_info(config, args)


def _verify(config, args):
    from eaglecache.precompute.tools import run_verify

    return run_verify(config, args)


def _plan(config, args):
    from eaglecache.precompute.plan import run_plan

    return run_plan(config, args)


def register(subparsers) -> None:
    p = add_command(subparsers, "precompute", _precompute,
                    "Run the target in vLLM over a prepared data set and write its hidden states to a Zarr cache.")
    p.add_argument("--input", required=True, metavar="DIR", help="Prepared Parquet dataset (eaglecache data prepare).")
    p.add_argument("--output", required=True, metavar="DIR", help="Cache directory (shared by all shard jobs).")
    p.add_argument("--shard-index", type=int, default=None, metavar="I",
                   help="This job's part, 0..num_shards-1 (overrides precompute.shard_index).")
    p.add_argument("--num-shards", type=int, default=None, metavar="N",
                   help="Number of independent jobs splitting the data set (overrides precompute.num_shards).")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="Only the first N samples (smoke tests).")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace --output when it is not a feature cache (it is removed first); a cache, "
                        "this job's part included, is resumed as without it. In a job array remove such a "
                        "directory before submitting instead: every task would remove it.")

    cache = subparsers.add_parser("cache", help="Inspect and check a feature cache.")
    sub = cache.add_subparsers(dest="cache_command", metavar="COMMAND", required=True)
    p = add_command(sub, "info", _info, "Print what a cache holds: samples, tokens, layers, codec, provenance.")
    p.add_argument("cache", metavar="DIR", help="Cache directory, or a URL such as s3://bucket/prefix.")
    p = add_command(sub, "verify", _verify,
                    "Re-read every shard: shapes, write-time checksums, no NaN/Inf. Exits non-zero on damage.")
    p.add_argument("cache", metavar="DIR", help="Cache directory, or a URL such as s3://bucket/prefix.")
    p.add_argument("--repair", action="store_true",
                   help="Re-queue damaged samples for the next precompute run (local caches only).")

    p = add_command(subparsers, "plan", _plan,
                    "Storage and bandwidth plan of a cache: tokens, bytes per codec, shards, write/read rates.")
    p.add_argument("--dataset", metavar="DIR", default=None, help="Prepared data set (exact token count).")
    p.add_argument("--num-samples", type=int, default=None, metavar="N", help="Samples, without --dataset.")
    p.add_argument("--mean-tokens", type=float, default=None, metavar="M", help="Mean tokens per sample.")
    p.add_argument("--hidden-size", type=int, default=None, help="Target hidden size (default: target config).")
    p.add_argument("--num-layers", type=int, default=None, help="Target decoder layers (default: target config).")
    p.add_argument("--precompute-tokens-per-s", type=float, default=50_000.0, metavar="R",
                   help="Precompute throughput the write rate is computed for (all jobs together).")
    p.add_argument("--train-tokens-per-s", type=float, default=100_000.0, metavar="R",
                   help="Training throughput the read rate is computed for (all ranks together).")
    p.add_argument("--cache", metavar="DIR", default=None, help="Existing cache to measure the codec ratio on.")
    p.add_argument("--output", metavar="DIR", default=None, help="Planned cache path: warn if it will not fit.")
