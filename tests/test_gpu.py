"""The GPU path: decoders, the packed training forward, FSDP2 over NCCL, Ray Train with GPU workers and the
Serve app on a CUDA device. Marked ``gpu``: never run in CI (no accelerator there); run them on a GPU machine
with ``pytest -m gpu tests/test_gpu.py``.

Greedy equality with AR is asserted in fp32 (the kernels of a one-token and a many-token forward add in
different orders, so half precision can flip near-ties); half precision is checked to decode, and its
agreement with AR is a benchmark figure (`jf-ray bench --dtype bf16`, "exact vs AR").
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from ray_nodes import free_port
from test_decoding import hf_greedy
from tiny_models import random_qwen2

from jf_ray.decoding import DecodeConfig, generate
from jf_ray.training.batches import TrainSequence, collate
from jf_ray.training.config import TrainConfig
from jf_ray.training.loop import (
    LoopState,
    autocast_context,
    build_optimizer,
    build_scheduler,
    packed_forward,
    run_loop,
)
from jf_ray.training.losses import jacobi_forcing_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
VOCAB = 96


@pytest.fixture(scope="module")
def cuda_model():
    return random_qwen2(seed=0).cuda()


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 200, (n,), generator=gen).tolist() for n in (1, 5, 17, 40)]


@pytest.mark.parametrize("decoder", ["jacobi", "rolling", "mr", "lookup"])
@pytest.mark.parametrize("block_size", [7, 16, 64])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_decoders_equal_ar_on_cuda(cuda_model, prompts, decoder, block_size, batch_size):
    expected = [hf_greedy(cuda_model, p, 60) for p in prompts]
    ar = generate(cuda_model, prompts, DecodeConfig(decoder="ar", max_new_tokens=60), [], batch_size=batch_size)
    assert [r.token_ids for r in ar] == expected
    config = DecodeConfig(decoder=decoder, block_size=block_size, max_new_tokens=60, pool_size=4)
    results = generate(cuda_model, prompts, config, [], batch_size=batch_size)
    assert [r.token_ids for r in results] == expected
    assert all(r.stats.forwards <= r.stats.tokens for r in results)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decodes_on_cuda(prompts, dtype):
    model = random_qwen2(seed=0).to("cuda", dtype)
    for decoder in ("ar", "jacobi", "mr"):
        results = generate(model, prompts, DecodeConfig(decoder=decoder, block_size=16, max_new_tokens=40), [], 2)
        assert all(len(r.token_ids) == 40 and r.stats.tpf >= 1.0 for r in results)


def packed_batch(seed: int = 0):
    rng = random.Random(seed)
    items = []
    for _ in range(3):
        clean = [[rng.randrange(VOCAB) for _ in range(8)] for _ in range(3)]
        noisy = [[t if rng.random() < 0.4 else rng.randrange(VOCAB) for t in block] for block in clean]
        items.append(TrainSequence([rng.randrange(VOCAB) for _ in range(rng.randint(3, 9))], noisy, clean))
    return collate(items)


def test_packed_loss_under_bf16_autocast_and_flex_attention_match_fp32_sdpa():
    """The flex-attention block mask is the fast path of the same rule: same logits at every real position
    (flex needs a head dimension of at least 16 on the GPU: the tiny Qwen2 has 64 / 4)."""
    from jf_ray.training.masks import PAD

    batch = packed_batch().to("cuda")
    real = batch.segment != PAD
    logits, losses = {}, {}
    for attn, precision in (("sdpa", "fp32"), ("sdpa", "bf16"), ("flex_attention", "fp32")):
        model = random_qwen2(seed=0, vocab_size=VOCAB, attn=attn).cuda().train()
        with autocast_context(torch.device("cuda"), precision):
            out = packed_forward(model, batch, attn=attn)
            parts = jacobi_forcing_loss(out, batch)
        parts.total.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        logits[(attn, precision)] = out.detach().float()[real]
        losses[(attn, precision)] = float(parts.total.detach())
    torch.testing.assert_close(logits[("flex_attention", "fp32")], logits[("sdpa", "fp32")], atol=1e-4, rtol=1e-3)
    reference = losses[("sdpa", "fp32")]
    assert losses[("flex_attention", "fp32")] == pytest.approx(reference, rel=1e-4)
    assert losses[("sdpa", "bf16")] == pytest.approx(reference, rel=3e-2)


def test_fsdp2_over_nccl_trains_like_a_plain_model_and_saves_full_weights(tmp_path):
    """One rank over NCCL: FSDP2 (fp32 params) must train exactly like the unwrapped model on the GPU, and
    its checkpoint must hold full, loadable weights."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from jf_ray.training.checkpoint import save_checkpoint
    from jf_ray.training.ray_train import shard_model

    batch = packed_batch(1).to("cuda")
    config = TrainConfig(
        model="m", data="d", out="o", strategy="fsdp", lr=3e-3, warmup_ratio=0.0, steps=3, precision="fp32"
    )

    def train(model):
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
            "cuda",
            lambda s, m: None,
        )
        return optimizer, scheduler, state

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        sharded = shard_model(random_qwen2(seed=0, vocab_size=VOCAB).cuda().train(), bf16=False)
        optimizer, scheduler, state = train(sharded)
        save_checkpoint(tmp_path, sharded, None, optimizer, scheduler, state, {}, is_writer=True)
    finally:
        dist.destroy_process_group()
    reference = random_qwen2(seed=0, vocab_size=VOCAB).cuda().train()
    train(reference)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, expected), got in zip(reference.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(got, expected.cpu(), atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ray_train_on_a_gpu_worker_lowers_the_loss_in_bf16(strategy, micro_checkpoint, tmp_path, ray_session):
    from test_train import dataset_loss, jacobi_sequences

    from jf_ray.modeling import load_model
    from jf_ray.packing.pack import packed_to_table
    from jf_ray.packing.schema import PACKED_SCHEMA
    from jf_ray.storage import DatasetWriter, read_bytes
    from jf_ray.training.data import load_packed_sequences
    from jf_ray.training.ray_train import train

    packed = jacobi_sequences(load_model(str(micro_checkpoint), dtype="fp32", device="cuda"))
    writer = DatasetWriter(f"file://{tmp_path}/packed", PACKED_SCHEMA)
    writer.write_shard("part-0", packed_to_table(packed))
    writer.commit()
    config = TrainConfig(
        model=str(micro_checkpoint),
        data=f"file://{tmp_path}/packed",
        out=f"file://{tmp_path}/runs",
        lr=3e-3,
        warmup_ratio=0.0,
        micro_batch_size=2,
        steps=8,
        workers=1,
        use_gpu=True,
        strategy=strategy,
        run_name=strategy,
    )
    summary = train(config)
    log = [json.loads(line) for line in read_bytes(summary["metrics_log"]).decode().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, 9))
    from jf_ray.modeling import local_model_path
    from jf_ray.training.checkpoint import declared_dtype

    trained = load_model(summary["model"], dtype="fp32", device="cuda")
    assert declared_dtype(local_model_path(summary["model"])) == torch.float32, "the model's own dtype, not bf16"
    sequences = load_packed_sequences(config.data)
    before = dataset_loss(load_model(config.model, dtype="fp32", device="cpu"), sequences)
    after = dataset_loss(trained.cpu(), sequences)
    assert after["total"] < 0.95 * before["total"]


def test_serve_app_on_a_gpu_replica_answers_greedy_like_ar(ray_session, tmp_path):
    from openai import OpenAI
    from ray import serve
    from test_serving import PROMPT, build_tiny_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jf_ray.serving.config import ServeConfig
    from jf_ray.serving.deployment import build_app

    checkpoint = build_tiny_checkpoint(str(tmp_path / "ckpt"))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).cuda().eval()
    expected = tokenizer.decode(
        hf_greedy(model, tokenizer(PROMPT)["input_ids"], 48),
        skip_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )
    config = ServeConfig(
        model=checkpoint,
        model_name="tiny",
        dtype="fp32",
        device="cuda",
        num_gpus=1,
        port=free_port(),
        decode={"decoder": "mr", "block_size": 16},
    )
    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
        client = OpenAI(base_url=f"http://{config.host}:{config.port}/v1", api_key="none", max_retries=0, timeout=120)
        for decoder in ("ar", "jacobi", "mr"):
            reply = client.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=48, temperature=0, extra_body={"decoder": decoder}
            )
            assert reply.choices[0].text == expected, decoder
    finally:
        serve.shutdown()
