"""``jf-ray eval``: task quality (pass@1 by execution, accuracy, loss) and speed beside greedy AR, as JSON."""

from __future__ import annotations

import argparse

from jf_ray.cli.common import FieldFlag, add_config_options, config_from_args, decoder_name, positive_int
from jf_ray.config import DTYPE_NAMES
from jf_ray.decoding.registry import DECODER_NAMES
from jf_ray.scoring import QUALITY_FIELDS
from jf_ray.workloads.common import SPLITS
from jf_ray.workloads.tasks import ALL_TASKS as TASKS

FLAGS = (
    FieldFlag("--model", "HF checkpoint dir, file:// or s3:// URI, or hub name", required=True),
    FieldFlag("--task", "workload (with --prompts: a label)", choices=TASKS, required=True),
    FieldFlag(
        "--prompts",
        "JSONL (path or URI) of your own examples: {prompt, tests, entry_point} rows are executed, "
        "{prompt, answer} rows checked by final answer; HumanEval's own row layout works too",
    ),
    FieldFlag("--split", "workload split (default heldout)", choices=SPLITS),
    FieldFlag("--n", "examples (default 200; all of HumanEval)", positive_int),
    FieldFlag("--seed", "which examples are drawn; also the decoders' seed", int),
    FieldFlag("--batch-size", "requests decoded together (default 8)", positive_int),
    FieldFlag("--dtype", "model dtype (default auto)", choices=DTYPE_NAMES),
    FieldFlag("--device", "auto | cpu | cuda | cuda:N"),
    FieldFlag("--timeout-s", "wall-clock limit per executed program (default 10)", float),
    FieldFlag("--decoder", " | ".join(DECODER_NAMES) + " (default ar)", decoder_name, key="decode.decoder"),
    FieldFlag("--block-size", "Jacobi block size n", positive_int, key="decode.block_size"),
    FieldFlag("--max-new-tokens", "cap per answer (default: per task)", positive_int, key="decode.max_new_tokens"),
    FieldFlag("--num-blocks", "multiblock: blocks in flight K", positive_int, key="decode.num_blocks"),
    FieldFlag("--pool-size", "multiblock: candidates verified per forward", int, key="decode.pool_size"),
    FieldFlag("--spawn-ratio", "multiblock: spawn at ceil(r*n) accepted", float, key="decode.spawn_ratio"),
    FieldFlag("--recycle-context", "multiblock: copied candidates (default on)", bool, key="decode.recycle_context"),
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on a workload, HumanEval or your own JSONL set with any decoder",
        description="code, humaneval and sets with tests: pass@1, each completion executed in the sandbox. "
        "math, wordmath and sets with answers: final-answer accuracy. Rates carry a Wilson 95% interval "
        "(ci_low, ci_high). stdlib: loss of the reference bodies. Every decoder other than ar runs beside greedy "
        "AR: TPF, tokens/s, speed-up over AR, repetition. "
        "Settings: an EvalConfig (its decode section a DecodeConfig).",
    )
    add_config_options(parser, "EvalConfig", FLAGS)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", dest="json_out", default=None, help="write the report here (path or URI)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jf_ray.evaluation import EvalConfig, evaluate
    from jf_ray.modeling import set_torch_threads
    from jf_ray.storage import check_writable_file

    config = config_from_args(EvalConfig, args, FLAGS)
    if args.json_out:
        check_writable_file(args.json_out, "--json")
    set_torch_threads(args.threads)
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


# ci_low/ci_high: the rate's Wilson 95% interval (jf_ray.scoring.wilson_interval).
SUMMARY_FIELDS = (
    "n",
    *QUALITY_FIELDS,
    "ci_low",
    "ci_high",
    "correct",
    "tpf",
    "tokens_per_s",
    "speedup_vs_ar",
    "repetition",
)


def print_summary(report: dict) -> None:
    row = {"task": report["task"], "decoder": report["decoder"]}
    row.update({k: report[k] for k in SUMMARY_FIELDS if report.get(k) is not None})
    print("  ".join(f"{k}={v}" for k, v in row.items()))
