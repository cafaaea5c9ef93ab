"""Config of the train stage: draft architecture, TTT, optimizer, DeepSpeed, loader, logging."""

from typing import Any, ClassVar, Literal, Optional

from pydantic import Field, field_validator, model_validator

from eaglecache.formats.draft import resolve_aux_norm
from eaglecache.section import Section, strictly_ascending


# the deepest TTT unroll a run may ask for: metrics and the ablation report name positions 0..63
MAX_TTT_LENGTH = 64
SEQUENTIAL_TTT_LENGTH = 7  # the TTT depth of the EAGLE3 recipes (train.ttt_length null, sequential families)
PARALLEL_FAMILIES = ("peagle", "dflash")  # their slots 1.. read a constant input: train what is served


class DraftConfig(Section):
    family: Literal["eagle3", "eagle3.1", "peagle", "dflash"] = Field(
        "eagle3", description="Draft family: eagle3; eagle3.1 (aux states normalized before fc, the post-norm "
        "state carried to the next step); peagle (P-EAGLE: steps after the first drafted in one parallel pass "
        "from a learned mask state); the three are vLLM's LlamaForCausalLMEagle3. dflash (a block of ttt_length "
        "mask tokens drafted in one pass by num_layers Qwen3 layers over the target's context states; vLLM's "
        "DFlashDraftModel)."
    )
    num_layers: int = Field(
        1, ge=1, description="Decoder layers of the draft. EAGLE families: the midlayer, then plain Llama layers "
        "(vLLM's layers.1..); dflash: Qwen3 layers. vLLM 0.32's CPU build serves a multi-layer DFlash draft "
        "wrongly (every layer gets layer 0's k_norm): on CPU keep DFlash at 1."
    )
    aux_norm: Optional[Literal["none", "joint", "per_layer"]] = Field(
        None, description="RMSNorm of the aux states before fc: per_layer (one per aux layer, vLLM's fc_norm: EAGLE "
        "3.1's paper), joint (one over their concatenation, vLLM's norm_before_fc, gpt-oss style; eagle3.1 only) or "
        "none. null: the family's own (eagle3.1 per_layer, the others none); peagle may set per_layer; eagle3 and "
        "dflash have none. Earlier releases wrote joint into every resolved config: for a family other than "
        "eagle3.1 it is read as null."
    )
    mask_token_id: Optional[int] = Field(
        None, ge=0, description="peagle and dflash: token id of the parallel slots; null: for peagle the target's "
        "pad token, else its end-of-sequence token, else 0; for dflash the first of its mask, bos, eos and pad tokens "
        "whose embedding row is not zero (dflash refuses a zero row: docs/draft-families.md)."
    )
    intermediate_size: Optional[int] = Field(None, ge=1, description="Draft MLP width; null uses the target's.")
    num_attention_heads: Optional[int] = Field(None, ge=1, description="Draft heads; null uses the target's.")
    num_key_value_heads: Optional[int] = Field(None, ge=1, description="Draft KV heads; null uses the target's.")
    aux_layer_ids: Optional[list[int]] = Field(
        None, description="Aux layers feeding the draft (a subset of the cache's); null uses all the cache stores "
        "(Config.draft_aux_layer_ids resolves it; train refuses ids the cache lacks before starting)."
    )

    _aux_order = field_validator("aux_layer_ids")(strictly_ascending)

    # the draft families came after the first release: an EAGLE3 run of that release keeps its fingerprint
    IDENTITY_WHEN_SET: ClassVar[tuple[str, ...]] = ("family", "aux_norm", "mask_token_id", "num_layers")

    def identity(self, drop: tuple[str, ...] = ()) -> dict[str, Any]:
        """As every section's, with ``aux_norm`` entered as the family resolves it, except where it equals what
        the release before gave by default (eagle3.1: joint, the others: none), so that those runs keep their
        fingerprints while an eagle3.1 run of today's default (per_layer) gets another one."""
        out = super().identity(drop)
        out.pop("aux_norm", None)
        if "aux_norm" not in drop:
            resolved = resolve_aux_norm(self.family, self.aux_norm)
            if resolved != ("joint" if self.family == "eagle3.1" else "none"):
                out["aux_norm"] = resolved
        return out

    @model_validator(mode="before")
    @classmethod
    def _legacy_joint(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("aux_norm") == "joint" and data.get("family", "eagle3") != "eagle3.1":
            data = {**data, "aux_norm": None}  # what earlier releases wrote by default, and ignored, for them
        return data

    @model_validator(mode="after")
    def _aux_norm_fits_the_family(self):
        resolve_aux_norm(self.family, self.aux_norm)  # ValueError: one config error line
        return self


class LauncherConfig(Section):
    num_gpus: int = Field(2, ge=1, description="Processes per node (GPUs, or CPU ranks with DS_ACCELERATOR=cpu).")
    num_nodes: int = Field(1, ge=1, description="Nodes; >1 needs a hostfile.")
    hostfile: Optional[str] = Field(None, description="DeepSpeed hostfile for multi-node runs.")
    master_port: Optional[int] = Field(
        None, ge=1, le=65535,
        description="Rendezvous port; null: a free port on one node (so runs side by side never collide), 29500 on several.",
    )
    collective_timeout_s: int = Field(
        600, ge=10, description="Seconds a rank waits in one collective before it gives up with an error naming the "
        "lost peer (a node lost mid-run); torch's default is 30 min. Long enough for the slowest checkpoint save.",
    )


class TrainConfig(Section):
    source: Literal["cache", "online"] = Field(
        "cache", description="Read features from the Zarr cache, or compute them live with the target."
    )
    ttt_length: Optional[int] = Field(
        None, ge=1, le=MAX_TTT_LENGTH, description=f"TTT depth: draft steps unrolled per position in training "
        f"(1..{MAX_TTT_LENGTH}). null: 7 for the sequential families (eagle3, eagle3.1); for the parallel ones "
        "(peagle, dflash) as many slots as vLLM serves, serve.num_speculative_tokens (a DFlash block is that + 1).")
    ttt_decay: float = Field(0.8, gt=0.0, description="Weight of TTT step k is ttt_decay**k.")
    lr: float = Field(1e-4, gt=0.0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    warmup_ratio: float = Field(0.02, ge=0.0, lt=1.0, description="Fraction of steps of linear warmup.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine floor as a fraction of lr.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="Training precision; auto: bfloat16 on CUDA; on a CPU with native bf16 the faster of the two "
        "in a short matmul probe (cached per CPU model; eaglecache/dtypes.py), float32 on other CPUs.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward.")
    global_batch_size: int = Field(32, ge=1, description="Sequences per optimizer step, over all ranks.")
    micro_batch_size: int = Field(1, ge=1, description="Sequences per rank per forward.")
    epochs: float = Field(1.0, gt=0.0, description="Passes over the cache.")
    max_steps: Optional[int] = Field(
        None, ge=1, description="Stop after this many optimizer steps; set with epochs, the run stops at whichever "
        "ends first (max_steps caps the epochs, it never extends them).")
    max_seq_length: Optional[int] = Field(
        None, ge=8, description="Tokens per sample, longer ones truncated (each micro-batch is padded to its longest "
        "sample); null uses data.max_seq_length (Config.train_max_seq_length resolves it).")
    loss_chunk_tokens: int = Field(2048, ge=1, description="Positions per chunk of the LM-head loss.")
    attention: Literal["auto", "reference", "split", "flex"] = Field(
        "auto", description="TTT attention kernel: auto = split (CPU flash kernel) on CPU, flex on CUDA; "
        "reference = masked SDPA (slow, for checks).")
    seed: int = Field(0, description="Seed of weights init, data order and dropout.")
    checkpoint_interval: int = Field(1000, ge=1, description="Optimizer steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    log_interval: int = Field(10, ge=1, description="Optimizer steps between metric logs.")
    loader_workers: int = Field(2, ge=0, description="Background threads reading and decoding the cache.")
    prefetch: int = Field(4, ge=1, description="Batches read ahead of the step.")
    subset_fraction: float = Field(1.0, gt=0.0, le=1.0, description="Deterministic fraction of samples to train on.")
    lk_loss: Optional[Literal["alpha", "lambda"]] = Field(
        None, description="LK loss (arXiv 2602.23881) in place of the soft cross-entropy: alpha = -log(acceptance), "
        "lambda = exp(-lk_eta*sg(acceptance)) * KL + (1 - that) * TV per position (speculators' lk_hybrid); "
        "acceptance = sum_v min(p_v, q_v). null: soft cross-entropy (docs/loss.md).")
    lk_eta: float = Field(3.0, ge=0.0, description="lk_loss=lambda only: eta of the KL weight exp(-eta * acceptance), "
                          "unitless (3: speculators' default, SpecForge's original --kl-decay).")
    hidden_noise: float = Field(
        0.0, ge=0.0, description="Half-width of uniform noise U(-x, x) added in training (never in evaluation) to "
        "every aux state before fc, absolute, in the target's hidden-state units: speculators' --noise-std (a "
        "half-width despite its name; its default 0.05). 0: none.")
    loss_mask_alignment: Literal["anchor", "predicted"] = Field(
        "predicted", description="Which loss-mask position weights TTT step k's prediction of raw token t+k+2: "
        "predicted = mask[t+k+2], the predicted token's own (won every comparison here: docs/loss.md); anchor = "
        "mask[t+k] (EAGLE3's reference, SpecForge, and this trainer before; a run of then reads as anchor).")
    draft: DraftConfig = Field(default_factory=DraftConfig)
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)

    @model_validator(mode="after")
    def _whole_micro_batches(self):
        # the ranks' micro-batches must add up to the global batch for some number of ranks
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        return self

    # how the run is launched, logged, read and saved: none of these changes a trained weight
    RUNTIME_ONLY: ClassVar[tuple[str, ...]] = ("launcher", "log_interval", "checkpoint_interval",
                                               "keep_checkpoints", "loader_workers", "prefetch")
    # the loss knobs came after the first release: a run that leaves them at their defaults keeps its fingerprint
    IDENTITY_WHEN_SET: ClassVar[tuple[str, ...]] = ("lk_loss", "lk_eta", "hidden_noise")

    def identity(self, drop: tuple[str, ...] = ()) -> dict[str, Any]:
        """As every section's, with ``loss_mask_alignment`` entered only when predicted: anchor was the only
        alignment of earlier releases, so their runs keep their fingerprints, and today's default gets another."""
        out = super().identity(drop)
        if out.get("loss_mask_alignment") == "anchor":
            del out["loss_mask_alignment"]
        return out
