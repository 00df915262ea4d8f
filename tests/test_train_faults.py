"""A Ray Train worker killed twice in one round: the round restarts from its last checkpoint each time
(``max_failures``), its loss curve has every step once, and its final checkpoint equals, bit for bit in fp32,
that of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_train import config_for, jacobi_sequences

from jf_ray.packing.pack import packed_to_table
from jf_ray.packing.schema import PACKED_SCHEMA

STEPS, EVERY = 16, 2
TIMING = {"step_s", "tokens_per_s"}  # wall-clock fields: the only ones allowed to differ


def train_workers() -> list[psutil.Process]:
    """The Ray Train worker processes of this test's own Ray node (children of its raylet, by title)."""
    import ray._private.worker as ray_worker

    raylet = psutil.Process(ray_worker._global_node.all_processes["raylet"][0].process.pid)
    found = []
    for proc in raylet.children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "RayTrainWorker" in title:
            found.append(proc)
    return found


class WorkerKiller(threading.Thread):
    """SIGKILLs a training worker each time the run's latest registered checkpoint (Ray Train's snapshot of its
    checkpoint list) reaches the next threshold step; records (pid, that step)."""

    def __init__(self, run_dir: Path, thresholds: list[int]):
        super().__init__(daemon=True)
        self.snapshot, self.thresholds = run_dir / "checkpoint_manager_snapshot.json", list(thresholds)
        self.killed: list[tuple[int, int]] = []
        self.done = threading.Event()

    def registered_step(self) -> int:
        try:
            results = json.loads(self.snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
            return 0
        return max((r["metrics"]["step"] for r in results), default=0)

    def run(self) -> None:
        while self.thresholds and not self.done.is_set():
            step = self.registered_step()
            workers = train_workers() if step >= self.thresholds[0] else []
            if workers:
                victim = workers[len(self.killed) % len(workers)]  # one rank, then another
                victim.send_signal(signal.SIGKILL)
                self.killed.append((victim.pid, step))
                self.thresholds.pop(0)
            time.sleep(0.05)


def final_tensors(summary: dict) -> dict[str, torch.Tensor]:
    """Model weights and optimizer moments of the run's final checkpoint."""
    from safetensors.torch import load_file

    root = Path(summary["checkpoint"].removeprefix("file://"))
    return {
        **{f"model/{k}": v for k, v in load_file(root / "model" / "model.safetensors").items()},
        **{f"optimizer/{k}": v for k, v in load_file(root / "trainer" / "optimizer.safetensors").items()},
    }


def logged(summary: dict) -> list[dict]:
    path = Path(summary["metrics_log"].removeprefix("file://"))
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_worker_killed_twice_resumes_each_time_and_ends_bit_for_bit_as_an_uninterrupted_run(
    micro_checkpoint, tmp_path, ray_session, capfd
):
    from jf_ray.modeling import load_model
    from jf_ray.storage import DatasetWriter
    from jf_ray.training.ray_train import train

    writer = DatasetWriter(f"file://{tmp_path}/packed", PACKED_SCHEMA)
    writer.write_shard(
        "part-0", packed_to_table(jacobi_sequences(load_model(str(micro_checkpoint), dtype="fp32", device="cpu")))
    )
    writer.commit()
    setup = {"root": tmp_path, "model": str(micro_checkpoint), "data": f"file://{tmp_path}/packed"}
    config = config_for(setup, workers=2, steps=STEPS, checkpoint_every=EVERY, precision="fp32", max_failures=2)

    straight = train(config.model_copy(update={"run_name": "straight"}))
    capfd.readouterr()
    killer = WorkerKiller(tmp_path / "runs" / "killed", thresholds=[2 * EVERY, 4 * EVERY])
    killer.start()
    try:
        killed = train(config.model_copy(update={"run_name": "killed"}))
    finally:
        killer.done.set()
        killer.join()

    assert len(killer.killed) == 2, f"the run ended before both kills: {killer.killed}"
    # Ray forwards the workers' log to this process: rank 0 logs the step each start of the group resumes at
    starts = [int(n) for n in re.findall(r"rank 0/2: \d+ steps from step (\d+)", capfd.readouterr().err)]
    assert len(starts) == 3 and starts[0] == 0, starts
    assert all(start >= step for start, (_, step) in zip(starts[1:], killer.killed)), (starts, killer.killed)
    assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie" for pid, _ in killer.killed)
    assert killed["checkpoint"].endswith(f"checkpoint-{STEPS:06d}")
    assert [m["step"] for m in logged(killed)] == list(range(1, STEPS + 1)), "every step once, in order"
    assert logged(killed) == logged(straight), "the loss curve is the uninterrupted one"
    expected, got = final_tensors(straight), final_tensors(killed)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, got[name]), name
