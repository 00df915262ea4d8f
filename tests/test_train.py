"""Training: data stream, plain loop (loss goes down, resume is exact), and the Ray TorchTrainer layer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tiny_models import random_qwen2

from jf_ray.decoding import DecodeConfig, generate
from jf_ray.packing.pack import PackOptions, pack_rows, packed_to_table
from jf_ray.packing.schema import PACKED_SCHEMA
from jf_ray.training.batches import TrainSequence, collate
from jf_ray.training.checkpoint import load_training_state, save_checkpoint
from jf_ray.training.config import TrainConfig
from jf_ray.training.data import MicroBatchStream, anchor_from_record, load_packed_sequences
from jf_ray.training.loop import LoopState, build_optimizer, build_scheduler, packed_forward, run_loop
from jf_ray.training.losses import jacobi_forcing_loss
from jf_ray.trajectories.recorder import trajectory_rows

VOCAB = 96
BLOCK = 8


def jacobi_sequences(model, count: int = 12, seed: int = 0) -> list:
    """Real greedy Jacobi trajectories of ``model`` packed with the progressive schedule."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(3, 7))] for _ in range(count)]
    cap = 4 * BLOCK  # as the collector does: decode one token more so the last block's drafts are full
    config = DecodeConfig(decoder="jacobi", block_size=BLOCK, max_new_tokens=cap + 1, record_trajectory=True, seed=seed)
    results = generate(model, prompts, config, eos_token_ids=[], batch_size=count)
    rows = []
    for index, (prompt, result) in enumerate(zip(prompts, results)):
        rows += trajectory_rows(
            f"p{index}",
            prompt,
            result,
            block_size=BLOCK,
            model_id="tiny",
            round_index=1,
            eos_ids=[],
            max_tokens=cap,
        )
    packed, stats = pack_rows(rows, PackOptions(window=4))
    assert stats.packed == count
    return packed


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A saved tiny Qwen2 and a committed packed dataset of its own Jacobi trajectories."""
    from jf_ray.storage import DatasetWriter

    root = tmp_path_factory.mktemp("train")
    model = random_qwen2(seed=0, vocab_size=VOCAB)
    model.save_pretrained(root / "base")
    packed = jacobi_sequences(model)
    writer = DatasetWriter(f"file://{root}/packed", PACKED_SCHEMA)
    writer.write_shard("part-0", packed_to_table(packed[:7]))
    writer.write_shard("part-1", packed_to_table(packed[7:]))
    writer.commit()
    return {"root": root, "model": str(root / "base"), "data": f"file://{root}/packed", "packed": packed}


def config_for(setup, **overrides) -> TrainConfig:
    base = dict(
        model=setup["model"],
        data=setup["data"],
        out=f"file://{setup['root']}/runs",
        lr=3e-3,
        warmup_ratio=0.0,
        micro_batch_size=2,
        max_row_tokens=200,
    )
    return TrainConfig(**{**base, **overrides})


def dataset_loss(model, sequences: list[TrainSequence]) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        parts = [jacobi_forcing_loss(packed_forward(model, collate([s])), collate([s])) for s in sequences]
    return {
        "total": sum(float(p.total) for p in parts) / len(parts),
        "consistency": sum(float(p.consistency) for p in parts) / len(parts),
        "ar": sum(float(p.ar) for p in parts) / len(parts),
    }


def test_each_worker_reads_only_the_shards_holding_its_rows(tiny_setup, tmp_path):
    import shutil

    from jf_ray.storage import DatasetError

    whole = load_packed_sequences(tiny_setup["data"])
    assert len(whole) == 12
    ranks = [load_packed_sequences(tiny_setup["data"], rank, 3) for rank in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]
    assert [s.prompt_ids for r in ranks for s in r] == [s.prompt_ids for s in whole], "contiguous, disjoint"
    assert [len(r) for r in (load_packed_sequences(tiny_setup["data"], rank, 5) for rank in range(5))] == [2] * 5
    # part-0 holds rows 0-6, part-1 rows 7-11: with part-1 corrupt, rank 0 (rows 0-3) never notices
    copy = tmp_path / "packed"
    shutil.copytree(tiny_setup["root"] / "packed", copy)
    (copy / "shards" / "part-1.parquet").write_bytes(b"not parquet")
    assert [s.prompt_ids for s in load_packed_sequences(f"file://{copy}", 0, 3)] == [s.prompt_ids for s in ranks[0]]
    with pytest.raises(DatasetError, match="part-1"):
        load_packed_sequences(f"file://{copy}", 2, 3)


def step_fingerprints(stream: MicroBatchStream, steps: range) -> list[list[list[int]]]:
    return [[batch.input_ids.flatten().tolist() for batch in stream(step)] for step in steps]


def test_a_resumed_worker_sees_the_batches_of_an_uninterrupted_one(tiny_setup):
    """Per rank, steps 0-4 (10 micro-batches of 2 over 6 rows: three epoch boundaries) in one go equal
    steps 0-1, then a fresh stream (a restarted worker re-reading its rows) from step 2 on."""
    config = config_for(tiny_setup, micro_batch_size=2, grad_accum=2, epochs=3)
    for rank in (0, 1):
        straight = MicroBatchStream(load_packed_sequences(tiny_setup["data"], rank, 2), config, rank)
        assert straight.micro_per_epoch == 3 and straight.total_steps() == 5  # ceil(3 * 3 / 2)
        restarted = MicroBatchStream(load_packed_sequences(tiny_setup["data"], rank, 2), config, rank)
        uninterrupted = step_fingerprints(straight, range(5))
        assert step_fingerprints(straight, range(2)) + step_fingerprints(restarted, range(2, 5)) == uninterrupted
        assert straight.epoch_order(0) != straight.epoch_order(1), "epochs reshuffle"
    first = [MicroBatchStream(load_packed_sequences(tiny_setup["data"], r, 2), config, r) for r in (0, 1)]
    assert step_fingerprints(first[0], range(1)) != step_fingerprints(first[1], range(1)), "ranks differ"


def test_anchor_sequences_ride_along_at_the_configured_ratio(tiny_setup):
    anchors = [anchor_from_record({"input_ids": list(range(1, 20 + i))}, None, 16, False) for i in range(5)]
    assert all(len(a) == 16 and a.is_anchor for a in anchors)
    config = config_for(tiny_setup, micro_batch_size=2, anchor="unused.jsonl", anchor_ratio=0.75)
    stream = MicroBatchStream(load_packed_sequences(tiny_setup["data"]), config, 0, anchors=anchors)
    counts = [stream.micro_batch(i).anchor_labels.ne(-100).sum().item() // 15 for i in range(8)]
    assert sum(counts) == 12  # 0.75 anchors per packed sequence, 2 packed sequences per micro-batch, 8 batches
    with pytest.raises(ValueError, match="anchor"):
        config_for(tiny_setup, anchor_ratio=0.5)


def train_in_process(setup, steps: int, stop: int | None = None, model=None, resume_from=None):
    """Run the plain loop for a ``steps``-step schedule, up to step ``stop``; optionally resume first."""
    config = config_for(setup, steps=steps)
    model = model or random_qwen2(seed=0, vocab_size=VOCAB).train()
    stream = MicroBatchStream(load_packed_sequences(setup["data"]), config, 0)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, steps, config.warmup_ratio)
    state = LoopState()
    if resume_from is not None:
        state = load_training_state(resume_from, model, optimizer, scheduler)
    logged = []
    run_loop(
        model,
        stream,
        optimizer,
        scheduler,
        config,
        stop or steps,
        state,
        "cpu",
        lambda s, m: logged.append(m),
    )
    return model, optimizer, scheduler, logged


def test_plain_loop_lowers_the_jacobi_forcing_loss(tiny_setup):
    sequences = load_packed_sequences(tiny_setup["data"])
    before = dataset_loss(random_qwen2(seed=0, vocab_size=VOCAB), sequences)
    model, _, _, logged = train_in_process(tiny_setup, steps=12)
    after = dataset_loss(model, sequences)
    assert after["total"] < 0.85 * before["total"]
    assert after["consistency"] < before["consistency"] and after["ar"] < before["ar"]
    assert [m["step"] for m in logged] == list(range(1, 13))
    assert all(m["tokens_per_s"] > 0 and m["consistency_pairs"] > 0 for m in logged)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_resume_from_a_checkpoint_continues_exactly(tiny_setup, tmp_path, model_dtype):
    """fp32 training of a model stored in fp32 or bf16: ``model/`` holds the weights in that dtype and
    nothing but model files; resuming (from ``model/`` + ``trainer/``) continues bit for bit."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    straight, _, _, _ = train_in_process(tiny_setup, steps=6)
    interrupted, optimizer, scheduler, _ = train_in_process(tiny_setup, steps=6, stop=3)
    state = LoopState(step=3)
    save_checkpoint(
        tmp_path, interrupted, None, optimizer, scheduler, state, {}, is_writer=True, model_dtype=model_dtype
    )
    model_dir = tmp_path / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {model_dtype}
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == str(model_dtype).removeprefix("torch.")
    stored_apart = sorted(p.name for p in (tmp_path / "trainer").iterdir())
    master = ["master.safetensors"] if model_dtype != torch.float32 else []
    assert stored_apart == sorted(["optimizer.safetensors", "trainer_state.json", *master])
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    resumed, _, _, logged = train_in_process(tiny_setup, steps=6, model=reloaded, resume_from=tmp_path)
    assert [m["step"] for m in logged] == [4, 5, 6]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name, atol=0, rtol=0)


def test_tied_embeddings_stay_tied_in_a_narrower_dtype(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64
    )
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=True, **shape))
    optimizer = build_optimizer(model, TrainConfig(model="m", data="d", out="o", steps=1))
    scheduler = build_scheduler(optimizer, 1, 0.0)
    save_checkpoint(tmp_path, model, None, optimizer, scheduler, LoopState(), {}, True, model_dtype=torch.bfloat16)
    with safe_open(tmp_path / "model" / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" not in weights.keys(), "the tied matrix is stored once"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16))


def test_consumers_fetch_only_the_model_files_of_an_s3_checkpoint(tiny_setup, s3_bucket, tmp_path, monkeypatch):
    from jf_ray.modeling import load_model, local_model_path
    from jf_ray.storage import upload_dir

    monkeypatch.setenv("JF_CACHE_DIR", str(tmp_path / "cache"))
    model, optimizer, scheduler, _ = train_in_process(tiny_setup, steps=2)
    save_checkpoint(tmp_path / "ckpt", model, None, optimizer, scheduler, LoopState(step=2), {}, is_writer=True)
    upload_dir(tmp_path / "ckpt", f"{s3_bucket}/run/checkpoint-000002")
    for uri in (f"{s3_bucket}/run/checkpoint-000002", f"{s3_bucket}/run/checkpoint-000002/model"):
        local = local_model_path(uri)
        assert sorted(p.name for p in Path(local).iterdir() if not p.name.startswith(".")) == [
            "config.json",
            "generation_config.json",
            "model.safetensors",
        ]
    assert not list((tmp_path / "cache").rglob("*optimizer*")), "the optimizer state was downloaded"
    loaded = load_model(f"{s3_bucket}/run/checkpoint-000002", dtype="fp32", device="cpu")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert Path(local_model_path(str(tmp_path / "ckpt"))) == tmp_path / "ckpt" / "model", "a local root resolves too"


@pytest.fixture(scope="module")
def ray_run(micro_checkpoint, tmp_path_factory, ray_session):
    """One 2-worker TorchTrainer run (gloo DDP on CPU) of 6 steps, checkpoint every 3, on the micro base
    model's own Jacobi trajectories with text anchors mixed in."""
    from jf_ray.modeling import load_model
    from jf_ray.storage import DatasetWriter
    from jf_ray.training.ray_train import train

    root = tmp_path_factory.mktemp("ray_train")
    packed = jacobi_sequences(load_model(str(micro_checkpoint), dtype="fp32", device="cpu"))
    writer = DatasetWriter(f"file://{root}/packed", PACKED_SCHEMA)
    writer.write_shard("part-0", packed_to_table(packed))
    writer.commit()
    (root / "anchor.jsonl").write_text("".join(json.dumps({"text": f"x = {i} + {i}\n"}) + "\n" for i in range(8)))
    setup = {"root": root, "model": str(micro_checkpoint), "data": f"file://{root}/packed"}
    config = config_for(
        setup,
        workers=2,
        steps=6,
        checkpoint_every=3,
        run_name="ray2",
        anchor=f"file://{root}/anchor.jsonl",
        anchor_ratio=0.5,
    )
    return config, train(config), packed


def test_two_worker_ray_run_lowers_the_loss_and_its_checkpoint_loads(ray_run):
    from jf_ray.modeling import load_model, load_tokenizer
    from jf_ray.storage import read_bytes, read_json

    config, summary, packed = ray_run
    assert summary["checkpoint"] == f"{config.out}/ray2/checkpoint-000006"
    assert summary["model"] == f"{summary['checkpoint']}/model"
    assert summary["metrics"]["step"] == 6 and summary["metrics"]["tokens_per_s"] > 0
    assert read_json(f"{config.out}/ray2/summary.json")["checkpoint"] == summary["checkpoint"]
    log = [json.loads(line) for line in read_bytes(summary["metrics_log"]).decode().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, 7))
    assert {"loss", "loss_consistency", "loss_ar", "lr", "tokens_per_s", "grad_norm"} <= set(log[0])
    assert all(entry["loss_anchor"] > 0 for entry in log), "every micro-batch carries an anchor (ratio 0.5 x 2)"
    # both workers' tokens are counted: one step covers 2 micro-batches of 2 sequences
    assert log[0]["tokens"] > 2 * max(s.num_tokens for s in packed)

    trained = load_model(summary["model"], dtype="fp32", device="cpu")
    assert load_tokenizer(summary["model"]).eos_token_id is not None, "the tokenizer travels with it"
    sequences = load_packed_sequences(config.data)
    before = dataset_loss(load_model(config.model, dtype="fp32", device="cpu"), sequences)
    after = dataset_loss(trained, sequences)
    assert after["total"] < 0.95 * before["total"]
    # the trained checkpoint still decodes: greedy Jacobi reproduces its greedy AR
    prompt = [[5, 17, 42, 8]]
    outputs = [
        generate(trained, prompt, DecodeConfig(decoder=d, block_size=BLOCK, max_new_tokens=24), [])[0]
        for d in ("ar", "jacobi")
    ]
    assert outputs[0].token_ids == outputs[1].token_ids


@pytest.mark.slow
def test_cli_bench_train_reports_packed_tokens_per_s_per_worker_count(ray_run, tmp_path):
    from jf_ray.cli.main import main

    config = ray_run[0]
    report_path = tmp_path / "train.json"
    argv = ["bench", "train", "--model", config.model, "--data", config.data, "--workers", "1", "--steps", "3"]
    argv += ["--skip", "1", "--scratch", f"file://{tmp_path}/runs", "--set", "micro_batch_size=2"]
    assert main([*argv, "--set", "max_row_tokens=200", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    (row,) = report["results"]
    assert report["benchmark"] == "train" and report["settings"]["set"] == ["micro_batch_size=2", "max_row_tokens=200"]
    assert row["workers"] == 1 and row["steps"] == 3 and row["tokens_per_s_median"] > 0 and row["tokens_per_step"] > 0
    assert set(report["machine"]) >= {"cpus", "torch", "load_avg_start", "load_avg_end"}


def test_rerunning_the_same_run_resumes_from_the_latest_checkpoint(ray_run):
    from jf_ray.storage import read_bytes
    from jf_ray.training.ray_train import train

    config, first, _ = ray_run
    summary = train(config.model_copy(update={"steps": 8}))
    assert summary["checkpoint"].endswith("checkpoint-000008")
    log = [json.loads(line) for line in read_bytes(summary["metrics_log"]).decode().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, 9)), "steps 1-6 kept, 7-8 appended, none redone"
    assert summary["metrics"]["tokens_total"] > first["metrics"]["tokens_total"]


def _fsdp_rank(rank: int, port: int, checkpoint_dir: str, batch) -> None:
    """One rank of a 2-process FSDP2 run (gloo, CPU): 3 steps on the same batch, then a full checkpoint."""
    import torch.distributed as dist

    from jf_ray.training.ray_train import shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = shard_model(random_qwen2(seed=0, vocab_size=VOCAB).train(), bf16=False)
        config = TrainConfig(model="m", data="d", out="o", strategy="fsdp", lr=3e-3, warmup_ratio=0.0, steps=3)
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, 3, 0.0)
        state = run_loop(
            model,
            lambda step: [batch],
            optimizer,
            scheduler,
            config,
            3,
            LoopState(),
            "cpu",
            lambda s, m: None,
        )
        save_checkpoint(checkpoint_dir, model, None, optimizer, scheduler, state, {}, is_writer=rank == 0)
        dist.barrier()  # both ranks leave together: a rank that tore gloo down while its peer wrote aborted once
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_on_two_ranks_matches_a_single_process_and_saves_full_weights(tmp_path):
    """Both ranks see the same batch, so the averaged gradient equals one process's: the gathered
    checkpoint must equal plain single-process training (checks sharding, gradient reduction, gather)."""
    import socket

    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    item = TrainSequence([1, 2, 3], [[4, 5, 60, 61], [8, 70, 71, 72]], [[4, 5, 6, 7], [8, 9, 10, 11]])
    batch = collate([item])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_fsdp_rank, args=(port, str(tmp_path), batch), nprocs=2, join=True)

    reference = random_qwen2(seed=0, vocab_size=VOCAB).train()
    config = TrainConfig(model="m", data="d", out="o", lr=3e-3, warmup_ratio=0.0, steps=3)
    optimizer = build_optimizer(reference, config)
    run_loop(
        reference,
        lambda step: [batch],
        optimizer,
        build_scheduler(optimizer, 3, 0.0),
        config,
        3,
        LoopState(),
        "cpu",
        lambda s, m: None,
    )
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for (name, expected), got in zip(reference.state_dict().items(), sharded.state_dict().values()):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)
    assert json.loads((tmp_path / "trainer" / "trainer_state.json").read_text())["step"] == 3


def test_anchor_records_from_text_and_prompt_answer_pairs(micro_checkpoint, tmp_path):
    from jf_ray.errors import UserInputError
    from jf_ray.modeling import encode_prompt, load_tokenizer
    from jf_ray.training.data import load_anchor_sequences

    tokenizer = load_tokenizer(str(micro_checkpoint))
    path = tmp_path / "anchor.jsonl"
    text = "def add(a, b):\n    return a + b\n"
    path.write_text(json.dumps({"text": text}) + "\n\n" + json.dumps({"prompt": "2 + 3 = ?", "answer": "5"}) + "\n")
    plain, pair = load_anchor_sequences(f"file://{path}", tokenizer, max_tokens=64, ar_on_prompt=False)
    assert plain.prompt_ids == tokenizer(text, add_special_tokens=False)["input_ids"][:64]
    assert plain.anchor_loss_from == 0
    prompt = encode_prompt(tokenizer, "2 + 3 = ?")
    assert pair.prompt_ids[: len(prompt)] == prompt and pair.prompt_ids[-1] == tokenizer.eos_token_id
    labels = collate([pair]).anchor_labels[0]
    assert labels[labels != -100].tolist() == pair.prompt_ids[len(prompt) :], "only the answer (+ EOS) is a target"
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserInputError, match="line 2"):
        load_anchor_sequences(f"file://{path}", tokenizer, max_tokens=64, ar_on_prompt=False)
