"""`eaglecache plan` on the seed's numbers prints figures that can be checked by hand."""

from pathlib import Path

from eaglecache.cli import main

REPO = Path(__file__).resolve().parent.parent
SEED = ["--config", str(REPO / "configs/minimax_m3/config.yaml"), "--num-samples", "456881",
        "--mean-tokens", "4096", "--hidden-size", "6144", "--num-layers", "60"]


def _row(out: str, key: str) -> list[str]:
    return next(line for line in out.splitlines() if line.startswith(key)).split()


def test_plan_on_the_seed_numbers(capsys, tmp_path):
    assert main(["plan", *SEED, "--precompute-tokens-per-s", "100000", "--train-tokens-per-s", "200000"]) == 0
    out = capsys.readouterr().out
    num_tokens = 456881 * 4096
    bytes_per_token = 4 + 1 + 2 * 4 * 6144  # id, mask, 3 aux + final layer in bf16
    assert _row(out, "tokens")[1] == f"{num_tokens:,}"
    assert _row(out, "bytes per token")[4] == f"{bytes_per_token:,}"
    assert _row(out, "raw size")[2] == f"{num_tokens * bytes_per_token / 1e12:,.3f}"
    assert _row(out, "shards")[1] == f"{-(-num_tokens // 20000):,}"
    none = _row(out, "none")
    assert none[2] == f"{num_tokens * bytes_per_token / 1e12:,.3f}"
    assert none[3] == f"{100000 * bytes_per_token / 1e9:.3f}"  # write GB/s
    assert none[4] == f"{200000 * bytes_per_token / 1e9:.3f}"  # read GB/s
    zstd = _row(out, "zstd")
    assert zstd[2] == f"{num_tokens * bytes_per_token / 1.28 / 1e12:,.3f}"


def test_plan_fp8_halves_the_state_bytes(capsys):
    assert main(["plan", *SEED, "precompute.fp8=true"]) == 0
    out = capsys.readouterr().out
    assert _row(out, "bytes per token")[4] == f"{4 + 1 + 4 * 6144 + 4 * 4:,}"


def test_plan_warns_when_the_cache_will_not_fit(capsys, tmp_path):
    assert main(["plan", *SEED, "--output", str(tmp_path / "cache")]) == 0
    assert "warning: the cache needs" in capsys.readouterr().out


def test_plan_without_sizes_is_a_clear_error(capsys):
    assert main(["plan", "--hidden-size", "8", "--num-layers", "8"]) == 2
    assert "--num-samples" in capsys.readouterr().err


def test_plan_measures_the_codec_ratio_on_a_real_cache(capsys, tiny_cache):
    from eaglecache.formats.cache_reader import open_cache

    assert main(["plan", "--num-samples", "1000", "--mean-tokens", "100", "--cache", str(tiny_cache)]) == 0
    out = capsys.readouterr().out
    cache = open_cache(tiny_cache)
    meta = cache.metadata
    raw = 4 + 1 + 2 * (len(meta["aux_layer_ids"]) + 1) * meta["hidden_size"]
    on_disk = sum(f.stat().st_size for f in tiny_cache.glob("parts/*/shard-*.zarr/**/*") if f.is_file())
    row = _row(out, meta["codec"])
    assert row[-1] == "(measured)" and _row(out, "none")[-1] == "(nominal)"
    assert float(row[1]) == round(raw * cache.total_tokens / on_disk, 2)
    assert float(row[1]) > 1.0  # zstd does compress the states
