"""Running a list of stages idempotently, with completion markers and visible progress.

Each stage writes its outputs first and then ``<run_dir>/stages/<name>.json`` (atomically) as its completion
marker, which holds the stage's typed outputs (a pydantic model, ``Stage.output``). A stage whose marker exists
is skipped and its recorded outputs are read back into that model and reused, so re-submitting a run
does no finished work, and a stage that died midway (no marker) is redone; stages themselves are resumable
(collection skips finished shards, training restarts from its latest checkpoint). The marker also records the
config values the stage's result depends on (``Stage.settings``): a re-submission with other values is refused
with the differences named, rather than silently reusing results made with the old ones. ``rerun`` invalidates
a stage and everything after it and clears their output directories, so they start afresh. Progress (stage,
round, percentage, ETA) is logged and kept in ``<run_dir>/progress.json`` for anyone watching the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError

from jf_ray.storage import delete_file, delete_tree, exists, join_uri, read_json, write_json_atomic

logger = logging.getLogger(__name__)


@dataclass
class Stage:
    name: str
    run: Callable[[dict[str, BaseModel]], BaseModel]  # receives the outputs of all earlier stages by name
    output: type[BaseModel]  # what ``run`` returns; the marker stores it, a resumed run reads it back
    weight: float = 1.0  # estimated seconds: the first ETA sums them, later ones scale them by the pace seen
    settings: dict = field(default_factory=dict)  # the config values its result depends on (JSON-able)
    outputs_dir: str | None = None  # where it writes (partial work a resume continues); a rerun clears it


@dataclass
class GraphRun:
    outputs: dict[str, BaseModel] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def marker_uri(run_dir: str, stage: str) -> str:
    return join_uri(run_dir, "stages", f"{stage}.json")


def invalidate_from(run_dir: str, stages: list[Stage], first: str) -> list[str]:
    """Remove the markers of ``first`` and every stage after it; returns the names invalidated."""
    names = [s.name for s in stages]
    if first not in names:
        from jf_ray.errors import UserInputError

        raise UserInputError(f"unknown stage {first!r}; stages are: {', '.join(names)}")
    dropped = stages[names.index(first) :]
    for stage in dropped:
        delete_file(marker_uri(run_dir, stage.name))
        if stage.outputs_dir:  # or a collection would keep its shards and training resume from old checkpoints
            delete_tree(stage.outputs_dir)
    return [stage.name for stage in dropped]


def run_graph(run_dir: str, stages: list[Stage], on_progress: Callable[[dict], None] | None = None) -> GraphRun:
    state = GraphRun()
    total = sum(s.weight for s in stages)
    done_weight, work_weight, work_seconds = 0.0, 0.0, 0.0
    for index, stage in enumerate(stages):
        marker = marker_uri(run_dir, stage.name)
        if exists(marker):
            state.outputs[stage.name] = _recorded_outputs(marker, stage, run_dir)
            state.skipped.append(stage.name)
            done_weight += stage.weight
            continue
        pace = work_seconds / work_weight if work_weight else 1.0
        eta = (total - done_weight) * pace
        progress = {
            "stage": stage.name,
            "index": index + 1,
            "of": len(stages),
            "percent": round(100 * done_weight / total, 1),
            "eta_s": round(eta),
        }
        _report(run_dir, progress, on_progress)
        started = time.perf_counter()
        with behind_schedule_warnings(stage.name, stage.weight * pace):
            outputs = stage.output.model_validate(stage.run(state.outputs))
        seconds = time.perf_counter() - started
        write_json_atomic(
            marker,
            {
                "stage": stage.name,
                "settings": stage.settings,
                "outputs": outputs.model_dump(mode="json"),
                "seconds": round(seconds, 2),
                "finished_at": time.time(),
            },
        )
        state.outputs[stage.name] = outputs
        state.executed.append(stage.name)
        done_weight += stage.weight
        work_weight += stage.weight
        work_seconds += seconds
        logger.info("stage %s done in %.1fs", stage.name, seconds)
    _report(
        run_dir,
        {"stage": "done", "index": len(stages), "of": len(stages), "percent": 100.0, "eta_s": 0},
        on_progress,
    )
    return state


@contextlib.contextmanager
def behind_schedule_warnings(stage: str, expected_s: float, check_every_s: float = 15.0, min_warn_s: float = 60.0):
    """Log a warning whenever the stage inside has run 2x, 4x, 8x... its expected seconds (and at least
    ``min_warn_s``): a stage far behind its estimate (a slow processor, emulated bf16, a busy machine) says so
    while it runs."""
    done = threading.Event()

    def watch() -> None:
        started, factor = time.perf_counter(), 2.0
        while not done.wait(check_every_s):
            elapsed = time.perf_counter() - started
            if elapsed > max(factor * expected_s, min_warn_s):
                logger.warning(
                    "stage %s is running behind: %.0fs so far, about %.0fs were expected on this machine",
                    stage,
                    elapsed,
                    expected_s,
                )
                factor *= 2

    watcher = threading.Thread(target=watch, name=f"eta-{stage}", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def _recorded_outputs(marker: str, stage: Stage, run_dir: str) -> BaseModel:
    """The outputs a finished stage recorded, as its output model; an error naming the stage where they were
    made with other settings than the config's now, or do not fit its output model (a marker written by another
    version of the job)."""
    from jf_ray.config import format_validation_error
    from jf_ray.errors import UserInputError

    record = read_json(marker)
    recorded = record.get("settings")
    if recorded is not None and recorded != json.loads(json.dumps(stage.settings)):
        changes = "; ".join(settings_changes(recorded, stage.settings)) or "the settings differ"
        raise UserInputError(
            f"stage {stage.name} of {run_dir} finished with other settings than this config's ({changes}); "
            f"redo it and the stages after it with --rerun {stage.name}, or use another run_dir"
        )
    try:
        return stage.output.model_validate(record.get("outputs"))
    except ValidationError as exc:
        problem = format_validation_error(stage.output.__name__, exc)
        raise UserInputError(
            f"{marker} does not hold the outputs of stage {stage.name} ({problem}); redo it with --rerun {stage.name}"
        ) from None


def settings_changes(before: dict, after: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two nested settings dicts (dotted keys)."""
    after = json.loads(json.dumps(after))  # compare as recorded: tuples are lists, keys are strings
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += settings_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changes


def _report(run_dir: str, progress: dict, on_progress) -> None:
    eta = progress["eta_s"]
    eta_text = f"{eta // 60}m{eta % 60:02d}s"
    logger.info(
        "[%d/%d %5.1f%% ETA %s] %s",
        progress["index"],
        progress["of"],
        progress["percent"],
        eta_text,
        progress["stage"],
    )
    write_json_atomic(join_uri(run_dir, "progress.json"), {**progress, "updated_at": time.time()})
    if on_progress:
        on_progress(progress)
