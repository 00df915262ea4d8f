"""Serving under changing load and failure, on a real Ray cluster over real HTTP (slow: replicas start and
stop). Load rises until Serve adds a replica that takes traffic; a replica killed under load leaves every
request either complete or a clean 5xx, and a replacement takes over; idle, the extra replica goes. The test
logs what it measured (scale-up, recovery and scale-down times); docs/serving.md reports them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request

import pytest
from ray_nodes import free_port
from test_serving import PROMPT, build_tiny_checkpoint

from jf_ray.serving.deployment import REPLICA_HEADER

logger = logging.getLogger(__name__)
pytestmark = pytest.mark.slow
APP = "jf-ray-scaling"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("scaling_ckpt")))


@pytest.fixture
def deploy(ray_session, checkpoint):
    """deploy(**ServeConfig fields) -> base URL; the app and Serve are gone after the test."""
    from ray import serve

    from jf_ray.serving.config import ServeConfig
    from jf_ray.serving.deployment import build_app

    def start(**fields) -> str:
        config = ServeConfig(
            model=checkpoint,
            model_name="tiny",
            app_name=APP,
            port=free_port(),
            num_cpus=0.5,  # two replicas fit the 2-CPU test cluster
            max_tokens_limit=160,
            default_max_tokens=64,
            decode={"decoder": "ar"},
            **fields,
        )
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config), name=APP, route_prefix="/")
        return f"http://{config.host}:{config.port}"

    yield start
    serve.shutdown()


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return 0
    return app.deployments["JacobiDecoder"].replica_states.get("RUNNING", 0)


def wait_until(condition, timeout_s: float, what: str) -> float:
    """Seconds until ``condition()`` holds; fails the test after ``timeout_s``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.25)
    return time.monotonic() - start


class Outcome:
    def __init__(self, status: int, replica: str | None, complete: bool, at: float, detail: str = ""):
        self.status, self.replica, self.complete, self.at, self.detail = status, replica, complete, at, detail


def request(url: str, body: dict, timeout_s: float = 60) -> Outcome:
    """One completion; ``complete`` means a 200 whose answer ended properly (finish_reason, and [DONE] when
    streamed): a 200 cut short by a dying replica is not complete."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            replica, raw = response.headers.get(REPLICA_HEADER), response.read().decode()
            status = response.status
    except urllib.error.HTTPError as err:
        return Outcome(err.code, None, False, time.monotonic(), err.read().decode(errors="replace")[:200])
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
        return Outcome(0, None, False, time.monotonic(), f"{type(err).__name__}: {err}")
    if body.get("stream"):
        events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
        finished = any('"finish_reason":"' in e for e in events[:-1])
        complete = bool(events) and events[-1] == "[DONE]" and finished and '"error"' not in raw
    else:
        try:
            complete = json.loads(raw)["choices"][0]["finish_reason"] in ("stop", "length")
        except (ValueError, KeyError, IndexError):
            complete = False
    return Outcome(status, replica, complete, time.monotonic(), raw[-200:])


class Load:
    """``clients`` threads sending requests back to back until stopped; every outcome is kept."""

    def __init__(self, url: str, clients: int, body: dict, stream_every: int = 0):
        self.url, self.body, self.stream_every = url, body, stream_every
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, index: int) -> None:
        sent = 0
        while not self.stop.is_set():
            stream = bool(self.stream_every) and (index + sent) % self.stream_every == 0
            self.outcomes.append(request(self.url, {**self.body, "stream": stream}))
            sent += 1

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=90)
        assert not any(t.is_alive() for t in self.threads), "a request hung"


def test_autoscaling_up_and_down_and_a_replica_killed_under_load(deploy):
    """One deployment (min 1, max 2 replicas) lives through it all, so the test pays one start-up:
    load -> a second replica that takes traffic -> one replica killed -> clean failures only, a replacement
    -> idle -> back to one replica."""
    import ray

    url = deploy(
        max_batch_size=2,
        max_queued_requests=8,
        autoscaling={
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 2,
            "look_back_period_s": 2,
        },
    )
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 100}
    assert running_replicas() == 1
    with Load(url, clients=4, body=body, stream_every=2) as load:
        scale_up_s = wait_until(lambda: running_replicas() == 2, 180, "a second replica")
        upscaled_at = time.monotonic()
        wait_until(lambda: len(answering(load, upscaled_at)) == 2, 120, "both replicas to answer")
        before_kill = len(load.outcomes)
        victim = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "JacobiDecoder" in a["name"])
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        killed_at = time.monotonic()
        wait_until(lambda: running_replicas() < 2, 30, "Serve to notice the dead replica")
        recovery_s = wait_until(lambda: running_replicas() == 2, 180, "a replacement replica")
        recovered_at = time.monotonic()
        wait_until(lambda: len(answering(load, recovered_at)) == 2, 120, "both replicas to answer again")
    scale_down_s = wait_until(lambda: running_replicas() == 1, 240, "the extra replica to go")
    failed = [o for o in load.outcomes if not o.complete]
    logger.warning(
        "measured: 1->2 replicas %.1f s after the load began; replacement running %.1f s after a kill; 2->1 "
        "%.1f s after the load stopped; %d requests completed, %d failed (statuses %s)",
        scale_up_s,
        recovery_s,
        scale_down_s,
        len(load.outcomes) - len(failed),
        len(failed),
        sorted({o.status for o in failed}),
    )
    # Scaling up loses nothing; a killed replica costs only clean 5xx (never a 200 cut short; none hung: Load's
    # exit checks that), and only until its replacement runs.
    assert all(o.complete for o in load.outcomes[:before_kill])
    assert all(500 <= o.status < 600 for o in failed), [(o.status, o.detail) for o in failed]
    assert all(killed_at - 1 < o.at < recovered_at + 5 for o in failed), "requests kept failing after recovery"
    assert request(url, {**body, "max_tokens": 4}).complete  # serving on one replica


def answering(load: Load, since: float) -> set[str]:
    return {o.replica for o in load.outcomes if o.at > since and o.complete}
