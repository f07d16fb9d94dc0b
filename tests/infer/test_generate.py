"""Generation over the paged latent cache: greedy decoding equals the argmax of full forwards, ragged
batches equal their requests run alone, MTP speculative decoding gives plain greedy's tokens, sampling is
reproducible, and bad requests or a full cache raise clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv3.infer import CacheFullError, Generator, PagedKVCache, SamplingParams
from dsv3.infer.generate import probabilities
from dsv3.model import ModelConfig, build_model


@pytest.fixture(scope="module")
def model():
    # A small vocabulary makes MTP drafts right often enough to exercise the accept path.
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=24).validate()
    m = build_model(cfg, dtype=torch.float32, seed=11).eval()
    with torch.no_grad():
        for layer in m.model.layers[cfg.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
        m.lm_head.weight.mul_(30)  # sharper distributions than a 0.006-std init gives
        m.mtp.shared_head.head.weight.copy_(m.lm_head.weight)
    return m


PROMPTS = [[3, 7, 1, 9, 2], list(range(1, 24)) * 3, [5]]  # the second crosses a 64-token page


def test_greedy_equals_full_forward_argmax(model):
    outs = Generator(model, num_pages=16).generate(PROMPTS, SamplingParams(max_new_tokens=12))
    for o in outs:
        assert len(o.tokens) == 12 and o.finish_reason == "length"
        seq = torch.tensor([o.prompt + o.tokens])
        with torch.no_grad():
            expect = model(seq)[0, len(o.prompt) - 1 : -1].argmax(-1).tolist()
        assert o.tokens == expect


def test_ragged_batch_equals_requests_alone(model):
    gen = Generator(model, num_pages=16)
    together = gen.generate(PROMPTS, SamplingParams(max_new_tokens=8))
    for p, o in zip(PROMPTS, together, strict=True):
        assert gen.generate([p], SamplingParams(max_new_tokens=8))[0].tokens == o.tokens
    assert gen.cache.num_free_tokens() == 16 * 64  # every page went back to the pool


def test_speculative_equals_greedy_token_for_token(model):
    params = SamplingParams(max_new_tokens=30)
    plain = Generator(model, num_pages=16).generate(PROMPTS, params)
    gen = Generator(model, num_pages=16)
    spec = gen.generate(PROMPTS, params, speculative=True)
    assert [o.tokens for o in spec] == [o.tokens for o in plain]
    assert gen.stats.drafted > 0 and 0 < gen.stats.accepted <= gen.stats.drafted
    assert gen.stats.steps < sum(len(o.tokens) for o in plain) / len(PROMPTS) + 1  # fewer steps than tokens


def test_speculative_sampling_is_seeded_and_in_vocab(model):
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.8, seed=7)
    a = Generator(model, num_pages=16).generate(PROMPTS, params, speculative=True)
    b = Generator(model, num_pages=16).generate(PROMPTS, params, speculative=True)
    assert [o.tokens for o in a] == [o.tokens for o in b]
    assert all(0 <= t < model.config.vocab_size for o in a for t in o.tokens)


def test_sampling_seed_top_p_and_stop_tokens(model):
    gen = Generator(model, num_pages=16)
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, seed=1)
    first, again = gen.generate(PROMPTS, sampled), gen.generate(PROMPTS, sampled)
    assert [o.tokens for o in first] == [o.tokens for o in again]
    greedy = gen.generate(PROMPTS, SamplingParams(max_new_tokens=16))
    nucleus = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=2)
    tiny_nucleus = gen.generate(PROMPTS, nucleus)
    assert [o.tokens for o in tiny_nucleus] == [o.tokens for o in greedy]  # top_p -> 0 keeps only the argmax
    stop = greedy[0].tokens[3]
    out = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=16, stop_token_ids=[stop]))[0]
    assert out.finish_reason == "stop" and out.tokens == greedy[0].tokens[: greedy[0].tokens.index(stop)]


def test_probabilities_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.7))
    full = torch.softmax(logits, -1)
    assert p[0, 2:].sum() == 0 and torch.allclose(p[0, :2], full[0, :2] / full[0, :2].sum())
    assert probabilities(logits, SamplingParams()).tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_bad_requests_and_cache_exhaustion(model):
    gen = Generator(model, num_pages=2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate([[1], []])
    with pytest.raises(ValueError, match="outside"):
        gen.generate([[1, 99]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate([[1]], SamplingParams(max_new_tokens=0))
    with pytest.raises(CacheFullError, match="needs"):
        gen.generate([list(range(1, 24)) * 6], SamplingParams(max_new_tokens=4))  # 138 tokens > 2 pages
    assert gen.cache.num_free_tokens() == 2 * 64  # the failed request's pages were returned
    with pytest.raises(ValueError, match="num_pages"):
        PagedKVCache(model.config, 0)


def test_cache_bytes_per_token(model):
    cfg = ModelConfig.preset("v3-671b")
    assert PagedKVCache(cfg, 1, dtype=torch.bfloat16).bytes_per_token_per_layer == (512 + 64) * 2
    assert PagedKVCache(cfg, 1, fp8=True).bytes_per_token_per_layer == 656
