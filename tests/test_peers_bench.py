"""benchmarks/peers.py end to end at a tiny size: the peers' own generation path, readers and training steps
still run here.

Skipped, with the reason, when the peers are not installed (they are the ``peers`` extra, installed
--no-deps); a peer upgrade that breaks an adapter fails this test.
"""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peer_adapters  # noqa: E402

MISSING = [name for name, version in peer_adapters.peer_versions().items() if version is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"peers not installed: {', '.join(MISSING)} (pip install --no-deps "
                       "speculators==0.9.0 hs-connectors==0.9.0 specforge==0.2.0 && pip install datasets)"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def _rate(line: str) -> float:
    return float(re.search(r"(?:warm|cold)\s+(\d+)", line).group(1))


def test_peers_benchmark_prints_every_reader_and_model_at_a_tiny_size(tmp_path, capsys):
    import peers

    assert peers.main(["--samples", "12", "--mean-tokens", "24", "--hidden", "32", "--ours", "zstd:16,none:16",
                       "--warm-only", "--repeat", "1", "--workdir", str(tmp_path), "--train-steps", "1", "--train-seq", "32",
                       "--train-hidden", "64", "--train-dtypes", "float32", "--skip-generation", "--skip-fp8"]) == 0
    out = capsys.readouterr().out
    reads = [line for line in out.splitlines() if " warm " in line]
    for reader in ("eaglecache FeatureCache.read, zstd, chunk_tokens 16", "eaglecache FeatureCache.read, none",
                   "previous read path (zarr arrays)", "speculators FileTransfer", "specforge load_feature_file",
                   "sequential read"):
        rows = [line for line in reads if reader in line]
        assert rows and all(_rate(line) > 0 for line in rows), (reader, out)
    assert "speculators 0.9.0" in out and "specforge 0.2.0" in out
    train = [line for line in out.splitlines() if "float32" in line and "matmul peak" in line]
    assert len(train) == 3, out  # ours and both peers
    for line in train:
        tokens_per_s, mfu = re.search(r"float32\s+[\d.]+\s+([\d.]+)\s+([\d.]+)%", line).groups()
        assert float(tokens_per_s) > 0 and float(mfu) > 0, line


def _generation_row(out: str, system: str, fp8: bool) -> list[float]:
    """tokens/s, wall s, bytes/token, files per 1,000 samples of one row of table (1)."""
    rows = [line for line in out.splitlines() if line.strip().startswith(system)
            and (("fp8" in line.lower()) == fp8) and "files/1k" not in line]
    assert len(rows) == 1, (system, fp8, out)
    return [float(x) for x in re.search(r"\s(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)  ", rows[0]).groups()]


def test_peers_generation_row_runs_ours_and_speculators_through_vllm_at_a_tiny_size(tmp_path, capsys):
    """Four vLLM engines (ours and the peer's server, lossless and FP8) on 8 samples: a few minutes."""
    import peers

    assert peers.main(["--gen-samples", "8", "--gen-max-seq", "128", "--skip-reads", "--skip-train",
                       "--skip-fp8", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "speculators 0.9.0, hs-connectors 0.9.0" in out
    ours = {fp8: _generation_row(out, "eaglecache precompute", fp8) for fp8 in (False, True)}
    theirs = {fp8: _generation_row(out, "speculators generate-offline-data", fp8) for fp8 in (False, True)}
    for tokens_per_s, wall_s, bytes_per_token, files_per_1000 in [*ours.values(), *theirs.values()]:
        assert tokens_per_s > 0 and wall_s > 0 and bytes_per_token > 0, out
    assert theirs[False][3] == theirs[True][3] == 1000.0, out  # one file per sample
    # 3 aux + final layers of hidden 256 in the dtype the target computed in (speculators stores it as it
    # is: 2 KiB a token in bf16, 4 KiB in float32 where bf16 is not native), FP8 one byte a value plus a scale
    width = {"bfloat16": 2, "float32": 4}[re.search(r"\(compute (\w+)\)", out).group(1)]
    assert 4 * 256 * width <= theirs[False][2] < 4 * 256 * width + 200, out
    assert 4 * 256 <= theirs[True][2] < theirs[False][2] * 0.6, out
    assert ours[True][2] < ours[False][2], out
