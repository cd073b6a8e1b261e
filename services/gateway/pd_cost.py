"""The cost model of per-request disaggregation: the predicted TTFT of one prompt
prefilled on a prefill worker (remote) or on its decode worker itself (local), and what
a local prefill costs the decode's other streams. Plain Python, no grpc.

    ttft_remote = o_r + max(P queue + prefill(n_r) + transfer(n_t), D's local prefills)
                  + decode step / 2
    ttft_local  = o_l + D's local prefills + decode step / 2 + prefill(n_l)
    stall       = prefill(n_l)          (every running stream of D waits this long)
    cost_local  = ttft_local + stall_weight · running · stall,   cost_remote = ttft_remote

n_r, n_l: the prompt's tokens not in the prefill's / the decode's prefix cache (as far
as the gateway knows); n_t: the tokens whose KV a remote prefill sends the decode, n_l
when the decode reuses adopted KV (decode-side reuse: only the KV it lacks is sent),
else the whole prompt (it announces which in the registry, KvReuse). The time models
are pdmesh simulate's (pdmesh/sim/
profile.py): prefill(T) = a + b·T + c·T², decode step(B) = decode_a + decode_b·B,
transfer(n) = latency + n·kv_bytes_per_token / bandwidth, the bytes per token from the
decode worker's KV layout in the registry. Coefficients start from a Profile (a file
written by `pdmesh plan` or `pdmesh simulate --calibrate-from-table`, or the defaults
below) and are calibrated online: the prefill model keeps the profile's shape and is
scaled by the median ratio of measured to modelled compute seconds over the last PD
requests (their PrefillTimings; a median of one scale, so a few slow steps on a busy
host move it little, and a GPU's ~100x faster prefill is learned from the first
samples), the bandwidth from their write times, and the overheads o_r, o_l (gateway, RPC
hops, adoption: whatever the model leaves out) as moving averages of measured TTFT minus
the modelled parts.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from pdmesh.sim.profile import Profile

# Built-in starting point when no profile file is given: the 2-core development CPU, the
# default model in bfloat16 on one thread per worker (Engine alone, 2026-11-30: prefill of
# 16/64/256/512/1024 tokens 23/50/177/408/1172 ms, decode steps 15/18/23/32 ms at batch
# 1/4/8/16); transfer_latency: the PD path's extra hops (Prefill and Transfer RPCs, the
# adoption); the bandwidth is Mooncake TCP's order (same-host shm is ~10x faster). A
# GPU's prefill is ~100x faster: the first PD requests' timings replace these figures.
DEFAULT_PROFILE = Profile(prefill_a=0.02, prefill_b=4.1e-4, prefill_c=7e-7, decode_a=0.0135,
                          decode_b=1.15e-3, transfer_bandwidth=2e9, transfer_latency=0.015,
                          client_overhead=0.01, note="pdmesh gateway --pd-mode default: 2-core CPU")
_WINDOW = 64  # samples kept per online fit
_EWMA = 0.2  # weight of a new overhead residual
_MAX_OVERHEAD_S = 10.0


@dataclass(frozen=True)
class Situation:
    """What the gateway knows of one request and its pair when routing it."""

    prompt_tokens: int
    uncached_remote: int  # prompt tokens the prefill worker must compute
    uncached_local: int  # ... the decode worker would compute
    prefill_wait_s: float  # until the prefill worker gets to it (its queue ahead)
    local_wait_s: float  # until the decode worker is done with its local prefills ahead
    decode_running: int  # streams on the decode worker (not counting this one)
    kv_bytes_per_token: float  # of the decode worker's pool (0: the profile's)
    # prompt tokens whose KV a remote prefill writes into the decode worker: uncached_local
    # with decode-side reuse, else the whole prompt
    transfer_tokens: int


@dataclass(frozen=True)
class Estimate:
    """Predicted TTFT both ways (seconds from routing to the first token at the
    gateway), the stall a local prefill would cause, and the two costs compared."""

    ttft_remote: float
    ttft_local: float
    stall_s: float
    cost_remote: float
    cost_local: float


class CostModel:
    """Time models plus their online calibration; not thread-safe (the caller locks)."""

    def __init__(self, profile: Profile = DEFAULT_PROFILE, stall_weight: float = 0.1) -> None:
        self.profile, self.stall_weight = profile, stall_weight
        self.prefill_scale = 1.0  # measured / the profile's prefill time (median)
        self.bandwidth = profile.transfer_bandwidth
        self.overhead = {"remote": profile.client_overhead, "local": profile.client_overhead}
        self._ratios: deque[float] = deque(maxlen=_WINDOW)  # measured / modelled prefill
        self._transfer: deque[tuple[float, float]] = deque(maxlen=_WINDOW)  # (bytes, s)

    # -- the time models ---------------------------------------------------------------
    def prefill_time(self, tokens: int) -> float:
        """Seconds to prefill `tokens` uncached tokens (0 for none)."""
        if tokens <= 0:
            return 0.0
        return self.prefill_scale * self.profile.prefill_time(tokens)

    def decode_step(self, batch: int) -> float:
        """Seconds of one decode step of `batch` streams (0 when idle)."""
        return self.profile.decode_time(batch, 0) if batch > 0 else 0.0

    def transfer_time(self, tokens: int, bytes_per_token: float = 0.0) -> float:
        """Seconds to write `tokens` tokens of KV into the decode worker."""
        per_token = bytes_per_token or self.profile.kv_bytes_per_token
        return self.profile.transfer_latency + tokens * per_token / self.bandwidth

    def estimate(self, s: Situation) -> Estimate:
        """Both choices' predicted TTFT and cost (see the module doc)."""
        half_step = self.decode_step(s.decode_running) / 2
        ready = (s.prefill_wait_s + self.prefill_time(s.uncached_remote)
                 + self.transfer_time(s.transfer_tokens, s.kv_bytes_per_token))
        remote = self.overhead["remote"] + max(ready, s.local_wait_s) + half_step
        stall = self.prefill_time(s.uncached_local)
        local = self.overhead["local"] + s.local_wait_s + half_step + stall
        return Estimate(remote, local, stall, remote,
                        local + self.stall_weight * s.decode_running * stall)

    # -- online calibration ------------------------------------------------------------
    def observe_prefill(self, uncached_tokens: int, seconds: float) -> None:
        """A prefill worker computed `uncached_tokens` tokens in `seconds` (its
        PrefillTimings.prefill_s): the scale is the median ratio over the last samples."""
        modelled = self.profile.prefill_time(uncached_tokens)
        if uncached_tokens > 0 and modelled > 0 and math.isfinite(seconds) and seconds > 0:
            self._ratios.append(seconds / modelled)
            self.prefill_scale = statistics.median(self._ratios)

    def observe_transfer(self, nbytes: float, seconds: float) -> None:
        """A KV write of `nbytes` took `seconds` (the write step as a whole): the bandwidth
        over the last samples."""
        if nbytes > 0 and math.isfinite(seconds) and seconds > 0:
            self._transfer.append((nbytes, seconds))
            self.bandwidth = (sum(b for b, _ in self._transfer)
                              / sum(t for _, t in self._transfer))

    def observe_overhead(self, mode: str, residual_s: float) -> None:
        """Measured TTFT minus the modelled parts of one `mode` request: its overhead's
        moving average (kept in [0, 10 s])."""
        if math.isfinite(residual_s):
            o = self.overhead[mode]
            self.overhead[mode] = min(max(o + _EWMA * (residual_s - o), 0.0), _MAX_OVERHEAD_S)

    def snapshot(self) -> dict[str, float]:
        """The coefficients now (logs, tests)."""
        return {"prefill_scale": self.prefill_scale,
                "prefill_a": self.prefill_scale * self.profile.prefill_a,
                "prefill_b": self.prefill_scale * self.profile.prefill_b,
                "bandwidth": self.bandwidth, "overhead_remote": self.overhead["remote"],
                "overhead_local": self.overhead["local"]}

