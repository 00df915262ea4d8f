"""The ``collect:``, ``pack:``, ``train:`` and ``evaluation:`` sections of the job config: the stage configs
themselves, less the fields the job fills in (docs/pipeline.md).

Each section is built from its stage config's fields (:func:`section_of`), so it has the stage's defaults,
descriptions and checks, and a field added to a stage config appears in the job config by itself. A field
the job fills in (the model, the locations, the round's block size, the seed) is refused in the section,
naming where the job takes it from.
"""

from __future__ import annotations

from copy import copy
from typing import Any, ClassVar

from pydantic import Field, create_model, field_validator, model_validator

from jf_ray.config import StageConfig
from jf_ray.decoding.registry import BENCH_NAMES, DECODER_NAMES, canonical
from jf_ray.decoding.types import DecodeConfig, DecoderName
from jf_ray.packing.config import PackConfig
from jf_ray.training.config import TrainConfig
from jf_ray.trajectories.config import CollectConfig


class JobSection(StageConfig):
    """A stage config without ``job_owned``: field -> where the job takes its value from."""

    job_owned: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _not_job_owned(cls, data: Any) -> Any:
        if isinstance(data, dict):
            taken = [f"{key} (from {cls.job_owned[key]})" for key in data if key in cls.job_owned]
            if taken:
                raise ValueError(f"the job sets {', '.join(taken)}; remove it from this section")
        return data


def section_of(stage: type[StageConfig], job_owned: dict[str, str], base: type[JobSection] = JobSection):
    """A :class:`JobSection` subclass of ``base`` with every field of ``stage`` but the ``job_owned`` ones."""
    missing = sorted(set(job_owned) - set(stage.model_fields))
    if missing:
        raise TypeError(f"{stage.__name__} has no fields {missing}")
    fields = {name: (info.annotation, copy(info)) for name, info in stage.model_fields.items() if name not in job_owned}
    section = create_model(
        f"{stage.__name__}Section",
        __base__=base,
        __module__=__name__,
        __doc__=f"{stage.__name__} as a job config section: every field but {', '.join(job_owned)}.",
        **fields,
    )
    section.job_owned = {**base.job_owned, **job_owned}
    return section


CollectSection = section_of(
    CollectConfig,
    {
        "model": "the previous round's model",
        "prompts": "workloads",
        "out": "run_dir",
        "block_size": "rounds.K.block_size",
        "round": "the round's number",
        "model_id": "the previous round's name",
        "seed": "seed",
        "resume": "the job: a resubmitted job always resumes",
        "ray_address": "ray_address",
    },
)

PackSection = section_of(
    PackConfig,
    {
        "trajectories": "the round's collection",
        "out": "run_dir",
        "window": "rounds.K.window",
        "strategy": "rounds.K.strategy",
        "seed": "seed",
    },
)

TrainSection = section_of(
    TrainConfig,
    {
        "model": "the previous round's model",
        "data": "the round's packed data",
        "out": "run_dir",
        "run_name": "the round's name",
        "epochs": "rounds.K.steps",
        "steps": "rounds.K.steps",
        "lr": "rounds.K.lr",
        "anchor": "workloads.anchor_examples",
        "seed": "seed",
    },
)


class EvaluationFields(JobSection):
    """The evaluation's own settings; the DecodeConfig fields join them in :data:`EvaluationSection`."""

    decoders: list[str] = Field(
        list(DECODER_NAMES),
        description="decoders of the final benchmark; 'generate' adds transformers' greedy "
        "model.generate as a reference outside jf-ray's engine",
    )
    round_decoder: DecoderName = Field(
        "ar",
        description="decoder of the per-round quality evaluation (greedy decoders give the same outputs; "
        "batched AR is the quickest)",
    )
    batch_size: int = Field(1, ge=1, description="requests decoded together while timing")
    threads: int | None = Field(None, ge=1, description="torch threads while evaluating (default: all)")
    repeats: int = Field(
        1,
        ge=1,
        description="final benchmark: timed runs per decoder, interleaved; the (lower) median is kept",
    )
    vllm_reference: bool | None = Field(
        None,
        description="final benchmark: also time vLLM's greedy AR of each model (docs/vllm.md); default: "
        "where vLLM is installed and can run the model (else a warning)",
    )
    vllm_eager: bool = Field(False, description="vLLM reference without compilation (starts faster, may run slower)")

    @field_validator("decoders")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return [canonical(name, BENCH_NAMES) for name in value]  # aliases (mr) become public names

    def decode_settings(self) -> dict[str, Any]:
        """This section's DecodeConfig fields (block size, cap, multiblock and sampling settings)."""
        return self.model_dump(include=set(DecodeConfig.model_fields) - set(self.job_owned))

    def changed_decode_settings(self) -> dict[str, Any]:
        """The DecodeConfig fields set to other than DecodeConfig's defaults, block size and cap aside."""
        settings = self.decode_settings()
        return {
            name: value
            for name, value in settings.items()
            if name not in ("block_size", "max_new_tokens") and value != DecodeConfig.model_fields[name].default
        }


EvaluationSection = section_of(
    DecodeConfig,
    {
        "decoder": "evaluation.decoders and evaluation.round_decoder",
        "seed": "seed",
        "record_trajectory": "collection (never while evaluating)",
    },
    base=EvaluationFields,
)
