"""Per-request sampling parameters (vLLM-compatible names and defaults).

`SamplingParams` is immutable and validated on construction, so the scheduler and
the sampler can trust its values; every rejection is a `ValueError` whose message
names the offending field and value (the API layer turns it into a 400).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

# Temperatures below this are treated as greedy (same threshold as vLLM).
SAMPLING_EPS = 1e-5
MAX_LOGPROBS = 20
# Repetition penalties outside this range push fp32 logits to inf (1e-308 did: the
# softmax turned NaN and the engine thread died, found by benchmarks/fuzz.py); sglang
# bounds it to [0, 2]. Anything useful is well inside.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
# The samplers work in float32: a temperature past its range (1e308) becomes inf there
# and turns masked (-inf) logits into NaN; beyond 1e6 every token is as likely anyway.
MAX_TEMPERATURE = 1e6
# A top_p below float32's range (1e-308) becomes 0 there and masks every token (NaN
# again); any top_p this small keeps only the most likely token, as this one does.
MIN_TOP_P = 1e-6
# Sequences one request may fork into (n > 1: the prompt computed once, runtime/fork.py);
# the gateway's own limit (GatewayConfig.max_n, default 16) is usually lower.
MAX_N = 128


def _as_tuple(value: str | Sequence | None, field: str) -> tuple:
    """Normalise a list/tuple (or a lone string, as OpenAI's `stop` allows) to a tuple."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ValueError(f"{field} must be a sequence, got {value!r}") from None


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request and when to stop.

    - temperature: 0 (anything < 1e-5) means greedy argmax.
    - top_k: -1 or 0 disables; top_p: nucleus mass in (0, 1]; min_p: keep tokens whose
      probability is at least min_p * (max probability).
    - repetition_penalty: HF/vLLM semantics over prompt + output tokens (positive logits
      divided by it, negative logits multiplied).
    - frequency_penalty / presence_penalty: OpenAI semantics over output tokens only:
      logit -= frequency_penalty * count + presence_penalty * (count > 0).
    - stop: strings that end generation; the matched string is not returned.
    - stop_token_ids: extra token ids that end generation (the token is kept in output_ids).
    - min_tokens: eos and stop_token_ids are masked until this many tokens were generated.
    - logprobs: None = none; N = chosen token's logprob plus the top-N alternatives.
    - n: sequences to generate from the prompt (OpenAI's choices), 1..MAX_N; the prompt's
      KV is computed once and shared (runtime/fork.py); sequence i samples with seed + i.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    n: int = 1

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__
        object.__setattr__(self, "stop", _as_tuple(self.stop, "stop"))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids"))
        self._validate_lengths()
        self._validate_distribution()
        self._validate_penalties()
        self._validate_stops()

    def _validate_lengths(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if not (isinstance(self.n, int) and 1 <= self.n <= MAX_N):
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be at most max_tokens={self.max_tokens}, "
                             f"got {self.min_tokens}")

    def _validate_distribution(self) -> None:
        # `not (a <= x)` also rejects NaN
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got "
                             f"{self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "top_p", max(self.top_p, MIN_TOP_P))  # see MIN_TOP_P
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable), 0 (disable) or at least 1, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    def _validate_penalties(self) -> None:
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, "
                             f"{MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")

    def _validate_stops(self) -> None:
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got stop={self.stop!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative ints, got "
                                 f"stop_token_ids={self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        """True when the sampler takes the argmax (temperature ~ 0)."""
        return self.temperature < SAMPLING_EPS

    def validate_for_prompt(self, prompt_len: int, max_model_len: int) -> None:
        """Reject an empty prompt, or one that cannot fit max_tokens in the context window."""
        if prompt_len <= 0:
            raise ValueError("The prompt is empty (prompt_len=0); at least one token is required")
        total = prompt_len + self.max_tokens
        if total > max_model_len:
            raise ValueError(
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {total} tokens ({prompt_len} in the prompt, {self.max_tokens} in "
                f"max_tokens). Please reduce the length of the prompt or max_tokens.")
