"""Precision by capability: ``auto`` is bf16 only where the processor computes it natively, and the choice
reaches the base build, training, decoding and the reports (jf_ray/precision.py)."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from jf_ray import precision
from jf_ray.precision import cpu_info_from, parse_cpuinfo, resolve_precision

AVX2_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx fma avx2 bmi2
"""
SAPPHIRE_CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile avx512_fp16
"""
GRAVITON_CPUINFO = """processor\t: 0
Features\t: fp asimd sve bf16 i8mm
CPU implementer\t: 0x41
"""


def cpu_of(text: str):
    model, flags = parse_cpuinfo(text)
    return cpu_info_from(model, flags, threads=2)


AVX2, NATIVE = cpu_of(AVX2_CPUINFO), cpu_of(SAPPHIRE_CPUINFO)


@pytest.fixture
def this_cpu(monkeypatch):
    """Make the process see a given processor (what ``auto`` resolves against everywhere)."""

    def use(cpu) -> None:
        monkeypatch.setattr(precision, "cpu_info", lambda: cpu)

    return use


def test_cpuinfo_flags_decide_native_bf16():
    assert AVX2.model == "AMD EPYC 7B12" and AVX2.features == ("avx2",) and not AVX2.native_bf16
    assert NATIVE.native_bf16 and {"avx512_bf16", "amx_bf16"} <= set(NATIVE.features)
    graviton = cpu_of(GRAVITON_CPUINFO)
    assert graviton.native_bf16 and graviton.features == ("bf16",)
    record = AVX2.record()
    assert record["cpu_features"] == {name: name == "avx2" for name in precision.FEATURES}
    assert record["native_bf16"] is False and record["cpu_threads"] == 2


@pytest.mark.parametrize(
    ("cpu", "purpose", "expected"),
    [
        (AVX2, "pretrain", "fp32"),
        (NATIVE, "pretrain", "bf16"),
        (AVX2, "train", "fp32"),
        (NATIVE, "train", "fp32"),
        (AVX2, "decode", "fp32"),
        (NATIVE, "decode", "fp32"),
    ],
)
def test_auto_picks_bf16_only_to_pretrain_on_native_hardware(cpu, purpose, expected):
    chosen = resolve_precision("auto", "cpu", purpose, cpu=cpu)
    assert chosen.name == expected
    assert cpu.model in chosen.reason or purpose != "pretrain"


def test_auto_on_a_gpu_is_bf16_whatever_the_host_cpu():
    assert resolve_precision("auto", "cuda:0", "train", cpu=AVX2).name == "bf16"
    assert resolve_precision("auto", "cuda", "decode", cpu=AVX2).name == "bf16"


def test_explicit_settings_win_and_emulated_bf16_is_warned(caplog):
    precision._warn_emulated.cache_clear()
    with caplog.at_level(logging.WARNING, logger="jf_ray.precision"):
        assert resolve_precision("fp32", "cpu", "train", cpu=NATIVE).name == "fp32"
        assert not caplog.records
        forced = resolve_precision("bf16", "cpu", "train", cpu=AVX2)
    assert forced.name == "bf16" and "emulated" in forced.reason
    assert len(caplog.records) == 1 and "no native bf16" in caplog.records[0].getMessage()
    assert "AMD EPYC 7B12" in caplog.records[0].getMessage()
    assert resolve_precision("bf16", "cpu", "decode", cpu=NATIVE).name == "bf16"


def test_unknown_precision_is_a_user_error():
    from jf_ray.errors import UserInputError

    with pytest.raises(UserInputError, match="unknown precision 'half'"):
        resolve_precision("half", "cpu", "train", cpu=AVX2)


def test_the_environment_overrides_the_verdict(monkeypatch):
    monkeypatch.setenv(precision.NATIVE_BF16_ENV, "1")
    precision.cpu_info.cache_clear()
    try:
        forced = precision.cpu_info()
        assert forced.native_bf16 and forced.source == "JF_NATIVE_BF16" and forced.threads >= 1
        monkeypatch.delenv(precision.NATIVE_BF16_ENV)
        precision.cpu_info.cache_clear()
        assert precision.cpu_info().source in ("cpuinfo", "probe")  # this machine's own processor, read
    finally:
        precision.cpu_info.cache_clear()


@pytest.mark.parametrize(("cpu", "expected"), [(AVX2, "fp32"), (NATIVE, "bf16")])
def test_the_base_build_trains_in_the_resolved_precision(cpu, expected, this_cpu, monkeypatch, tmp_path):
    from jf_ray.basemodel import build, pretrain

    this_cpu(cpu)
    seen = []
    real_step = pretrain._train_step

    def spy(model, optimizer, rows, index, bf16=False):
        seen.append(bf16)
        return real_step(model, optimizer, rows, index, bf16)

    monkeypatch.setattr(pretrain, "_train_step", spy)
    out = build.build_base(tmp_path / "base", preset="micro", overrides=["steps=3"])
    info = json.loads((out / build.BUILD_INFO).read_text())
    assert info["preset"]["precision"] == expected
    assert seen == [expected == "bf16"] * 3
    assert info["machine"]["cpu_model"] == cpu.model and info["machine"]["native_bf16"] == cpu.native_bf16


def test_builds_in_either_precision_are_cached_apart(this_cpu):
    from jf_ray.basemodel.build import content_hash, resolved_for_this_machine
    from jf_ray.basemodel.presets import resolve_preset

    preset = resolve_preset("micro")
    this_cpu(AVX2)
    on_avx2 = resolved_for_this_machine(preset)
    this_cpu(NATIVE)
    on_native = resolved_for_this_machine(preset)
    assert (on_avx2.precision, on_native.precision) == ("fp32", "bf16")
    assert content_hash(on_avx2, 0) != content_hash(on_native, 0)


def test_the_old_bf16_autocast_override_names_its_successor():
    from jf_ray.basemodel.presets import resolve_preset
    from jf_ray.errors import UserInputError

    with pytest.raises(UserInputError, match="precision=auto"):
        resolve_preset("small", ["bf16_autocast=false"])


@pytest.mark.parametrize("cpu", [AVX2, NATIVE])
def test_training_rounds_autocast_only_where_bf16_resolves(cpu, this_cpu):
    from jf_ray.training.loop import autocast_context

    this_cpu(cpu)
    with autocast_context("cpu", "auto"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast_context("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("cpu", [AVX2, NATIVE])
def test_decoding_on_cpu_stays_fp32_unless_asked(cpu, this_cpu):
    from jf_ray.modeling import resolve_dtype
    from jf_ray.vllm_engine import VllmOptions, _vllm_dtype

    this_cpu(cpu)
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert _vllm_dtype(VllmOptions(dtype="auto", device="cpu")) == "float32"


def test_bench_json_records_the_machine_and_precision(this_cpu):
    from jf_ray.bench.common import MachineRecord

    this_cpu(AVX2)
    record = MachineRecord.start().finish("fp32")
    assert record["cpu_model"] == "AMD EPYC 7B12" and record["cpu_features"]["avx2"]
    assert record["cpu_features"]["avx512_bf16"] is False and record["precision"] == "fp32"
    assert record["torch"] == torch.__version__.split("+")[0] or record["torch"].startswith(torch.__version__[:4])
    assert record["transformers"]


def test_the_report_names_machine_and_precisions(this_cpu):
    from jf_ray.pipeline.report import machine_line, machine_section

    class Outputs:
        class base:  # noqa: N801 - stands in for RunOutputs.base
            precision = "bf16"

    this_cpu(NATIVE)
    section = machine_section(Outputs, [{"precision": "fp32"}, {"precision": "fp32"}])
    assert section["precision"] == {
        "base": "bf16",
        "train": ["fp32", "fp32"],
        "decode": "fp32",
        "decode_reason": section["precision"]["decode_reason"],
    }
    line = machine_line(section)
    assert "Intel(R) Xeon(R) Platinum 8481C" in line and "avx512_bf16" in line
    assert "base bf16, training fp32, decoding fp32" in line


def test_a_stage_far_behind_its_estimate_says_so(caplog):
    from jf_ray.pipeline.graph import behind_schedule_warnings

    with caplog.at_level(logging.WARNING, logger="jf_ray.pipeline.graph"):
        with behind_schedule_warnings("base", expected_s=0.01, check_every_s=0.02, min_warn_s=0):
            time.sleep(0.3)
        with behind_schedule_warnings("data", expected_s=60.0, check_every_s=0.02, min_warn_s=0):
            time.sleep(0.1)
    messages = [r.getMessage() for r in caplog.records]
    assert messages and all("stage base is running behind" in m for m in messages)


def test_the_first_eta_comes_from_the_measured_step():
    from jf_ray.pipeline.config import PipelineConfig
    from jf_ray.pipeline.estimate import MachinePace, stage_seconds

    cfg = PipelineConfig.load("jobs/configs/quickstart.yaml")
    slow = stage_seconds(cfg, MachinePace(base_step_s=6.0, speed=0.5))
    fast = stage_seconds(cfg, MachinePace(base_step_s=0.5, speed=1.0))
    steps = cfg.base.overrides["steps"]
    assert slow["base"] > steps * 6.0 and fast["base"] < steps * 0.5 + 60
    assert slow["collect"] == pytest.approx(2 * fast["collect"])


def test_the_step_probe_times_the_preset_at_its_precision():
    from jf_ray.basemodel.presets import resolve_preset
    from jf_ray.basemodel.pretrain import time_train_steps

    threads = torch.get_num_threads()
    seconds = time_train_steps(resolve_preset("micro", ["precision=fp32"]), steps=2, threads=1)
    assert 0 < seconds < 10 and torch.get_num_threads() == threads
