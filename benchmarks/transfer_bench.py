"""KV transfer micro-benchmark: every KV path this machine has, side by side, in one run.

    python benchmarks/transfer_bench.py [--suite small|512MiB|all] [--paths a,b] [--json]
        [--transport mooncake] [--protocol tcp] [--hostname 127.0.0.1] [--device-name ...]

Paths (a row each, whichever import and work here; the others are listed as skipped):
  mooncake-sync   Mooncake's batch_transfer_sync_write (its waiting thread spins)
  mooncake-async  MooncakeTransport's default: async submit, then sleep-poll
  shm             pdmesh.transfer.shm: the peer's pool is a memfd mapped here, torch copies
  ipc             pdmesh.transfer.cuda_ipc (GPU pools; needs CUDA)
  memcpy          torch copy_ of the same pages between two pools of this process, the
                  ceiling (memcpy-cuda for GPU pools: there the scattered row is
                  launch-bound, one copy_ per page)
The destination pool lives in a child process (pdmesh.transfer.peer for Mooncake, a small
server here for shm/ipc), so bytes really cross a socket, a mapping or the NIC. Every row
checks one write into a destination refilled with a sentinel, every page by digest; then
the paths take turns (3 rounds) for the timed calls, so background load hits all alike.

Suites: "small": SmolLM2-135M pages (30 layers x 16 tokens x K/V x 3 heads x 64, fp32 =
737,280 B), runs of 1, 8 and 64 consecutive pages and 64 scattered pages (the original
cases). "512MiB": SmolLM2's page and an 8B-shaped page (32 x 16 x 2 x 8 x 128 bf16 = 2 MiB),
512 MiB of pages each, as one consecutive run and as a random permutation (a descriptor
per page). Columns: GB/s (1e9 B/s) from the median call, the writer process's CPU seconds
per GB written (all its threads, time.process_time over the timed calls) and the peer
process's (/proc/<pid>/stat, 10 ms ticks), and GB/s as a share of memcpy's.
`run_all()` returns the rows; `run_bench()` is the original single-transport API.
"""
from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pdmesh.transfer import get_transport, plan_runs
from pdmesh.transfer.peer import SENTINEL, PoolPeer, make_pool, page_digest, tensor_page_digests

PAGE_SHAPE = (30, 16, 2, 3, 64)  # SmolLM2-135M, float32
POOL_PAGES = 128
SHAPES = {  # name -> (page shape, dtype)
    "smollm2": (PAGE_SHAPE, "float32"),  # 737,280 B
    "8b": ((32, 16, 2, 8, 128), "bfloat16"),  # 2 MiB
}
BIG_BYTES = 512 << 20
LOCAL_MODULES = {"shm": "pdmesh.transfer.shm", "ipc": "pdmesh.transfer.cuda_ipc"}
ALL_PATHS = ("mooncake-sync", "mooncake-async", "shm", "ipc", "memcpy")
ROUNDS = 3  # each row's calls are spread over this many turns of all paths


def cases(pool_pages: int = POOL_PAGES) -> dict[str, tuple[list[int], list[int]]]:
    """The "small" suite: name -> (src_pages, dst_pages). Scattered uses even ids only, so
    no two pairs merge."""
    rng = random.Random(0)
    evens = list(range(0, pool_pages, 2))
    return {
        "run of 1": ([5], [9]),
        "run of 8": (list(range(8, 16)), list(range(40, 48))),
        "run of 64": (list(range(0, 64)), list(range(64, 128))),
        "64 scattered": (rng.sample(evens, 64), rng.sample(evens, 64)),
    }


def big_cases(pages: int) -> dict[str, tuple[list[int], list[int]]]:
    """The "512MiB" suite for a pool of `pages` pages: all of them as one run, and all of
    them permuted at random on both sides (a descriptor per page, bar chance neighbours)."""
    rng = random.Random(1)
    every = list(range(pages))
    return {f"run of {pages}": (every, every),
            f"{pages} scattered": (rng.sample(every, pages), rng.sample(every, pages))}


def page_bytes(shape: str) -> int:
    import torch

    page_shape, dtype = SHAPES[shape]
    n = getattr(torch, dtype).itemsize
    for d in page_shape:
        n *= d
    return n


# ---------------------------------------------------------------- measuring

def _proc_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system, all threads) of process `pid`, None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Tally:
    """Timed calls of one path on one case, gathered over several rounds."""

    def __init__(self, nbytes: int, peer_pid: int | None = None) -> None:
        self.nbytes, self.peer_pid = nbytes, peer_pid
        self.times: list[float] = []
        self.cpu = 0.0
        self.peer_cpu: float | None = 0.0

    def run(self, write: Callable[[], Any], min_seconds: float, min_reps: int) -> None:
        """Time >= min_reps calls of `write` lasting >= min_seconds in all; add them up."""
        cpu0, peer0 = time.process_time(), _proc_cpu(self.peer_pid)
        t_end, n = time.perf_counter() + min_seconds, 0
        while n < min_reps or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            write()
            self.times.append(time.perf_counter() - t0)
            n += 1
        self.cpu += time.process_time() - cpu0
        peer1 = _proc_cpu(self.peer_pid)
        if peer0 is None or peer1 is None or self.peer_cpu is None:
            self.peer_cpu = None
        else:
            self.peer_cpu += peer1 - peer0

    def row(self) -> dict:
        """ms and GB/s of the median call, CPU seconds per GB of writer and peer, reps."""
        sec, gb = statistics.median(self.times), self.nbytes * len(self.times) / 1e9
        return dict(ms=sec * 1e3, gbps=self.nbytes / sec / 1e9, reps=len(self.times),
                    writer_cpu_s_per_gb=self.cpu / gb,
                    peer_cpu_s_per_gb=None if self.peer_cpu is None else self.peer_cpu / gb)


def measure(write: Callable[[], Any], nbytes: int, peer_pid: int | None = None,
            min_seconds: float = 0.5, min_reps: int = 5) -> dict:
    """Time `write` (one warm-up call first): median seconds over >= min_reps calls and
    >= min_seconds, and CPU seconds per GB of this process and of the peer's."""
    write()  # warm-up: handshake, connections, page faults
    tally = Tally(nbytes, peer_pid)
    tally.run(write, min_seconds, min_reps)
    return tally.row()


def time_case(transport, peer, src_base, src_pages, dst_pages, min_seconds=0.5, min_reps=5):
    """Median seconds of write_pages over >= min_reps repetitions and >= min_seconds, and
    the repetitions (the original helper)."""
    args = (peer.session_id, src_base, peer.base, peer.bytes_per_page, src_pages, dst_pages)
    transport.write_pages(*args)  # warm-up: handshake, connections, page faults
    tally = Tally(len(src_pages) * peer.bytes_per_page)
    tally.run(lambda: transport.write_pages(*args), min_seconds, min_reps)
    return statistics.median(tally.times), len(tally.times)


# ---------------------------------------------------------------- a local-path peer process

def _serve_local(conn: Any, module: str, num_pages: int, page_shape: tuple, dtype: str,
                 device: str) -> None:
    # Child: a sentinel pool made by the path's module (alloc_pool where it has one),
    # exported; answers ("reset",), ("digests",), ("stop",).
    import torch

    mod = importlib.import_module(module)
    shape, dt = (num_pages, *page_shape), getattr(torch, dtype)
    if device == "cpu" and hasattr(mod, "alloc_pool"):
        pool = mod.alloc_pool(shape, dt)
    else:
        pool = torch.empty(shape, dtype=dt, device=device)
    pool.view(torch.uint8).fill_(SENTINEL)
    if pool.is_cuda:
        torch.cuda.synchronize()
    conn.send(("ready", mod.export_pool(pool)))
    while True:
        op = conn.recv()[0]
        if op == "reset":
            pool.view(torch.uint8).fill_(SENTINEL)
            if pool.is_cuda:
                torch.cuda.synchronize()
            conn.send("ok")
        elif op == "digests":
            conn.send(tensor_page_digests(pool.cpu()))
        elif op == "stop":
            conn.send("stopped")
            return


class LocalPeer:
    """A child process holding an exported pool for the shm or ipc path."""

    def __init__(self, name: str, num_pages: int, page_shape: Sequence[int], dtype: str,
                 device: str = "cpu", timeout: float = 120.0) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve_local, daemon=True, args=(
            child, LOCAL_MODULES[name], num_pages, tuple(page_shape), dtype, device))
        self.process.start()
        if not self.conn.poll(timeout):
            self.process.kill()
            raise TimeoutError(f"{name} peer did not start within {timeout} s")
        _, self.uri = self.conn.recv()
        if not self.uri:
            self.stop()
            raise RuntimeError(f"the {name} path does not export this pool")

    def _ask(self, op: str) -> Any:
        self.conn.send((op,))
        if not self.conn.poll(120):
            raise TimeoutError(f"local peer did not answer {op!r}")
        return self.conn.recv()

    def reset(self) -> None:
        self._ask("reset")

    def digests(self) -> list[str]:
        return self._ask("digests")

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self._ask("stop")
            except (TimeoutError, EOFError, BrokenPipeError):
                pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


# ---------------------------------------------------------------- paths

@dataclass
class Path:
    """One way of writing pages into one destination pool."""

    name: str
    write: Callable[[list[int], list[int]], Any]  # (src_pages, dst_pages), blocks until done
    reset: Callable[[], None]  # destination back to the sentinel
    digests: Callable[[], list[str]]  # every destination page's digest
    peer_pid: int | None = None
    close: Callable[[], None] = lambda: None


def _memcpy_path(name: str, src: Any, bpp: int) -> Path:
    import torch

    dst = torch.empty_like(src)
    s8, d8 = src.view(torch.uint8).view(-1), dst.view(torch.uint8).view(-1)
    sync = torch.cuda.synchronize if src.is_cuda else (lambda: None)

    def write(sp: list[int], dp: list[int]) -> None:
        for s, d, n in plan_runs(sp, dp):
            d8[d * bpp:(d + n) * bpp].copy_(s8[s * bpp:(s + n) * bpp])
        sync()

    def reset() -> None:
        d8.fill_(SENTINEL)
        sync()

    return Path(name, write, reset, lambda: tensor_page_digests(dst.cpu()))


def open_paths(want: Sequence[str], num_pages: int, shape: str, src: Any, src_gpu: Any,
               transport_name: str, transport_kwargs: dict, skipped: dict[str, str]) -> list[Path]:
    """Start a peer for each wanted path that works here; note why the others do not."""
    page_shape, dtype = SHAPES[shape]
    bpp = page_bytes(shape)
    paths: list[Path] = []
    engine_modes = [p for p in want if p.startswith("mooncake") or p == "engine"]
    if transport_name != "mooncake":
        engine_modes = engine_modes[:1]  # one row for another transport: its own behaviour
    if engine_modes:
        peer, engines = None, []

        def close() -> None:
            if peer is not None:
                peer.stop()
            for t in engines:
                t.close()
        try:
            factory = get_transport(transport_name)
            peer = PoolPeer.start(num_pages, page_shape, dtype, transport=transport_name,
                                  **transport_kwargs)
            engine_paths = []
            for p in engine_modes:
                kw = dict(transport_kwargs)
                if transport_name == "mooncake":
                    kw["write_api"] = p.partition("-")[2]
                t = factory(**kw)
                engines.append(t)
                base = t.register(src)
                engine_paths.append(Path(
                    p if transport_name == "mooncake" else transport_name,
                    lambda sp, dp, t=t, base=base: t.write_pages(
                        peer.session_id, base, peer.base, bpp, sp, dp),
                    peer.reset, peer.digests, peer.process.pid))
        except Exception as e:  # noqa: BLE001 - e.g. MooncakeUnavailable: report, go on
            close()
            for p in engine_modes:
                skipped[p] = f"{type(e).__name__}: {e}"
        else:
            engine_paths[-1].close = close
            paths += engine_paths
    for name in ("shm", "ipc"):
        if name not in want:
            continue
        local = src_gpu if name == "ipc" else src
        if local is None:
            skipped[name] = "no CUDA device here"
            continue
        try:
            mod = importlib.import_module(LOCAL_MODULES[name])
        except ImportError as e:
            skipped[name] = f"{LOCAL_MODULES[name]} does not import: {e}"
            continue
        try:
            lp = LocalPeer(name, num_pages, page_shape, dtype,
                           device=str(local.device) if name == "ipc" else "cpu")
        except Exception as e:  # noqa: BLE001
            skipped[name] = f"{type(e).__name__}: {e}"
            continue
        try:
            peer_obj = mod.open_peer(lp.uri, local)
        except Exception as e:  # noqa: BLE001
            lp.stop()
            skipped[name] = f"open_peer failed: {type(e).__name__}: {e}"
            continue

        def close(peer_obj=peer_obj, lp=lp) -> None:
            peer_obj.close()
            lp.stop()
        paths.append(Path(name, lambda sp, dp, o=peer_obj: o.write_pages(sp, dp, bpp),
                          lp.reset, lp.digests, lp.process.pid, close))
    if "memcpy" in want:
        paths.append(_memcpy_path("memcpy", src, bpp))
        if src_gpu is not None:
            paths.append(_memcpy_path("memcpy-cuda", src_gpu, bpp))
    return paths


def _expected(src_digests: list[str], bpp: int, pairs) -> list[str]:
    out = [page_digest(bytes([SENTINEL]) * bpp)] * len(src_digests)
    for s, d in pairs:
        out[d] = src_digests[s]
    return out


def run_all(paths: Sequence[str] = ALL_PATHS, suites: Sequence[str] = ("small", "512MiB"),
            transport_name: str = "mooncake", min_seconds: float = 0.5, verify: bool = True,
            **transport_kwargs: Any) -> tuple[list[dict], dict[str, str]]:
    """Measure every wanted path that works here on every case of `suites`; returns
    (rows, {path: why it was skipped}). Rows: suite, shape, case, path, pages,
    descriptors, bytes, ms, gbps, reps, writer/peer_cpu_s_per_gb, of_memcpy, verified."""
    import torch

    rows: list[dict] = []
    skipped: dict[str, str] = {}
    plan = []
    if "small" in suites:
        plan.append(("small", "smollm2", POOL_PAGES, cases(), 5))
    if "512MiB" in suites:
        for shape in SHAPES:
            n = BIG_BYTES // page_bytes(shape)
            plan.append(("512MiB", shape, n, big_cases(n), 3))
    cuda = torch.cuda.is_available()
    for suite, shape, num_pages, suite_cases, min_reps in plan:
        page_shape, dtype = SHAPES[shape]
        bpp = page_bytes(shape)
        src = make_pool(num_pages, page_shape, dtype, seed=0)
        src_gpu = src.cuda() if cuda else None
        src_digests = tensor_page_digests(src)
        opened = open_paths(paths, num_pages, shape, src, src_gpu, transport_name,
                            transport_kwargs, skipped)
        try:
            for case, (sp, dp) in suite_cases.items():
                nbytes = len(sp) * bpp
                checked = {}
                for p in opened:  # one write into a fresh sentinel pool, checked page by page
                    p.reset()
                    p.write(sp, dp)  # also the warm-up: handshake, connections, page faults
                    checked[p.name] = p.digests() == _expected(src_digests, bpp, zip(sp, dp)) \
                        if verify else None
                # paths take turns, so that a burst of load elsewhere hits them all alike
                tallies = {p.name: Tally(nbytes, p.peer_pid) for p in opened}
                for _ in range(ROUNDS):
                    for p in opened:
                        tallies[p.name].run(lambda: p.write(sp, dp), min_seconds / ROUNDS,
                                            -(-min_reps // ROUNDS))
                case_rows = [dict(suite=suite, shape=shape, case=case, path=p.name,
                                  pages=len(sp), descriptors=len(plan_runs(sp, dp)),
                                  bytes=nbytes, **tallies[p.name].row(),
                                  verified=checked[p.name]) for p in opened]
                ceiling = {r["path"]: r["gbps"] for r in case_rows
                           if r["path"].startswith("memcpy")}
                for r in case_rows:
                    ref = ceiling.get("memcpy-cuda" if r["path"] == "ipc" else "memcpy")
                    r["of_memcpy"] = r["gbps"] / ref if ref else None
                rows += case_rows
        finally:
            for p in opened:
                p.close()
    return rows, skipped


def run_bench(transport_name: str = "mooncake", **transport_kwargs) -> list[dict]:
    """The original API: the small suite through one transport (for Mooncake, its default
    write API); rows of {case, pages, descriptors, bytes, ms, gbps, reps, ...}."""
    path = "mooncake-" + transport_kwargs.pop("write_api", "async") \
        if transport_name == "mooncake" else "engine"
    rows, skipped = run_all([path], ["small"], transport_name, **transport_kwargs)
    if not rows:
        raise RuntimeError(f"{transport_name} could not be measured: {skipped}")
    return rows


# ---------------------------------------------------------------- output

def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(rows: list[dict], skipped: dict[str, str] | None = None) -> str:
    """Markdown table of run_all / run_bench rows, grouped by case, paths side by side."""
    head = ("| suite | page | case | path | pages | descr | MB | ms | GB/s | of memcpy "
            "| writer CPU s/GB | peer CPU s/GB | reps | verified |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ok = {True: "yes", False: "**NO**", None: "-"}[r.get("verified")]
        lines.append(
            f"| {r.get('suite', 'small')} | {r.get('shape', 'smollm2')} | {r['case']} "
            f"| {r.get('path', '')} | {r['pages']} | {r['descriptors']} "
            f"| {r['bytes'] / 1e6:.2f} | {r['ms']:.3f} | {r['gbps']:.2f} "
            f"| {_num(r.get('of_memcpy') and 100 * r['of_memcpy'], '.0f')}"
            f"{'%' if r.get('of_memcpy') else ''} "
            f"| {_num(r.get('writer_cpu_s_per_gb'), '.3f')} "
            f"| {_num(r.get('peer_cpu_s_per_gb'), '.3f')} | {r['reps']} | {ok} |")
    for name, why in (skipped or {}).items():
        lines.append(f"\nskipped {name}: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transport", default="mooncake",
                    help="transfer engine for the engine rows (pdmesh.transfer.get_transport)")
    ap.add_argument("--protocol", default="tcp", choices=["tcp", "rdma"])
    ap.add_argument("--hostname", default="127.0.0.1")
    ap.add_argument("--device-name", default="", help="rdma: HCAs, e.g. mlx5_0,mlx5_1")
    ap.add_argument("--suite", default="all", choices=["small", "512MiB", "all"])
    ap.add_argument("--paths", default=",".join(ALL_PATHS),
                    help=f"comma-separated subset of {','.join(ALL_PATHS)}")
    ap.add_argument("--min-seconds", type=float, default=0.5, help="per row, after warm-up")
    ap.add_argument("--no-verify", action="store_true", help="skip the digest check per row")
    ap.add_argument("--json", action="store_true", help="print rows as JSON lines")
    a = ap.parse_args(argv)
    want = [p.strip() for p in a.paths.split(",") if p.strip()]
    bad = [p for p in want if p not in ALL_PATHS]
    if bad:
        ap.error(f"unknown paths {bad}; known: {', '.join(ALL_PATHS)}")
    if a.transport != "mooncake":
        want = ["engine" if p.startswith("mooncake") else p for p in want]
        want = list(dict.fromkeys(want))
    suites = ["small", "512MiB"] if a.suite == "all" else [a.suite]
    rows, skipped = run_all(want, suites, a.transport, a.min_seconds, not a.no_verify,
                            hostname=a.hostname, protocol=a.protocol, device_name=a.device_name)
    if a.json:
        print("\n".join(json.dumps(r) for r in rows))
        for name, why in skipped.items():
            print(json.dumps({"skipped": name, "why": why}))
    else:
        print(format_table(rows, skipped))


if __name__ == "__main__":
    main()
