"""Evaluation on the workloads and HumanEval with the decoding engine, on the real micro checkpoint; ``jf-ray eval``."""

from __future__ import annotations

import json
import math

import pytest

from jf_ray.cli.main import main
from jf_ray.decoding import DecodeConfig
from jf_ray.evaluation import answer_loss, evaluate_decoders
from jf_ray.modeling import load_model, load_tokenizer
from jf_ray.workloads import load_examples
from jf_ray.workloads.math import is_correct

STAT_KEYS = {"tokens", "forwards", "tpf", "tokens_per_s", "wall_s", "speedup_vs_ar", "repetition"}


@pytest.fixture(scope="module")
def micro(micro_checkpoint):
    return load_model(str(micro_checkpoint), dtype="fp32", device="cpu"), load_tokenizer(str(micro_checkpoint))


def test_math_rows_score_with_the_checker(micro):
    model, tokenizer = micro
    problems = load_examples("math", "heldout", 6, seed=0)
    config = DecodeConfig(decoder="ar", max_new_tokens=24)
    rows = evaluate_decoders(model, tokenizer, problems, ["ar"], config, batch_size=4, warmup=False)
    row = rows["ar"]
    assert row["n"] == 6 and STAT_KEYS <= set(row)
    texts = [sample["output"] for sample in row["samples"]]
    assert [s["correct"] for s in row["samples"]] == [is_correct(t, p.answer) for t, p in zip(texts, problems)]
    assert row["accuracy"] == pytest.approx(row["correct"] / 6, abs=1e-4) and "pass_at_1" not in row
    assert row["forwards"] == row["tokens"]  # greedy AR: one token per forward, the prefill included


@pytest.mark.parametrize("decoder", ["jacobi", "mr"])
def test_parallel_decoders_reproduce_greedy_ar(micro, decoder):
    model, tokenizer = micro
    examples = load_examples("math", "heldout", 4, seed=1) + load_examples("stdlib", "heldout", 3, seed=0)
    config = DecodeConfig(decoder="ar", max_new_tokens=40, block_size=8)
    rows = evaluate_decoders(model, tokenizer, examples, [decoder], config, batch_size=3, warmup=False)
    assert rows[decoder]["exact_match_vs_ar"] == 1.0
    assert rows[decoder]["tokens"] == rows["ar"]["tokens"] and rows[decoder]["forwards"] <= rows["ar"]["forwards"]


def test_code_rows_are_scored_by_execution_and_stdlib_by_loss(micro):
    model, tokenizer = micro
    config = DecodeConfig(decoder="jacobi", block_size=8, max_new_tokens=16)
    code = evaluate_decoders(model, tokenizer, load_examples("code", "heldout", 4, seed=0), ["jacobi"], config, 2)
    assert code["jacobi"]["n"] == 4 and 0.0 <= code["jacobi"]["pass_at_1"] <= 1.0 and "accuracy" not in code["ar"]
    stdlib = load_examples("stdlib", "heldout", 4, seed=0)
    rows = evaluate_decoders(model, tokenizer, stdlib, ["jacobi"], config, 2, warmup=False, by_loss=True)
    # Barely trained: the loss is far above a trained model's and below a uniform guess over the vocabulary.
    assert 0.0 < rows["jacobi"]["loss"] < math.log(len(tokenizer)) + 1.0 and "pass_at_1" not in rows["jacobi"]


def test_answer_loss_does_not_depend_on_batching(micro):
    model, tokenizer = micro
    examples = load_examples("stdlib", "heldout", 5, seed=0) + load_examples("math", "heldout", 3, seed=0)
    one = answer_loss(model, tokenizer, examples, batch_size=1)
    many = answer_loss(model, tokenizer, examples, batch_size=8)
    assert one["tokens"] == many["tokens"] > 0
    assert one["loss"] == pytest.approx(many["loss"], abs=1e-3)


def eval_cli(checkpoint, tmp_path, *args: str) -> dict:
    out = tmp_path / "eval.json"
    common = ["--model", str(checkpoint), "--block-size", "4", "--threads", "1", "--json", str(out)]
    assert main(["eval", *common, *args]) == 0
    return json.loads(out.read_text())


def test_cli_eval_code_writes_json(micro_checkpoint, tmp_path, capsys):
    report = eval_cli(micro_checkpoint, tmp_path, "--task", "code", "--n", "2", "--decoder", "jacobi")
    assert report["task"] == "code" and report["decoder"] == "jacobi" and STAT_KEYS <= set(report)
    assert report["n"] == 2 and report["ar"]["pass_at_1"] == report["pass_at_1"]  # greedy: the same outputs
    assert "pass_at_1=" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_eval_humaneval_runs_all_164_through_the_sandbox(micro_checkpoint, tmp_path, monkeypatch):
    import jf_ray.scoring as scoring

    executed = []
    real = scoring.execute_many
    monkeypatch.setattr(scoring, "execute_many", lambda programs, *a: executed.extend(programs) or real(programs, *a))
    report = eval_cli(
        micro_checkpoint, tmp_path, "--task", "humaneval", "--decoder", "jacobi", "--max-new-tokens", "4",
        "--batch-size", "32",
    )  # fmt: skip
    # AR and Jacobi write the same completions (greedy): each distinct program runs once
    assert report["n"] == 164 and len(executed) == len(set(executed)) == 164
    assert 0.0 <= report["pass_at_1"] <= 0.05 and report["tpf"] >= 1.0 and report["speedup_vs_ar"] > 0
    assert all(program.rstrip().endswith(")") and "def check(candidate)" in program for program in executed)


def test_cli_eval_user_sets_with_tests_and_with_answers(micro_checkpoint, tmp_path):
    tests = "def check(candidate):\n    assert candidate(2) == 4\n"
    rows = [{"prompt": "def double(x):\n", "tests": tests, "entry_point": "double"}] * 2
    (tmp_path / "code.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = eval_cli(micro_checkpoint, tmp_path, "--task", "code", "--prompts", str(tmp_path / "code.jsonl"))
    assert report["n"] == 2 and "pass_at_1" in report
    answers = [{"prompt": "What is 2 + 2?", "answer": "The answer is 4."}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in answers))
    report = eval_cli(micro_checkpoint, tmp_path, "--task", "math", "--prompts", str(tmp_path / "qa.jsonl"))
    assert report["n"] == 1 and "accuracy" in report and report["decoder"] == "ar"
    (tmp_path / "mixed.jsonl").write_text((tmp_path / "code.jsonl").read_text() + (tmp_path / "qa.jsonl").read_text())
    args = ["eval", "--model", str(micro_checkpoint), "--task", "code", "--prompts", str(tmp_path / "mixed.jsonl")]
    assert main(args) == 2


def test_cli_eval_bad_input_exits_2(tmp_path):
    assert main(["eval", "--model", str(tmp_path / "missing"), "--task", "math", "--n", "1"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", str(tmp_path), "--task", "poetry"])
    assert exc.value.code == 2


def test_cli_bench_reports_every_decoder_exact_vs_ar_with_repeats(micro_checkpoint, tmp_path, monkeypatch):
    import jf_ray.bench.decoders as bench

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Ann has 3 pens.", "def add(a, b):"]))
    calls = []
    real_run_decoder = bench.run_decoder
    monkeypatch.setattr(bench, "run_decoder", lambda *a, **k: calls.append(a[2].decoder) or real_run_decoder(*a, **k))
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "decoders",
            "--model",
            str(micro_checkpoint),
            "--prompts",
            str(prompts),
            "--decoders",
            "jacobi,mr",
            "--block-size",
            "4",
            "--max-new-tokens",
            "12",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["config"]["repeats"] == 2 and set(report["results"]) == {"jacobi", "multiblock"}  # mr: alias
    assert report["benchmark"] == "decoders" and set(report["machine"]) >= {"cpus", "load_avg_start", "load_avg_end"}
    # an untimed warm-up of every decoder, then the timed runs interleaved
    assert calls == ["ar", "jacobi", "multiblock"] + ["ar", "jacobi", "multiblock", "ar", "jacobi", "multiblock"]
    for row in report["results"].values():
        assert row["exact_match_vs_ar"] == 1.0 and row["tpf"] >= 1.0 and row["speedup_vs_ar"] > 0
        low, high = row["speedup_vs_ar_range"]
        assert 0 < low <= row["speedup_vs_ar"] <= high
    # the shape of every decoding forward: one main draft, its candidates and its blocks each
    shapes = report["results"]["multiblock"]
    assert sum(shapes["draft_hist"].values()) == sum(shapes["candidates_hist"].values())
    assert sum(shapes["draft_hist"].values()) == sum(shapes["blocks_hist"].values()) > 0
    with pytest.raises(SystemExit) as exc:
        main(["bench", "decoders", "--model", str(micro_checkpoint), "--prompts", str(prompts), "--repeats", "0"])
    assert exc.value.code == 2


def test_speedup_pairs_each_run_with_the_ar_run_before_it():
    """A slow phase of the machine hits the AR run and the decoder run beside it alike: their ratio holds."""
    from jf_ray.bench.decoders import DecoderRun, summarize
    from jf_ray.decoding import DecodeResult, DecodeStats

    def run(tokens: list[int], walls: list[float]) -> DecoderRun:
        result = DecodeResult(tokens, "length", DecodeStats(tokens=len(tokens), forwards=len(tokens)))
        return DecoderRun([result], sorted(walls)[(len(walls) - 1) // 2], 0.0, 0.0, repeat_wall_s=walls)

    ar = run([1, 2, 3, 4], [2.0, 6.0, 6.0])  # the machine slowed down threefold after the first repeat
    fast = run([1, 2, 3, 4], [1.0, 1.5, 3.0])  # ... and was briefly quick again during its second run
    row = summarize(fast, [[0]], ar)
    # pairs 2/1, 6/1.5, 6/3: median 2 (the ratio of the median runs, 6/1.5, would say 4)
    assert row["speedup_vs_ar"] == 2.0 and row["speedup_vs_ar_range"] == [2.0, 4.0]
    assert row["exact_match_vs_ar"] == 1.0
    single = summarize(run([1, 2, 3, 4], [4.0]), [[0]], run([1, 2, 3, 4], [2.0]))
    assert single["speedup_vs_ar"] == 0.5 and single["speedup_vs_ar_range"] == [0.5, 0.5]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_bench_generate_reference_is_greedy_ar_by_transformers(micro_checkpoint, tmp_path, batch_size):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Ann has 3 pens.", "def f(x):", "Bo"]))
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "decoders",
                "--model",
                str(micro_checkpoint),
                "--prompts",
                str(prompts),
                "--decoders",
                "generate,rolling",
                "--block-size",
                "4",
                "--max-new-tokens",
                "12",
                "--repeats",
                "1",
                "--batch-size",
                str(batch_size),
                "--threads",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["results"]
    assert set(rows) == {"generate", "rolling"}
    assert rows["generate"]["exact_match_vs_ar"] == 1.0 and rows["generate"]["tpf"] == 1.0
    assert rows["generate"]["overhead_frac"] is None  # generate's forwards are not timed apart
    assert rows["rolling"]["exact_match_vs_ar"] == 1.0


def test_generate_rows_end_at_the_first_eos():
    from jf_ray.bench.decoders import _until_eos

    stopped = _until_eos([5, 7, 2, 0, 0], eos_ids=[2])
    assert stopped.token_ids == [5, 7, 2] and stopped.finish_reason == "stop" and stopped.stats.tokens == 3
    capped = _until_eos([5, 7, 9], eos_ids=[2])
    assert capped.token_ids == [5, 7, 9] and capped.finish_reason == "length"


def test_run_decoders_without_warmup_runs_each_decoder_once_per_repeat(micro_checkpoint, monkeypatch):
    import jf_ray.bench.decoders as bench

    calls = []
    real_run_decoder = bench.run_decoder
    monkeypatch.setattr(bench, "run_decoder", lambda *a, **k: calls.append(a[2].decoder) or real_run_decoder(*a, **k))
    model = load_model(str(micro_checkpoint))
    config = DecodeConfig(block_size=4, max_new_tokens=6)
    runs = bench.run_decoders(model, [[5, 6, 7], [8, 9]], ["ar", "rolling"], config, [], warmup=False)
    assert calls == ["ar", "rolling"] and runs["rolling"].results[0].token_ids == runs["ar"].results[0].token_ids
    calls.clear()
    bench.run_decoders(model, [[5, 6, 7]], ["rolling"], config, [], repeats=2)
    assert calls == ["ar", "rolling"] * 3  # one untimed warm-up each, then two interleaved repeats


def test_cli_eval_wordmath_and_a_dataset_set_report_intervals(micro_checkpoint, tmp_path, capsys):
    report = eval_cli(micro_checkpoint, tmp_path, "--task", "wordmath", "--n", "2", "--max-new-tokens", "8")
    assert report["n"] == 2 and 0.0 <= report["ci_low"] <= report["accuracy"] <= report["ci_high"] <= 1.0
    assert "ci_low=" in capsys.readouterr().out
    datasets = pytest.importorskip("datasets")
    rows = {"question": ["What is 2 + 2?", "What is 3 + 3?"], "solution": ["#### 4", "#### 6"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "qa.parquet"))
    reference = f"{tmp_path / 'qa.parquet'}?column=question&answer=solution"
    report = eval_cli(micro_checkpoint, tmp_path, "--task", "math", "--prompts", reference, "--max-new-tokens", "8")
    assert report["n"] == 2 and "accuracy" in report and "ci_high" in report
    missing = f"{tmp_path / 'qa.parquet'}?column=prompt_text&answer=solution"
    assert main(["eval", "--model", str(micro_checkpoint), "--task", "math", "--prompts", missing]) == 2
    assert "no column 'prompt_text'" in capsys.readouterr().err
