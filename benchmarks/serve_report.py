"""serve_gpu.py's report: the throughput table, forward steps, targets, ready times,
profiles; with several rounds, the rounds' medians first (serve_rounds.py)."""
from __future__ import annotations

import os
import subprocess

import serve_rounds
from serve_common import ROOT, TARGETS, fmt_steps, level_sizes
from serve_profile import format_profile

def steps_section(args, res: dict, modes: list[str]) -> list[str]:
    """Each level's forward steps per engine (incl. the one request before the level):
    prompts arriving one by one cost more prefill steps between decode steps."""
    L = []
    for c, _ in level_sizes(args):
        cells = []
        for m in modes:
            r = next((x for x in res[m]["levels"] if x["concurrency"] == c), None)
            if r and r.get("steps"):
                cells.append(f"{m}: {fmt_steps(r['steps'])[len('steps: '):]}")
        if cells:
            L.append(f"- c={c}: " + "; ".join(cells))
    return ["", "## Forward steps per level (decode / prefill)", ""] + L if L else []


def fmt_ms(x: float) -> str:
    return f"{1e3 * x:.1f}"


def report(args, res: dict, meta: dict, rounds: list[dict] | None = None) -> str:
    """The run's report: `res` (round 1's results) in full; with several `rounds`, each
    level's ratios over the rounds and the targets judged on their medians, first."""
    L = ["# serve_gpu: engine alone vs `pdmesh serve` colocated vs 1P1D", "",
         f"- date: {meta['date']}", f"- device: {meta['device']}",
         f"- git: {meta['git']}", f"- command: `{meta['command']}`",
         f"- workload: {args.input_len} random token ids -> text "
         f"(~{meta.get('prompt_tokens', '?')} tokens re-encoded), {args.output_len} output "
         f"tokens, ignore_eos, greedy, "
         f"N = max({args.min_requests}, {args.requests_factor:g} x C) per level, model "
         f"{args.model}, device {args.device}", ""]
    if rounds and len(rounds) > 1:
        L += serve_rounds.section(rounds, args.modes, [c for c, _ in level_sizes(args)],
                                  TARGETS) + ["", "Round 1 in full:", ""]
    modes = [m for m in args.modes if m in res and "levels" in res[m]]
    eng = {r["concurrency"]: r for r in res.get("engine", {}).get("levels", [])}
    hdr = "| C |" + "".join(f" {m} tok/s | {m} TTFT ms | {m} TPOT ms |" for m in modes) + \
        "".join(f" {m}/engine |" for m in modes if m != "engine")
    L += ["## Throughput and latency (means)", "", hdr,
          "|" + "---:|" * (1 + 3 * len(modes) + len([m for m in modes if m != "engine"]))]
    for c, _ in level_sizes(args):
        row = f"| {c} |"
        for m in modes:
            r = next((x for x in res[m]["levels"] if x["concurrency"] == c), None)
            bad = "" if r is None or not r["failed"] else f" ({r['failed']} failed)"
            row += " - | - | - |" if r is None else (
                f" {r['output_tok_s']:.0f}{bad} | {fmt_ms(r['ttft_mean'])} | "
                f"{fmt_ms(r['tpot_mean'])} |")
        for m in modes:
            if m == "engine":
                continue
            r = next((x for x in res[m]["levels"] if x["concurrency"] == c), None)
            e = eng.get(c)
            row += (f" {r['output_tok_s'] / e['output_tok_s']:.2f}x |"
                    if r and e and e["output_tok_s"] else " - |")
        L.append(row)
    L += steps_section(args, res, modes)
    L += ["", "## Targets", ""]
    for m in modes:
        if m == "engine" or not eng:
            continue
        lv = {r["concurrency"]: r for r in res[m]["levels"]}
        for c in TARGETS["ratio_at"]:
            if c in lv and c in eng:
                q = lv[c]["output_tok_s"] / eng[c]["output_tok_s"]
                L.append(f"- {m} c={c}: {q:.2f}x engine (target >= {TARGETS['ratio']}): "
                         f"{'MET' if q >= TARGETS['ratio'] else 'MISSED'}")
        if 1 in lv and 1 in eng:
            dt = 1e3 * (lv[1]["ttft_mean"] - eng[1]["ttft_mean"])
            rel = lv[1]["tpot_mean"] / eng[1]["tpot_mean"] - 1
            L.append(f"- {m} c=1: TTFT {dt:+.1f} ms vs engine (target <= +{TARGETS['ttft_ms']:g} "
                     f"ms): {'MET' if dt <= TARGETS['ttft_ms'] else 'MISSED'}; "
                     f"TPOT {100 * rel:+.1f}% (target <= +{100 * TARGETS['tpot_rel']:.0f}%): "
                     f"{'MET' if rel <= TARGETS['tpot_rel'] else 'MISSED'}")
    L += ["", "## Ready times (s)", ""]
    if "engine" in res and "ready_s" in res["engine"]:
        L.append(f"- engine alone: Engine(...) constructed in {res['engine']['ready_s']:.1f} s "
                 "(in a process that has imported torch)")
    for m in modes:
        if m == "engine":
            continue
        svc = res[m].get("services", [])
        L.append(f"- {m}: `pdmesh serve: ready` at {res[m]['ready_s']:.1f} s after spawn; "
                 + ", ".join(f"{s['name']} {s['took_s']:.1f}" for s in svc))
        for s in svc:
            if s["name"] not in ("registry", "gateway"):
                ok = s["took_s"] <= TARGETS["ready_s"]
                L.append(f"  - {s['name']}: {s['took_s']:.1f} s (target <= "
                         f"{TARGETS['ready_s']:g} s): {'MET' if ok else 'MISSED'}")
    profs = [(m, res[m].get("profile")) for m in args.modes if res.get(m, {}).get("profile")]
    if profs:
        L += ["", f"## Where the time goes at c={args.profile_concurrency} "
              f"(py-spy, {args.profile_seconds:g} s, own samples of non-idle threads)", "",
              "own % = the function's share of the process's non-idle py-spy samples (leaf "
              "frame; a C extension's time counts to the Python function that called it); "
              "CPU % = the process's CPU time over the window / wall time (100% = one core). "
              "Own time at a GPU sync point (`sample`, `Event.synchronize`, "
              "`CUDAGraph.replay`, `.tolist()`) includes waiting for the GPU.", ""]
        for m, prof in profs:
            L += [f"### {m}", ""]
            for name, p in prof.items():
                L += format_profile(name, p, args.profile_top)
    errs = {m: res[m]["error"] for m in args.modes if res.get(m, {}).get("error")}
    if errs:
        L += ["", "## Failures", ""] + [f"- {m}: {e}" for m, e in errs.items()]
    return "\n".join(L) + "\n"


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--short", "--untracked-files=no"], cwd=ROOT,
                               text=True, capture_output=True).stdout.split()
        files = dirty[1::2]
        return head + (f" + uncommitted changes in {', '.join(files)}" if files else "") \
            if head else "unknown (no git here)"
    except OSError:
        return "unknown (no git here)"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            return r.stdout.strip().replace("\n", "; ") or device
        except OSError:
            return device
    return f"cpu ({os.cpu_count()} cores)"
