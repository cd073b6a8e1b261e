"""A request's n choices at the gateway (SamplingParams.n; 1 unless the client asked).

The decode stream interleaves its sequences' messages (DecodeChunk.index). `Choices`
turns each into a Delta of that choice: its own incremental detokenizer (text, stop
strings), its own token count, its own end. A stop string matched here ends that choice
only: the worker's later tokens of it are dropped, the other choices go on, and the
request is over when every choice has ended. `RequestUsage` sums what a response
reports once: prompt (and cached) tokens once, completion tokens over the choices, as
OpenAI and vLLM count n.
"""
from __future__ import annotations

from typing import Any

from pdmesh.runtime.detokenizer import IncrementalDetokenizer
from pdmesh.v1 import common_pb2 as cpb


def choice_count(sampling: cpb.SamplingParams) -> int:
    """n of a request's sampling parameters (unset: 1)."""
    return sampling.n if sampling.HasField("n") and sampling.n > 1 else 1


class Choices:
    """Per choice: detokenizer, tokens so far, ended or not (one attempt's state)."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], sampling: cpb.SamplingParams,
                 detokenize: bool = True) -> None:
        self.n, self.prompt_len = choice_count(sampling), len(prompt_ids)
        skip = sampling.skip_special_tokens if sampling.HasField("skip_special_tokens") \
            else True
        self.detoks = [IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip,
                                              stop=list(sampling.stop))
                       for _ in range(self.n)] if detokenize else None
        self.tokens = [0] * self.n
        self.ended = [False] * self.n

    @property
    def done(self) -> bool:
        """Every choice has ended."""
        return all(self.ended)

    def take(self, delta: Any, reported: cpb.Usage) -> bool | None:
        """Fill `delta` (a Delta of one decode message; `reported`: that message's usage):
        text, a stop string's end, its choice's usage when it ends. None: drop it (a
        choice that already ended here, or an index past n); True: a stop string ended
        its choice here (the worker goes on until it sees the same)."""
        i = delta.index
        if not 0 <= i < self.n or self.ended[i]:
            return None
        self.tokens[i] += len(delta.token_ids)
        stopped = self.detoks is not None and detokenize(self.detoks[i], delta)
        if stopped:
            self.tokens[i] = len(self.detoks[i].output_ids)
        if delta.finish_reason:
            delta.usage = usage(self.prompt_len, self.tokens[i], reported)
            self.ended[i] = True
        return stopped


def detokenize(detok: IncrementalDetokenizer, delta: Any) -> bool:
    """Fill delta.text; True when a stop string ended the choice (tokens after the one
    that completed it are dropped)."""
    texts = []
    for i, tok in enumerate(delta.token_ids):
        text, stopped = detok.add(tok)
        texts.append(text)
        if stopped:
            delta.token_ids = delta.token_ids[:i + 1]
            delta.logprobs = delta.logprobs[:i + 1]
            delta.finish_reason = cpb.FINISH_REASON_STOP
            delta.text = "".join(texts)
            return True
    if delta.finish_reason:
        texts.append(detok.flush())
    delta.text = "".join(texts)
    return False


def usage(prompt: int, completion: int, reported: cpb.Usage) -> cpb.Usage:
    """The worker's usage when it reported one, else counted here."""
    if reported.completion_tokens:
        completion = reported.completion_tokens
        prompt = reported.prompt_tokens or prompt
    return cpb.Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion, cached_tokens=reported.cached_tokens)


class RequestUsage:
    """The usage of a whole request from its choices' final Deltas."""

    def __init__(self) -> None:
        self.ended: dict[int, cpb.Usage] = {}  # choice index -> its usage

    def add(self, delta: Any) -> None:
        """Note `delta` (any Delta); only a choice's final one counts."""
        if delta.finish_reason and delta.usage is not None:
            self.ended[delta.index] = delta.usage

    def total(self) -> cpb.Usage | None:
        """Prompt and cached tokens once (choice 0's, else the first that ended),
        completion tokens summed; None before any choice ended."""
        if not self.ended:
            return None
        first = self.ended.get(0) or next(iter(self.ended.values()))
        completion = sum(u.completion_tokens for u in self.ended.values())
        return cpb.Usage(prompt_tokens=first.prompt_tokens, completion_tokens=completion,
                         total_tokens=first.prompt_tokens + completion,
                         cached_tokens=first.cached_tokens)
