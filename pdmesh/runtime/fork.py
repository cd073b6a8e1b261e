"""n > 1: one request forked into n sequences that share its prompt's KV (plain Python).

A request with `SamplingParams.n > 1` (the parent, sequence 0) is computed, or adopted
from a prefill worker, once. Then the engine forks it: sequences 1..n-1 are new requests
(`child_id`, seed `fork_seed(seed, i)`) whose prompt is the parent's. They share the
parent's *full* prompt pages up to the last prompt token's page, and each recomputes
the rest of the prompt itself (1..page_size tokens): that writes its own copy of the
last, partial page (copy-on-write done by recomputing one page, not by copying it) and
gives it the prompt's last logits, from which it samples its first token with its own
seed. The parent keeps the token it already has (sampled by its prefill, here or on the
prefill worker, with seed + 0 = seed: so sequence 0 of n is the n = 1 output).

Sharing goes through one of two owners, never both for one request:
- the prefix cache, when the engine has one and the parent uses it (a colocated
  GENERATE request, or an ADOPTED one with decode-side reuse: `adopt` inserted them):
  its full pages are in the tree already, and the children's ordinary cache lookup at
  admission finds them;
- else a `ForkGroup` (an ADOPTED parent on a decode without `decode_prefix_cache`, or an
  engine without a cache): the pages, reference-counted by the members that hold them as
  their first pages; the last release frees them, once.

Children are admitted at fork time when they fit (while the parent still holds the
pages: a parent with max_tokens=1 finishes on its first token). One that does not fit
waits at the queue's head holding nothing; at admission it shares the group if a member
still holds it, else it recomputes the whole prompt. A waiting request never pins pages,
so the scheduler's progress argument is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

_INT64 = 1 << 64


def child_id(request_id: str, index: int) -> str:
    """The request id of sequence `index` (>= 1) of `request_id`'s fork."""
    return f"{request_id}/{index}"


def member_ids(request_id: str, n: int) -> list[str]:
    """Every sequence's request id: the parent's, then its children's."""
    return [request_id] + [child_id(request_id, i) for i in range(1, n)]


def fork_seed(seed: int | None, index: int) -> int | None:
    """Sequence `index`'s seed: seed + index, wrapped into int64 (None stays None: every
    sequence then draws from the global generator, independently)."""
    if seed is None:
        return None
    return (seed + index + (1 << 63)) % _INT64 - (1 << 63)


@dataclass(eq=False)
class ForkGroup:
    """Full prompt pages shared by the sequences of one fork. A member holding a
    reference has them as its first `len(pages)` pages; `refs` counts those members."""

    pages: list[int]
    refs: int = 0

    @property
    def alive(self) -> bool:
        """Some member holds the pages (once 0, they were freed: never taken again)."""
        return self.refs > 0

    def acquire(self) -> None:
        if not self.alive:
            raise ValueError("taking pages of a fork group whose pages were freed")
        self.refs += 1

    def release(self) -> list[int]:
        """Drop one reference; the pages to free when it was the last one, else []."""
        if self.refs <= 0:
            raise ValueError("releasing a fork group nobody holds")
        self.refs -= 1
        return list(self.pages) if self.refs == 0 else []
