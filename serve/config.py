"""Config of the serve stage: speculative decoding settings, the benchmark, the server."""

from typing import ClassVar, Optional

from pydantic import Field

from eaglecache.section import Section


class DemoConfig(Section):
    num_conversations: int = Field(
        2000, ge=1, description="ShareGPT training-split conversations (first exchange) the demo regenerates and trains on."
    )
    # all 164 of HumanEval, the first 200 of the 810 held-out ShareGPT ones: with all 810 and an untrained
    # baseline the bench was 8 of the demo's 24 minutes on 2 AVX512 cores
    bench_prompts: int = Field(200, ge=1, description="Prompts of each benchmark set the demo measures (the first N).")


class ServeConfig(Section):
    num_speculative_tokens: int = Field(3, ge=1, le=64, description="Draft tokens proposed per target step (1..64, as train.ttt_length).")
    tensor_parallel_size: Optional[int] = Field(None, ge=1, description="vLLM tensor parallel size for bench and serve; null uses target.tensor_parallel_size.")
    max_new_tokens: int = Field(256, ge=1, description="Tokens generated per benchmark prompt.")
    temperature: float = Field(0.0, ge=0.0, description="Benchmark sampling temperature; 0 is greedy.")
    seed: int = Field(0, description="Seed of benchmark sampling and of the untrained baseline draft's weights.")
    max_prompts: Optional[int] = Field(None, ge=1, description="Cap on prompts per benchmark set.")
    single_stream_prompts: int = Field(
        4, ge=0, description="Prompts of each set also generated one at a time, for tokens/s at one stream "
                             "(latency-bound serving); 0 skips it. Acceptance counts the full-batch run only."
    )
    host: str = Field("127.0.0.1", description="Address `eaglecache serve` binds; loopback unless told otherwise.")
    api_key_env: str = Field("EAGLECACHE_API_KEY", description="Environment variable holding the server API key.")
    served_model_name: Optional[str] = Field(
        None, description="Model name the server answers to; null uses the target directory's name."
    )
    demo: DemoConfig = Field(default_factory=DemoConfig)

    # where and for whom `eaglecache serve` listens, and the demo's training data: none changes a benchmark result
    RUNTIME_ONLY: ClassVar[tuple[str, ...]] = ("host", "api_key_env", "served_model_name", "demo")
    IDENTITY_WHEN_SET: ClassVar[tuple[str, ...]] = ("single_stream_prompts",)  # added after release 95dabc5
