"""PNG charts of benchmark runs: TTFT and output tok/s against load, one line per label.

The x axis is the concurrency when every run is a fixed-concurrency run, else the request
rate, so several result files (e.g. 1P1D and 2P1D) compare on one chart.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pdmesh.bench.metrics import RunSummary

CHARTS = {  # file stem -> (title, y label, [(value getter, line style suffix)])
    "ttft": ("Time to first token", "TTFT (s)",
             [(lambda s: s.ttft.mean, "avg", "-o"), (lambda s: s.ttft.p99, "P99", "--x")]),
    "throughput": ("Output throughput", "output tok/s",
                   [(lambda s: s.output_tok_s, "", "-o")]),
    "tpot": ("Time per output token", "TPOT (s)",
             [(lambda s: s.tpot.mean, "avg", "-o")]),
}


def _x(s: RunSummary, by_rate: bool) -> float:
    if by_rate:
        return float(s.request_rate) if s.request_rate is not None else float("nan")
    return float(s.concurrency or 0)


def group_by_label(summaries: Sequence[RunSummary], default: str = "run"
                   ) -> dict[str, list[RunSummary]]:
    """Runs grouped by label (empty labels become `default`), in first-seen order."""
    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        groups.setdefault(s.label or default, []).append(s)
    return groups


def plot_runs(groups: dict[str, Sequence[RunSummary]], out_dir: str | Path) -> list[Path]:
    """Write ttft.png, throughput.png and tpot.png under out_dir; return their paths."""
    import matplotlib
    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [s for g in groups.values() for s in g]
    by_rate = any(s.request_rate is not None for s in runs)
    xlabel = "request rate (req/s)" if by_rate else "concurrency"
    paths = []
    for stem, (title, ylabel, series) in CHARTS.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (label, group) in enumerate(groups.items()):
            pts = sorted(group, key=lambda s: _x(s, by_rate))
            xs = [_x(s, by_rate) for s in pts]
            for get, name, style in series:  # one colour per label, a style per statistic
                ax.plot(xs, [get(s) for s in pts], style, color=f"C{i % 10}",
                        label=f"{label} {name}".strip())
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ticks = sorted({_x(s, by_rate) for s in runs})
        if not by_rate and len(ticks) > 2:
            ax.set_xscale("log", base=2)  # concurrency sweeps double
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
