"""Per-device defaults of EngineConfig: the prefill budget (max_prefill_tokens).

On CPU a prefill step runs ~1500 tokens/s per core, so the default budget is small
(CPU_MAX_PREFILL_TOKENS): prompts that arrive together get their first tokens a few at a
time instead of all at the end of one step of seconds (measured in
benchmarks/results/2026-11-30-cpu-vs-vllm.md). CUDA keeps 4096.
"""
from __future__ import annotations

import pytest

from pdmesh import Engine, SamplingParams
from pdmesh.config import CPU_MAX_PREFILL_TOKENS, EngineConfig, engine_config_from_env


def test_prefill_budget_defaults_by_device_and_explicit_wins():
    assert EngineConfig().max_prefill_tokens is None
    assert EngineConfig().prefill_budget() == CPU_MAX_PREFILL_TOKENS == 512
    assert EngineConfig(device="cuda").prefill_budget() == 4096
    assert EngineConfig(device="cuda:1").prefill_budget() == 4096
    # replace() keeps "unset": a config made on CPU and moved to CUDA gets CUDA's default
    assert EngineConfig().replace(device="cuda").prefill_budget() == 4096
    assert EngineConfig(max_prefill_tokens=2048).prefill_budget() == 2048
    assert EngineConfig(device="cuda", max_prefill_tokens=100).prefill_budget() == 100
    env = engine_config_from_env(env={"PDMESH_MAX_PREFILL_TOKENS": "1024"})
    assert env.prefill_budget() == 1024
    with pytest.raises(ValueError, match="max_prefill_tokens must be >= 1, got 0"):
        EngineConfig(max_prefill_tokens=0)


def test_cpu_engine_hands_a_wave_its_first_tokens_in_turn(default_model):
    engine = Engine(loaded=default_model, num_pages=128)
    assert engine.scheduler.max_prefill_tokens == CPU_MAX_PREFILL_TOKENS
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    for i in range(3):  # 3 x 300 tokens together: more than one step's budget
        engine.add_request(prompt_token_ids=[100 + i] * 300, params=params)
    first = engine.step()  # 300 + 212 tokens: the first prompt is done, the second chunked
    assert [o.request_id for o in first] == ["req-0"]
    assert engine.scheduler.prefilling and engine.scheduler.prefilling[0].num_computed == 212
    while engine.has_unfinished():
        engine.step()
    assert engine.stats()["used_pages"] == 0 and engine.stats()["reserved_pages"] == 0
