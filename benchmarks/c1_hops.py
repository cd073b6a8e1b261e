"""Where a single request's TTFT goes, layer by layer: one request at a time, each through
a different entry of the same running mesh, in rotating order, beside the engine alone in
this process. The differences between neighbouring rows are the cost of each layer.

  engine        Engine.add_request(token ids) -> the step that returns token 1, timed in
                a process of its own (no RPC; as serve_gpu.py's engine alone)
  worker        gRPC pdmesh.v1.Decode/Generate straight to the first colocated or decode
                worker (token ids; a decode worker then prefills locally)
  gateway-ids   gRPC pdmesh.v1.Gateway/Generate with token ids (no tokenizing)
  gateway-text  the same with the text (the gateway tokenizes)
  rest          POST /v1/completions, stream=true, timed as bench_serving does

Every request has a prompt of its own (a unique head), so no prefix cache helps any row.

    python benchmarks/c1_hops.py --serve-arg=--colocated=1 --serve-arg=--prefill=0 \\
        --serve-arg=--decode=0 --rounds 40 --input-len 280
    PDMESH_DEVICE=cuda python3 benchmarks/c1_hops.py ...     # on a GPU
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKEN = "c1-hops"
PATHS = ("engine", "worker", "gateway-ids", "gateway-text", "rest")


def start_mesh(serve_args: list[str]) -> tuple[subprocess.Popen, dict[str, str]]:
    """`pdmesh serve` with free ports (multi_turn.start_serve, with this run's cluster
    token); returns it and its addresses once it is ready."""
    from multi_turn import start_serve

    os.environ["PDMESH_CLUSTER_TOKEN"] = TOKEN  # the worker entry needs it
    proc, base, lines = start_serve(serve_args)
    text = "".join(lines)
    return proc, {"rest": base,
                  "grpc": re.search(r"\(REST\) and (\S+) \(gRPC\)", text).group(1),
                  "worker": re.search(r"ready — .*?(?:colocated|decode)-\d+ ([\d.:]+)",
                                      text).group(1)}


class Engine:
    """The runtime alone, in a process of its own (as a worker's engine is): this one
    sends it token ids over a pipe, it times add_request -> the step with token 1."""

    def __init__(self, model: str) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--engine-worker", model],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=ROOT)
        assert self.proc.stdout.readline().strip() == "ready", "the engine did not start"

    def ttft(self, ids: list[int], out: int) -> float:
        self.proc.stdin.write(json.dumps([ids, out]) + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def engine_worker(model: str) -> int:
    """The engine process's loop: one request per stdin line, its TTFT (s) per line out."""
    from pdmesh.aio import freeze_startup_objects
    from pdmesh.runtime.engine import Engine as RuntimeEngine
    from pdmesh.runtime.sampling_params import SamplingParams

    dev = os.environ.get("PDMESH_DEVICE")  # as the workers read it
    engine = RuntimeEngine(model=model, **({"device": dev} if dev else {}))
    freeze_startup_objects()  # as every served process does once it is ready
    print("ready", flush=True)
    for line in sys.stdin:
        ids, out = json.loads(line)
        t = time.perf_counter()
        rid = engine.add_request(prompt_token_ids=ids, params=SamplingParams(
            max_tokens=out, temperature=0, ignore_eos=True))
        first = None
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id == rid and o.new_token_ids and first is None:
                    first = time.perf_counter() - t
        print(first, flush=True)
    return 0


class Mesh:
    """The mesh's entries: the worker's and the gateway's gRPC, the gateway's REST."""

    def __init__(self, addr: dict[str, str], model: str) -> None:
        import aiohttp
        import grpc

        from pdmesh.v1 import decode_pb2_grpc, gateway_pb2_grpc

        self.model = model
        self.worker = decode_pb2_grpc.DecodeStub(grpc.aio.insecure_channel(addr["worker"]))
        self.gateway = gateway_pb2_grpc.GatewayStub(grpc.aio.insecure_channel(addr["grpc"]))
        self.session = aiohttp.ClientSession()
        self.rest = addr["rest"]

    async def ttft(self, path: str, text: str, ids: list[int], out: int) -> float:
        from pdmesh.auth import METADATA_KEY
        from pdmesh.v1 import common_pb2, decode_pb2, gateway_pb2

        sp = common_pb2.SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)
        t = time.perf_counter()
        if path == "worker":
            call = self.worker.Generate(decode_pb2.DecodeRequest(
                room=random.getrandbits(63), token_ids=ids, sampling_params=sp),
                metadata=[(METADATA_KEY, TOKEN)])
        elif path == "rest":
            return await self._rest(text, out, t)
        else:
            req = gateway_pb2.GenerateRequest(model=self.model, sampling_params=sp)
            req.token_ids.extend(ids) if path == "gateway-ids" else setattr(req, "text", text)
            call = self.gateway.Generate(req)
        first = None
        async for msg in call:
            if first is None and msg.token_ids:
                first = time.perf_counter() - t
        return first

    async def _rest(self, text: str, out: int, t: float) -> float:
        body = {"model": self.model, "prompt": text, "max_tokens": out, "temperature": 0,
                "ignore_eos": True, "stream": True}
        first = None
        async with self.session.post(self.rest + "/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            async for raw in resp.content:
                line = raw.strip()
                if first is None and line.startswith(b"data: {") and b'"text":""' not in line:
                    first = time.perf_counter() - t
        return first


def prompts(n: int, length: int, seed: int) -> list[tuple[str, list[int]]]:
    """n distinct texts of about `length` tokens, with their token ids."""
    from pdmesh.bench.workload import Workload, WorkloadSpec

    w = Workload.load(WorkloadSpec((length, length), (1, 1), seed=seed))
    tok = w.tokenizer
    out = []
    for i, r in enumerate(w.sample(n)):
        text = f"{i} {r.prompt}"
        out.append((text, tok.encode(text, add_special_tokens=False)))
    return out


def table(res: dict[str, list[float]]) -> str:
    rows = ["| path | n | min ms | median ms | mean ms | p90 ms | median over the row above |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    prev = None
    for path, xs in res.items():
        if not xs:
            continue
        xs = sorted(1e3 * x for x in xs)
        med = statistics.median(xs)
        diff = f"{med - prev:+.1f}" if prev is not None else ""
        rows.append(f"| {path} | {len(xs)} | {xs[0]:.1f} | {med:.1f} | {statistics.fmean(xs):.1f} | "
                    f"{xs[int(0.9 * (len(xs) - 1))]:.1f} | {diff} |")
        prev = med
    return "\n".join(rows)


async def run(args) -> dict[str, list[float]]:
    paths = [p for p in PATHS if p in args.paths]
    proc, addr = start_mesh(args.serve_arg)
    try:
        engine = Engine(args.model) if "engine" in paths else None
        mesh = Mesh(addr, "")  # the served model (its name is optional)
        todo = prompts((args.rounds + args.warmup) * len(paths), args.input_len, args.seed)
        res: dict[str, list[float]] = {p: [] for p in paths}
        for r in range(args.warmup + args.rounds):
            order = paths[r % len(paths):] + paths[:r % len(paths)]  # rotate: no fixed slot
            for path in order:
                text, ids = todo.pop()
                t = engine.ttft(ids, args.output_len) if path == "engine" else \
                    await mesh.ttft(path, text, ids, args.output_len)
                if r >= args.warmup:
                    res[path].append(t)
        await mesh.session.close()
        if engine is not None:
            engine.close()
        return res
    finally:
        proc.send_signal(signal.SIGINT)  # serve stops every service it started
        proc.wait(60)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="a flag for pdmesh serve (repeat), e.g. --serve-arg=--colocated=1")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--rounds", type=int, default=40, help="measured requests per path")
    ap.add_argument("--warmup", type=int, default=4, help="unmeasured rounds first")
    ap.add_argument("--input-len", type=int, default=280)
    ap.add_argument("--output-len", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--engine-worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine_worker:
        return engine_worker(args.engine_worker)
    t = time.perf_counter()
    res = asyncio.run(run(args))
    print(f"c=1 TTFT by entry ({args.rounds} rounds, ~{args.input_len}-token prompts, "
          f"serve {' '.join(args.serve_arg) or '(defaults)'}; {time.perf_counter() - t:.0f} s)")
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
