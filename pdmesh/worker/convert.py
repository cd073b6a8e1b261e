"""The one adapter between pdmesh.v1 messages and runtime types (protobuf only, no grpc).

`sampling_from_proto` raises ValueError naming the field, so a servicer turns it into
INVALID_ARGUMENT and the gateway into a 400 with the same words.
"""
from __future__ import annotations

from typing import Any

from pdmesh.runtime.sampling_types import SampledToken
from pdmesh.runtime.sampling_params import SamplingParams
from pdmesh.v1 import common_pb2 as cpb

# proto3 `optional` fields: unset takes the runtime default (the dataclass default)
_OPTIONAL = ("max_tokens", "temperature", "top_p", "seed", "repetition_penalty", "logprobs",
             "skip_special_tokens", "n")
_PLAIN = ("min_tokens", "top_k", "min_p", "frequency_penalty", "presence_penalty",
          "ignore_eos")

FINISH_REASONS = {None: cpb.FINISH_REASON_UNSPECIFIED, "stop": cpb.FINISH_REASON_STOP,
                  "length": cpb.FINISH_REASON_LENGTH, "abort": cpb.FINISH_REASON_ABORT}


def sampling_from_proto(msg: cpb.SamplingParams | None) -> SamplingParams:
    """Runtime SamplingParams from the proto; ValueError naming the field when invalid."""
    if msg is None:
        return SamplingParams()
    kwargs: dict[str, Any] = {name: getattr(msg, name) for name in _PLAIN}
    for name in _OPTIONAL:
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    if msg.top_k == 0:
        kwargs["top_k"] = -1  # proto default 0 means "off", as -1 does in the runtime
    kwargs["stop"] = tuple(msg.stop)
    kwargs["stop_token_ids"] = tuple(int(t) for t in msg.stop_token_ids)
    return SamplingParams(**kwargs)


def sampling_to_proto(params: SamplingParams) -> cpb.SamplingParams:
    """The proto form of runtime SamplingParams (every value set explicitly)."""
    msg = cpb.SamplingParams(
        max_tokens=params.max_tokens, min_tokens=params.min_tokens,
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        min_p=params.min_p, repetition_penalty=params.repetition_penalty,
        frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
        stop=list(params.stop), stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos, skip_special_tokens=params.skip_special_tokens)
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    if params.n != 1:
        msg.n = params.n
    return msg


def logprob_to_proto(tok: SampledToken) -> cpb.TokenLogprob:
    """A sampled token's logprob (and top-N) as a TokenLogprob."""
    return cpb.TokenLogprob(
        token_id=tok.token_id, logprob=tok.logprob or 0.0,
        top_logprobs=[cpb.TopLogprob(token_id=t, logprob=lp)
                      for t, lp in (tok.top_logprobs or [])])


def logprob_from_proto(msg: cpb.TokenLogprob) -> SampledToken:
    """The runtime SampledToken for a TokenLogprob (what Engine.adopt takes)."""
    return SampledToken(msg.token_id, msg.logprob,
                        [(t.token_id, t.logprob) for t in msg.top_logprobs])


def finish_reason_to_proto(reason: str | None) -> int:
    """"stop" | "length" | "abort" | None -> FinishReason enum value."""
    return FINISH_REASONS.get(reason, cpb.FINISH_REASON_UNSPECIFIED)


def validate_token_ids(token_ids: Any, vocab_size: int) -> list[int]:
    """The prompt as a list; ValueError when empty or a token id is outside the vocabulary."""
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("token_ids is empty; at least one prompt token is required")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token_ids out of range [0, {vocab_size}): {bad[:5]}")
    return ids
