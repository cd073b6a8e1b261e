"""A rank-0 lead that runs the runtime's whole Engine over the TP ranks.

The Engine keeps everything but the forward: scheduler (batching, chunked prefill,
admission, retraction), prefix cache, sampler, stop handling, n > 1. Its runner is the
rank's TPRunner, whose `run(batch)` broadcasts each scheduled batch as a Step; the
ranks' KV pools share the Engine's page ids (each holding its own KV heads), so a prefix
the cache reuses is reused on every rank.

Until Engine takes a runner (a hook in engine.py, not built), rank 0 builds a whole
Engine first, loading the full model there once, then swaps its runner: the Engine's
own model and KV pool are dropped when the swap releases them. This is therefore the
path for tests and offline use, not yet the memory-saving one.
"""
from __future__ import annotations

from functools import partial

from pdmesh.runtime.request import RequestOutput
from pdmesh.runtime.sampling_params import SamplingParams
from pdmesh.runtime.tp.driver import TPRunner
from pdmesh.runtime.tp.launch import TPSpec, launch


def engine_lead(runner: TPRunner, spec: TPSpec, rounds: list[list[list[int]]],
                params: SamplingParams, overrides: dict) -> list[list[RequestOutput]]:
    """Rank 0: each round's prompts through one Engine stepping on `runner`, one
    `generate` call per round in order (a later round can reuse an earlier one's cached
    prefix); the final outputs of each round."""
    from pdmesh.runtime.engine import Engine

    engine = Engine(model=spec.model, dtype=spec.dtype, device=spec.device,
                    page_size=spec.page_size, num_pages=spec.num_pages, **overrides)
    engine.runner = runner  # Engine.step calls only runner.run(batch)
    outs = [engine.generate(prompt_token_ids=prompts, params=params) for prompts in rounds]
    runner.send(None)  # the followers stop
    return outs


def engine_generate(model: str, rounds: list[list[list[int]]], params: SamplingParams,
                    tp: int, *, dtype: str = "float32", page_size: int = 16,
                    num_pages: int = 256, **engine_overrides) -> list[list[RequestOutput]]:
    """Outputs of an Engine whose forwards run on `tp` ranks, for each round of prompts
    (see engine_lead); `engine_overrides` are EngineConfig fields (e.g.
    chunked_prefill_size). The model needs a tokenizer (the Engine loads one)."""
    spec = TPSpec(str(model), tp, dtype, "cpu", page_size, num_pages)
    return launch(spec, partial(engine_lead, spec=spec, rounds=rounds, params=params,
                                overrides=engine_overrides))


__all__ = ["engine_lead", "engine_generate"]
