"""One request's state as it moves through the scheduler (plain Python, no torch)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from pdmesh.runtime.sampling_params import SamplingParams


class Mode(enum.Enum):
    GENERATE = "generate"  # prefill then decode here (colocated)
    PREFILL_ONLY = "prefill_only"  # compute the prompt's KV, sample token 1, keep the pages
    ADOPTED = "adopted"  # KV filled from outside; decode only


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no pages yet (new, or retracted: its KV to be recomputed)
    HELD = "held"  # pages allocated, waiting for KV from outside (adopt) or to be released
    PREFILLING = "prefilling"  # some prompt chunks computed
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Invariant: the KV of all_ids[:num_computed] is in `pages` (page_size tokens each)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    mode: Mode = Mode.GENERATE
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    reserved: int = 0  # pages of its prefill (prefill_target) not yet allocated
    retractions: int = 0  # times its KV was freed under page pressure (then recomputed)
    # prefix cache: tree nodes it holds a reference on; they are pages[:len(cache_nodes)]
    cache_nodes: list[Any] = field(default_factory=list)
    cached_tokens: int = -1  # prompt tokens found in the prefix cache at first admission
    # n > 1 (fork.py): which sequence of its request this is (0: the parent); the fork
    # group it may share prompt pages with, and how many of its first pages are the
    # group's (0: it holds no reference)
    index: int = 0
    group: Any = None
    group_pages: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[Any] = field(default_factory=list)  # per output token, when asked
    stop_ids: frozenset[int] = frozenset()  # eos (unless ignore_eos) + stop_token_ids
    generator: Any = None  # torch.Generator for seeded sampling
    detok: Any = None  # IncrementalDetokenizer
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None  # its first prefill chunk was scheduled
    first_token_time: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def all_ids(self, n: int) -> list[int]:
        """The first `n` tokens (prompt, then output)."""
        p = self.prompt_ids
        return p[:n] if n <= len(p) else p + self.output_ids[:n - len(p)]

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def tokens(self, start: int, end: int) -> list[int]:
        """[token_at(i) for i in range(start, end)], as list slices (a prefill's whole
        chunk at once: per-token calls were ~1 ms of a 4k-token step's host time)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return [*self.prompt_ids[start:n], *self.output_ids[max(start - n, 0): end - n]]

    @property
    def prefill_target(self) -> int:
        """Tokens whose KV a prefill builds: the prompt; once tokens were sampled, every
        token but the last sampled one (whose KV the next decode step writes). A retracted
        request recomputes exactly this; for a decoding request it equals num_computed."""
        return self.num_tokens - 1 if self.output_ids else self.prompt_len

    def kv_tokens_needed(self) -> int:
        """Tokens whose KV this request may ever store here (the last sampled token's never is)."""
        if self.mode is Mode.PREFILL_ONLY:
            return self.prompt_len
        return self.prompt_len + self.params.max_tokens - 1

    def remaining_kv_tokens(self) -> int:
        """Tokens of KV it may still add after its prefill_target (max_tokens permitting)."""
        return max(0, self.kv_tokens_needed() - self.prefill_target)


@dataclass
class RequestOutput:
    """A request's progress after a step: everything so far plus this step's delta."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    logprobs: list[Any] | None = None  # per token: SampledToken (logprob, top_logprobs)
    pages: list[int] = field(default_factory=list)  # PREFILL_ONLY: pages holding the prompt KV
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    index: int = 0  # n > 1: which sequence of its request (request_id: fork.child_id)
