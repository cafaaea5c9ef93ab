"""Renamed flags and config keys: the new names work, the old ones still do with exactly one deprecation line."""

import pytest

from eaglecache.cli import _collect_overrides, build_parser, main
from eaglecache.config import load_config
from eaglecache.errors import UserError


def _parse(argv):
    args = build_parser().parse_args(argv)
    _collect_overrides(args)
    return args


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def test_old_precompute_flags_mean_the_new_ones_with_one_line_each(capsys):
    new = _parse(["precompute", "--data", "D", "--output", "O", "--part-index", "1", "--num-parts", "2"])
    assert _warnings(capsys.readouterr().err) == []
    old = _parse(["precompute", "--input", "D", "--output", "O", "--shard-index", "1", "--num-shards", "2"])
    lines = _warnings(capsys.readouterr().err)
    assert (old.data, old.part_index, old.num_parts) == (new.data, new.part_index, new.num_parts) == ("D", 1, 2)
    assert len(lines) == 3 and all("is deprecated, use --" in line for line in lines)
    assert "--shard-index is deprecated, use --part-index" in lines[1]


def test_an_old_and_a_new_spelling_of_one_flag_are_refused_together(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["precompute", "--data", "D", "--input", "E", "--output", "O"])
    assert exc.value.code == 2 and "not allowed with argument --data" in capsys.readouterr().err


def test_the_range_error_names_the_flags_as_typed(tmp_path, capsys):
    out = str(tmp_path / "c")
    assert main(["precompute", "--data", str(tmp_path), "--output", out, "--part-index", "2", "--num-parts", "2"]) == 2
    assert capsys.readouterr().err.strip() == "error: --part-index 2 must be in 0..1 (--num-parts 2)"
    assert main(["precompute", "--data", str(tmp_path), "--output", out, "--shard-index", "2", "--num-shards", "2"]) == 2
    assert "error: --shard-index 2 must be in 0..1 (--num-shards 2)" in capsys.readouterr().err


def test_plan_and_vocab_take_data(capsys):
    assert _parse(["plan", "--data", "D"]).data == "D" and _warnings(capsys.readouterr().err) == []
    assert _parse(["plan", "--dataset", "D"]).data == "D"
    assert _parse(["data", "vocab", "--input", "D", "--output", "V"]).data == "D"
    assert len(_warnings(capsys.readouterr().err)) == 2


@pytest.mark.parametrize("command", ["info", "verify"])
def test_cache_commands_take_cache_or_the_old_positional(command, tmp_path, capsys):
    missing = str(tmp_path / "no-cache")
    assert main(["cache", command, "--cache", missing]) == 2
    new_err = capsys.readouterr().err.strip().splitlines()
    assert main(["cache", command, missing, "precompute.codec=none"]) == 2  # an override after it stays one
    old_err = capsys.readouterr().err.strip().splitlines()
    assert len(new_err) == 1 and new_err[0].startswith(f"error: {missing}")
    assert old_err[1:] == new_err and _warnings(old_err[0]) == [old_err[0]]
    assert main(["cache", command]) == 2
    assert capsys.readouterr().err.strip() == "error: the following argument is required: --cache"


def test_old_config_keys_are_read_with_one_line_each(capsys):
    config = load_config(None, ["precompute.num_shards=4", "precompute.shard_index=3"])
    assert (config.precompute.num_parts, config.precompute.part_index) == (4, 3)
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 2 and "precompute.num_shards is deprecated, use precompute.num_parts" in lines[0]
    # runtime-only either way: the cache's recorded config is the same as with the new keys
    assert config.identity("precompute") == load_config(None, ["precompute.num_parts=4"]).identity("precompute")
    with pytest.raises(UserError, match="same setting"):
        load_config(None, ["precompute.num_shards=4", "precompute.num_parts=4"])
