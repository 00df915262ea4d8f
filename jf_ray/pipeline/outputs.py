"""Typed outputs of the progressive job's stages and one accessor over them (docs/pipeline.md).

Each stage returns one of the models below; the graph saves it in the stage's completion marker and reads it
back, validated, when a resubmitted job skips the stage. :class:`RunOutputs` is the only place that knows the
stage names (``round2.train``): stages ask it for ``outputs.model(1)`` or ``outputs.train(2)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

Row = dict[str, Any]  # one decoder's fields on one task: bench fields (tpf, tokens_per_s, ...) + quality fields
T = TypeVar("T", bound=BaseModel)


class StageOutput(BaseModel):
    # The library summaries (collect, pack, train) carry more than the job reads; the marker keeps all of it.
    model_config = ConfigDict(extra="allow")


class BaseOutput(StageOutput):
    model: str  # the base checkpoint (given or built)
    built: bool
    preset: str | None = None
    precision: str | None = None  # what the build computed in (bf16 or fp32); None for a given checkpoint
    # Where a given or fetched model came from (jf_provenance.json: the fetch route, source file, quantization);
    # None for a built base and for checkpoints without a record.
    provenance: dict[str, Any] | None = None


class DataOutput(StageOutput):
    collect_prompts: str  # JSONL of the collection prompts
    num_prompts: int  # prompts the job drew from the tasks' train splits (0 with workloads.prompts)
    eval: dict[str, str]  # task -> JSONL of the timed benchmark's held-out examples
    quality: dict[str, str]  # task -> JSONL of the per-round quality set (tasks without one use ``eval``)
    anchor: str | None  # JSONL of AR anchor pairs, None without any

    def quality_set(self, task: str) -> str:
        return self.quality.get(task, self.eval[task])


class CollectOutput(StageOutput):
    """The summary of :func:`jf_ray.trajectories.collect`."""

    out: str
    prompts: int
    rows: int
    tokens: int
    forwards: int
    tpf: float
    tokens_per_s: float
    wall_s: float


class PackOutput(StageOutput):
    """The summary of :func:`jf_ray.packing.pack`."""

    out: str
    packed: int
    tokens: int


class TrainOutput(StageOutput):
    """The summary of :func:`jf_ray.training.train`."""

    model: str  # the checkpoint's model files (docs/checkpoints.md): what the next round starts from
    checkpoint: str
    metrics_log: str
    wall_s: float | None = None


class EvalOutput(StageOutput):
    model: str
    eval: dict[str, Row]  # task -> the round decoder's row on the task's quality set


class BenchRound(BaseModel):
    round: int
    block_size: int | None  # None for the base model
    model: str
    eval: dict[str, dict[str, Any]]  # task -> {decoder: Row, "samples": [...]}


class BenchOutput(StageOutput):
    rounds: list[BenchRound]


class ReportOutput(StageOutput):
    json_uri: str
    markdown_uri: str
    plots: dict[str, str]  # plot name -> PNG URI


OUTPUT_TYPES: dict[str, type[StageOutput]] = {
    "base": BaseOutput,
    "data": DataOutput,
    "collect": CollectOutput,
    "pack": PackOutput,
    "train": TrainOutput,
    "eval": EvalOutput,
    "bench": BenchOutput,
    "report": ReportOutput,
}


def stage_name(kind: str, round_index: int | None = None) -> str:
    """``base``, ``bench``, ... or ``round<k>.<kind>`` for the stages of a round (the marker's name)."""
    if kind not in OUTPUT_TYPES:
        raise ValueError(f"unknown stage kind {kind!r}; kinds are {', '.join(OUTPUT_TYPES)}")
    return kind if round_index is None else f"round{round_index}.{kind}"


class RunOutputs:
    """Typed view of the outputs of the stages run (or skipped) so far, by stage kind and round."""

    def __init__(self, by_name: Mapping[str, BaseModel]):
        self._by_name = by_name

    def _get(self, kind: str, round_index: int | None, expected: type[T]) -> T:
        name = stage_name(kind, round_index)
        if name not in self._by_name:
            raise KeyError(f"stage {name} has no outputs yet")
        output = self._by_name[name]
        if not isinstance(output, expected):
            raise TypeError(f"stage {name} gave {type(output).__name__}, not {expected.__name__}")
        return output

    @property
    def base(self) -> BaseOutput:
        return self._get("base", None, BaseOutput)

    @property
    def data(self) -> DataOutput:
        return self._get("data", None, DataOutput)

    def collect(self, k: int) -> CollectOutput:
        return self._get("collect", k, CollectOutput)

    def pack(self, k: int) -> PackOutput:
        return self._get("pack", k, PackOutput)

    def train(self, k: int) -> TrainOutput:
        return self._get("train", k, TrainOutput)

    def eval(self, k: int) -> EvalOutput:
        """Round ``k``'s quality evaluation (``k = 0``: the base model's)."""
        return self._get("eval", k, EvalOutput)

    @property
    def bench(self) -> BenchOutput:
        return self._get("bench", None, BenchOutput)

    @property
    def report(self) -> ReportOutput:
        return self._get("report", None, ReportOutput)

    def model(self, k: int) -> str:
        """Round ``k``'s model files (``k = 0``: the base): a trained checkpoint's ``model/``, never its
        optimizer state."""
        return self.base.model if k == 0 else self.train(k).model
