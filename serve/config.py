"""Config of the serve stage: speculative decoding settings, the benchmark, the server."""

from typing import Optional

from pydantic import Field

from eaglecache.section import Section


class DemoConfig(Section):
    num_conversations: int = Field(
        2000, ge=1, description="ShareGPT training-split conversations (first exchange) the demo regenerates and trains on."
    )


class ServeConfig(Section):
    num_speculative_tokens: int = Field(3, ge=1, description="Draft tokens proposed per target step.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel size when serving/benchmarking.")
    gpu_memory_utilization: float = Field(
        0.2, gt=0.0, le=1.0, description="vLLM memory fraction (of host RAM on CPU builds)."
    )
    kv_cache_gib: Optional[float] = Field(
        None, gt=0.0, description="KV cache size in GiB; set, it replaces gpu_memory_utilization (exact on CPU, where the fraction is of a NUMA node's RAM)."
    )
    enforce_eager: Optional[bool] = Field(
        None, description="vLLM eager mode; null: eager on CPU (graph compilation there takes minutes), graphs on GPU."
    )
    max_new_tokens: int = Field(256, ge=1, description="Tokens generated per benchmark prompt.")
    temperature: float = Field(0.0, ge=0.0, description="Benchmark sampling temperature; 0 is greedy.")
    seed: int = Field(0, description="Seed of benchmark sampling and of the untrained baseline draft's weights.")
    max_prompts: Optional[int] = Field(None, ge=1, description="Cap on prompts per benchmark set.")
    host: str = Field("127.0.0.1", description="Address `eaglecache serve` binds; loopback unless told otherwise.")
    api_key_env: str = Field("EAGLECACHE_API_KEY", description="Environment variable holding the server API key.")
    served_model_name: Optional[str] = Field(
        None, description="Model name the server answers to; null uses the target directory's name."
    )
    demo: DemoConfig = Field(default_factory=DemoConfig)
