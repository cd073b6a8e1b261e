"""Benchmark workloads: random token-id prompts of given input / output lengths.

Prompts follow sglang bench_serving's random-token datasets: token ids are drawn, then
decoded to text with the served model's tokenizer; each request asks for exactly its
output length (`max_tokens`, with `ignore_eos` on the client side).

- prompt_ids="sequential" (default) is bench_serving's `random-ids` dataset: a random offset o
  per prompt, ids (o + i + j) % vocab_size; with seed s and fixed lengths it draws the same
  numbers in the same order as `bench_serving --seed s`, so both tools send the same prompts.
- prompt_ids="uniform": independent uniform ids (evalscope's `random` dataset style).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

PROMPT_ID_MODES = ("sequential", "uniform")


@dataclass(frozen=True)
class WorkloadSpec:
    """What to send: input/output token length ranges (inclusive), tokenizer, prompt ids, seed."""
    input_len: tuple[int, int] = (128, 128)
    output_len: tuple[int, int] = (32, 32)
    tokenizer: str = "default"  # "default", a HF folder, a tokenizer folder or a .gguf file
    prompt_ids: str = "sequential"
    seed: int = 1

    def __post_init__(self) -> None:
        for name, (lo, hi) in (("input_len", self.input_len), ("output_len", self.output_len)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} range must satisfy 1 <= lo <= hi, got {lo}..{hi}")
        if self.prompt_ids not in PROMPT_ID_MODES:
            raise ValueError(f"prompt_ids must be one of {PROMPT_ID_MODES}, "
                             f"got {self.prompt_ids!r}")


@dataclass(frozen=True)
class BenchRequest:
    """One request: prompt text, its token count (re-encoded), requested output tokens.

    Multi-turn requests (pdmesh/bench/multiturn.py) also carry the chat history as
    `messages` (sent instead of one user message by the chat backend; `prompt` is the
    same history concatenated, for the completions backend) and their 1-based `turn`."""
    prompt: str
    prompt_tokens: int
    output_tokens: int
    messages: Optional[tuple[dict[str, str], ...]] = None
    turn: int = 0


def load_tokenizer(spec: str) -> Any:
    """A transformers tokenizer for "default", a folder, a .gguf file or a hub name."""
    from transformers import AutoTokenizer

    if spec == "default":
        from pdmesh.runtime.loader import resolve_model_path
        path = resolve_model_path("default")
    else:
        path = Path(spec).expanduser()
    try:
        if path.is_file():
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for missing tokenizer data
        raise ValueError(f"cannot load a tokenizer from {spec!r}: {type(e).__name__}: {e}") from e


class Workload:
    """A WorkloadSpec plus its tokenizer; `sample(n)` makes the requests of one run."""

    def __init__(self, spec: WorkloadSpec, tokenizer: Any) -> None:
        self.spec = spec
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, spec: WorkloadSpec) -> "Workload":
        """Load spec.tokenizer and build the workload."""
        return cls(spec, load_tokenizer(spec.tokenizer))

    def count_tokens(self, text: str) -> int:
        """Tokens of generated text (no special tokens), the fallback when no usage comes back."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def sample(self, n: int, seed: Optional[int] = None) -> list[BenchRequest]:
        """n requests drawn with `seed` (default spec.seed); same seed -> same requests."""
        rng = np.random.RandomState(self.spec.seed if seed is None else seed)
        (ilo, ihi), (olo, ohi) = self.spec.input_len, self.spec.output_len
        # draw order mirrors bench_serving.sample_random_requests: lengths, then offsets
        in_lens = rng.randint(ilo, ihi + 1, size=n)
        out_lens = rng.randint(olo, ohi + 1, size=n)
        vocab = int(self.tokenizer.vocab_size)
        if self.spec.prompt_ids == "sequential":
            offsets = rng.randint(0, vocab, size=n)
            ids = [[int((offsets[i] + i + j) % vocab) for j in range(in_lens[i])] for i in range(n)]
        else:
            ids = [rng.randint(0, vocab, size=int(in_lens[i])).tolist() for i in range(n)]
        out = []
        for i in range(n):
            text = self.tokenizer.decode(ids[i])
            out.append(BenchRequest(text, len(self.tokenizer.encode(text)), int(out_lens[i])))
        return out
