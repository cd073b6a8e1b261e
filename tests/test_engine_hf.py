"""Greedy output equals Hugging Face transformers token for token.

The reference is a plain greedy loop over transformers' own forward with its KV cache
(no eos stop, so every prompt runs the full count); pdmesh runs with ignore_eos.
"""
from __future__ import annotations

import pytest
import torch

from pdmesh import Engine, SamplingParams
from pdmesh.runtime.loader import load_model, resolve_model_path
from tiny_models import ARCHS, write_tiny_hf_model

N_TOKENS = 32
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain, in two sentences, why the sky is blue.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish and German.",
    "Hi",
    "Summarise the plot of Romeo and Juliet for a ten-year-old, mentioning the families, "
    "the balcony, the secret wedding, the duel, the exile, the sleeping potion and the "
    "ending, and explain what lesson the story teaches about hatred and haste.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from transformers' forward + cache, never stopping at eos."""
    out, past, x = [], None, torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(n):
            res = model(x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            x = torch.tensor([[tok]])
    return out


GREEDY = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def smol(default_model):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path("default")
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              dtype=torch.float32).eval()
    engine = Engine(loaded=default_model, page_size=16, num_pages=512)
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": q}])
               for q in QUESTIONS]
    expected = [hf_greedy(hf, p, N_TOKENS) for p in prompts]
    return engine, prompts, expected


def test_prompts_have_mixed_lengths(smol):
    _, prompts, _ = smol
    lengths = sorted(len(p) for p in prompts)
    assert lengths[-1] > 2 * lengths[0], lengths


def test_smollm2_each_alone_matches_transformers(smol):
    engine, prompts, expected = smol
    for ids, want in zip(prompts, expected):
        out = engine.generate(prompt_token_ids=ids, params=GREEDY)[0]
        assert out.token_ids == want
        assert out.finish_reason == "length"
    assert engine.stats()["used_pages"] == 0


def test_smollm2_all_batched_matches_transformers(smol):
    engine, prompts, expected = smol
    outs = engine.generate(prompt_token_ids=prompts, params=GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert engine.stats()["used_pages"] == 0 and engine.stats()["reserved_pages"] == 0


def test_cpu_decode_ran_the_paged_kernel(smol):
    """On CPU the matches above went through the C++ paged decode attention (the "cpu"
    backend that auto picks, pdmesh/runtime/cpu_attention.py), not the torch fallback."""
    engine, _, _ = smol
    assert engine.runner.device.type != "cpu" or engine.runner.backend == "cpu"


def test_chat_messages_path_matches_token_path(smol):
    engine, prompts, expected = smol
    out = engine.generate(messages=[{"role": "user", "content": QUESTIONS[0]}], params=GREEDY)[0]
    assert out.prompt_token_ids == prompts[0] and out.token_ids == expected[0]


def test_chunked_prefill_equals_unchunked(default_model, smol):
    _, prompts, expected = smol
    # chunks of 7 tokens, at most 24 prefill tokens per step: every prompt is split
    chunked = Engine(loaded=default_model, page_size=4, num_pages=1024,
                     chunked_prefill_size=7, max_prefill_tokens=24)
    outs = chunked.generate(prompt_token_ids=prompts, params=GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert chunked.stats()["used_pages"] == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_random_models_match_transformers(tmp_path, arch):
    overrides = {"llama": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64,
                                               "rope_theta": 500000.0}},
                 "qwen2": {"tie_word_embeddings": True}, "qwen3": {}}[arch]
    hf = write_tiny_hf_model(tmp_path, arch, seed=3, **overrides)
    engine = Engine(model=str(tmp_path), page_size=8, num_pages=256)
    prompts = [engine.tokenizer.encode(q) for q in QUESTIONS[:4]]
    outs = engine.generate(prompt_token_ids=prompts, params=GREEDY)
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, N_TOKENS) for p in prompts]
    assert engine.model_config.arch == arch
