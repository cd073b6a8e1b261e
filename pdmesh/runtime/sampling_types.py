"""The data sampler.py and gpu_sampler.py share: a request's row for one step (in) and
the token drawn for it (out). Their own module, so that neither sampler imports the other
for them (sampler.sample dispatches to gpu_sampler; gpu_sampler needs only these)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from pdmesh.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:  # torch-free at run time: an --engine-process worker's RPC process uses
    import torch  # SampledToken without torch


@dataclass
class SamplingRow:
    """One request's view for this step."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: torch.Generator | None  # seeded per request when params.seed is set; else None
    banned_until_min: tuple[int, ...] = ()  # eos + stop ids, masked while len(output) < min_tokens


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None  # of the chosen token, when params.logprobs is not None
    top_logprobs: list[tuple[int, float]] | None  # top-N (id, logprob), highest first


__all__ = ["SampledToken", "SamplingRow"]
