"""The one scorer: executed code (our tasks, HumanEval, chat-style replies) and answer checks."""

from __future__ import annotations

import pytest

from jf_ray.sandbox import SandboxLimits
from jf_ray.scoring import answer_matches, extract_code, program_for, score_outputs, wilson_interval
from jf_ray.workloads import load_examples
from jf_ray.workloads.humaneval import humaneval_examples

LIMITS = SandboxLimits(timeout_s=10.0)


def test_reference_bodies_pass_and_wrong_ones_fail():
    tasks = load_examples("code", "heldout", 40, seed=4)  # every kind and reduction, most filters
    good = score_outputs(tasks, [t.answer for t in tasks], LIMITS)
    assert good["pass_at_1"] == 1.0 and good["correct"] == 40 and good["n"] == 40
    wrong = ["    return None\n", "    return 1 / 0\n", "    while True:\n        pass\n", "    import socket\n"]
    bad = score_outputs(tasks[:4], wrong, SandboxLimits(timeout_s=2.0))
    assert bad["pass_at_1"] == 0.0 and not any(s["correct"] for s in bad["samples"])


def test_a_chat_reply_with_the_whole_function_in_a_fence_passes():
    [task] = load_examples("code", "heldout", 1, seed=5)
    reply = f"Here you go:\n```python\n{task.prompt}{task.answer}```\nIt filters the list."
    assert extract_code(reply) == task.prompt + task.answer
    assert score_outputs([task], [reply], LIMITS)["pass_at_1"] == 1.0
    assert program_for(task, task.answer).endswith(f"check({task.entry_point})\n")


def test_humaneval_canonical_solutions_pass_in_our_sandbox():
    problems = humaneval_examples()[::8]  # a spread of 21 problems: imports, helpers, floats, strings
    assert score_outputs(problems, [p.answer for p in problems], LIMITS)["pass_at_1"] == 1.0
    assert score_outputs(problems[:3], ["    pass\n"] * 3, LIMITS)["pass_at_1"] == 0.0


def test_answers_and_the_refusal_to_mix():
    math = load_examples("math", "heldout", 2, seed=0)
    score = score_outputs(math, [math[0].answer, "The answer is -1."])
    assert score["accuracy"] == 0.5 and score["correct"] == 1 and "pass_at_1" not in score
    assert answer_matches("Paris", "  Paris\n") and not answer_matches("Paris", "Lyon")
    with pytest.raises(ValueError, match="mix"):
        score_outputs(math[:1] + load_examples("code", "heldout", 1), ["", ""])


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (49, 164, 0.2340, 0.3728), (0, 0, 0, 1)],
)
def test_wilson_interval_known_values(successes, n, low, high):
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=1e-4)


def test_every_rate_carries_its_interval():
    math = load_examples("math", "heldout", 4)
    score = score_outputs(math, [math[0].answer, math[1].answer, "", ""])
    assert score["accuracy"] == 0.5 and (score["ci_low"], score["ci_high"]) == pytest.approx((0.1500, 0.8500), abs=1e-4)
