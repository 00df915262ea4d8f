"""Serving metrics as Ray metrics, exported by every node's metrics agent in Prometheus format.

Ray prefixes every name with ``ray_`` on export (``ray_jf_serve_request_latency_s_bucket``); the Grafana
dashboard in ``dashboards/jf_ray_serving.json`` queries those names (counters get ``_total``). Every series
carries ``model`` and ``replica`` tags (Ray adds only its own node/worker tags), request series ``decoder``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray.util.metrics import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from jf_ray.serving.generation import DraftCounts

PREFIX = "jf_serve_"
LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TPF_BUCKETS = [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0]
TOKENS_PER_S_BUCKETS = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
DRAFT_BUCKETS = [1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128]
COUNT_BUCKETS = [0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 16]

# name -> (kind, description, extra tag keys); the dashboard and the tests read this table.
METRICS = {
    "request_latency_s": ("histogram", "end-to-end latency of a request on the replica", ("status",)),
    "time_to_first_token_s": ("histogram", "time from arrival to the first generated token", ()),
    "request_tokens_per_s": ("histogram", "completion tokens per second of one request", ()),
    "request_tokens_per_forward": ("histogram", "completion tokens per model forward of one request", ()),
    "requests": ("counter", "finished requests by status (ok, aborted, error)", ("status",)),
    "completion_tokens": ("counter", "generated tokens", ()),
    "forwards": ("counter", "model forwards spent on requests (per request, prefill included)", ()),
    "request_draft_length": ("histogram", "mean draft length (head included) of a request's decoding forwards", ()),
    "draft_tokens": ("counter", "main draft tokens put into decoding forwards (auto: the length it chose)", ()),
    "request_candidates": ("histogram", "mean recycled candidates verified per decoding forward of a request", ()),
    "request_blocks": ("histogram", "mean blocks in flight (1 + pseudo-active) per decoding forward of a request", ()),
    "query_tokens": ("counter", "tokens put into decoding forwards: drafts, candidates, pseudo blocks", ()),
    "batch_size": ("histogram", "requests in one engine step (one shared forward)", ()),
    "running_requests": ("gauge", "requests in the engine's running batch after the last step", ()),
    "queue_length": ("gauge", "requests waiting for a batch slot after the last step", ()),
    "step_latency_s": ("histogram", "wall time of one engine step", ()),
    "rejected_requests": ("counter", "requests refused with 503 because the queue was full", ()),
}
_BUCKETS = {
    "request_latency_s": LATENCY_BUCKETS_S,
    "time_to_first_token_s": LATENCY_BUCKETS_S,
    "request_tokens_per_s": TOKENS_PER_S_BUCKETS,
    "request_tokens_per_forward": TPF_BUCKETS,
    "request_draft_length": DRAFT_BUCKETS,
    "request_candidates": COUNT_BUCKETS,
    "request_blocks": COUNT_BUCKETS,
    "batch_size": BATCH_BUCKETS,
    "step_latency_s": LATENCY_BUCKETS_S,
}


def _make(name: str, base_tags: tuple[str, ...]):
    kind, description, tags = METRICS[name]
    tag_keys = base_tags + tags
    if kind == "histogram":
        return Histogram(PREFIX + name, description, boundaries=_BUCKETS[name], tag_keys=tag_keys)
    if kind == "counter":
        return Counter(PREFIX + name, description, tag_keys=tag_keys)
    return Gauge(PREFIX + name, description, tag_keys=tag_keys)


class ServingMetrics:
    """Implements the scheduler's StepObserver and the request observer of ``generation.stream_text``."""

    def __init__(self, model_name: str, replica: str = "") -> None:
        request_tags, step_tags = ("model", "replica", "decoder"), ("model", "replica")
        per_step = {"batch_size", "running_requests", "queue_length", "step_latency_s", "rejected_requests"}
        self._m = {name: _make(name, step_tags if name in per_step else request_tags) for name in METRICS}
        for metric in self._m.values():
            metric.set_default_tags({"model": model_name, "replica": replica})

    def on_step(self, batch_size: int, running: int, queue_length: int, step_s: float) -> None:
        self._m["batch_size"].observe(batch_size)
        self._m["running_requests"].set(running)
        self._m["queue_length"].set(queue_length)
        self._m["step_latency_s"].observe(step_s)

    def on_first_token(self, decoder: str, ttft_s: float) -> None:
        self._m["time_to_first_token_s"].observe(ttft_s, tags={"decoder": decoder})

    def on_request_done(
        self, decoder: str, status: str, latency_s: float, tokens: int, forwards: int, drafts: DraftCounts
    ) -> None:
        tags = {"decoder": decoder}
        self._observe_drafts(drafts, tags)
        self._m["request_latency_s"].observe(latency_s, tags={**tags, "status": status})
        self._m["requests"].inc(1, tags={**tags, "status": status})
        if tokens:
            self._m["completion_tokens"].inc(tokens, tags=tags)
            if latency_s > 0:
                self._m["request_tokens_per_s"].observe(tokens / latency_s, tags=tags)
        if forwards:
            self._m["forwards"].inc(forwards, tags=tags)
            self._m["request_tokens_per_forward"].observe(tokens / forwards, tags=tags)

    def _observe_drafts(self, drafts: DraftCounts, tags: dict) -> None:
        """Per-request means of the draft shape (length, candidates, blocks) and the tokens put into forwards."""
        decoding = sum(drafts.draft_hist.values())
        if not decoding:
            return
        drafted = sum(int(length) * count for length, count in drafts.draft_hist.items())
        self._m["request_draft_length"].observe(drafted / decoding, tags=tags)
        self._m["draft_tokens"].inc(drafted, tags=tags)
        for name, hist in (("request_candidates", drafts.candidates_hist), ("request_blocks", drafts.blocks_hist)):
            if hist:
                self._m[name].observe(sum(int(k) * v for k, v in hist.items()) / decoding, tags=tags)
        self._m["query_tokens"].inc(drafts.query_tokens, tags=tags)

    def on_rejected(self) -> None:
        self._m["rejected_requests"].inc(1)
