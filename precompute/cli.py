"""``eaglecache precompute``, ``eaglecache cache info|verify|convert`` and ``eaglecache plan``: the precompute stage's
commands. Only this module sees the parsed arguments; it calls the typed stage functions."""

from eaglecache import outputs
from eaglecache.cli import add_command
from eaglecache.flags import add_flag, add_positional_alias, take_positional


def _precompute(config, args):
    from eaglecache.precompute.run import resolve_part, run_precompute

    # refused before the output is claimed, naming the flags as they were typed
    part_index, num_parts = resolve_part(config, args.part_index, args.num_parts,
                                         index_flag=args.part_index_flag, count_flag=args.num_parts_flag)
    outputs.claim_output(args.output, args.overwrite, "precompute", outputs.feature_cache)
    return run_precompute(config, data=args.data, output=args.output, part_index=part_index,
                          num_parts=num_parts, limit=args.limit)


def _info(config, args):
    from eaglecache.precompute.cache_tools import run_info

    return run_info(take_positional(args, "cache", "--cache"))


def _verify(config, args):
    from eaglecache.precompute.cache_tools import run_verify

    return run_verify(take_positional(args, "cache", "--cache"), repair=args.repair)


def _convert(config, args):
    from eaglecache.precompute.convert import run_convert

    outputs.claim_output(args.output, args.overwrite, "cache convert", lambda path: False)  # never onto a cache unasked
    return run_convert(config, cache=take_positional(args, "cache", "--cache"), output=args.output)


def _plan(config, args):
    from eaglecache.precompute.plan import run_plan

    return run_plan(config, data=args.data, num_samples=args.num_samples, mean_tokens=args.mean_tokens,
                    hidden_size=args.hidden_size, num_layers=args.num_layers,
                    precompute_tokens_per_s=args.precompute_tokens_per_s,
                    train_tokens_per_s=args.train_tokens_per_s, cache=args.cache, output=args.output)


def _add_cache_arg(parser) -> None:
    add_flag(parser, "--cache", metavar="DIR", default=None,
             help="Cache directory, or a URL such as s3://bucket/prefix.")
    add_positional_alias(parser, "cache")  # `cache info DIR` of earlier releases


def register(subparsers) -> None:
    p = add_command(subparsers, "precompute", _precompute,
                    "Run the target in vLLM over a prepared data set and write its hidden states to a Zarr cache.")
    add_flag(p, "--data", aliases=("--input",), required=True, metavar="DIR",
             help="Prepared data set (eaglecache data prepare).")
    p.add_argument("--output", required=True, metavar="DIR", help="Cache directory (shared by all part jobs).")
    add_flag(p, "--part-index", aliases=("--shard-index",), type=int, default=None, metavar="I",
             help="This job's part, 0..num_parts-1 (overrides precompute.part_index).")
    add_flag(p, "--num-parts", aliases=("--num-shards",), type=int, default=None, metavar="N",
             help="Number of independent jobs splitting the data set, one part each "
                  "(overrides precompute.num_parts).")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="Only the first N samples (smoke tests).")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace --output when it is not a feature cache (it is removed first); a cache, "
                        "this job's part included, is resumed as without it. In a job array remove such a "
                        "directory before submitting instead: every task would remove it.")

    cache = subparsers.add_parser("cache", help="Inspect and check a feature cache.")
    sub = cache.add_subparsers(dest="cache_command", metavar="COMMAND", required=True)
    p = add_command(sub, "info", _info, "Print what a cache holds: samples, tokens, layers, codec, provenance.")
    _add_cache_arg(p)
    p = add_command(sub, "verify", _verify,
                    "Re-read every shard: shapes, write-time checksums, no NaN/Inf. Exits non-zero on damage.")
    _add_cache_arg(p)
    p.add_argument("--repair", action="store_true",
                   help="Re-queue damaged samples for the next precompute run (local caches only).")
    p = add_command(sub, "convert", _convert,
                    "Rewrite a cache in this release's format (v2), or with the codec, level and chunk size of "
                    "precompute.codec / codec_level / chunk_tokens, without the target: the same bits, verified.")
    _add_cache_arg(p)
    p.add_argument("--output", required=True, metavar="DIR",
                   help="The new cache (must not exist; written under DIR.converting, renamed when verified).")
    outputs.add_overwrite_flag(p)

    p = add_command(subparsers, "plan", _plan,
                    "Storage and bandwidth plan of a cache: tokens, bytes per codec, shards, write/read rates.")
    add_flag(p, "--data", aliases=("--dataset",), metavar="DIR", default=None,
             help="Prepared data set (exact token count).")
    p.add_argument("--num-samples", type=int, default=None, metavar="N", help="Samples, without --data.")
    p.add_argument("--mean-tokens", type=float, default=None, metavar="M", help="Mean tokens per sample.")
    p.add_argument("--hidden-size", type=int, default=None, help="Target hidden size (default: target config).")
    p.add_argument("--num-layers", type=int, default=None, help="Target decoder layers (default: target config).")
    p.add_argument("--precompute-tokens-per-s", type=float, default=50_000.0, metavar="R",
                   help="Precompute throughput the write rate is computed for (all jobs together).")
    p.add_argument("--train-tokens-per-s", type=float, default=100_000.0, metavar="R",
                   help="Training throughput the read rate is computed for (all ranks together).")
    p.add_argument("--cache", metavar="DIR", default=None, help="Existing cache to measure the codec ratio on.")
    p.add_argument("--output", metavar="DIR", default=None, help="Planned cache path: warn if it will not fit.")
