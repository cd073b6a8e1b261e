"""Multi-turn workload for `pdmesh bench --workload multi-turn`: conversations with a shared
system prompt and a growing history, so a server's prefix cache has something to reuse.

Every conversation starts with the same system prompt (`system_prompt_len` random token
ids decoded to text, identical in every conversation and every run with the same seed).
Turn k (1-based) sends the whole history: the system prompt, user messages 1..k and the
assistant's actual replies to turns 1..k-1 (the text streamed back, not a planned one), so
turn k's prompt extends turn k-1's prompt and its reply. User messages are random token
ids too (lengths drawn from `user_len`, requested outputs from `output_len`), different
for each conversation and turn, seeded: conversation i is the same whatever the number of
conversations. Ids of special tokens are never drawn.

- chat backend: `messages` = [system, user, assistant, ..., user] (the server's chat
  template renders them);
- completions backend: the same history concatenated as plain text,
  `SYSTEM\n\nUser: u1\n\nAssistant:r1\n\nUser: u2\n\nAssistant:` (replies continue right
  after `Assistant:`, so turn k's prompt text starts with turn k-1's prompt and reply).

Load: `concurrency` conversations run at once, `conversations` in all; a conversation
waits `think_time` seconds between a reply and its next turn. A failed turn ends its
conversation: its later turns are counted as failed ("skipped") requests.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp
import numpy as np
from tqdm.auto import tqdm

from pdmesh.bench.metrics import RequestRecord, RunSummary, summarize
from pdmesh.bench.workload import BenchRequest, Workload, WorkloadSpec, load_tokenizer


@dataclass(frozen=True)
class MultiTurnSpec:
    """Turns per conversation, shared system prompt tokens, per-turn user message and
    reply lengths (inclusive ranges), think time (s) between turns, tokenizer, seed."""
    turns: int = 8
    system_prompt_len: int = 1024
    user_len: tuple[int, int] = (128, 128)
    output_len: tuple[int, int] = (32, 32)
    think_time: float = 0.0
    tokenizer: str = "default"
    seed: int = 1

    def __post_init__(self) -> None:
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")
        if self.system_prompt_len < 0:
            raise ValueError(f"system_prompt_len must be >= 0, got {self.system_prompt_len}")
        if not self.think_time >= 0:
            raise ValueError(f"think_time must be >= 0, got {self.think_time}")
        for name, (lo, hi) in (("user_len", self.user_len), ("output_len", self.output_len)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} range must satisfy 1 <= lo <= hi, got {lo}..{hi}")


@dataclass
class Conversation:
    """One conversation's planned user messages and the replies it got so far."""
    index: int
    system: str
    system_tokens: int
    users: list[str]
    user_tokens: list[int]
    output_tokens: list[int]  # requested reply length of each turn
    replies: list[str] = field(default_factory=list)
    reply_tokens: list[int] = field(default_factory=list)

    @property
    def turns(self) -> int:
        return len(self.users)

    def messages(self, k: int) -> tuple[dict[str, str], ...]:
        """Chat history for turn k (1-based): system, then user/assistant pairs, user k."""
        self._check(k)
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for j in range(k - 1):
            msgs += [{"role": "user", "content": self.users[j]},
                     {"role": "assistant", "content": self.replies[j]}]
        msgs.append({"role": "user", "content": self.users[k - 1]})
        return tuple(msgs)

    def prompt(self, k: int) -> str:
        """The same history as one text (completions backend)."""
        self._check(k)
        parts = [self.system]
        for j in range(k - 1):
            parts.append(f"\n\nUser: {self.users[j]}\n\nAssistant:{self.replies[j]}")
        parts.append(f"\n\nUser: {self.users[k - 1]}\n\nAssistant:")
        return "".join(parts)

    def request(self, k: int) -> BenchRequest:
        """Turn k's request; prompt_tokens is an estimate (the server's usage replaces it)."""
        est = self.system_tokens + sum(self.user_tokens[:k]) + sum(self.reply_tokens[:k - 1])
        return BenchRequest(self.prompt(k), est, self.output_tokens[k - 1],
                            messages=self.messages(k), turn=k)

    def add_reply(self, text: str, tokens: int) -> None:
        self.replies.append(text)
        self.reply_tokens.append(tokens)

    def _check(self, k: int) -> None:
        if not 1 <= k <= self.turns or len(self.replies) < k - 1:
            raise ValueError(f"turn {k} needs replies to turns 1..{k - 1} "
                             f"(have {len(self.replies)}) and k <= {self.turns}")


class MultiTurnWorkload:
    """A MultiTurnSpec plus its tokenizer: the shared system prompt and the conversations."""

    def __init__(self, spec: MultiTurnSpec, tokenizer: Any) -> None:
        self.spec, self.tokenizer = spec, tokenizer
        vocab = int(tokenizer.vocab_size)
        special = set(getattr(tokenizer, "all_special_ids", None) or [])
        self._allowed = np.array([i for i in range(vocab) if i not in special], dtype=np.int64)
        rng = np.random.default_rng([spec.seed, 0])
        self.system_prompt = self._text(rng, spec.system_prompt_len)
        self.system_prompt_tokens = self.count_tokens(self.system_prompt)

    @classmethod
    def load(cls, spec: MultiTurnSpec) -> "MultiTurnWorkload":
        return cls(spec, load_tokenizer(spec.tokenizer))

    def _text(self, rng: np.random.Generator, n: int) -> str:
        return self.tokenizer.decode(rng.choice(self._allowed, size=n).tolist()) if n else ""

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False)) if text else 0

    def conversation(self, i: int) -> Conversation:
        """Conversation i (0-based), drawn from its own seed (spec.seed, i)."""
        rng = np.random.default_rng([self.spec.seed, 1, i])
        (ulo, uhi), (olo, ohi), n = self.spec.user_len, self.spec.output_len, self.spec.turns
        ulens = rng.integers(ulo, uhi + 1, size=n)
        olens = rng.integers(olo, ohi + 1, size=n)
        users = [self._text(rng, int(m)) for m in ulens]
        return Conversation(i, self.system_prompt, self.system_prompt_tokens, users,
                            [self.count_tokens(u) for u in users], [int(o) for o in olens])

    def conversations(self, n: int) -> list[Conversation]:
        return [self.conversation(i) for i in range(n)]

    def base_workload(self) -> Workload:
        """Single-turn random prompts of the user lengths (warm-up requests: they share
        nothing with the system prompt, so warming up fills no cache for turn 1)."""
        s = self.spec
        return Workload(WorkloadSpec(s.user_len, s.output_len, "default", "uniform",
                                     s.seed + 104729), self.tokenizer)


async def run_multi_turn(cfg, mt: MultiTurnWorkload, concurrency: int, conversations: int, *,
                         label: str = "", slo_ttft: Optional[float] = None,
                         slo_tpot: Optional[float] = None, warmup_requests: int = 0,
                         progress: bool = True) -> tuple[RunSummary, list[RequestRecord]]:
    """`conversations` conversations, `concurrency` at once; one record per turn request
    (records carry turn and cached_tokens; the summary has the per-turn table)."""
    from pdmesh.bench.loadgen import resolve_model, send_request_text, warmup

    if concurrency < 1 or conversations < 1:
        raise ValueError(f"concurrency and conversations must be >= 1, "
                         f"got {concurrency}, {conversations}")
    cfg = await resolve_model(cfg)
    base = mt.base_workload()
    await warmup(cfg, base, warmup_requests)
    convs = mt.conversations(conversations)
    todo = iter(convs)
    records: list[RequestRecord] = []
    bar = tqdm(total=conversations * mt.spec.turns, leave=False, disable=not progress,
               desc=f"{label or 'bench'} multi-turn c={concurrency}")
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        async def client() -> None:
            for conv in todo:  # the next conversation not yet started
                for k in range(1, conv.turns + 1):
                    if k > 1 and mt.spec.think_time:
                        await asyncio.sleep(mt.spec.think_time)
                    req = conv.request(k)
                    rec, text = await send_request_text(session, cfg, req, base)
                    records.append(rec)
                    bar.update(1)
                    if not rec.ok:  # no reply to build the next turn on
                        for j in range(k + 1, conv.turns + 1):
                            records.append(RequestRecord(
                                False, f"skipped: turn {k} failed", 0, 0, 0.0, 0.0, [],
                                time.perf_counter(), turn=j))
                            bar.update(1)
                        break
                    conv.add_reply(text, rec.output_tokens)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(min(concurrency, conversations))))
        duration = time.perf_counter() - t0
    bar.close()
    return summarize(records, duration, label=label, concurrency=concurrency,
                     slo_ttft=slo_ttft, slo_tpot=slo_tpot), records
