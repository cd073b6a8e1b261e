"""`Profile`: the simulator's calibration — how long prefill steps, transfers and decode
steps take on one deployment's hardware, and the limits of its workers.

Written by `pdmesh plan` (fitted from measurements on a running mesh) or by
`pdmesh simulate --calibrate-from-table` (fitted to a measured 1P1D bench table), read by
`pdmesh simulate --profile`. JSON, one flat object; unknown keys are refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Profile:
    """Timing models (seconds) and limits of one prefill and one decode worker.

    prefill step time = prefill_a + prefill_b·T + prefill_c·T²   (T: tokens in the step)
    decode step time  = decode_a + decode_b·B + decode_c·C       (B: running requests,
                                                                  C: their context tokens)
    transfer time     = transfer_latency + tokens·kv_bytes_per_token / transfer_bandwidth

    With prefix_cache, a prefill step counts only a prompt's uncached tokens (see
    pdmesh/sim/simulator.py, "Prefix cache"); the transfer still moves the whole prompt.
    """

    prefill_a: float = 0.01
    prefill_b: float = 1e-4
    prefill_c: float = 0.0
    max_prefill_tokens: int = 4096  # tokens per prefill step, all requests together
    chunked_prefill_size: int = 2048  # at most this many tokens of one prompt per step
    decode_a: float = 0.02
    decode_b: float = 1e-3
    decode_c: float = 0.0
    max_running_requests: int = 64  # decode: held + running requests at once
    kv_capacity_tokens: int = 1 << 20  # decode KV pool; a request reserves input + output
    kv_bytes_per_token: float = 46080.0  # SmolLM2-135M float32: 30 layers·2·3 heads·64·4 B
    transfer_bandwidth: float = 1.3e9  # bytes/s
    transfer_latency: float = 0.0  # s per transfer
    # True: token 1 reaches the client after the request's first decode step (SGLang);
    # False: when it joins the running batch (pdmesh streams the prefill's token at adopt).
    first_token_after_step: bool = False
    # >0: the workers share this many cores (one machine): a step that starts while k
    # workers are busy takes max(1, k / cpu_cores) times longer. 0: dedicated hardware.
    cpu_cores: float = 0.0
    client_overhead: float = 0.0  # s added to every request (gateway, HTTP, tokenizer)
    # prefix cache of the prefill workers (only multi-turn workloads share prefixes): a
    # prompt's full pages of page_size tokens already seen by that worker cost nothing
    prefix_cache: bool = True
    page_size: int = 16
    note: str = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if not math.isfinite(v) or v < 0:
                    raise ValueError(f"profile field {f.name} must be finite and >= 0, got {v}")
        for name in ("max_prefill_tokens", "chunked_prefill_size", "max_running_requests",
                     "kv_capacity_tokens", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"profile field {name} must be >= 1")
        if self.transfer_bandwidth <= 0:
            raise ValueError("profile field transfer_bandwidth must be > 0")

    # -- the timing models -------------------------------------------------------------
    def prefill_time(self, tokens: int) -> float:
        """Seconds for one prefill step over `tokens` tokens (all requests in the step)."""
        return self.prefill_a + self.prefill_b * tokens + self.prefill_c * tokens * tokens

    def decode_time(self, batch: int, context_tokens: int) -> float:
        """Seconds for one decode step of `batch` requests holding `context_tokens` in all."""
        return self.decode_a + self.decode_b * batch + self.decode_c * context_tokens

    def transfer_time(self, tokens: int) -> float:
        """Seconds to move `tokens` tokens of KV from a prefill to a decode worker."""
        return self.transfer_latency + tokens * self.kv_bytes_per_token / self.transfer_bandwidth

    # -- files -------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "Profile":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Profile":
        """Build from a dict; unknown keys raise ValueError naming them."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown profile fields: {', '.join(unknown)}")
        kwargs = {}
        for k, v in data.items():
            typ = known[k].type
            kwargs[k] = (int(v) if typ == "int" else bool(v) if typ == "bool"
                         else str(v) if typ == "str" else float(v))
        return cls(**kwargs)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write JSON: the profile's fields, plus `extra` under "measurements" if given."""
        data: dict[str, Any] = {"profile": self.to_dict()}
        if extra:
            data["measurements"] = extra
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        """Read a file written by `save` (or a bare JSON object of profile fields)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read profile {path}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"profile {path}: expected a JSON object")
        return cls.from_dict(data.get("profile", data))
