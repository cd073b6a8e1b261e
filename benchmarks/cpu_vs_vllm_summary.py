"""Medians over rounds of a benchmarks/cpu_vs_vllm.sh output folder, and each pdmesh
server's ratios to vLLM within the same round (paired: the servers of a round ran
minutes apart, so a round's ratio cancels the load that changed between rounds).

    .venv/bin/python benchmarks/cpu_vs_vllm_summary.py /tmp/cpu_vs_vllm [REFERENCE_LABEL]

REFERENCE_LABEL: the file label of the reference server (default vllm_bfloat16).
Ratio columns: pdmesh / vLLM of output tok/s (goal >= 1), mean and P99 TTFT (goal <= 1).
"""
from __future__ import annotations

import collections
import glob
import json
import re
import statistics
import sys

KEYS = ("output_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms")


def load(folder: str) -> dict[tuple[str, int], dict[int, dict]]:
    """(server label, concurrency) -> round -> bench_serving's figures."""
    runs: dict[tuple[str, int], dict[int, dict]] = collections.defaultdict(dict)
    for f in glob.glob(f"{folder}/*_c*_r*.jsonl"):
        label, c, r = re.search(r"/([^/]+)_c(\d+)_r(\d+)\.jsonl$", f).groups()
        runs[(label, int(c))][int(r)] = json.loads(open(f).readline())
    return runs


def main() -> None:
    folder = sys.argv[1]
    ref = sys.argv[2] if len(sys.argv) > 2 else "vllm_bfloat16"
    runs = load(folder)
    print("| server | c | rounds | output tok/s | mean TTFT s | P99 TTFT s | mean TPOT ms "
          "| tok/s ratio | mean TTFT ratio | P99 TTFT ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (label, c), by_round in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0] != ref,
                                                                     kv[0][0])):
        med = [statistics.median(g[k] for g in by_round.values()) for k in KEYS]
        cells = [f"{med[0]:.1f}", f"{med[1] / 1e3:.3f}", f"{med[2] / 1e3:.3f}", f"{med[3]:.1f}"]
        base = runs.get((ref, c), {})
        paired = [r for r in by_round if r in base]
        if label != ref and paired:
            for k in KEYS[:3]:
                ratios = sorted(by_round[r][k] / base[r][k] for r in paired)
                cells.append(f"{statistics.median(ratios):.2f} "
                             f"({' / '.join(f'{x:.2f}' for x in ratios)})")
        else:
            cells += ["", "", ""]
        print(f"| {label} | {c} | {len(by_round)} | " + " | ".join(cells) + " |")
    print("\nfigures: median over rounds; ratios: median of the per-round ratios to "
          f"{ref} (all rounds' ratios, sorted, in brackets)")


if __name__ == "__main__":
    main()
