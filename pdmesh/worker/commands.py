"""The typed boundary to the engine: commands in, events out (plain Python, no torch).

Servicers and the P/D protocol never touch the Engine; they submit one of these to the
EngineLoop, which handles every command in one place (`EngineLoop._process`) between
forward steps. Each command's result comes back through a Future; request progress
comes back as events (`RequestOutput` from the engine, or `Held` below), delivered in
one batch per loop turn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union


@dataclass(frozen=True)
class MakeRequest:
    """Validate and build a request (not queued). Result: the Request; ValueError if bad."""

    prompt_token_ids: Sequence[int]
    params: Any  # SamplingParams
    request_id: str
    mode: Any  # pdmesh.runtime.request.Mode
    detokenize: bool = False  # workers stream token ids; the gateway makes the text


@dataclass(frozen=True)
class Add:
    """Queue a GENERATE or PREFILL_ONLY request; its outputs come back as events."""

    req: Any  # Request from MakeRequest


@dataclass(frozen=True)
class Start:
    """`make`, then Add, in one command: one trip to the engine, not two (with the engine
    in its own process each trip waits for the step under way to end). Result: the
    Request, already queued; ValueError if bad, and then nothing is queued."""

    make: MakeRequest  # a GENERATE or PREFILL_ONLY request


@dataclass(frozen=True)
class Hold:
    """Pre-allocate pages for an ADOPTED request (FIFO pre-allocation queue); a `Held`
    event follows once they are taken."""

    req: Any


@dataclass(frozen=True)
class Adopt:
    """The held request's KV is in its pages: decode it after `first_token`."""

    request_id: str
    first_token: int
    first_logprob: Any = None


@dataclass(frozen=True)
class Abort:
    """End a request wherever it is (queued for pages, held, running). Result: bool."""

    request_id: str


@dataclass(frozen=True)
class Release:
    """Free a finished PREFILL_ONLY request's pages (its KV was sent)."""

    request_id: str


@dataclass(frozen=True)
class SlowDown:
    """Sleep this long after every forward step (decode-capacity measurement)."""

    seconds: float


@dataclass(frozen=True)
class FailStep:
    """Fault injection (pdmesh.v1.Chaos, --chaos only): the next forward step raises."""


Command = Union[MakeRequest, Start, Add, Hold, Adopt, Abort, Release, SlowDown, FailStep]


@dataclass(frozen=True)
class Held:
    """Event: pages were taken for a held request (from `Hold`)."""

    request_id: str
    pages: list[int]
    cached_pages: int = 0  # leading pages whose KV is here already (decode prefix cache)


@dataclass(frozen=True)
class EngineStats:
    """What the layers above may know of the engine; published after every loop turn,
    so reading it never waits on a forward step."""

    num_pages: int = 0
    free_pages: int = 0
    used_pages: int = 0
    reserved_pages: int = 0  # promised to admitted prompts' prefill, not yet allocated
    estimated_pages: int = 0  # decode pages running requests are expected to take
    waiting: int = 0  # queued for admission (no pages yet)
    running: int = 0  # prefilling + decoding + held for adoption
    held: int = 0  # pages kept for a transfer (in or out)
    prealloc_queue: int = 0  # holds waiting for pages
    queued_prefill_tokens: int = 0  # prompt tokens still to compute
    retracted: int = 0  # requests preempted to free pages (cumulative)
    prompt_tokens: int = 0  # cumulative: prompt tokens computed
    generation_tokens: int = 0  # cumulative: tokens sampled by this engine's steps
    prefill_steps: int = 0  # cumulative: forward steps of prompts
    decode_steps: int = 0  # cumulative: forward steps of one token per running request
    forward_sleep_time: float = 0.0
    page_size: int = 0
    max_running_requests: int = 0
