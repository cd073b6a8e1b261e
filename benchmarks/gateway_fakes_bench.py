"""Fake workers for benchmarks/gateway_ceiling.py: as fast as the process can stream.

    python benchmarks/gateway_fakes_bench.py grpc --registry HOST:PORT --ids 1,2,3 --log F
    python benchmarks/gateway_fakes_bench.py openai --port 0 --words " a, b" --log F

grpc:   one process serving pdmesh.v1.Decode (Generate streams max_tokens tokens, one
        token a message) and pdmesh.v1.Prefill (returns at once), both registered with
        the registry (a decode and a prefill worker), on grpc.aio.
openai: a tiny aiohttp OpenAI server (the worker behind SMG): POST /v1/chat/completions
        streams max_tokens chat.completion.chunk events, one token each.

Both pace tokens by the request's `seed` (microseconds between tokens; 0 = as fast as
the process can) on an absolute schedule, so a late token does not push the later
ones back. Each finished stream appends one JSON line [id, send times...] (monotonic
clock, shared by every process of the machine) to --log (flushed every 0.2 s), so the
benchmark can tell how long each token took from the fake's send to the client's
receive. Several fakes can run side by side (gateway_ceiling.py --fakes M), each with
its own log: the grpc fake's ids come from the gateway's random room ids, the openai
fake's carry its process id, so ids are unique across fakes. Prints
`fake listening on HOST:PORT` when ready.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import time


def pace(seed: int) -> float:
    return seed / 1e6


async def paced(n: int, interval: float):
    """Yields i = 0..n-1 at t0 + i * interval (yielding to the loop between tokens)."""
    t0 = time.monotonic()
    for i in range(n):
        if interval:
            delay = t0 + i * interval - time.monotonic()
            await asyncio.sleep(max(0.0, delay))
        yield i


class SendLog:
    """Per-stream send times, one JSON line per finished stream."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "a", buffering=1 << 16)

    def write(self, rid: str, times: list[float]) -> None:
        self.f.write(json.dumps([rid, times]) + "\n")

    async def flusher(self, every: float = 0.2) -> None:
        """Flush now and then, so the benchmark reads every finished stream soon after."""
        while True:
            await asyncio.sleep(every)
            self.f.flush()


async def run_grpc(args) -> None:
    import grpc

    from pdmesh.v1 import common_pb2 as cpb
    from pdmesh.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
    from pdmesh.v1 import registry_pb2 as rpb

    ids, log = [int(x) for x in args.ids.split(",")], SendLog(args.log)
    _TASKS.append(asyncio.ensure_future(log.flusher()))

    class Decode(decode_pb2_grpc.DecodeServicer):
        async def Generate(self, request, context):
            sp, times = request.sampling_params, []
            n = sp.max_tokens
            async for i in paced(n, pace(sp.seed)):
                chunk = decode_pb2.DecodeChunk(token_ids=[ids[i % len(ids)]])
                if i == n - 1:
                    chunk.finish_reason = cpb.FINISH_REASON_LENGTH
                    p = len(request.token_ids)
                    chunk.usage.CopyFrom(cpb.Usage(prompt_tokens=p, completion_tokens=n,
                                                   total_tokens=p + n))
                times.append(time.monotonic())
                yield chunk
            log.write(f"chatcmpl-{request.room:x}", times)

    class Prefill(prefill_pb2_grpc.PrefillServicer):
        async def Prefill(self, request, context):
            return prefill_pb2.PrefillResponse(room=request.room)

    # one server a role: the registry takes a second worker at one address for a restart
    servers = []
    for role, add, svc in ((rpb.WORKER_ROLE_PREFILL, prefill_pb2_grpc.add_PrefillServicer_to_server,
                            Prefill()),
                           (rpb.WORKER_ROLE_DECODE, decode_pb2_grpc.add_DecodeServicer_to_server,
                            Decode())):
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        add(svc, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        await register(args.registry, rpb.RegisterRequest(
            role=role, address=f"127.0.0.1:{port}", model_id="default"))
    print(f"fake listening on 127.0.0.1:{port}", flush=True)
    await servers[-1].wait_for_termination()


async def register(registry: str, reg) -> None:
    """Register, then heartbeat from this loop (a sync RegistryClient thread beside
    grpc.aio in one process misses its beats)."""
    import grpc

    from pdmesh.v1 import registry_pb2 as rpb
    from pdmesh.v1 import registry_pb2_grpc

    from pdmesh import auth

    stub = registry_pb2_grpc.RegistryStub(auth.aio_insecure_channel(registry))
    resp = await stub.Register(reg)

    async def beat(wid, interval):
        while True:
            await asyncio.sleep(interval)
            try:
                await stub.Heartbeat(rpb.HeartbeatRequest(worker_id=wid))
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                wid = (await stub.Register(reg)).worker_id
    _TASKS.append(asyncio.ensure_future(beat(resp.worker_id, resp.heartbeat_interval_s)))


_TASKS: list = []


def chunk_bytes(rid: str, created: int, text: str, first: bool, finish: str | None) -> bytes:
    delta = {"role": "assistant", "content": text} if first else {"content": text}
    obj = {"id": rid, "object": "chat.completion.chunk", "created": created,
           "model": "default", "choices": [{"index": 0, "delta": delta,
                                            "finish_reason": finish}]}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def run_openai(args) -> None:
    from aiohttp import web

    words, log = args.words.split(","), SendLog(args.log)
    _TASKS.append(asyncio.ensure_future(log.flusher()))
    counter, prefix = iter(range(1 << 62)), f"chatcmpl-{os.getpid():x}-"  # unique per fake

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n, interval = int(body.get("max_tokens", 16)), pace(int(body.get("seed", 0)))
        rid, created, times = f"{prefix}{next(counter):x}", int(time.time()), []
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        async for i in paced(n, interval):
            times.append(time.monotonic())
            await resp.write(chunk_bytes(rid, created, words[i % len(words)], i == 0,
                                         "length" if i == n - 1 else None))
        await resp.write(b"data: [DONE]\n\n")
        log.write(rid, times)
        return resp

    models = {"object": "list", "data": [{"id": "default", "object": "model",
                                          "created": 0, "owned_by": "fake"}]}
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", lambda _: web.json_response(models))
    for path in ("/health", "/health_generate"):
        app.router.add_get(path, lambda _: web.Response(text="ok"))
    for path in ("/get_model_info", "/model_info"):
        app.router.add_get(path, lambda _: web.json_response({"model_path": "default"}))
    app.router.add_get("/get_server_info", lambda _: web.json_response({}))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"fake listening on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=["grpc", "openai"])
    ap.add_argument("--registry", default="127.0.0.1:50050")
    ap.add_argument("--ids", default="1", help="token ids to stream, cycled (grpc)")
    ap.add_argument("--words", default=" x", help="token texts to stream, cycled (openai)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--log", required=True, help="append per-stream send times here")
    args = ap.parse_args()
    gc.disable()  # a collection pause here would read as the gateway's latency
    asyncio.run(run_grpc(args) if args.kind == "grpc" else run_openai(args))


if __name__ == "__main__":
    main()
