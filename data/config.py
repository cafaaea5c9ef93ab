"""Config of the data stage: reading conversations, templating, regeneration, draft vocab."""

from typing import Literal, Optional

from pydantic import Field

from eaglecache.section import Section


class RegenerateConfig(Section):
    tensor_parallel_size: Optional[int] = Field(None, ge=1, description="vLLM tensor parallel size for regeneration; null uses target.tensor_parallel_size.")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling cut-off (ignored when greedy).")
    max_new_tokens: int = Field(256, ge=1, description="Token limit of each regenerated assistant turn.")
    seed: int = Field(0, description="Sampling seed, so sampled regeneration is reproducible.")
    batch_size: int = Field(256, ge=1, description="Conversations sent to vLLM per generate call.")


class DataConfig(Section):
    max_seq_length: int = Field(2048, ge=8, description="Token limit of one training sample.")
    long_policy: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with a conversation longer than max_seq_length."
    )
    min_loss_tokens: int = Field(1, ge=1, description="Drop samples with fewer loss-masked tokens than this.")
    system_prompt: Optional[str] = Field(None, description="System message prepended to every conversation.")
    draft_vocab_size: Optional[int] = Field(
        None, ge=1, description="Reduced draft vocabulary size; null keeps the full target vocab (shared LM head)."
    )
    regenerate: RegenerateConfig = Field(default_factory=RegenerateConfig)
