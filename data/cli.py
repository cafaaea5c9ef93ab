"""``eaglecache data prepare|regenerate|vocab``: the data stage's commands. Only this module sees the parsed
arguments; it calls the typed stage functions."""

from eaglecache import outputs
from eaglecache.cli import add_command
from eaglecache.flags import add_flag


def _prepare(config, args):
    from eaglecache.data.prepare import run_prepare

    outputs.claim_output(args.output, args.overwrite, "data prepare", outputs.prepared_dataset)
    return run_prepare(config, inputs=args.input, output=args.output)


def _regenerate(config, args):
    from eaglecache.data.regenerate import run_regenerate

    outputs.claim_output(args.output, args.overwrite, "data regenerate", outputs.regenerated_file, kind="file")
    return run_regenerate(config, conversations=args.input, output=args.output, limit=args.limit)


def _vocab(config, args):
    from eaglecache.data.vocab import run_vocab

    outputs.claim_output(args.output, args.overwrite, "data vocab", outputs.vocab_file, kind="file")
    return run_vocab(config, data=args.data, output=args.output)


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="Prepare conversations: tokenize and mask, regenerate, draft vocab.")
    sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    p = add_command(sub, "prepare", _prepare,
                    "Tokenize conversations with the target's chat template into a loss-masked Parquet set.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="ShareGPT JSON, messages JSONL or Parquet files.")
    p.add_argument("--output", required=True, metavar="DIR", help="Parquet dataset directory to write.")
    outputs.add_overwrite_flag(p)
    p = add_command(sub, "regenerate", _regenerate,
                    "Replace every assistant turn with the target's own answer (vLLM), turn by turn.")
    p.add_argument("--input", required=True, metavar="PATH", help="Conversations (any format prepare reads).")
    p.add_argument("--output", required=True, metavar="PATH", help="Messages JSONL file to write.")
    outputs.add_overwrite_flag(p)
    p.add_argument("--limit", type=int, default=None, metavar="N", help="Regenerate only the first N conversations.")
    p = add_command(sub, "vocab", _vocab,
                    "Build the reduced draft vocabulary (d2t/t2d) from loss-masked token frequencies.")
    add_flag(p, "--data", aliases=("--input",), required=True, metavar="DIR",
             help="Prepared data set (eaglecache data prepare).")
    p.add_argument("--output", required=True, metavar="PATH", help="Vocab mapping file (.safetensors) to write.")
    outputs.add_overwrite_flag(p)
