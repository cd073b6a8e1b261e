#!/usr/bin/env python3
"""Chaos run: steady load through `pdmesh serve --chaos` (2P2D by default) while faults
are injected at random into every phase of a request, checking after every fault that

  - every request ended within its deadline: the reference greedy tokens, or a clear
    error (an HTTP error / SSE error event in OpenAI's error JSON, or a refused connection
    while the gateway itself was down) -- never hung, never wrong tokens;
  - no page leaked on any live worker (pages back to total once the mesh is idle);
  - no surviving process crashed (every exit serve reports is one this script caused);
  - restarted processes rejoin (2P2D registered again) and serve.

    .venv/bin/python benchmarks/chaos.py --faults 1000 --out benchmarks/results/x.md
    .venv/bin/python benchmarks/chaos.py --faults 60 --process-share 0.1   # CI-sized

Faults, by phase of the requests they hit (queued, prefilling, waiting for Transfer,
writing KV, decoding, streaming), are mostly armed by `pdmesh.v1.Chaos` RPCs (cheap) --
delay/fail/corrupt KV writes, delay/fail the next calls of Prefill/Transfer/Generate,
slow an engine, stall/drop a worker's or the registry's heartbeats -- plus a client
cancel at each phase, and fewer process faults (kill -9, SIGSTOP/SIGCONT of a worker or
the registry, kill -9 of the registry or the gateway; `pdmesh serve` restarts the dead).
Prints one table by fault kind and phase (and `--out` writes it as markdown).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdmesh import auth  # noqa: E402
from pdmesh.registry_client import RECONNECT_OPTIONS  # noqa: E402
from pdmesh.v1 import chaos_pb2 as cpb  # noqa: E402
from pdmesh.v1 import chaos_pb2_grpc as cgrpc  # noqa: E402
from pdmesh.v1 import decode_pb2 as dpb  # noqa: E402
from pdmesh.v1 import decode_pb2_grpc as dgrpc  # noqa: E402
from pdmesh.v1 import prefill_pb2 as ppb  # noqa: E402
from pdmesh.v1 import prefill_pb2_grpc as pgrpc  # noqa: E402
from pdmesh.v1 import registry_pb2 as rpb  # noqa: E402
from pdmesh.v1 import registry_pb2_grpc as rgrpc  # noqa: E402

TOKEN = "pdmesh-chaos-token"
PHASES = ("queued", "prefilling", "waiting_transfer", "writing", "decoding", "streaming")
PROMPTS = ["Say hi", "Name a color.", "What is 2+2?", "Name a fruit.", "Say yes or no.",
           "Count to three.", "Name an animal.", "What day comes after Monday?",
           "Name a planet.", "What is the capital of France?", "Say hello in Spanish.",
           "Name a month.", "What is 3 times 3?", "Name a vegetable.", "Spell cat.",
           "Name a season."]
# phase -> the fault kinds that hit a request in that phase; "proc:" kinds are processes
KINDS = {
    "queued": ["rpc_delay:P:Prefill", "rpc_fail:P:Prefill", "rpc_delay:D:Generate",
               "rpc_fail:D:Generate", "engine_slow:P", "cancel", "proc:sigstop:P",
               "proc:kill9:P"],
    "prefilling": ["engine_slow:P", "rpc_fail:P:Prefill", "hb_drop:P", "cancel",
                   "proc:kill9:P", "proc:sigstop:P"],
    "waiting_transfer": ["rpc_delay:P:Transfer", "rpc_fail:P:Transfer", "hb_stall:D",
                         "hb_drop:P", "cancel", "proc:kill9:D", "proc:sigstop:D"],
    "writing": ["kv_delay", "kv_fail", "kv_corrupt", "cancel", "proc:kill9:P",
                "proc:sigstop:P"],
    "decoding": ["engine_slow:D", "hb_drop:D", "rpc_delay:D:Generate", "reg_hb_drop",
                 "cancel", "proc:kill9:D", "proc:sigstop:D", "proc:sigstop:R"],
    "streaming": ["engine_slow:D", "reg_hb_stall", "cancel", "proc:kill9:R",
                  "proc:kill9:G", "proc:sigstop:R"],
}


@dataclass
class Row:
    faults: int = 0
    requests: int = 0
    ok: int = 0
    clear_error: int = 0
    cancelled: int = 0
    near_tie: int = 0  # ok, but through a near tie other than the reference's
    hung: int = 0
    wrong: int = 0
    unclear: int = 0
    leaked: int = 0
    crashed: int = 0
    notice: list = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)
    rejoin: list = field(default_factory=list)


class Mesh:
    """`pdmesh serve --chaos` and what this script knows about its processes."""

    def __init__(self, args) -> None:
        self.args = args
        env = dict(os.environ, PDMESH_CLUSTER_TOKEN=TOKEN, PDMESH_DEVICE=args.device,
                   PDMESH_DTYPE=args.dtype, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "pdmesh.cli", "serve", "--chaos",
               "--prefill", str(args.prefill), "--decode", str(args.decode),
               "--port", str(args.port), "--grpc-port", str(args.port + 1 if args.port else 0),
               "--heartbeat-interval", str(args.heartbeat_interval),
               "--heartbeat-max-failure", str(args.heartbeat_max_failure),
               f"--worker-arg=--kv-cache-bytes={args.kv_cache_bytes}"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: collections.deque = collections.deque(maxlen=4000)
        self.exits: list[tuple[float, str, str]] = []  # (time, child, code) serve reported
        self.ready = threading.Event()
        self.log = open(args.log, "w") if args.log else None
        threading.Thread(target=self._pump, daemon=True).start()
        if not self.ready.wait(600):
            raise SystemExit("pdmesh serve did not start:\n" + "\n".join(self.lines))
        line = next(x for x in self.lines if "pdmesh serve: ready" in x)
        self.registry = re.search(r"registry (\S+?),", line).group(1)
        gateway = re.search(r"gateway (\S+)", line).group(1).rstrip(",")
        self.base = f"http://{gateway}/v1"
        self.reg_stub = rgrpc.RegistryStub(channel(self.registry))
        self.workers: dict[str, list[str]] = {}  # role -> addresses
        self.pids: dict[str, int] = {}  # address -> pid
        self.dead_by_us: list[tuple[float, str]] = []  # (time, "registry"/"gateway"/addr)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if self.log:
                self.log.write(line)
            if "pdmesh serve: ready" in line:
                self.ready.set()
            m = re.search(r"pdmesh serve: (\S+) exited \((-?\d+)\)", line)
            if m:
                self.exits.append((time.monotonic(), m.group(1), m.group(2)))
        self.ready.set()

    # ---- membership ------------------------------------------------------------------
    def members(self) -> dict[str, list[str]]:
        resp = self.reg_stub.ListWorkers(rpb.ListWorkersRequest(), timeout=2)
        out: dict[str, list[str]] = {"PREFILL": [], "DECODE": []}
        for w in resp.workers:
            out.setdefault(rpb.WorkerRole.Name(w.role).removeprefix("WORKER_ROLE_"),
                           []).append(w.address)
        return out

    def whole(self) -> bool:
        try:
            m = self.members()
        except grpc.RpcError:
            return False
        return len(m["PREFILL"]) >= self.args.prefill and len(m["DECODE"]) >= self.args.decode

    def wait_whole(self, timeout: float = 120.0) -> float | None:
        """Seconds until 2P2D are registered, every one answers Chaos.State, and the
        gateway serves a request; None on timeout."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.whole():
                try:
                    self.refresh()
                    if one_request(self.base, PROMPTS[0], self.args.max_tokens, 30)[0] == "ok":
                        return time.monotonic() - t0
                except (grpc.RpcError, OSError):
                    pass
            time.sleep(0.2)
        return None

    def refresh(self) -> None:
        m = self.members()
        self.workers = {"P": sorted(m["PREFILL"]), "D": sorted(m["DECODE"]),
                        "R": [self.registry]}
        for addr in [*self.workers["P"], *self.workers["D"], self.registry]:
            self.pids[addr] = self.chaos(addr).State(cpb.ChaosStateRequest(), timeout=3).pid

    def chaos(self, addr: str):
        return cgrpc.ChaosStub(channel(addr))

    def gateway_pid(self) -> int | None:
        out = subprocess.run(["ps", "--ppid", str(self.proc.pid), "-o", "pid=,args="],
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            if " gateway " in line:
                return int(line.split()[0])
        return None

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


_channels: dict[str, grpc.Channel] = {}


def channel(addr: str) -> grpc.Channel:
    if addr not in _channels:
        _channels[addr] = auth.insecure_channel(addr, token=TOKEN, options=RECONNECT_OPTIONS)
    return _channels[addr]


class Watcher(threading.Thread):
    """Follows Registry.Watch; records when each address expired, and when the registry
    last heard from it (the event's last_heartbeat_at, moved to this clock)."""

    def __init__(self, registry: str) -> None:
        super().__init__(daemon=True)
        self.registry, self.expired = registry, collections.defaultdict(list)

    def run(self) -> None:
        while True:
            try:
                ch = auth.insecure_channel(self.registry, token=TOKEN)
                for ev in rgrpc.RegistryStub(ch).Watch(rpb.WatchRequest(), wait_for_ready=True):
                    if ev.type == rpb.WorkerEvent.EXPIRED:
                        now, wall = time.monotonic(), time.time()
                        seen = ev.worker.last_heartbeat_at  # registry's wall clock, this host
                        last = now - (wall - seen) if seen else None
                        self.expired[ev.worker.address].append((now, last))
            except grpc.RpcError:
                time.sleep(0.2)

    def noticed(self, addr: str, since: float, timeout: float) -> float | None:
        """Seconds from the peer's death to its EXPIRED event: from `since` (the fault),
        or from its last heartbeat if the registry got one after that (a beat in flight
        when the fault was armed: the peer was alive then)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for t, last in self.expired.get(addr, []):
                if t >= since:
                    return t - max(since, last or since)
            time.sleep(0.02)
        return None


class Oracle:
    """Teacher-forced check of a served greedy output that differs from the reference,
    on the runtime alone in this process: every served token must be the argmax of the
    runtime's logprobs given the prompt and the served tokens before it, or within `eps`
    nats of it (a near tie that batching's float32 sums may flip). A KV page that was
    corrupted or another request's gives tokens far from that."""

    def __init__(self, eps: float, dtype: str) -> None:
        from pdmesh import Engine
        from pdmesh.runtime.loader import load_model

        self.engine = Engine(loaded=load_model("default"), num_pages=64, dtype=dtype)
        self.eps = eps
        self.lock = threading.Lock()

    def check(self, prompt: str, text: str) -> tuple[bool, str]:
        from pdmesh import SamplingParams

        with self.lock:
            ref = self.engine.generate(messages=[{"role": "user", "content": prompt}],
                                       params=SamplingParams(max_tokens=1, temperature=0))[0]
            pids = list(ref.prompt_token_ids)
            ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
            ties = []
            for k, tid in enumerate(ids):
                out = self.engine.generate(prompt_token_ids=pids + ids[:k], params=SamplingParams(
                    max_tokens=1, temperature=0, logprobs=5))[0]
                top = out.logprobs[0].top_logprobs
                mine = dict(top).get(tid)
                if mine is None or top[0][1] - mine > self.eps:
                    return False, (f"token {k} ({tid}) is not greedy: "
                                   f"{'not in the top 5' if mine is None else f'{top[0][1] - mine:.3f} nats below the best'}")
                if top[0][0] != tid:
                    ties.append(f"token {k}: {top[0][1] - mine:.4f} nats")
            return True, "near ties: " + (", ".join(ties) or "none (the reference was one)")


# ---- one request ---------------------------------------------------------------------
def one_request(base: str, prompt: str, max_tokens: int, deadline: float,
                cancel: threading.Event | None = None, cancel_after_tokens: int = 0,
                gateway_down=lambda: False) -> tuple[str, str]:
    """(outcome, text): ok | error (clear) | cancelled | hung | unclear."""
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.monotonic()
    text, tokens, finished = "", 0, False
    try:
        with requests.post(f"{base}/chat/completions", json=body, stream=True,
                           timeout=(5, deadline)) as r:
            if r.status_code != 200:
                err = r.json().get("error", {})
                return (("error" if err.get("message") else "unclear"),
                        f"HTTP {r.status_code}: {err.get('message')}")
            for raw in r.iter_lines():
                if time.monotonic() - t0 > deadline:
                    return "hung", text
                if cancel is not None and cancel.is_set():
                    return "cancelled", text
                if not raw.startswith(b"data: "):
                    continue
                data = raw[6:]
                if data == b"[DONE]":
                    break
                ev = json.loads(data)
                if "error" in ev:
                    return (("error" if ev["error"].get("message") else "unclear"),
                            f"stream error after {tokens} events: {ev['error'].get('message')}")
                ch = ev["choices"][0] if ev.get("choices") else {}
                text += (ch.get("delta") or {}).get("content") or ""
                tokens += 1
                finished = finished or bool(ch.get("finish_reason"))
                if cancel_after_tokens and tokens >= cancel_after_tokens:
                    return "cancelled", text
    except requests.exceptions.ReadTimeout:
        return "hung", text
    except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError):
        # the gateway's socket went away: clear only when we killed or stopped it
        return ("error" if gateway_down() else "unclear"), "connection to the gateway lost"
    if time.monotonic() - t0 > deadline:
        return "hung", text
    return ("ok" if finished else "unclear"), text


# ---- the run -------------------------------------------------------------------------
class Run:
    def __init__(self, args) -> None:
        self.args, self.rng = args, random.Random(args.seed)
        self.rows: dict[tuple[str, str], Row] = collections.defaultdict(Row)
        self.reference: dict[str, str] = {}
        self.gateway_down_since: float | None = None
        self.leftover: dict[str, int] = {}  # address -> pages in use after the last check
        self.lease = args.heartbeat_interval * args.heartbeat_max_failure
        self.unexpected_exits: list[str] = []
        self.bugs: list[str] = []
        self.near_ties: list[str] = []
        self.oracle = Oracle(args.tie_eps, args.dtype)

    def problem(self, what: str) -> None:
        self.bugs.append(what)
        print("PROBLEM " + what, flush=True)

    def start(self) -> None:
        a = self.args
        t0 = time.monotonic()
        self.mesh = Mesh(a)
        print(f"serve ready in {time.monotonic() - t0:.0f} s", flush=True)
        if self.mesh.wait_whole() is None:
            raise SystemExit("mesh never became whole")
        self.watch = Watcher(self.mesh.registry)
        self.watch.start()
        # reference greedy run, fault-free: every prompt alone on every pair, then in
        # batches as the load sends them. A prompt whose greedy output changes with the
        # batch (a near tie that float32 sums in another order flip) cannot tell a bad
        # KV from a batch, so it is left out of the load (and said so)
        seen: dict[str, set] = collections.defaultdict(set)
        for p in PROMPTS:
            for _ in range(4):
                seen[p].add(one_request(self.mesh.base, p, a.max_tokens, 60))
        for _ in range(a.reference_rounds):
            batch = list(PROMPTS)
            self.rng.shuffle(batch)
            for k in range(0, len(batch), a.requests):
                group = batch[k:k + a.requests]
                outs = [None] * len(group)

                def one(j: int, p: str) -> None:
                    outs[j] = one_request(self.mesh.base, p, a.max_tokens, 60)
                ts = [threading.Thread(target=one, args=(j, p)) for j, p in enumerate(group)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                for p, o in zip(group, outs):
                    seen[p].add(o)
        self.prompts = [p for p in PROMPTS if len(seen[p]) == 1
                        and next(iter(seen[p]))[0] == "ok"]
        self.unstable = {p: sorted(t for _, t in seen[p]) for p in PROMPTS
                         if p not in self.prompts}
        for p in self.prompts:
            self.reference[p] = next(iter(seen[p]))[1]
        print(f"reference: {len(self.prompts)} of {len(PROMPTS)} prompts give one greedy "
              f"output alone and batched; left out: {self.unstable}", flush=True)
        if len(self.prompts) < 4:
            raise SystemExit("too few batch-stable prompts")

    def pick(self) -> tuple[str, str]:
        phases = [p for p in PHASES if _wanted(KINDS[p], self.args.kinds)]
        phase = self.rng.choice(phases)
        kinds = _wanted(KINDS[phase], self.args.kinds)
        proc = [k for k in kinds if k.startswith("proc:")]
        if not [k for k in kinds if not k.startswith("proc:")]:
            return phase, self.rng.choice(proc)  # --kinds left process faults only
        if proc and self.rng.random() < self.args.process_share:
            return phase, self.rng.choice(proc)
        return phase, self.rng.choice([k for k in kinds if not k.startswith("proc:")])

    # -- arming ----------------------------------------------------------------------
    def arm(self, kind: str, n: int) -> tuple[list[str], float]:
        """Arm a Chaos fault; returns (addresses it targets for notice-time, armed at)."""
        m, parts = self.mesh, kind.split(":")
        if not all(m.workers.get(r) for r in ("P", "D")):
            m.wait_whole()
        now = time.monotonic()
        F, C = cpb.ChaosFault, cpb
        if parts[0] in ("kv_delay", "kv_fail", "kv_corrupt"):
            action = {"kv_delay": C.KV_WRITE_ACTION_DELAY, "kv_fail": C.KV_WRITE_ACTION_FAIL,
                      "kv_corrupt": C.KV_WRITE_ACTION_CORRUPT}[parts[0]]
            for addr in m.workers["P"]:
                m.chaos(addr).Inject(F(kv_write=C.KvWriteFault(
                    action=action, count=n, delay_s=0.4)), timeout=3)
            return [], now
        if parts[0] in ("rpc_delay", "rpc_fail"):
            action = C.RPC_ACTION_DELAY if parts[0] == "rpc_delay" else C.RPC_ACTION_FAIL
            for addr in m.workers[parts[1]]:
                m.chaos(addr).Inject(F(rpc=C.RpcFault(method=parts[2], action=action, count=n,
                                                      delay_s=0.4)), timeout=3)
            return [], now
        if parts[0] == "engine_slow":
            for addr in m.workers[parts[1]]:
                m.chaos(addr).Inject(F(engine=C.EngineFault(step_sleep_s=0.05,
                                                            duration_s=1.0)), timeout=3)
            return [], now
        if parts[0] in ("hb_drop", "hb_stall"):
            addr = self.rng.choice(m.workers[parts[1]])
            action = C.HEARTBEAT_ACTION_DROP if parts[0] == "hb_drop" else \
                C.HEARTBEAT_ACTION_STALL
            m.chaos(addr).Inject(F(heartbeat=C.HeartbeatFault(
                action=action, duration_s=self.lease * 1.5)), timeout=3)
            return [addr], now
        if parts[0] in ("reg_hb_drop", "reg_hb_stall"):
            action = C.HEARTBEAT_ACTION_DROP if parts[0] == "reg_hb_drop" else \
                C.HEARTBEAT_ACTION_STALL
            m.chaos(m.registry).Inject(F(heartbeat=C.HeartbeatFault(
                action=action, duration_s=self.lease * 1.5)), timeout=3)
            return [*m.workers["P"], *m.workers["D"]], now
        return [], now

    def clear(self) -> None:
        m = self.mesh
        for addr in [*m.workers["P"], *m.workers["D"], m.registry]:
            try:
                m.chaos(addr).Clear(cpb.ChaosClearRequest(), timeout=3)
            except grpc.RpcError:
                pass

    def process_fault(self, kind: str) -> tuple[str, int | None, str]:
        """Do a process fault now: (what, pid, its address for notice-time)."""
        _, sig, who = kind.split(":")
        m = self.mesh
        if not all(m.workers.get(r) for r in ("P", "D")):
            m.wait_whole()
        if who == "G":
            pid, addr = m.gateway_pid(), ""
        elif who == "R":
            addr = m.registry
            pid = m.pids.get(addr)
        else:
            addr = self.rng.choice(m.workers[who])
            pid = m.pids.get(addr)
        if pid is None:
            return who, None, addr
        if who == "G":
            self.gateway_down_since = time.monotonic()
        os.kill(pid, signal.SIGKILL if sig == "kill9" else signal.SIGSTOP)
        m.dead_by_us.append((time.monotonic(), addr or "gateway"))
        return who, pid, addr

    # -- one fault ---------------------------------------------------------------------
    def cycle(self, i: int) -> None:
        a, m = self.args, self.mesh
        phase, kind = self.pick()
        row = self.rows[(kind, phase)]
        row.faults += 1
        n = a.requests
        proc = kind.startswith("proc:")
        notice_addrs, armed_at = ([], time.monotonic()) if proc else self.arm(kind, n)
        # the cancel and the process fault land while requests are in `phase`
        offset = {"queued": 0.02, "prefilling": 0.08, "waiting_transfer": 0.15,
                  "writing": 0.2, "decoding": 0.35, "streaming": 0.5}[phase]
        if kind == "cancel" and phase in ("queued", "prefilling", "waiting_transfer", "writing"):
            # hold the request in that phase so the cancel finds it there
            hold = {"queued": "rpc_delay:P:Prefill", "prefilling": "engine_slow:P",
                    "waiting_transfer": "rpc_delay:P:Transfer", "writing": "kv_delay"}[phase]
            self.arm(hold, n)
        if kind == "cancel" and phase == "decoding":
            self.arm("engine_slow:D", n)
        cancels = [threading.Event() for _ in range(n)]
        results: list = [None] * n
        prompts = [self.rng.choice(self.prompts) for _ in range(n)]

        def client(j: int) -> None:
            after = 2 if (kind == "cancel" and phase in ("decoding", "streaming") and j == 0) else 0
            results[j] = one_request(m.base, prompts[j], a.max_tokens, a.deadline,
                                     cancels[j], after,
                                     gateway_down=lambda: self.gateway_down_since is not None)
        threads = [threading.Thread(target=client, args=(j,), daemon=True) for j in range(n)]
        for t in threads:
            t.start()
        stopped = None
        if kind == "cancel" and phase not in ("decoding", "streaming"):
            time.sleep(offset)
            cancels[0].set()
        if proc:
            time.sleep(offset)
            who, pid, addr = self.process_fault(kind)
            t_fault = time.monotonic()
            if pid is not None and "sigstop" in kind:
                stopped = (pid, addr)
                t_stop = time.monotonic()
                time.sleep(self.lease * 1.6)
                os.kill(pid, signal.SIGCONT)
                if who == "R":
                    pass  # the registry extends leases on its return
            elif pid is not None and addr:
                notice_addrs, armed_at = [addr], time.monotonic()
            if stopped and who in ("P", "D"):
                notice_addrs, armed_at = [addr], t_stop
        for t in threads:
            t.join(a.deadline + 30)
        for j, res in enumerate(results):
            row.requests += 1
            outcome, text = res if res else ("hung", "")
            if outcome == "ok":
                if text == self.reference[prompts[j]]:
                    row.ok += 1
                    continue
                greedy, why = self.oracle.check(prompts[j], text)
                if greedy:  # another greedy path through a near tie (batching numerics)
                    row.ok += 1
                    row.near_tie += 1
                    self.near_ties.append(f"{prompts[j]!r} -> {text!r}: {why}")
                else:
                    row.wrong += 1
                    self.problem(f"fault {i} {kind}/{phase}: wrong output {text!r} for "
                                 f"{prompts[j]!r} (reference {self.reference[prompts[j]]!r}): "
                                 f"{why}")
            elif outcome == "error":
                row.clear_error += 1
                row.errors[re.sub(r"\d+\.\d+\.\d+\.\d+:\d+|\d+", "N", text)[:90]] += 1
            elif outcome == "cancelled":
                row.cancelled += 1
            elif outcome == "hung":
                row.hung += 1
                self.problem(f"fault {i} {kind}/{phase}: request hung")
            else:
                row.unclear += 1
                self.problem(f"fault {i} {kind}/{phase}: unclear end {res!r}")
        # time to notice a dead peer: the registry's EXPIRED for the address
        for addr in notice_addrs:
            if kind.startswith("proc:") and "kill9" in kind and addr == m.registry:
                continue
            if "stall" in kind and kind.startswith("reg_"):
                continue
            t = self.watch.noticed(addr, armed_at, self.lease * 3)
            if t is not None:
                row.notice.append(t)
        if not proc:
            self.clear()
        else:
            if "kill9" in kind or kind.endswith(":R") or "sigstop" in kind:
                took = m.wait_whole()
                if took is None:
                    self.problem(f"fault {i} {kind}: mesh not whole after 120 s")
                else:
                    row.rejoin.append(time.monotonic() - t_fault)
            self.gateway_down_since = None
        if kind.startswith(("hb_", "reg_hb")) or proc:
            # until the heartbeat fault is over and everyone is registered again
            time.sleep(max(0.0, armed_at + self.lease * 1.5 + 0.1 - time.monotonic()))
            if m.wait_whole() is None:
                self.problem(f"fault {i} {kind}: workers did not re-register")
        self.check_crashes(row)
        row.leaked += self.check_pages(i, kind, phase)

    def check_crashes(self, row: Row) -> None:
        m = self.mesh
        while m.exits:
            t, name, code = m.exits.pop(0)
            if code != "-9":  # every exit we cause is a SIGKILL
                row.crashed += 1
                self.unexpected_exits.append(f"{name} exited {code}")

    def check_pages(self, i: int, kind: str, phase: str) -> int:
        """Pages in use on live workers once idle; new leftovers count as leaked."""
        m = self.mesh
        try:
            m.refresh()
        except grpc.RpcError:
            time.sleep(1)
            m.refresh()
        leaked = 0
        deadline = time.monotonic() + self.args.idle_wait
        pending = {a: r for r in ("P", "D") for a in m.workers[r]}
        used: dict[str, int] = {}
        while pending and time.monotonic() < deadline:
            for addr, role in list(pending.items()):
                try:
                    if role == "P":
                        s = pgrpc.PrefillStub(channel(addr)).Stats(ppb.PrefillStatsRequest(),
                                                                   timeout=3)
                        used[addr] = s.total_pages - s.free_pages
                    else:
                        s = dgrpc.DecodeStub(channel(addr)).Stats(dpb.StatsRequest(), timeout=3)
                        used[addr] = s.total_pages - s.free_pages
                except grpc.RpcError:
                    continue
                if used[addr] == 0:
                    del pending[addr]
            time.sleep(0.1)
        for addr in pending:
            new = used.get(addr, 0) - self.leftover.get(addr, 0)
            if new > 0:
                leaked += new
                self.problem(f"fault {i} {kind}/{phase}: {used[addr]} pages still in use "
                             f"on {addr} {self.args.idle_wait:g} s after idle")
        self.leftover = {a: used.get(a, 0) for a in pending}
        return leaked

    def table(self) -> str:
        head = ("| fault | phase | faults | requests | ok (correct tokens) | clear error | "
                "cancelled by client | hung | unclear end | wrong output | leaked pages | "
                "crashed | notice p50 / p99 s | rejoin p50 s |")
        lines = [head, "|" + "---|" * 14]
        total = Row()
        for (kind, phase), r in sorted(self.rows.items()):
            lines.append(_line(kind, phase, r))
            for f in ("faults", "requests", "ok", "clear_error", "cancelled", "hung", "unclear",
                      "wrong", "leaked", "crashed", "near_tie"):
                setattr(total, f, getattr(total, f) + getattr(r, f))
            total.notice += r.notice
            total.rejoin += r.rejoin
        lines.append(_line("**all**", "", total))
        errs = collections.Counter()
        for r in self.rows.values():
            errs.update(r.errors)
        lines += ["", "Clear errors seen (numbers and addresses as N):", ""]
        lines += [f"- {n} x {msg}" for msg, n in errs.most_common(25)]
        if self.near_ties:
            lines += ["", f"Served outputs other than the reference that the runtime alone "
                      f"confirms greedy, token by token within {self.args.tie_eps:g} nats "
                      f"(near ties batching flips; counted as correct): {len(self.near_ties)}",
                      ""]
            lines += [f"- {x}" for x in collections.Counter(self.near_ties)]
        return "\n".join(lines)

    def run(self) -> None:
        t0 = time.monotonic()
        i = 0
        for i in range(1, self.args.faults + 1):
            if self.mesh.proc.poll() is not None:
                self.problem("pdmesh serve itself exited")
                break
            if self.args.max_minutes and time.monotonic() - t0 > self.args.max_minutes * 60:
                print(f"stopping at the time limit after {i - 1} faults", flush=True)
                i -= 1
                break
            try:
                self.cycle(i)
            except Exception as e:  # noqa: BLE001 - the run goes on; the report says so
                self.problem(f"fault {i}: the benchmark itself failed: {e!r}")
                self.mesh.wait_whole()
            self.seconds = time.monotonic() - t0
            if i % 25 == 0:
                s = sum(r.faults for r in self.rows.values())
                print(f"[{time.monotonic() - t0:6.0f} s] {s} faults, "
                      f"{len(self.bugs)} problems", flush=True)
        self.faults_done = sum(r.faults for r in self.rows.values())
        self.seconds = time.monotonic() - t0


def _q(xs: list[float], q: float) -> str:
    if not xs:
        return "-"
    xs = sorted(xs)
    return f"{xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]:.2f}"


def _line(kind: str, phase: str, r: Row) -> str:
    notice = f"{_q(r.notice, 0.5)} / {_q(r.notice, 0.99)}" if r.notice else "-"
    ok = f"{r.ok} ({r.near_tie} near tie)" if r.near_tie else f"{r.ok}"
    return (f"| {kind} | {phase} | {r.faults} | {r.requests} | {ok} | {r.clear_error} | "
            f"{r.cancelled} | {r.hung} | {r.unclear} | {r.wrong} | {r.leaked} | {r.crashed} | "
            f"{notice} | {_q(r.rejoin, 0.5)} |")


def _wanted(kinds: list[str], words: str) -> list[str]:
    """The kinds that contain one of the comma-separated `words` (all when empty)."""
    want = [w for w in words.split(",") if w]
    return [k for k in kinds if not want or any(w in k for w in want)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=int, default=1000)
    p.add_argument("--max-minutes", type=float, default=0,
                   help="stop injecting after this long (0 = no limit)")
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32",
                   help="the workers' and the oracle's dtype: float32 (default) so that "
                        "batching changes no greedy token; 'auto' is bf16 on CPUs with "
                        "AVX512-BF16, where batch composition flips near ties")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="requests per fault (the load)")
    p.add_argument("--deadline", type=float, default=60.0, help="per request, seconds")
    p.add_argument("--process-share", type=float, default=0.08,
                   help="share of faults that are process faults (kill -9, SIGSTOP)")
    p.add_argument("--kinds", default="",
                   help="only fault kinds containing one of these comma-separated words, "
                        "e.g. 'hb_,sigstop' (default: every kind)")
    p.add_argument("--heartbeat-interval", type=float, default=0.5)
    p.add_argument("--heartbeat-max-failure", type=int, default=2)
    p.add_argument("--kv-cache-bytes", type=int, default=64 << 20)
    p.add_argument("--tie-eps", type=float, default=0.02,
                   help="nats: a served token this close to the runtime's argmax is greedy")
    p.add_argument("--reference-rounds", type=int, default=3,
                   help="fault-free batched rounds of every prompt for the reference")
    p.add_argument("--idle-wait", type=float, default=10.0,
                   help="seconds an idle worker gets to free its pages")
    p.add_argument("--port", type=int, default=18700,
                   help="gateway REST port, gRPC the next one (0: free ports)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="write serve's output here")
    p.add_argument("--out", default=None, help="write the markdown report here")
    return p


def execute(args: argparse.Namespace) -> Run:
    """The whole run: start the mesh, inject, print (and write) the report, stop."""
    auth.configure(TOKEN)
    run = Run(args)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    run.start()
    try:
        run.run()
    finally:
        table = run.table()
        lease = run.lease
        summary = [f"prompts: {len(getattr(run, 'prompts', []))} batch-stable of {len(PROMPTS)}"
                   f"; left out (outputs seen fault-free): {getattr(run, 'unstable', {})}",
                   f"faults injected: {sum(r.faults for r in run.rows.values())}"
                   f" in {getattr(run, 'seconds', 0):.0f} s; lease {lease:g} s "
                   f"({args.heartbeat_interval:g} s x {args.heartbeat_max_failure}); notice = "
                   f"the EXPIRED event's time less the later of the fault and the peer's last "
                   f"heartbeat at the registry",
                   f"problems: {len(run.bugs)}; unexpected exits: {run.unexpected_exits or 'none'}"]
        print(table)
        print("\n".join(summary))
        for b in run.bugs[:50]:
            print("  " + b)
        if args.out:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip()
            Path(args.out).write_text(
                f"# Chaos run, {started}\n\ncommit {commit}; command: `{' '.join(sys.argv)}`"
                f"\n\n" + "\n".join(summary) + "\n\n" + table + "\n\n"
                + ("Problems:\n\n" + "\n".join(f"- {b}" for b in run.bugs) + "\n"
                   if run.bugs else "No problems.\n"))
        run.mesh.stop()
    return run


def failures(run: Run) -> int:
    """Requests that hung, were wrong or ended unclearly, leaked pages, crashes."""
    return sum(r.hung + r.wrong + r.leaked + r.crashed + r.unclear for r in run.rows.values())


def main() -> int:
    run = execute(build_parser().parse_args())
    return 1 if failures(run) or run.bugs else 0


if __name__ == "__main__":
    sys.exit(main())
