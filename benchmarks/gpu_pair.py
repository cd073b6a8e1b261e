"""Prefill and decode on different GPUs of one host: the KV path between them, and
heterogeneous TP through `pdmesh serve`.

    python3 benchmarks/gpu_pair.py transfer                 # GPU 0 -> GPU 1, 8B-shaped KV
    python3 benchmarks/gpu_pair.py hetero --model /tmp/llama-1b [--dtype float32]

transfer: a 4,096-token prompt's KV of the Llama-3-8B shape (256 pages of 2 MiB = 512 MiB,
bf16) in a pool on GPU 0, written by pdmesh's Mooncake transport (tcp, the GPU memory
registered as it is) into a pool on GPU 1 owned by another process, as one run of pages
and as 256 scattered pages; every page checked; beside torch's GPU 0 -> GPU 1 copy of the
same bytes (the link's bandwidth here) in the same run. pdmesh's CUDA IPC path copies
within one GPU only, so across GPUs the mesh takes Mooncake (the route probe says so).

hetero: `pdmesh serve --gpus 0,1` three ways with the same greedy chat requests (openai
/v1/completions, temperature 0): colocated TP 1 (the reference), prefill TP 2 (GPUs 0, 1) -> decode
TP 1, prefill TP 1 -> decode TP 2; prints whether each one's completions equal the
reference's, and the prefill's KV write rate from its metrics (bytes / seconds of its
transfers, path label). `--device cpu` runs the same on CPUs (gloo) as a smoke test.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_tp, beside this file

PAGE_SHAPE, PAGES = (32, 16, 2, 8, 128), 256  # 8B-shaped pages: 2 MiB each, 512 MiB


def _peer(conn, device: str) -> None:
    """Child: a zeroed pool on `device`, registered with Mooncake; answers digests."""
    import torch

    from pdmesh.transfer import get_transport

    t = get_transport("mooncake")(hostname="127.0.0.1", protocol="tcp")
    pool = torch.zeros(PAGES, *PAGE_SHAPE, dtype=torch.bfloat16, device=device)
    base = t.register(pool)
    conn.send((t.session_id, base))
    while (op := conn.recv()) != "stop":
        if op == "digests":
            conn.send(_digests(pool))
        else:
            pool.zero_()
            torch.cuda.synchronize(device) if pool.is_cuda else None
            conn.send("ok")
    t.close()


def _digests(pool) -> list[int]:
    """A 64-bit sum per page of its int32 words (the same bytes give the same value)."""
    import torch

    words = pool.view(torch.int32).view(pool.shape[0], -1).to(torch.int64)
    return words.sum(dim=1).tolist()


def transfer(args) -> None:
    import torch

    from pdmesh.transfer import get_transport

    src_dev, dst_dev = args.src, args.dst
    gen = torch.Generator(src_dev).manual_seed(0)
    src = torch.randint(-2 ** 15, 2 ** 15, (PAGES, *PAGE_SHAPE), dtype=torch.int16,
                        device=src_dev, generator=gen).view(torch.bfloat16)
    nbytes, bpp = src.numel() * 2, src[0].numel() * 2
    local = torch.empty_like(src, device=dst_dev)
    copy_s = _median(lambda: (local.copy_(src), torch.cuda.synchronize(dst_dev)), 10)
    p2p = torch.cuda.can_device_access_peer(0, 1) if torch.cuda.device_count() > 1 else None
    print(f"{nbytes / 2**20:.0f} MiB of 8B-shaped KV, {src_dev} -> {dst_dev}; peer access "
          f"{p2p}; torch copy {nbytes / copy_s / 1e9:,.1f} GB/s ({copy_s * 1e3:.2f} ms)")
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_peer, args=(child, dst_dev), daemon=True)
    proc.start()
    session, dst_base = conn.recv()
    t = get_transport("mooncake")(hostname="127.0.0.1", protocol="tcp")
    src_base = t.register(src)
    want = _digests(src)
    perm = list(range(PAGES))
    __import__("random").Random(0).shuffle(perm)
    for name, dst_pages in (("one run", list(range(PAGES))), ("256 scattered pages", perm)):
        conn.send("reset"), conn.recv()
        t.write_pages(session, src_base, dst_base, bpp, list(range(PAGES)), dst_pages)
        conn.send("digests")
        got = conn.recv()
        ok = all(got[d] == want[s] for s, d in enumerate(dst_pages))
        sec = _median(lambda: t.write_pages(session, src_base, dst_base, bpp,
                                            list(range(PAGES)), dst_pages), args.reps)
        print(f"mooncake tcp, {name}: {nbytes / sec / 1e9:.2f} GB/s ({sec * 1e3:.0f} ms), "
              f"{nbytes / sec / (nbytes / copy_s):.4f} of the copy; pages verified: {ok}")
    conn.send("stop")
    proc.join(30)
    t.close()


def _median(fn, n: int) -> float:
    """Median wall seconds of fn() (gpu_tp.dev_time on the host clock)."""
    import torch
    from gpu_tp import dev_time

    return dev_time(fn, n, torch.device("cpu"))


class Serve:
    """`pdmesh serve ...` in the background: its gateway URL and metrics URLs once ready."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: str) -> None:
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "pdmesh.cli", "serve", *argv],
                                     env=env, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.url, self.metrics, self.lines = None, {}, []
        self.ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            self.lines.append(line)
            if m := re.search(r"pdmesh serve: ready — .*gateway (\S+)", line):
                self.url = f"http://{m.group(1)}"
            if line.startswith("pdmesh serve: metrics"):
                self.metrics = dict(re.findall(r"(\S+) (http://\S+/metrics)", line))
                self.ready.set()
        self.ready.set()

    def wait(self, timeout: float) -> None:
        if not self.ready.wait(timeout) or self.url is None:
            raise RuntimeError("pdmesh serve did not become ready:\n" + "".join(self.lines[-30:]))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def kv_rate(metrics_url: str) -> str:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    b = {m[0]: float(m[1]) for m in re.findall(
        r'^pdmesh_kv_transfer_bytes_total\{path="(\w+)"\} (\S+)', text, re.M)}
    s = {m[0]: float(m[1]) for m in re.findall(
        r'^pdmesh_kv_transfer_seconds_sum\{path="(\w+)"\} (\S+)', text, re.M)}
    n = {m[0]: float(m[1]) for m in re.findall(
        r'^pdmesh_kv_transfer_seconds_count\{path="(\w+)"\} (\S+)', text, re.M)}
    return "; ".join(f"path {p}: {b[p] / 2**20:.1f} MiB in {n.get(p, 0):.0f} writes, "
                     f"{b[p] / s[p] / 1e9:.2f} GB/s" for p in b if s.get(p)) or "no KV written"


def complete(url: str, model: str, prompt: str, tokens: int) -> tuple[str, int]:
    """One greedy /v1/completions call (plain HTTP: the GPU image has no openai package)
    -> (text, prompt tokens)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": tokens,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", body,
                                 {"Content-Type": "application/json"})
    r = json.loads(urllib.request.urlopen(req, timeout=300).read())
    return r["choices"][0]["text"], r["usage"]["prompt_tokens"]


def hetero(args) -> None:
    setups = [("colocated TP 1", ["--prefill", "0", "--decode", "0", "--colocated", "1"]),
              ("prefill TP 2 -> decode TP 1", ["--prefill-tp", "2", "--decode-tp", "1"]),
              ("prefill TP 1 -> decode TP 2", ["--prefill-tp", "1", "--decode-tp", "2"]),
              ("colocated TP 2", ["--prefill", "0", "--decode", "0", "--colocated", "1",
                                  "--tp", "2"])]
    env = dict(os.environ, PDMESH_DEVICE=args.device, PDMESH_DTYPE=args.dtype)
    prompts = [f"Question {i}: " + "tell me about the history of the mesh. " * (i * args.grow)
               for i in range(args.prompts)]
    ref = None
    for name, extra in [setups[i] for i in args.only]:
        serve = Serve(["--model", args.model, "--port", "0", "--grpc-port", "0",
                       "--gpus", args.gpus, *extra], env, f"{args.logs}/{name[:14]}.log")
        try:
            t0 = time.perf_counter()
            serve.wait(args.ready_timeout)
            ready = time.perf_counter() - t0
            outs = [complete(serve.url, args.model, p, args.tokens) for p in prompts]
            ref = outs if ref is None else ref
            same = sum(a[0] == b[0] for a, b in zip(outs, ref))
            pre = next((u for k, u in serve.metrics.items() if k.startswith("prefill")), None)
            rate = kv_rate(pre) if pre else "(colocated: no KV moved)"
            print(f"{name}: ready {ready:.1f} s; prompts {[u for _, u in outs]} tokens; "
                  f"completions equal to colocated TP 1: {same}/{len(outs)}; KV {rate}",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - report, go on to the next setup
            print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
        finally:
            serve.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("transfer")
    t.add_argument("--src", default="cuda:0")
    t.add_argument("--dst", default="cuda:1")
    t.add_argument("--reps", type=int, default=5)
    h = sub.add_parser("hetero")
    h.add_argument("--model", required=True)
    h.add_argument("--device", default="cuda")
    h.add_argument("--dtype", default="float32")
    h.add_argument("--gpus", default="0,1")
    h.add_argument("--prompts", type=int, default=4)
    h.add_argument("--grow", type=int, default=40, help="prompt i repeats a sentence i x this")
    h.add_argument("--tokens", type=int, default=32)
    h.add_argument("--ready-timeout", type=float, default=300.0)
    h.add_argument("--logs", default="/tmp")
    h.add_argument("--only", type=int, nargs="+", default=[0, 1, 2],
                   help="which setups (0 colocated reference, 1 P TP2 -> D TP1, 2 P TP1 -> D TP2, "
                   "3 colocated TP2)")
    args = ap.parse_args(argv)
    (transfer if args.cmd == "transfer" else hetero)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
