"""The build spec of the embedded tiny target: every number that decides what gets built.

The cache directory name hashes this spec together with everything else the build depends on: the
source files of ``eaglecache/tiny_target/``, the ShareGPT file it trains on and the versions of torch,
tokenizers and transformers. Changing any of them rebuilds instead of reusing a stale target.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from importlib import metadata
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")  # ids 0..3, in this order
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
DOC_SEPARATOR = "<|endoftext|>"  # between packed conversations in pretraining


@dataclasses.dataclass(frozen=True)
class TinyTargetSpec:
    seed: int = 0
    # Tokenizer: byte-level BPE trained on training-split ShareGPT text.
    vocab_size: int = 4096
    tokenizer_train_chars: int = 24_000_000  # characters of ShareGPT text the BPE trainer sees
    # Model: a Llama whose layer count and head size vLLM (CPU) accepts with distinct default aux ids.
    hidden_size: int = 256
    num_hidden_layers: int = 8
    num_attention_heads: int = 4  # head size 64
    num_key_value_heads: int = 2
    intermediate_size: int = 768
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # Data split: a conversation is held out when sha256(id) mod 1000 < heldout_per_mille.
    heldout_per_mille: int = 20
    # Pretraining (CPU, float32, AdamW, linear warmup then cosine to lr_min): 491,520 tokens, what
    # 2 cores of an AVX2-only CPU get through in about 9 minutes (4-5 s per 4,096 tokens there).
    # For that budget many small steps learn most: held-out loss below unigram by 0.88 nats at
    # 480 x 2 sequences, 0.83 at 240 x 4, 0.59 at 120 x 8 (lr 3e-3; 6e-3 did worse).
    seq_len: int = 512
    batch_size: int = 2  # sequences per step
    steps: int = 480
    lr: float = 3e-3
    lr_min: float = 3e-4
    warmup_steps: int = 24
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_sequences: int = 16  # held-out sequences of seq_len for the loss report
    num_threads: int = 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def source_hash() -> str:
    """sha256 over this package's source files, so a code change gives a new cache key."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def inputs_identity() -> dict:
    """What the build reads besides its spec and code: the corpus file's hash and the libraries whose
    numerics or tokenization decide the bytes written."""
    from eaglecache.target import file_sha256
    from eaglecache.tiny_target.corpus import corpus_file

    return {"sharegpt_sha256": file_sha256(corpus_file()),
            **{name: metadata.version(name) for name in ("torch", "tokenizers", "transformers")}}


def build_key(spec: TinyTargetSpec) -> str:
    """Short hash naming the cached build: the spec, the code that builds it and its inputs."""
    payload = json.dumps({"spec": spec.to_dict(), "code": source_hash(), "inputs": inputs_identity()},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
