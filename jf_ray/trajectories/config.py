"""Typed config of trajectory collection (``jf-ray collect``, the pipeline job)."""

from __future__ import annotations

from pydantic import Field

from jf_ray.config import DType, Location, ModelLocation, StageConfig
from jf_ray.trajectories.backend_base import BackendSpec


class CollectConfig(StageConfig):
    """Collect greedy Jacobi trajectories of ``model`` on ``prompts`` into a Parquet dataset at ``out``."""

    model: ModelLocation = Field(..., description="checkpoint: local dir, file:// or s3:// URI, hub name or .gguf file")
    prompts: Location = Field(
        ...,
        description='URI of a JSONL file, one {"prompt": str, "id"?: str|int} per line, or a Hugging Face dataset '
        "reference (hf://datasets/NAME, a save_to_disk dir, Parquet/JSON/CSV; ?column= or ?template=)",
    )
    out: Location = Field(..., description="URI of the output dataset (file://, s3:// or a local path)")
    block_size: int = Field(16, ge=1, description="Jacobi block size n")
    max_new_tokens: int = Field(256, ge=1, description="cap on generated tokens per prompt")
    workers: int = Field(1, ge=1, description="number of Ray actors (one per GPU on GPU clusters)")
    batch_size: int = Field(8, ge=1, description="prompts decoded together inside one worker")
    shard_size: int = Field(32, ge=1, description="prompts per output shard (the unit of resume and retry)")
    round: int = Field(1, ge=0, description="Jacobi Forcing round this data is for (stored in every row)")
    model_id: str | None = Field(None, description="id stored in every row (default: the model string)")
    seed: int = Field(0, description="base seed of draft initialisation; shard i uses seed + i")
    resume: bool = Field(True, description="skip shards already finished in `out` (checksums verified)")
    num_gpus_per_worker: float = Field(0.0, ge=0.0, description="GPUs per actor (1 on GPU clusters, 0 on CPU)")
    num_cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs per actor; also its torch thread count")
    max_shard_attempts: int = Field(3, ge=1, description="attempts per shard before the run fails")
    backend: str = Field("transformers", description="'transformers', 'vllm' (docs/vllm.md) or 'package.module:Class'")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one engine spans (<= num_gpus_per_worker)")
    vllm_kv_cache_gib: int = Field(1, ge=1, description="vllm on CPU: KV cache GiB per actor")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="vllm on GPU: share of GPU memory")
    vllm_enforce_eager: bool = Field(False, description="vllm: no compilation (starts in seconds; small models)")
    dtype: DType = Field("auto", description="model dtype (auto: bf16 on GPU, fp32 on CPU)")
    attn_implementation: str = Field("sdpa", description="transformers attention implementation")
    use_chat_template: bool = Field(True, description="wrap prompts in the tokenizer's chat template")
    ray_address: str | None = Field(None, description="Ray cluster to join (default: RAY_ADDRESS or local)")
    progress: bool = Field(True, description="show a progress bar on the driver")

    @property
    def resolved_model_id(self) -> str:
        return self.model_id or self.model

    def backend_spec(self) -> BackendSpec:
        return BackendSpec(
            name=self.backend,
            model=self.model,
            dtype=self.dtype,
            device="cuda" if self.num_gpus_per_worker > 0 else "cpu",
            attn_implementation=self.attn_implementation,
            use_chat_template=self.use_chat_template,
            tensor_parallel_size=self.tensor_parallel_size,
            vllm_kv_cache_gib=self.vllm_kv_cache_gib,
            gpu_memory_utilization=self.gpu_memory_utilization,
            num_threads=max(1, int(self.num_cpus_per_worker)),
            vllm_enforce_eager=self.vllm_enforce_eager,
        )
