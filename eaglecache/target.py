"""Which target a run uses, and the hashes that record it in every artifact.

``resolve_target(config)`` returns an HF-format directory: ``config.target.path`` when set,
else the embedded tiny target (built once and cached, see ``eaglecache.tiny_target.build``).

Hashes (hex sha256):
- ``weights_hash``: for checkpoints up to ``FULL_HASH_LIMIT`` bytes of safetensors, the hash of
  every ``*.safetensors`` file's name and content. Larger checkpoints (MiniMax-M3 is hundreds
  of GB) hash, per file, its name, size and first and last MiB, plus the index JSON; that is
  fast and still changes whenever a shard is replaced, grown or re-exported.
- ``tokenizer_hash``: tokenizer.json, tokenizer_config.json and special_tokens_map.json.
- ``chat_template_hash``: the template text (chat_template.jinja, else tokenizer_config.json's).

Reading: ``target_config`` (the text model's config, also inside a VL config's ``text_config``),
``weight_files`` (tensor name -> safetensors file, from ``model.safetensors.index.json`` when the
checkpoint is sharded) and ``read_tensors`` / ``read_head_tensors``, which open only the files
holding the named tensors and read only those (MiniMax-M3 is hundreds of GB; its embedding, norm
and LM head, under ``language_model.``, about 5 GB).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from typing import TYPE_CHECKING

from eaglecache.errors import UserError

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
# Names of the text model's head tensors, tried in order under target.weights_prefix.
HEAD_TENSOR_NAMES = {
    "embed": ("model.embed_tokens.weight", "embed_tokens.weight", "model.language_model.embed_tokens.weight"),
    "norm": ("model.norm.weight", "norm.weight", "model.language_model.norm.weight"),
    "lm_head": ("lm_head.weight",),
}
FULL_HASH_LIMIT = 4 << 30  # bytes; above this, weights_hash samples each file (see module doc)
_SAMPLE = 1 << 20  # bytes hashed at each end of a file in sampled mode


def resolve_target(config) -> Path:
    """The target directory a run uses (config.target.path, else the built tiny target)."""
    if config.target.path:
        path = Path(config.target.path).expanduser()
        if not path.is_dir():
            raise UserError(f"target.path {path}: not a directory")
        if not (path / "config.json").is_file():
            raise UserError(f"target.path {path}: no config.json (expected an HF-format model directory)")
        return path
    from eaglecache.tiny_target.build import ensure_tiny_target

    return ensure_tiny_target()


def target_config(path: str | Path) -> dict:
    """The target's config.json; for a VL model, the text model's config (``text_config``)."""
    config = json.loads((Path(path) / "config.json").read_text())
    return config.get("text_config", config) if "num_hidden_layers" not in config else config


def weight_files(path: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file: the index's weight map when sharded, else the files' own keys."""
    path = Path(path)
    indexes = [path / INDEX_FILE] if (path / INDEX_FILE).is_file() else sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise UserError(f"{indexes[0]}: not a safetensors index ({exc.__class__.__name__})") from None
        return {name: path / file for name, file in weight_map.items()}
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            files.update(dict.fromkeys(handle.keys(), file))
    if not files:
        raise UserError(f"target {path}: no *.safetensors weights")
    return files


def read_tensors(path: str | Path, names: list[str], files: dict[str, Path] | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of a checkpoint, each file opened once, no other tensor read."""
    from safetensors import safe_open

    files = weight_files(path) if files is None else files
    missing = [name for name in names if name not in files]
    if missing:
        raise UserError(f"target {path}: no tensor {', '.join(map(repr, missing))} in its safetensors")
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in file_names})
    return out


def read_head_tensors(path: str | Path, weights_prefix: str = "",
                      which: tuple[str, ...] = ("embed", "norm", "lm_head")) -> dict[str, torch.Tensor | None]:
    """The text model's ``embed``/``norm``/``lm_head`` (keys of HEAD_TENSOR_NAMES) found under
    ``weights_prefix``; a missing ``lm_head`` is None (tied embeddings), the others are an error."""
    files = weight_files(path)
    found: dict[str, str | None] = {}
    for key in which:
        candidates = [weights_prefix + name for name in HEAD_TENSOR_NAMES[key]]
        found[key] = next((name for name in candidates if name in files), None)
        if found[key] is None and key != "lm_head":
            raise UserError(f"target {path}: no {key} tensor (tried {', '.join(candidates)}); "
                            "check target.weights_prefix")
    tensors = read_tensors(path, [name for name in found.values() if name], files)
    return {key: tensors[name] if name else None for key, name in found.items()}


def target_layer_count(path: str | Path) -> int:
    return int(target_config(path)["num_hidden_layers"])


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """vLLM's default EAGLE3 aux layers (2, L//2, L-3); they must be distinct, hence L >= 7."""
    ids = [2, num_layers // 2, num_layers - 3]
    if len(set(ids)) != 3:
        raise UserError(f"a target with {num_layers} layers has colliding default aux layer ids {ids}")
    return ids


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_hash(path: str | Path) -> str:
    """Hash of the checkpoint's safetensors files: full content when small, sampled when huge."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path}: no *.safetensors files")
    sampled = sum(f.stat().st_size for f in files) > FULL_HASH_LIMIT
    digest = hashlib.sha256(b"sampled" if sampled else b"full")
    for index in sorted(path.glob("*.safetensors.index.json")):
        digest.update(index.name.encode() + index.read_bytes())
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}".encode())
        if not sampled:
            digest.update(file_sha256(f).encode())
            continue
        with open(f, "rb") as handle:
            digest.update(handle.read(_SAMPLE))
            handle.seek(max(size - _SAMPLE, 0))
            digest.update(handle.read(_SAMPLE))
    return digest.hexdigest()


def tokenizer_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        f = Path(path) / name
        if f.is_file():
            digest.update(name.encode() + f.read_bytes())
    return digest.hexdigest()


def chat_template_text(path: str | Path) -> str | None:
    """The chat template as the tokenizer will load it, or None when there is none."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    config_path = path / "tokenizer_config.json"
    if config_path.is_file():
        template = json.loads(config_path.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def chat_template_hash(path: str | Path) -> str:
    return hashlib.sha256((chat_template_text(path) or "").encode()).hexdigest()
