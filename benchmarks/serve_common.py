"""What serve_gpu.py's parts share: the modes, the targets, level sizes, the log line and
the per-level summary (benchmarks/serve_gpu.py runs them; serve_mesh.py, serve_profile.py
and serve_report.py are its parts)."""
from __future__ import annotations

import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("engine", "colocated", "1p1d")
SERVE_ARGS = {"colocated": ["--prefill", "0", "--decode", "0", "--colocated", "1"],
              "1p1d": ["--prefill", "1", "--decode", "1"]}
TARGETS = {"ratio": 0.8, "ratio_at": (64, 256), "ttft_ms": 5.0, "tpot_rel": 0.10, "ready_s": 20.0}


def level_sizes(args) -> list[tuple[int, int]]:
    return [(c, max(args.min_requests, math.ceil(args.requests_factor * c)))
            for c in args.concurrency]


def log(msg: str) -> None:
    print(f"[serve_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt_steps(steps: dict[str, dict[str, int]]) -> str:
    """'steps: decode-1 1,210 decode / 0 prefill; ...' (a level's forward steps per engine)."""
    return "steps: " + "; ".join(f"{name} {s.get('decode', 0):,} decode / "
                                 f"{s.get('prefill', 0):,} prefill" for name, s in steps.items())


def summary_dict(s) -> dict:
    return {"concurrency": s.concurrency, "number": s.number, "completed": s.completed,
            "failed": s.failed, "duration_s": s.duration_s, "output_tok_s": s.output_tok_s,
            "ttft_mean": s.ttft.mean, "ttft_median": s.ttft.median, "ttft_p99": s.ttft.p99,
            "tpot_mean": s.tpot.mean, "tpot_p99": s.tpot.p99, "itl_mean": s.itl.mean, "errors": list(s.errors)}


def profile_number(args, req_s: float | None, c: int) -> int:
    """Requests for a load that outlasts the profile window (+ a 1 s lead and slack)."""
    if not req_s:
        return 8 * c
    return max(2 * c, math.ceil(req_s * (args.profile_seconds + 3.0) * 1.3))
