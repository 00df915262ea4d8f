"""The load-aware ``auto`` decoder in the engine: exact under any plan, and the plan follows the load."""

from __future__ import annotations

import pytest
import torch
from tiny_models import cycle_qwen2, random_qwen2

from jf_ray.decoding import DecodeConfig, DecodingEngine, generate
from jf_ray.decoding.auto import OPENING_FORWARDS, lower_envelope, measure_cost_curve
from jf_ray.decoding.planner import CostCurve, DraftShape
from jf_ray.decoding.realized import MIN_STEPS, SETTLING_STEPS

BATCHES, WIDTHS = [1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 32, 64]


def knee_curve(tokens: int) -> CostCurve:
    """Flat up to ``tokens`` query tokens per forward, then proportional: long drafts alone, AR when full."""
    # Seconds per forward, so that the engine's own time per step (planned with as well) is negligible beside it.
    return CostCurve(BATCHES, WIDTHS, [[1000.0 * max(1.0, b * w / tokens) for w in WIDTHS] for b in BATCHES])


@pytest.fixture(scope="module")
def model():
    return random_qwen2(seed=0)


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 200, (n,), generator=gen).tolist() for n in (1, 3, 5, 9, 17, 26, 40, 2, 11, 33, 6, 20)]


@pytest.fixture(scope="module")
def ar_outputs(model, prompts):
    return [r.token_ids for r in generate(model, prompts, DecodeConfig(decoder="ar", max_new_tokens=60), [], 4)]


@pytest.mark.parametrize("knee", [8, 64, 4096])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_auto_equals_ar_under_every_load(model, prompts, ar_outputs, knee, batch_size):
    count = 3 if batch_size == 1 else len(prompts)  # batch 1: a few prompts suffice, each decodes alone
    config = DecodeConfig(decoder="auto", block_size=32, max_new_tokens=60)
    results = generate(model, prompts[:count], config, [], batch_size, cost_curve=knee_curve(knee))
    assert [r.token_ids for r in results] == ar_outputs[:count]
    assert all(r.stats.tokens == 60 and r.stats.forwards <= 60 for r in results)


@pytest.mark.parametrize("eos_at", [0, 5, 21])
def test_auto_stops_at_eos_anywhere_with_many_rows(model, prompts, ar_outputs, eos_at):
    eos = ar_outputs[6][eos_at]
    config = DecodeConfig(decoder="auto", block_size=16, max_new_tokens=60)
    results = generate(model, prompts, config, [eos], 8, cost_curve=knee_curve(64))
    for result, reference in zip(results, ar_outputs):
        expected = reference[: reference.index(eos) + 1] if eos in reference else reference
        assert result.token_ids == expected
        assert result.finish_reason == ("stop" if eos in reference else "length")


@pytest.mark.parametrize("rows,knee,width", [(1, 64, 32), (16, 64, 4), (16, 16, 1)])
def test_drafts_follow_the_load(model, prompts, rows, knee, width):
    """At the prior acceptance: alone the whole block, sixteen rows a few tokens, AR where width is not free."""
    engine = DecodingEngine(model, [], max_batch_size=16, cost_curve=knee_curve(knee))
    config = DecodeConfig(decoder="auto", block_size=32, max_new_tokens=40, pool_size=0)  # the window alone
    for i in range(rows):
        engine.add(str(i), prompts[i % len(prompts)], config)
    engine.step()
    assert engine.last_plan.width == width
    assert all(dict(req.stats.draft_hist) == {width: 1} for req in engine.running)
    assert all(dict(req.stats.candidates_hist) == {0: 1} for req in engine.running)
    assert all(req.stats.query_tokens == width for req in engine.running)


def test_a_plan_of_ar_stands_a_few_steps(model, prompts, monkeypatch):
    """At AR no window is judged and nothing the planner reads moves: a saturated batch is planned every
    AR_PLAN_STEPS steps, not every step (planning 64 rows cost 5% of their step)."""
    from jf_ray.decoding import engine as engine_module

    planned = []
    plan_drafts = engine_module.plan_drafts
    monkeypatch.setattr(engine_module, "plan_drafts", lambda *a, **k: planned.append(1) or plan_drafts(*a, **k))
    engine = DecodingEngine(model, [], max_batch_size=16, cost_curve=knee_curve(16))
    for i in range(16):
        engine.add(str(i), prompts[i % len(prompts)], DecodeConfig(decoder="auto", block_size=32, max_new_tokens=40))
    for _ in range(3 * engine_module.AR_PLAN_STEPS):
        engine.step()
        assert engine.last_plan.width == 1
    assert len(planned) == 3


def test_free_width_buys_candidates_and_costly_width_is_ar(model):
    """Every token occurs in the prompt, so the context offers one candidate from the first forward on."""
    prompt = list(range(200))
    config = DecodeConfig(decoder="auto", block_size=8, max_new_tokens=30)
    engine = DecodingEngine(model, [], max_batch_size=1, cost_curve=knee_curve(4096))
    engine.add("free", prompt, config)
    engine.step()
    assert engine.last_plan.shapes == [DraftShape(8, 1)]
    (req,) = engine.running
    assert dict(req.stats.candidates_hist) == {1: 1} and req.stats.query_tokens == 16
    proportional = CostCurve(BATCHES, WIDTHS, [[1000.0 * b * w for w in WIDTHS] for b in BATCHES])
    (result,) = generate(model, [prompt], config, [], 1, cost_curve=proportional)
    decoding = result.stats.forwards - 1
    assert result.stats.draft_hist == {1: decoding} and result.stats.candidates_hist == {0: decoding}
    assert result.stats.tpf == 1.0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_candidates_in_every_forward_and_greedy_equals_ar(model, temperature):
    """Prompts holding every token: the context offers a candidate in every forward and free width takes it."""
    gen = torch.Generator().manual_seed(3)
    prompts = [list(range(200)), torch.randperm(200, generator=gen).tolist()]
    config = DecodeConfig(decoder="auto", block_size=8, max_new_tokens=40, temperature=temperature, seed=3)
    results = generate(model, prompts, config, [], 2, cost_curve=knee_curve(4096))
    for result in results:  # every drafting forward verifies a candidate beside its window, except where a window
        # expected to gain its whole length leaves a candidate nothing to add (ties take fewer): rare. (AR
        # forwards have no room for one: the last token of a budget, the guard's probe of AR, realized.py)
        drafting = sum(result.stats.candidates_hist.values()) - result.stats.draft_hist[1]
        assert result.stats.candidates_hist[0] - result.stats.draft_hist[1] <= 0.1 * drafting and drafting > 5
    if temperature == 0.0:
        ar = generate(model, prompts, DecodeConfig(decoder="ar", max_new_tokens=40), [])
        assert [r.token_ids for r in results] == [r.token_ids for r in ar]


def test_engine_measures_a_cost_curve_and_records_its_plan(model, prompts):
    curve = measure_cost_curve(model, max_batch=4, max_width=8, repeats=1)
    assert curve.batch_sizes == [1, 2, 4] and curve.widths == [1, 2, 4, 8]
    assert all(ms > 0 for row in curve.ms for ms in row)
    for row, below in zip(curve.ms, curve.ms[1:]):  # monotone: more rows or more tokens never cost less
        assert row == sorted(row) and all(a <= b for a, b in zip(row, below))
    engine = DecodingEngine(model, [], max_batch_size=2)
    engine.add("a", prompts[0], DecodeConfig(decoder="auto", block_size=8, max_new_tokens=10))
    engine.add("b", prompts[1], DecodeConfig(decoder="jacobi", block_size=4, max_new_tokens=10))
    engine.step()
    assert engine.last_plan is not None and 1 <= engine.last_plan.width <= 8
    curve = engine.ensure_cost_curve()  # measured by the first step, up to the batch and 64 tokens wide
    assert curve.batch_sizes == [1, 2] and curve.widths[-1] == 64


def test_auto_requests_share_the_engines_gain_table_and_overhead_fit(model, prompts):
    engine = DecodingEngine(model, [], max_batch_size=4, cost_curve=knee_curve(64))
    config = DecodeConfig(decoder="auto", block_size=16, max_new_tokens=40, pool_size=0)
    for i in range(2):
        engine.add(str(i), prompts[i], config)
    for _ in range(OPENING_FORWARDS + 4):  # an answer's opening does not count (auto.py)
        engine.step()
    assert all(req.policy.acceptance.table is engine.gain_table for req in engine.running)
    table = engine.gain_table
    measured = [length for length in table.mean if table.measured(length)]  # judged once settled, all rows
    # A random model accepts nearly nothing: measured lengths are worth their head; an untried one is still
    # valued optimistically, so the planner would try it where it could pay.
    assert measured and all(table.gain(length) < 1.5 for length in measured)
    assert table.gain(2 * max(measured)) > 2.0
    assert engine.overhead.sums[0] > 0 and engine.last_step_tokens >= 2  # offline, the engine times itself
    assert engine.last_step_query == 2 * engine.last_plan.width


def test_lower_envelope_removes_timing_noise():
    noisy = [[5.0, 1.0, 12.0, 8.0], [9.0, 2.0, 20.0, 30.0]]
    assert lower_envelope(noisy) == [[1.0, 1.0, 8.0, 8.0], [2.0, 2.0, 20.0, 30.0]]


def test_the_engine_holds_ar_where_whole_steps_of_drafting_earned_less():
    """The engine's driver times whole steps (a server does, streaming included): AR steps take the second the
    curve says, drafting steps twenty, which holds the batch at AR however much the curve and the acceptance
    promised; the output is AR's either way. On a model whose drafts are accepted (it continues a cycle)."""
    model = cycle_qwen2()
    prompts = [[(start + i) % 12 for i in range(20)] for start in range(4)]
    engine = DecodingEngine(model, [], max_batch_size=4, cost_curve=knee_curve(4096))
    engine.overhead_timed_by_caller = True
    config = DecodeConfig(decoder="auto", block_size=4, max_new_tokens=160)
    for i, prompt in enumerate(prompts):
        engine.add(str(i), prompt, config)
    widths, outputs = [], {}
    while engine.has_work:
        outputs.update({out.request_id: out.result.token_ids for out in engine.step() if out.result is not None})
        if engine.last_plan is not None and engine.last_batch_size == 4:
            widths.append(engine.last_plan.width)
            engine.observe_step(0.0, 20000.0 if engine.last_plan.width > 1 else 1000.0)
    settled = 2 * (SETTLING_STEPS + MIN_STEPS)  # drafting measured, then AR beside it
    assert min(widths[: settled // 2]) > 1 and len(widths) > settled + 10
    assert set(widths[settled:]) == {1}
    ar = generate(model, prompts, DecodeConfig(decoder="ar", max_new_tokens=160), [])
    assert [outputs[str(i)] for i in range(4)] == [r.token_ids for r in ar]
