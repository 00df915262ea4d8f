"""The central invariant: every greedy decoder reproduces greedy AR of the same model token for token."""

from __future__ import annotations

import pytest
import torch
from tiny_models import cycle_qwen2, random_llama, random_qwen2

from jf_ray.decoding import DecodeConfig, DecodingEngine, generate

PROMPT_LENGTHS = (1, 5, 17, 40)


@pytest.fixture(scope="module")
def model():
    return random_qwen2(seed=0)


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 200, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def ar_outputs(model, prompts):
    results = generate(model, prompts, DecodeConfig(decoder="ar", max_new_tokens=70), [], batch_size=1)
    return [r.token_ids for r in results]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Reference greedy AR without any of our code: a plain loop of full forwards (on the model's device)."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def test_ar_matches_plain_forward_loop(model, prompts, ar_outputs):
    for prompt, out in zip(prompts, ar_outputs):
        assert out == hf_greedy(model, prompt, 70)


@pytest.mark.parametrize("decoder", ["jacobi", "rolling", "multiblock", "lookup", "auto"])
@pytest.mark.parametrize("block_size", [1, 2, 7, 16, 64])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_decoders_equal_ar(model, prompts, ar_outputs, decoder, block_size, batch_size):
    config = DecodeConfig(decoder=decoder, block_size=block_size, max_new_tokens=70, pool_size=4)
    results = generate(model, prompts, config, [], batch_size=batch_size)
    assert [r.token_ids for r in results] == ar_outputs
    for r in results:
        assert r.finish_reason == "length"
        assert r.stats.tokens == 70
        assert r.stats.forwards <= r.stats.tokens  # every forward commits >= 1 token
        assert min(r.stats.accepted_hist) >= 1


@pytest.mark.parametrize("decoder", ["ar", "jacobi", "rolling", "multiblock", "lookup", "auto"])
@pytest.mark.parametrize("eos_at", [0, 3, 7, 30])
def test_eos_anywhere_in_a_block_ends_the_request(model, prompts, ar_outputs, decoder, eos_at):
    """Make the token AR emits at ``eos_at`` the EOS id: every decoder must stop right after it."""
    prompt, reference = prompts[2], ar_outputs[2]
    eos = reference[eos_at]
    expected = reference[: reference.index(eos) + 1]
    config = DecodeConfig(decoder=decoder, block_size=8, max_new_tokens=70)
    (result,) = generate(model, [prompt], config, [eos])
    assert result.token_ids == expected
    assert result.finish_reason == "stop"


@pytest.mark.parametrize("decoder", ["jacobi", "rolling", "multiblock", "lookup", "auto"])
def test_cache_holds_exactly_the_committed_tokens_after_every_step(model, prompts, decoder):
    engine = DecodingEngine(model, [], max_batch_size=4)
    config = DecodeConfig(decoder=decoder, block_size=7, max_new_tokens=50)
    for i, prompt in enumerate(prompts):
        engine.add(str(i), prompt, config)
    while engine.has_work:
        engine.step()
        committed = engine.cache.committed().tolist()
        for row, req in enumerate(engine.running):
            assert committed[row] == len(req.prompt_ids) + len(req.generated) - 1


def test_committed_kv_equals_a_plain_forward(model, prompts):
    """The K/V kept for committed tokens is exactly what an AR pass over the same tokens produces."""
    engine = DecodingEngine(model, [], max_batch_size=1)
    engine.add("0", prompts[1], DecodeConfig(decoder="multiblock", block_size=7, max_new_tokens=30))
    for _ in range(6):
        engine.step()
    req = engine.running[0]
    engine.cache.compact()
    tokens = req.prompt_ids + req.generated[:-1]
    with torch.no_grad():
        reference = model(torch.tensor([tokens]), use_cache=True).past_key_values
    for ours, theirs in zip(engine.cache.kv.layers, reference.layers):
        torch.testing.assert_close(ours.keys[:, :, : len(tokens)], theirs.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.values[:, :, : len(tokens)], theirs.values, atol=1e-5, rtol=1e-5)


def test_multiblock_with_one_block_and_no_pool_is_plain_jacobi(model, prompts):
    jacobi = generate(model, prompts, DecodeConfig(decoder="jacobi", block_size=16, max_new_tokens=70), [])
    multiblock = generate(
        model,
        prompts,
        DecodeConfig(decoder="multiblock", block_size=16, num_blocks=1, pool_size=0, max_new_tokens=70),
        [],
    )
    assert [r.token_ids for r in multiblock] == [r.token_ids for r in jacobi]
    assert [r.stats.forwards for r in multiblock] == [r.stats.forwards for r in jacobi]


def test_continuous_batching_admits_requests_between_steps(model, prompts, ar_outputs):
    engine = DecodingEngine(model, [], max_batch_size=2)
    config = DecodeConfig(decoder="multiblock", block_size=7, max_new_tokens=70)
    done: dict[str, list[int]] = {}
    engine.add("0", prompts[0], config)
    for step in range(200):
        if step == 3:
            engine.add("1", prompts[1], config)
        if step == 5:
            engine.add("2", prompts[2], config)  # waits: the batch is full
            assert engine.num_waiting == 1
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.result.token_ids
        if not engine.has_work:
            break
    assert done == {str(i): ar_outputs[i] for i in range(3)}


def test_abort_frees_the_slot(model, prompts):
    engine = DecodingEngine(model, [], max_batch_size=1)
    config = DecodeConfig(decoder="jacobi", block_size=4, max_new_tokens=60)
    engine.add("a", prompts[0], config)
    engine.add("b", prompts[1], config)
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.abort("a")
    outputs = engine.step()
    assert any(o.request_id == "a" and o.finish_reason == "abort" for o in outputs)
    assert [r.request_id for r in engine.running] == ["b"]


def test_llama_family_and_eager_attention():
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 200, (n,), generator=gen).tolist() for n in (4, 11)]
    for model in (random_llama(seed=1), random_qwen2(seed=2, attn="eager")):
        ar = generate(model, prompts, DecodeConfig(decoder="ar", max_new_tokens=40), [])
        for decoder in ("jacobi", "rolling", "multiblock"):
            out = generate(model, prompts, DecodeConfig(decoder=decoder, block_size=8, max_new_tokens=40), [], 2)
            assert [r.token_ids for r in out] == [r.token_ids for r in ar]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decodes(model, prompts, dtype):
    half = random_qwen2(seed=0).to(dtype)
    config = DecodeConfig(decoder="multiblock", block_size=8, max_new_tokens=30)
    results = generate(half, prompts, config, [], batch_size=2)
    for r in results:
        assert len(r.token_ids) == 30 and r.stats.tpf >= 1.0


def test_copying_pays_on_a_repetitive_model():
    """On a model whose outputs repeat, lookup and recycling verify several tokens per forward, exactly."""
    model = cycle_qwen2()
    prompts = [[0, 1, 2, 3], [5, 6, 7]]
    ar = generate(model, prompts, DecodeConfig(decoder="ar", max_new_tokens=60), [])
    for decoder in ("lookup", "multiblock"):
        out = generate(model, prompts, DecodeConfig(decoder=decoder, block_size=16, max_new_tokens=60), [])
        assert [r.token_ids for r in out] == [r.token_ids for r in ar]
        assert all(r.stats.tpf > 2.0 for r in out), [r.stats.tpf for r in out]
        assert all(r.stats.recycled_hits > 0 for r in out)


def test_ngram_pool_candidates_start_with_the_head_and_keep_the_draft_length():
    from jf_ray.decoding.multiblock import NGramPool

    pool = NGramPool(capacity=4)
    pool.add([9, 5, 6, 7])
    pool.add([1, 5, 8])
    pool.add([5])  # too short to hold a continuation: ignored
    draft = [5, 0, 0, 0, 0]
    candidates = pool.candidates(draft, limit=4)
    assert candidates == [[5, 8, 0, 0, 0], [5, 6, 7, 0, 0]]  # newest entry first, padded with the draft
    assert pool.candidates(draft, limit=1) == [[5, 8, 0, 0, 0]]
    assert pool.candidates([4, 0, 0], limit=4) == []
    assert pool.candidates(draft, limit=0) == []  # a plan that allows no candidate gets none


def _latest_continuation(context: list[int], max_ngram: int, max_tokens: int) -> list[int]:
    """The lookup by a scan of the whole context: the latest earlier occurrence of the longest suffix."""
    for size in range(min(max_ngram, len(context) - 1), 0, -1):
        for start in range(len(context) - 1 - size, -1, -1):
            if context[start : start + size] == context[-size:]:
                return context[start + size : start + size + max_tokens]
    return []


def test_context_lookup_follows_a_growing_context_as_a_full_scan_would():
    from types import SimpleNamespace

    from jf_ray.decoding.lookup import ContextLookup

    gen = torch.Generator().manual_seed(3)
    for max_ngram in (1, 3):
        prompt = torch.randint(0, 6, (9,), generator=gen).tolist()
        req = SimpleNamespace(prompt_ids=prompt, generated=[])
        index = ContextLookup(max_ngram)
        while len(req.generated) < 60:  # grown by 1-4 tokens at a time, as forwards accept them
            req.generated += torch.randint(
                0, 6, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen
            ).tolist()
            index.sync(req)
            for max_tokens in (0, 1, 5):
                expected = _latest_continuation(prompt + req.generated, max_ngram, max_tokens)
                assert index.continuation(max_tokens) == expected
    index = ContextLookup(3)
    index.sync(SimpleNamespace(prompt_ids=[4], generated=[]))
    assert index.continuation(4) == []  # a lone token has nothing before it


def test_candidates_found_for_a_longer_draft_are_cut_distinct():
    from jf_ray.decoding.auto import cut_candidates

    draft = [5, 1, 2]
    found = [[5, 1, 2, 9], [5, 7, 7, 1], [5, 7, 7, 2], [5, 8, 0, 0]]
    assert cut_candidates(found, draft) == [[5, 7, 7], [5, 8, 0]]  # equal to the draft once cut: dropped


@pytest.mark.parametrize("spawn_ratio", [0.1, 0.5])
@pytest.mark.parametrize("block_size", [7, 16])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_multiblock_spawning_early_is_still_exact(model, prompts, ar_outputs, spawn_ratio, block_size, batch_size):
    """Pseudo blocks spawned after a few accepted tokens (the default job's r = 0.5) run far ahead of RA."""
    config = DecodeConfig(
        decoder="multiblock", block_size=block_size, num_blocks=3, spawn_ratio=spawn_ratio, max_new_tokens=70
    )
    results = generate(model, prompts, config, [], batch_size=batch_size)
    assert [r.token_ids for r in results] == ar_outputs


def test_recycling_without_context_copying_is_still_exact():
    model = cycle_qwen2()
    prompts = [[0, 1, 2, 3], [5, 6, 7]]
    ar = generate(model, prompts, DecodeConfig(decoder="ar", max_new_tokens=50), [])
    config = DecodeConfig(
        decoder="multiblock", block_size=8, num_blocks=3, spawn_ratio=0.5, recycle_context=False, max_new_tokens=50
    )
    out = generate(model, prompts, config, [], batch_size=2)
    assert [r.token_ids for r in out] == [r.token_ids for r in ar]


@pytest.mark.parametrize("block_size", [1, 2, 5, 16])
@pytest.mark.parametrize("max_new_tokens", [1, 9, 32, 33])
def test_trajectories_cover_every_token_with_full_length_states(model, prompts, ar_outputs, block_size, max_new_tokens):
    config = DecodeConfig(
        decoder="jacobi", block_size=block_size, max_new_tokens=max_new_tokens, record_trajectory=True
    )
    for prompt, result, expected in zip(prompts, generate(model, prompts, config, []), ar_outputs):
        blocks = result.trajectory
        assert [b.block_index for b in blocks] == list(range(len(blocks)))
        assert sum((b.fixed_point for b in blocks), []) == expected[:max_new_tokens] == result.token_ids
        for b in blocks:
            assert b.prefix_len == len(prompt) + b.block_index * block_size
            assert all(len(state) == len(b.fixed_point) for state in b.states)
            assert b.states[-1] == b.fixed_point and b.states[0][0] == b.fixed_point[0]


def test_rolling_jacobi_keeps_n_tokens_in_flight(model, prompts, ar_outputs):
    """Block Jacobi's draft shrinks towards the end of its block; the rolling window never does (until the cap)."""
    widths: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        for decoder in ("jacobi", "rolling"):
            widths.clear()
            (result,) = generate(
                model, [prompts[1]], DecodeConfig(decoder=decoder, block_size=8, max_new_tokens=70), []
            )
            assert result.token_ids == ar_outputs[1]
            decode_widths = widths[1:]  # after the prefill
            if decoder == "jacobi":
                assert min(decode_widths) < 8
            else:  # the window is cut only where fewer than n tokens remain before the cap
                assert all(w == 8 for w in decode_widths[:-8]) and set(decode_widths) <= set(range(1, 9))
    finally:
        hook.remove()


def test_registry_names_aliases_and_policies():
    from jf_ray.cli.common import decoder_list
    from jf_ray.decoding.engine import make_policy
    from jf_ray.decoding.multiblock import MultiBlockPolicy
    from jf_ray.decoding.registry import DECODER_NAMES, canonical

    assert DecodeConfig(decoder="mr").decoder == "multiblock" == canonical("mr")
    assert decoder_list("ar, mr,generate", allowed=("ar", "multiblock", "generate")) == ["ar", "multiblock", "generate"]
    assert isinstance(make_policy(DecodeConfig(decoder="mr")), MultiBlockPolicy)
    for name in DECODER_NAMES:  # every registered decoder builds a policy
        assert make_policy(DecodeConfig(decoder=name)) is not None
    with pytest.raises(ValueError, match="unknown decoder 'fast'.*multiblock"):
        DecodeConfig(decoder="fast")


def test_registry_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, jf_ray.decoding.registry, jf_ray.cli.common; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generate_reports_progress_as_prompts_finished_since_the_last_call(model, prompts, ar_outputs):
    """``progress(n)``: n more prompts done (a tqdm bar's update); ``on_step`` sees the engine after each step."""
    calls, forward_s = [], []
    config = DecodeConfig(decoder="jacobi", block_size=8, max_new_tokens=70)
    results = generate(
        model, prompts, config, [], 2, progress=calls.append, on_step=lambda e: forward_s.append(e.forward_s)
    )
    assert [r.token_ids for r in results] == ar_outputs
    assert sum(calls) == len(prompts) and all(n >= 1 for n in calls)
    assert len(forward_s) > len(calls) and forward_s == sorted(forward_s) and forward_s[-1] > 0


def test_cache_layers_append_in_place_and_adopt_tensors_put_in_their_place():
    """K/V are written into spare slots (no copy of the whole cache per forward); crops keep the buffer, row
    moves that replace the tensors are adopted, and growing past the spare slots keeps every slot."""
    from jf_ray.decoding.cache import SpareSlotsLayer

    layer, a, b = SpareSlotsLayer(), torch.randn(2, 1, 5, 4), torch.randn(2, 1, 3, 4)
    layer.update(a, -a)
    start = layer.keys.data_ptr()
    keys, values = layer.update(b, -b)
    assert keys.data_ptr() == start  # in place
    torch.testing.assert_close(keys, torch.cat([a, b], 2))
    torch.testing.assert_close(values, -torch.cat([a, b], 2))
    layer.keys, layer.values = keys[:, :, :6], values[:, :, :6]  # a crop: slots 6-7 are written over next
    keys, _ = layer.update(b, -b)
    assert keys.data_ptr() == start
    torch.testing.assert_close(keys, torch.cat([a, b[:, :, :1], b], 2))
    layer.keys, layer.values = layer.keys[[1]], layer.values[[1]]  # a row move: a new tensor, adopted
    keys, values = layer.update(b[[0]], -b[[0]])
    expected = torch.cat([a[[1]], b[[1], :, :1], b[[1]], b[[0]]], 2)
    torch.testing.assert_close(keys, expected)
    for _ in range(5):  # far past the spare slots
        expected = torch.cat([expected, b[[0]].repeat(1, 1, 20, 1)], 2)
        keys, values = layer.update(b[[0]].repeat(1, 1, 20, 1), -b[[0]].repeat(1, 1, 20, 1))
    torch.testing.assert_close(keys, expected)
    torch.testing.assert_close(values, -expected)
