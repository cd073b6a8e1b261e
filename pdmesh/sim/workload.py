"""What the simulator is given and what it returns: deployments, workloads, loads, and
one simulated request's timeline."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Deployment:
    """How many prefill and decode workers: "2P1D" -> Deployment(2, 1)."""

    prefill: int
    decode: int

    @classmethod
    def parse(cls, text: str) -> "Deployment":
        m = re.fullmatch(r"\s*(\d+)\s*P\s*(\d+)\s*D\s*", text, re.IGNORECASE)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise ValueError(f"deployment must look like 1P1D or 2P1D (>= 1 each), got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.prefill}P{self.decode}D"


@dataclass(frozen=True)
class Workload:
    """Input/output lengths drawn uniformly from [min, max] (inclusive), as evalscope's
    random dataset and bench's --input-len/--output-len ranges do."""

    input_min: int
    input_max: int
    output_min: int
    output_max: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not (1 <= self.input_min <= self.input_max and 1 <= self.output_min <= self.output_max):
            raise ValueError(f"bad length ranges in {self}")

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return (rng.integers(self.input_min, self.input_max + 1, n),
                rng.integers(self.output_min, self.output_max + 1, n))


@dataclass(frozen=True)
class MultiTurn:
    """Conversations (bench's --workload multi-turn): every conversation starts with the
    same `system_len`-token system prompt; turn k sends the system prompt, user messages
    1..k and replies 1..k-1 (user and reply lengths drawn uniformly per turn), and the
    next turn is sent `think_time` s after the reply ends. With FixedLoad(P, N): P
    conversations at once, N in all (a client starts its next conversation when one ends).
    Conversation i's lengths come from its own seed (seed, i)."""

    turns: int
    system_len: int
    user_min: int
    user_max: int
    output_min: int
    output_max: int
    think_time: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.turns < 1 or self.system_len < 0 or not self.think_time >= 0:
            raise ValueError(f"need turns >= 1, system_len >= 0, think_time >= 0 in {self}")
        if not (1 <= self.user_min <= self.user_max and 1 <= self.output_min <= self.output_max):
            raise ValueError(f"bad length ranges in {self}")

    def conversation(self, i: int) -> tuple[list[int], list[int]]:
        """(user lengths, reply lengths) of conversation i, one per turn."""
        rng = np.random.default_rng([self.seed, i])
        return ([int(x) for x in rng.integers(self.user_min, self.user_max + 1, self.turns)],
                [int(x) for x in rng.integers(self.output_min, self.output_max + 1, self.turns)])

    def input_len(self, users: list[int], outputs: list[int], turn: int) -> int:
        """Prompt tokens of `turn` (1-based): system + users 1..turn + replies 1..turn-1."""
        return self.system_len + sum(users[:turn]) + sum(outputs[:turn - 1])


@dataclass(frozen=True)
class FixedLoad:
    """`parallel` clients, `number` requests in all (evalscope --parallel/--number)."""

    parallel: int
    number: int


@dataclass(frozen=True)
class RateLoad:
    """Poisson arrivals at `rate` requests/s, `number` in all (seeded)."""

    rate: float
    number: int
    seed: int = 0


@dataclass
class SimRequest:
    """One request's life; times are seconds from the start of the run."""

    index: int
    input_len: int
    output_len: int
    t_send: float = 0.0
    t_prefill_done: float | None = None
    t_admit: float | None = None
    t_ready: float | None = None
    t_join: float | None = None
    t_first: float | None = None
    t_done: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per output token
    conversation: int = -1  # multi-turn: the conversation's index; -1 for single requests
    turn: int = 0  # multi-turn: 1-based turn index
    cached: int = 0  # prompt tokens the prefill found in its prefix cache

    @property
    def ttft(self) -> float:
        return self.t_first - self.t_send

    @property
    def latency(self) -> float:
        return self.t_done - self.t_send
