"""Admission on an estimate of future decode tokens (SGLang's `new_token_ratio` scheme).

A request that does not say max_tokens gets the whole context left (~8k tokens), and
most requests stop long before max_tokens. Reserving max_tokens up front would leave
most of the pool idle, so admission counts a request's future decode KV as

    ceil(min(tokens it may still add, CLIP_MAX_NEW_TOKENS) * ratio)

where `ratio` starts at INIT, decays linearly towards MIN over DECAY_STEPS decode steps
(requests finish early: be bolder), jumps up after each retraction (the estimate was too
bold: be more careful) and returns to INIT whenever the engine goes idle. When the
estimate is wrong the scheduler retracts requests (scheduler.py) instead of failing.
Plain Python, no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pdmesh.runtime.request import Request

INIT_NEW_TOKEN_RATIO = 0.7  # SGLang's default (SGLANG_INIT_NEW_TOKEN_RATIO)
MIN_NEW_TOKEN_RATIO = 0.1  # SGLang: 0.14 * init = 0.098
NEW_TOKEN_RATIO_DECAY_STEPS = 600  # decode steps from INIT down to MIN (SGLang: 600)
CLIP_MAX_NEW_TOKENS = 4096  # estimate at most this many future tokens (SGLang: 4096)


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


@dataclass
class NewTokenRatio:
    """The fraction of a request's remaining max_tokens that admission expects it to use."""

    init: float = INIT_NEW_TOKEN_RATIO
    min: float = MIN_NEW_TOKEN_RATIO
    decay_steps: int = NEW_TOKEN_RATIO_DECAY_STEPS
    clip: int = CLIP_MAX_NEW_TOKENS
    value: float = INIT_NEW_TOKEN_RATIO

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.init <= 1 or self.decay_steps < 1 or self.clip < 0:
            raise ValueError(f"bad new_token_ratio settings: {self}")
        self.value = self.init

    def decay(self) -> None:
        """One decode step ran without retraction."""
        self.value = max(self.min, self.value - (self.init - self.min) / self.decay_steps)

    def bump(self) -> None:
        """A retraction happened: back to at least INIT, and halfway to 1.0 from here."""
        self.value = max(self.init, (self.value + 1.0) / 2)

    def reset(self) -> None:
        """The engine is idle: nothing the estimate learned still applies."""
        self.value = self.init

    def future_tokens(self, req: Request) -> int:
        """Estimated KV tokens `req` will still add after its prefill (0 for PREFILL_ONLY)."""
        return math.ceil(min(req.remaining_kv_tokens(), self.clip) * self.value)

    def future_pages(self, req: Request, page_size: int) -> int:
        """Estimated pages `req` will still allocate beyond its prefill's pages."""
        base = req.prefill_target
        return pages_for(base + self.future_tokens(req), page_size) - pages_for(base, page_size)
