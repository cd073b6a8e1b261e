"""serve_gpu's --rounds summary (benchmarks/serve_rounds.py): ratios within a round,
targets on the medians."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serve_rounds  # noqa: E402

TARGETS = {"ratio": 0.8, "ratio_at": (64,), "ttft_ms": 5.0, "tpot_rel": 0.10}


def level(c, tok_s, ttft, tpot):
    return {"concurrency": c, "output_tok_s": tok_s, "ttft_mean": ttft, "tpot_mean": tpot}


def a_round(engine64, colo64, colo_ttft1):
    return {"engine": {"levels": [level(1, 1000, 0.015, 0.001), level(64, engine64, 0.1, 0.002)]},
            "colocated": {"levels": [level(1, 900, colo_ttft1, 0.00105),
                                     level(64, colo64, 0.1, 0.002)]}}


def test_a_ratio_is_taken_within_its_round():
    # the engine moves between rounds as much as the mesh: 0.71x and 1.26x as in §4 of
    # benchmarks/results/2026-12-02-gpu-gateway-warm-up-noise.md
    rounds = [a_round(20000, 14200, 0.019), a_round(15000, 18900, 0.025),
              a_round(16000, 15360, 0.018)]
    assert serve_rounds.per_round(rounds, "colocated", 64, serve_rounds.ratio) == \
        [0.71, 1.26, 0.96]
    text = "\n".join(serve_rounds.section(rounds, ["engine", "colocated"], [1, 64], TARGETS))
    assert "| 64 | median 0.96x (rounds 0.71x, 1.26x, 0.96x) |" in text
    assert "colocated c=64: median 0.96x (rounds 0.71x, 1.26x, 0.96x) (target >= 0.8): MET" \
        in text
    # c=1 TTFT: +4, +10, +3 ms -> median +4: met; TPOT +5% each round: met
    assert "TTFT median +4.0 ms (rounds +4.0 ms, +10.0 ms, +3.0 ms) (target <= +5 ms): MET" \
        in text
    assert "TPOT median +5.0%" in text


def test_a_failed_mode_or_a_missing_level_drops_out_of_its_round():
    rounds = [a_round(20000, 10000, 0.03), {"engine": {"error": "boom"}, "colocated":
                                             a_round(1, 1, 0.1)["colocated"]}]
    assert serve_rounds.per_round(rounds, "colocated", 64, serve_rounds.ratio) == [0.5]
    assert serve_rounds.per_round(rounds, "colocated", 16, serve_rounds.ratio) == []
    text = "\n".join(serve_rounds.section(rounds, ["engine", "colocated"], [16, 64], TARGETS))
    assert "| 16 | - |" in text
    assert "colocated c=64: median 0.50x (rounds 0.50x) (target >= 0.8): MISSED" in text
