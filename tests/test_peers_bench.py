"""benchmarks/peers.py end to end at a tiny size: the peers' own readers and training steps still run here.

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
                       "--train-hidden", "64", "--train-dtypes", "float32"]) == 0
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
    assert "(1) feature generation" in out  # what is not measured is said
