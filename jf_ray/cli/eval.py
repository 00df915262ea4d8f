"""``jf-ray eval``: task quality (pass@1 by execution, accuracy, loss) and speed beside greedy AR, as JSON."""

from __future__ import annotations

import argparse

from jf_ray.cli.common import add_decode_options, add_model_options, decoder_name, positive_int
from jf_ray.decoding.registry import DECODER_NAMES
from jf_ray.workloads.common import TASKS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on a workload, HumanEval or your own JSONL set with any decoder",
        description="code, humaneval and sets with tests: pass@1, each completion executed in the sandbox. "
        "math and sets with answers: final-answer accuracy. stdlib: loss of the reference bodies. Every "
        "decoder other than ar runs beside greedy AR: TPF, tokens/s, speed-up over AR, repetition.",
    )
    add_model_options(parser)
    parser.add_argument("--task", required=True, choices=TASKS, help="workload (with --prompts: a label)")
    parser.add_argument(
        "--prompts",
        default=None,
        help="JSONL (path or URI) of your own examples: {prompt, tests, entry_point} rows are executed, "
        "{prompt, answer} rows checked by final answer; HumanEval's own row layout works too",
    )
    parser.add_argument("--split", default="heldout", choices=("train", "heldout"))
    parser.add_argument("--decoder", type=decoder_name, default="ar", help=" | ".join(DECODER_NAMES))
    parser.add_argument("--n", type=positive_int, default=None, help="examples (default 200; all of HumanEval)")
    add_decode_options(parser)
    parser.set_defaults(max_new_tokens=None)  # per task: a math solution, a function body, a HumanEval reply
    parser.add_argument("--batch-size", type=positive_int, default=8, help="requests decoded together")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="wall-clock limit per executed program")
    parser.add_argument("--json", dest="json_out", default=None, help="write the report here (path or URI)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jf_ray.cli.common import decode_config_from_args
    from jf_ray.evaluation import DEFAULT_MAX_NEW_TOKENS, EvalConfig, evaluate
    from jf_ray.modeling import set_torch_threads
    from jf_ray.storage import check_writable_file

    if args.json_out:
        check_writable_file(args.json_out, "--json")
    set_torch_threads(args.threads)
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS[args.task]
    config = EvalConfig(
        model=args.model,
        task=args.task,
        prompts=args.prompts,
        split=args.split,
        n=args.n,
        seed=args.seed,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        timeout_s=args.timeout_s,
        decode=decode_config_from_args(args, decoder=args.decoder),
    )
    report = evaluate(config, progress_factory=_progress_bar)
    print_summary(report)
    if args.json_out:
        from jf_ray.storage import write_json_atomic

        write_json_atomic(args.json_out, report)
        print(f"wrote {args.json_out}")
    return 0


def _progress_bar(decoder: str, total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=f"eval {decoder}", unit="example", leave=False)
    return lambda done: bar.update(done)


SUMMARY_FIELDS = ("n", "pass_at_1", "accuracy", "loss", "correct", "tpf", "tokens_per_s", "speedup_vs_ar", "repetition")


def print_summary(report: dict) -> None:
    row = {"task": report["task"], "decoder": report["decoder"]}
    row.update({k: report[k] for k in SUMMARY_FIELDS if report.get(k) is not None})
    print("  ".join(f"{k}={v}" for k, v in row.items()))
