"""Multi-turn conversations through `pdmesh serve`: prefix cache off vs on, 1P1D and 2P1D.

For each deployment and setting it starts `pdmesh serve --prefill N --decode 1`, runs
`pdmesh bench --backend chat --workload multi-turn` against it (a shared system prompt,
growing history, the assistant's real replies) and stops the mesh. Settings:

  off          workers with --no-prefix-cache
  on           the prefix cache (the default), round-robin prefill routing (the default)
  on+cache_aware   the cache plus `--prefill-policy cache_aware` at the gateway, only when
               the gateway knows that policy (added by another change; skipped otherwise)
  on+cache_cost    the cache plus `--prefill-policy cache_cost` (least uncached + queued
               prompt tokens), likewise only when the gateway knows it
  on+pd_auto   the cache plus `--pd-mode auto` at the gateway: per request, prefill on the
               prefill worker or on the decode itself (which, with decode-side reuse,
               holds the conversation so far), whichever predicts the lower TTFT
  off+pd_auto  `--pd-mode auto` without the cache (only when named in --settings): what
               per-request disaggregation alone does

`--compare decode-reuse` compares instead (prefix cache on in both):

  decode-reuse off   workers with --no-decode-prefix-cache: every turn moves its whole
                     prompt's KV to the decode
  decode-reuse on    the default: the decode keeps finished requests' KV and the prefill
                     sends only the pages after the decode's cached prefix

Prints, per deployment, mean / P99 TTFT per turn side by side, output tok/s, the prefix
cache hit rate, how the bench's requests split over the prefills (each one's KV
transfers), and the ratio of mean TTFT over turns >= 2 (off / on); and the KV bytes
the prefill(s) wrote (`pdmesh_kv_transfer_bytes_total`): over the bench run, and per turn
of one extra conversation run turn by turn after it (its own system prompt, so its turn 1
shares nothing). Each bench run's JSON goes to --out-dir.

    .venv/bin/python benchmarks/multi_turn.py                 # 4 conversations x 6 turns
    .venv/bin/python benchmarks/multi_turn.py --turns 8 --conversations 8 --parallel 4
    .venv/bin/python benchmarks/multi_turn.py --compare decode-reuse --deployments 1
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

# this checkout's pdmesh (what `python -m pdmesh.cli` runs from the repository root), not
# whichever one the venv has installed
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdmesh.bench.scrape import fetch, mean_parts_ms  # noqa: E402  (this checkout's)

MODEL = "default"  # --model: what every `pdmesh serve` serves and every request names


def cache_aware_available() -> bool:
    """Does this checkout's gateway know `--prefill-policy cache_aware`?"""
    return policy_available("cache_aware")


def policy_available(name: str) -> bool:
    """Does this checkout's gateway know `--prefill-policy NAME`?"""
    from pdmesh import config
    return name in getattr(config, "ROUTING_POLICIES", ())


def start_serve(args: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "pdmesh.cli", "serve", "--port", "0",
                             "--grpc-port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"ready — .*gateway (\S+)", line)
        if m:
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
            return proc, f"http://{m.group(1).rstrip(',')}/v1", lines
    raise RuntimeError("pdmesh serve did not start:\n" + "".join(lines[-30:]))


def wait_routable(base: str, timeout: float = 60.0) -> None:
    """One tiny chat request until it is not a 503 (the gateway learns workers by Watch)."""
    body = json.dumps({"model": MODEL, "max_tokens": 1,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    deadline = time.monotonic() + timeout
    while True:
        req = urllib.request.Request(base + "/chat/completions", body,
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def kv_bytes(lines: list[str]) -> float:
    """KV bytes written so far by every prefill worker of the mesh (all paths)."""
    line = next(x for x in lines if "pdmesh serve: metrics" in x)
    total = 0.0
    for url in re.findall(r"prefill-\d+ (http://\S+?/metrics)", line):
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        total += sum(float(v) for v in re.findall(
            r"^pdmesh_kv_transfer_bytes_total\{[^}]*\} (\S+)$", text, re.M))
    return total


def prefill_transfers(lines: list[str]) -> list[float]:
    """KV transfers (rooms) so far, per prefill worker: where the gateway routed them."""
    line = next(x for x in lines if "pdmesh serve: metrics" in x)
    out = []
    for url in re.findall(r"prefill-\d+ (http://\S+?/metrics)", line):
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out.append(sum(float(v) for v in re.findall(
            r"^pdmesh_kv_transfer_seconds_count(?:\{[^}]*\})? (\S+)$", text, re.M)))
    return out


def gateway_metrics(base: str) -> str:
    """The gateway's /metrics text (`base` is its OpenAI URL, .../v1)."""
    return fetch(base.rsplit("/v1", 1)[0] + "/metrics")


def pd_mode_counts(text: str) -> dict[str, float]:
    """{remote|local: requests routed so far} from the gateway's metrics text."""
    return {m: float(v) for m, v in re.findall(
        r'^pdmesh_gateway_pd_mode_requests_total\{pd_mode="(\w+)"\} (\S+)$', text, re.M)}


def parts_table(runs: dict[str, dict]) -> str:
    """Mean TTFT parts (ms) of the bench's PD requests, from the gateway's metrics."""
    names = list(runs)
    parts = sorted({p for r in runs.values() for p in r["ttft_parts_ms"]})
    lines = ["| TTFT part, mean ms | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names))]
    for p in parts:
        lines.append(f"| {p} | " + " | ".join(f"{r['ttft_parts_ms'].get(p, 0.0):.1f}"
                                            for r in runs.values()) + " |")
    return "\n".join(lines)


def chat(base: str, messages: list[dict], max_tokens: int) -> str:
    body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(base + "/chat/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def bytes_per_turn(base: str, lines: list[str], turns: int, output_len: int) -> list[float]:
    """One conversation, turn by turn (nothing else running): the KV bytes each turn's
    request made the prefill write."""
    system = " ".join(f"Rule {i}: answer the traveller about harbour {i} politely."
                      for i in range(60))  # ~900 tokens, shared with no bench prompt
    messages, out = [{"role": "system", "content": system}], []
    for k in range(turns):
        messages.append({"role": "user", "content": f"Question {k}: which harbour is "
                         f"quietest in month {k + 1}, and why?"})
        before = kv_bytes(lines)
        messages.append({"role": "assistant", "content": chat(base, messages, output_len)})
        out.append(kv_bytes(lines) - before)
    return out


def run_setting(name: str, serve_args: list[str], bench_args: list[str], out: Path,
                probe: tuple[int, int]) -> dict:
    proc, base, lines = start_serve(serve_args)
    try:
        wait_routable(base)
        b0, m0, s0 = kv_bytes(lines), gateway_metrics(base), prefill_transfers(lines)
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "pdmesh.cli", "bench", "--base-url", base,
                              "--backend", "chat", "--workload", "multi-turn", "--label", name,
                              "--no-progress", "--output", str(out), *bench_args],
                             text=True, capture_output=True, cwd=ROOT)
        print(f"  {name}: bench took {time.monotonic() - t0:.0f} s, exit {res.returncode}",
              flush=True)
        if res.returncode != 0:
            print(res.stdout[-3000:] + res.stderr[-3000:])
        bench_bytes = kv_bytes(lines) - b0
        split = [int(b - a) for a, b in zip(s0, prefill_transfers(lines))]
        m1 = gateway_metrics(base)
        parts = mean_parts_ms(m1, m0)
        before = pd_mode_counts(m0)
        modes = {k: int(v - before.get(k, 0.0)) for k, v in pd_mode_counts(m1).items()}
        turn_bytes = bytes_per_turn(base, lines, *probe)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
    doc = json.loads(out.read_text())
    return doc["runs"][0] | {"system_prompt_tokens": doc["config"].get("system_prompt_tokens"),
                             "kv_bytes": bench_bytes, "kv_bytes_per_turn": turn_bytes,
                             "ttft_parts_ms": parts, "transfers_per_prefill": split,
                             "pd_modes": modes}


def bytes_table(runs: dict[str, dict]) -> str:
    names = list(runs)
    head = ["KV bytes written (MiB)"] + names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines.append("| bench run (warm-up included) | " +
                 " | ".join(mib(r["kv_bytes"]) for r in runs.values()) + " |")
    for k in range(len(next(iter(runs.values()))["kv_bytes_per_turn"])):
        lines.append(f"| probe conversation, turn {k + 1} | " +
                     " | ".join(mib(r["kv_bytes_per_turn"][k]) for r in runs.values()) + " |")
    return "\n".join(lines)


def table(runs: dict[str, dict]) -> str:
    names = list(runs)
    turns = [t["turn"] for t in next(iter(runs.values()))["per_turn"]]
    head = ["turn"] + [f"{n} mean / P99 TTFT s" for n in names] + [f"{n} hit" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, k in enumerate(turns):
        cells = [str(k)]
        cells += [f"{r['per_turn'][i]['ttft']['mean']:.3f} / {r['per_turn'][i]['ttft']['p99']:.3f}"
                  for r in runs.values()]
        cells += [f"{r['per_turn'][i]['hit_rate']:.0%}" for r in runs.values()]
        lines.append("| " + " | ".join(cells) + " |")
    late = {n: mean_late(r) for n, r in runs.items()}
    cells = ["≥ 2 (mean)"] + [f"{late[n]:.3f}" for n in names] + [""] * len(names)
    lines.append("| " + " | ".join(cells) + " |")
    cells = ["output tok/s"] + [f"{r['output_tok_s']:.1f}" for r in runs.values()] + \
        [f"{r['cache_hit_rate']:.0%}" for r in runs.values()]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_late(run: dict) -> float:
    """Mean TTFT over the requests of turns >= 2 (weighted by completed requests)."""
    rows = [t for t in run["per_turn"] if t["turn"] >= 2]
    n = sum(t["completed"] for t in rows)
    return sum(t["ttft"]["mean"] * t["completed"] for t in rows) / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deployments", nargs="+", type=int, default=[1, 2],
                    help="prefill workers (one decode): 1 = 1P1D, 2 = 2P1D")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=4, help="conversations at once")
    ap.add_argument("--system-prompt-len", type=int, default=1024)
    ap.add_argument("--user-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--think-time", type=float, default=0.5)
    ap.add_argument("--out-dir", default="/tmp/pdmesh-multi-turn")
    ap.add_argument("--compare", choices=("prefix-cache", "decode-reuse"),
                    default="prefix-cache", help="what the settings switch (see above)")
    ap.add_argument("--settings", nargs="+", default=None, metavar="NAME",
                    help="run only these settings (off, on, on+cache_aware, on+cache_cost, "
                    "on+pd_auto, off+pd_auto); off "
                    "is needed for the ratios")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="passed to every `pdmesh serve` (e.g. --serve-arg=--kv-checksum=off)")
    ap.add_argument("--model", default="default", help="what `pdmesh serve --model` serves "
                    "(e.g. a folder from benchmarks/random_hf_model.py)")
    a = ap.parse_args()
    global MODEL
    MODEL = a.model
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench_args = ["--turns", str(a.turns), "--system-prompt-len", str(a.system_prompt_len),
                  "--input-len", str(a.user_len), "--output-len", str(a.output_len),
                  "--think-time", str(a.think_time), "--parallel", str(a.parallel),
                  "--conversations", str(a.conversations), "--warmup", "2"]
    if a.compare == "decode-reuse":
        settings = [("off", ["--worker-arg=--no-decode-prefix-cache"]), ("on", [])]
        print("settings: decode-side reuse off vs on (prefix cache on in both)")
    else:
        settings = [("off", ["--worker-arg=--no-prefix-cache"]), ("on", [])]
    if a.compare == "decode-reuse":
        pass  # cache_aware is the same with one prefill
    elif cache_aware_available():
        settings.append(("on+cache_aware", ["--gateway-arg=--prefill-policy=cache_aware"]))
        if policy_available("cache_cost"):
            settings.append(("on+cache_cost", ["--gateway-arg=--prefill-policy=cache_cost"]))
    else:
        print("cache_aware prefill routing: not available in this checkout (skipped)")
    if a.compare == "prefix-cache":
        auto = "--gateway-arg=--pd-mode=auto"
        settings.append(("on+pd_auto", [auto]))
        if a.settings and "off+pd_auto" in a.settings:
            settings.append(("off+pd_auto", ["--worker-arg=--no-prefix-cache", auto]))
    if a.settings:  # in the order given (alternate them across repeats)
        settings = [s for n in a.settings for s in settings if s[0] == n]
    print("bench args: " + " ".join(bench_args), flush=True)
    t_all = time.monotonic()
    for p in a.deployments:
        dep = f"{p}P1D"
        runs = {}
        for name, extra in settings:
            if a.settings and name not in a.settings:
                continue
            out = out_dir / f"{dep}-{name.replace('+', '-')}.json"
            runs[name] = run_setting(name, ["--prefill", str(p), "--decode", "1", "--model",
                                            a.model, *extra, *a.serve_arg],
                                     bench_args, out, (a.turns, a.output_len))
        sp = next(iter(runs.values()))["system_prompt_tokens"]
        print(f"\n{dep}: {a.conversations} conversations x {a.turns} turns, {a.parallel} at "
              f"once, system prompt {sp} tokens, user {a.user_len}, reply {a.output_len}, "
              f"think {a.think_time:g} s")
        print(table(runs))
        print(bytes_table(runs))
        print(parts_table(runs))
        print("prefilled where (gateway's pd_mode choices, bench run): " + "; ".join(
            f"{n} " + (", ".join(f"{k} {v}" for k, v in sorted(r["pd_modes"].items())) or "-")
            for n, r in runs.items()))
        print("KV transfers per prefill over the bench run: " + "; ".join(
            f"{n} {r['transfers_per_prefill']}" for n, r in runs.items()))
        if "off" not in runs:
            continue
        off = mean_late(runs["off"])
        for name in [n for n in runs if n != "off"]:
            r = runs[name]
            print(f"{dep} {name}: mean TTFT turns >= 2 {off / mean_late(r):.2f}x lower than off; "
                  f"output tok/s {r['output_tok_s'] / runs['off']['output_tok_s']:.2f}x; "
                  f"failed {r['failed']}", flush=True)
    print(f"\ntotal {time.monotonic() - t_all:.0f} s")


if __name__ == "__main__":
    main()
