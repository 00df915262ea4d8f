"""The code, math, wordmath and stdlib workloads: splits, generators, the math checker, JSONL export."""

from __future__ import annotations

import json
import re

import pytest

from jf_ray.cli.main import main
from jf_ray.errors import UserInputError
from jf_ray.scoring import answer_matches
from jf_ray.workloads import TASKS, load_examples, read_examples, write_examples
from jf_ray.workloads.code import draw_task, generate_code
from jf_ray.workloads.code_parts import KINDS, REDUCTIONS
from jf_ray.workloads.common import TASKS as EMBEDDED_TASKS
from jf_ray.workloads.common import jsonl_to_examples, split_of
from jf_ray.workloads.humaneval import humaneval_examples
from jf_ray.workloads.math import column, final_answer, generate_math, is_correct
from jf_ray.workloads.stdlib import (
    body_parses,
    extract_functions,
    split_files,
    stdlib_examples,
    stdlib_files,
)
from jf_ray.workloads.word_math import ANSWER_FORMAT

_EQUATION_RE = re.compile(r"((?:\d+ [-+*/] )+\d+) = (\d+)")
_COLUMN_RE = re.compile(r"(\d+) ([-+]) (\d+): [^\n]*; so (\d+)")


# ---------------------------------------------------------------- math


def test_math_is_deterministic_per_seed_and_fresh_across_seeds():
    assert generate_math(20, "heldout", seed=3) == generate_math(20, "heldout", seed=3)
    other = {e.prompt for e in generate_math(20, "heldout", seed=4)}
    assert not other & {e.prompt for e in generate_math(20, "heldout", seed=3)}


def test_math_splits_never_share_a_problem():
    heldout = generate_math(300, "heldout", seed=0)
    assert all(split_of(e.prompt) == "heldout" for e in heldout)
    train = {e.prompt for seed in (0, 1) for e in generate_math(1500, "train", seed=seed)}
    assert not train & {e.prompt for e in heldout}


def test_math_solutions_compute_exactly():
    for example in generate_math(300, "train", seed=7):
        equations = list(_EQUATION_RE.finditer(example.answer))
        columns = list(_COLUMN_RE.finditer(example.answer))
        assert len(equations) >= 2, example.answer  # at least two events, each with a computation
        for match in equations:
            assert _evaluate(match[1]) == int(match[2]), example.answer
        for match in columns:
            assert _evaluate(f"{match[1]} {match[2]} {match[3]}") == int(match[4]), example.answer
        # The final answer is the result of the last computation.
        last = max(equations + columns, key=lambda m: m.end())
        assert final_answer(example.answer) == int(last[len(last.groups())])


def test_column_arithmetic_covers_every_pair():
    for a in range(100):
        for b in range(100):
            if a + b <= 99:
                assert column(a, "+", b).endswith(f"so {a + b}")
            if b <= a:
                assert column(a, "-", b).endswith(f"so {a - b}")
    assert column(45, "+", 17) == "45 + 17: 5 + 7 = 12, carry 1; 4 + 1 + 1 = 6; so 62"
    assert column(42, "-", 7) == "42 - 7: 12 - 7 = 5, borrow 1; 4 - 0 - 1 = 3; so 35"


def _evaluate(expression: str) -> int:
    """Left-to-right value of ``a op b op c`` with integer division that must be exact."""
    tokens = expression.split()
    value = int(tokens[0])
    for op, operand in zip(tokens[1::2], map(int, tokens[2::2])):
        if op == "/":
            assert value % operand == 0
        value = {
            "+": value + operand,
            "-": value - operand,
            "*": value * operand,
            "/": value // max(operand, 1),
        }[op]
    return value


def test_math_checker_accepts_right_and_rejects_wrong_answers():
    example = generate_math(1, "heldout", seed=0)[0]
    value = final_answer(example.answer)
    assert is_correct(example.answer, example.answer)
    assert is_correct(f"Some steps.\nThe answer is {value}.", example.answer)
    assert is_correct(f"#### {value}", example.answer)
    assert is_correct(f"so the total is \\boxed{{{value}}}", example.answer)
    assert not is_correct(f"The answer is {value + 1}.", example.answer)
    assert not is_correct(f"The answer is {value}1.", example.answer)
    # A solution cut off before its final line does not pass, even if its last number is the answer.
    cut = example.answer.rsplit("\n", 1)[0]
    assert not is_correct(cut, example.answer)
    assert not is_correct("", example.answer)
    assert not is_correct(f"The answer is {value}.", "no reference answer here")


# ---------------------------------------------------------------- code (executed tasks)


def test_code_tasks_are_deterministic_per_seed_and_fresh_across_seeds():
    first = generate_code(30, "train", seed=1)
    assert first == generate_code(30, "train", seed=1)
    assert not {e.prompt for e in first} & {e.prompt for e in generate_code(30, "train", seed=2)}
    assert len({e.prompt for e in first}) == 30


def test_code_split_is_by_task_specification_and_disjoint():
    """Held-out tasks differ from every training task in their specification, not only in their examples."""
    rng = __import__("random").Random(0)
    specs = {}
    for _ in range(3000):
        spec, example = draw_task(rng)
        specs.setdefault(split_of(spec), set()).add(spec)
    assert specs["train"] and specs["heldout"] and not specs["train"] & specs["heldout"]
    assert 0.04 < len(specs["heldout"]) / (len(specs["heldout"]) + len(specs["train"])) < 0.2
    held = generate_code(60, "heldout", seed=0)
    train = generate_code(600, "train", seed=0)
    assert not {e.prompt for e in held} & {e.prompt for e in train}
    assert all(split_of(spec_of(e)) == "heldout" for e in held)
    assert all(split_of(spec_of(e)) == "train" for e in train)
    assert not {spec_of(e) for e in held} & {spec_of(e) for e in train}


def spec_of(example) -> str:
    """Signature and first docstring line: the task without its examples."""
    signature, doc = example.prompt.split("\n")[:2]
    return signature + "\n" + doc.strip().removeprefix('"' * 3)


def test_code_tasks_are_humaneval_shaped_with_multi_line_bodies():
    for example in generate_code(40, "heldout", seed=3):
        assert example.prompt.startswith(f"def {example.entry_point}(") and ">>> " in example.prompt
        assert example.tests.startswith("def check(candidate):\n") and example.tests.count("assert ") == 5
        assert len(set(example.tests.splitlines())) == 6  # five different test inputs
        assert body_parses(example.prompt, example.answer)
        assert example.answer.count("\n") >= 4 and "    for " in example.answer  # a loop, statement by statement
    tasks = [draw_task(__import__("random").Random(i))[1] for i in range(600)]
    returns = {t.answer.rsplit("return ", 1)[1].split("(")[0][:8] for t in tasks}
    loops = {t.answer.split("for ")[1].split(" in")[0] for t in tasks}
    assert len(returns) >= 8 and loops == {"x", "w", "ch"} and len(REDUCTIONS) >= 8 and len(KINDS) >= 3


# ---------------------------------------------------------------- stdlib (language modelling)


def test_stdlib_split_is_by_file_and_disjoint():
    train, heldout = set(split_files("train")), set(split_files("heldout"))
    assert train and heldout and not train & heldout
    assert train | heldout == set(stdlib_files())
    assert all(split_of(f) == "heldout" for f in heldout)
    held_examples = stdlib_examples("heldout", n=40, seed=0)
    train_examples = stdlib_examples("train", n=40, seed=0)
    assert len(held_examples) == 40 and len(train_examples) == 40
    assert {e.source for e in held_examples} <= heldout
    assert {e.source for e in train_examples} <= train


def test_stdlib_examples_are_seeded_and_parse():
    first = stdlib_examples("heldout", n=15, seed=1)
    assert first == stdlib_examples("heldout", n=15, seed=1)
    assert first != stdlib_examples("heldout", n=15, seed=2)
    for example in first:
        assert example.prompt.startswith(("def ", "async def "))
        assert body_parses(example.prompt, example.answer)


SOURCE = '''
class Box:
    def area(self, scale=1):
        """Area of the box.

        Scaled by ``scale``.
        """
        w = self.w * scale
        return w * self.h

def no_doc(x):
    return x

def only_doc():
    """Nothing else."""
'''


def test_extract_functions_splits_signature_docstring_from_body():
    [example] = extract_functions(SOURCE, origin="box.py")
    assert example.prompt == 'def area(self, scale=1):\n    """Area of the box.\n\n    Scaled by ``scale``.\n    """\n'
    assert example.answer == "    w = self.w * scale\n    return w * self.h\n"
    assert example.source == "box.py"


def test_body_parses_needs_a_real_body():
    prompt = 'def f(x):\n    """Double x."""\n'
    assert body_parses(prompt, "    return 2 * x\n")
    assert body_parses(prompt, "def f(x):\n    return 2 * x\n")  # a model repeating the whole function
    assert not body_parses(prompt, "   \n")
    assert not body_parses(prompt, "    return 2 *\n")
    assert not body_parses(prompt, "return x\n")  # not indented: ends the function, body is empty


# ---------------------------------------------------------------- export


def test_jsonl_round_trip_local_and_s3(tmp_path, s3_bucket):
    examples = load_examples("math", "train", 5, seed=0) + load_examples("stdlib", "heldout", 2, seed=0)
    examples += load_examples("code", "heldout", 2, seed=0)
    for uri in (str(tmp_path / "out.jsonl"), f"{s3_bucket}/prompts/out.jsonl"):
        assert write_examples(uri, examples) == 9
        assert read_examples(uri) == examples
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"prompt", "answer"} and set(rows[5]) == {"prompt", "answer", "source"}
    assert set(rows[-1]) == {"prompt", "answer", "tests", "entry_point"}


def test_humaneval_is_read_from_the_package_data():
    problems = humaneval_examples()
    assert len(problems) == 164 and problems[0].source == "HumanEval/0"
    assert all(p.tests and p.entry_point and p.prompt for p in problems)
    assert load_examples("humaneval", "heldout", 5) == problems[:5]
    with pytest.raises(UserInputError, match="test set"):
        load_examples("humaneval", "train", 5)


def test_user_jsonl_rows_in_our_and_humanevals_layout():
    ours = '{"prompt": "def f(x):\\n", "tests": "def check(c):\\n    assert c(1) == 2\\n", "entry_point": "f"}'
    theirs = json.dumps(
        {
            "task_id": "T/0",
            "prompt": "def g():\n",
            "canonical_solution": "    return 1\n",
            "test": "x",
            "entry_point": "g",
        }
    )
    first, second = jsonl_to_examples(f"{ours}\n{theirs}\n".encode())
    assert first.entry_point == "f" and first.tests.startswith("def check")
    assert second.answer == "    return 1\n" and second.tests == "x" and second.source == "T/0"
    with pytest.raises(UserInputError, match="entry_point"):
        jsonl_to_examples(b'{"prompt": "p", "tests": "def check(c): pass"}\n', source="mine.jsonl")


def test_load_examples_rejects_bad_input():
    with pytest.raises(UserInputError, match="task"):
        load_examples("poetry", "train", 3)
    with pytest.raises(UserInputError, match="split"):
        load_examples("math", "test", 3)
    with pytest.raises(UserInputError, match=">= 1"):
        load_examples("math", "train", 0)


def test_cli_data_export(tmp_path, capsys):
    out = tmp_path / "math.jsonl"
    code = main(
        [
            "data",
            "export",
            "--task",
            "math",
            "--split",
            "heldout",
            "--out",
            str(out),
            "--n",
            "4",
            "--seed",
            "9",
        ]
    )
    assert code == 0
    assert read_examples(str(out)) == generate_math(4, "heldout", seed=9)
    assert "wrote 4 math/heldout examples" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["data", "export", "--task", "math", "--out", str(out), "--n", "0"])
    assert exc.value.code == 2


def test_every_per_task_table_names_every_task():
    """Task names are defined once (jf_ray.workloads.tasks.ALL_TASKS: the embedded ones of common.TASKS and the
    instruct-model ones); tables keyed by task must cover them all."""
    from jf_ray.evaluation import DEFAULT_MAX_NEW_TOKENS
    from jf_ray.pipeline.config import BENCHMARK_PROMPTS, WorkloadConfig
    from jf_ray.workloads.common import LOSS_TASKS, TEST_ONLY_TASKS
    from jf_ray.workloads.tasks import ALL_TASKS

    assert set(DEFAULT_MAX_NEW_TOKENS) == set(BENCHMARK_PROMPTS) == set(ALL_TASKS)
    assert set(TEST_ONLY_TASKS) | set(LOSS_TASKS) <= set(ALL_TASKS)
    assert WorkloadConfig(tasks=["stdlib"], train_prompts={"stdlib": 4}).tasks == ["stdlib"]
    assert WorkloadConfig(tasks=["wordmath"], train_prompts={"wordmath": 4}).tasks == ["wordmath"]
    with pytest.raises(ValueError, match="poetry"):
        WorkloadConfig(tasks=["poetry"])


# ---------------------------------------------------------------- wordmath (plain English, instruct models)
def test_word_problems_are_deterministic_per_seed_and_split():
    first = load_examples("wordmath", "heldout", 30, seed=3)
    assert first == load_examples("wordmath", "heldout", 30, seed=3)
    assert first != load_examples("wordmath", "heldout", 30, seed=4)
    assert all(split_of(ex.prompt) == "heldout" for ex in first)
    train = load_examples("wordmath", "train", 200, seed=3)
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in first}
    assert len({ex.prompt for ex in train}) == 200


def test_word_problems_are_plain_english_with_a_checkable_answer():
    for example in load_examples("wordmath", "train", 200, seed=0):
        question = example.prompt.removesuffix(" " + ANSWER_FORMAT)
        assert question != example.prompt and question.endswith("?") and not re.search(r"\d+ [-+] \d+:", question)
        value = final_answer(example.answer)
        assert value is not None and value >= 0
        for left, right in _EQUATION_RE.findall(example.answer):  # every step of the working is right
            assert eval(left.replace("/", "//")) == int(right), example.answer
        assert example.answer.endswith(f"The answer is {value}.")


def test_word_problems_are_scored_by_final_answer():
    example = load_examples("wordmath", "heldout", 1, seed=0)[0]
    value = final_answer(example.answer)
    assert answer_matches(example.answer, f"Let me think. So it is {value}. The answer is {value}.")
    assert not answer_matches(example.answer, f"The answer is {value + 1}.")
    assert not answer_matches(example.answer, f"It is {value}")  # no stated final answer: not scored right
    assert answer_matches(example.answer, f"#### {value}")


def test_wordmath_is_a_task_everywhere_and_math_stays_embedded(tmp_path):
    assert "wordmath" in TASKS and "wordmath" not in EMBEDDED_TASKS
    out = tmp_path / "wm.jsonl"
    assert main(["data", "export", "--task", "wordmath", "--split", "heldout", "--n", "5", "--out", str(out)]) == 0
    assert read_examples(str(out)) == load_examples("wordmath", "heldout", 5)
    with pytest.raises(UserInputError, match="unknown task"):
        load_examples("algebra", "train", 1)
