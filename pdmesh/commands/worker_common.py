"""Flags and process lifecycle shared by `pdmesh prefill` and `pdmesh decode`.

Lifecycle: load the engine, start the gRPC server, register with the registry, print
`<role> listening on HOST:PORT`; on SIGTERM/SIGINT: report NOT_SERVING, stop accepting
and drain in-flight RPCs (bounded), then deregister and release the transfer engine.
Deregistering after the drain means a LEFT event tells peers that no write is in flight.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from pdmesh.aio import freeze_startup_objects
from pdmesh.commands import auth_flags, telemetry_flags
from pdmesh.config import (EngineConfig, WorkerConfig, engine_config_from_env,
                           worker_config_from_env)


def add_arguments(p: argparse.ArgumentParser, role: str) -> None:
    """The flags every worker takes; `role` picks the timeout flag it documents."""
    p.add_argument("--registry", default=None,
                   help="registry address HOST:PORT (default 127.0.0.1:50050, env PDMESH_REGISTRY)")
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a Hugging Face folder or a .gguf file")
    p.add_argument("--model-id", default=None,
                   help="model id published in the registry (default: --model); prefill and "
                        "decode workers must agree")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="gRPC port (default 0 = a free port, printed)")
    p.add_argument("--hostname", default=None,
                   help="address peers reach this worker at, for gRPC and KV transfer "
                        "(default --host; env PDMESH_HOSTNAME)")
    p.add_argument("--page-size", type=int, default=None, help="tokens per KV page (default 16)")
    p.add_argument("--kv-cache-bytes", type=int, default=None,
                   help="KV pool size in bytes, all layers (default 1 GiB)")
    p.add_argument("--max-running-requests", type=int, default=None,
                   help="requests prefilling or decoding at once (default 64)")
    p.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV of prompt prefixes seen before (full pages, LRU "
                        "eviction; default on; env PDMESH_PREFIX_CACHE)")
    p.add_argument("--decode-prefix-cache", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="decode: keep finished PD requests' KV in the prefix cache and ask "
                        "the prefill for only the pages after a cached prefix (needs "
                        "--prefix-cache; default on; env PDMESH_DECODE_PREFIX_CACHE)")
    p.add_argument("--transfer-protocol", choices=("tcp", "rdma"), default=None,
                   help="Mooncake transport for KV pages (default tcp; env PDMESH_TRANSFER_PROTOCOL)")
    p.add_argument("--kv-transfer-mode", choices=("auto", "direct", "staged"), default=None,
                   help="KV pool on a GPU: direct (register device memory; needs Mooncake's "
                        "CUDA build), staged (through pinned host memory) or auto (default; "
                        "env PDMESH_KV_TRANSFER_MODE)")
    p.add_argument("--kv-path", choices=("auto", "mooncake", "shm", "ipc"), default=None,
                   help="prefill: how KV reaches a decode on the same host: auto (default; "
                        "the fastest that works, measured when the pair first meets), shm "
                        "(shared memory, host pools), ipc (CUDA IPC, GPU pools) or mooncake "
                        "(the transfer engine only); env PDMESH_KV_PATH")
    p.add_argument("--kv-checksum", choices=("on", "decode", "off"), default=None,
                   help="KV integrity (default decode; env PDMESH_KV_CHECKSUM): on = the "
                        "prefill reads each room's pages back from the decode after the "
                        "write and rewrites once on a mismatch, and the decode verifies "
                        "them before use; decode = only the decode's check (cheaper; a "
                        "mismatch fails the request); a room that stays corrupted fails "
                        "with DATA_LOSS")
    p.add_argument("--transfer-device", default=None,
                   help="RDMA devices, comma-separated, e.g. mlx5_0,mlx5_1 (default: auto; "
                        "env PDMESH_TRANSFER_DEVICE)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU: torch threads for decode steps (default OMP_NUM_THREADS or "
                        "all cores; `pdmesh serve` gives each worker its share less one "
                        "core for the gateway; env PDMESH_NUM_THREADS)")
    p.add_argument("--prefill-threads", type=int, default=None, metavar="N",
                   help="CPU: torch threads for prefill steps (default --threads; `pdmesh "
                        "serve` gives each worker its share of the cores; env "
                        "PDMESH_PREFILL_THREADS)")
    p.add_argument("--shutdown-grace", type=float, default=None,
                   help="seconds in-flight requests get on SIGTERM (default 10)")
    p.add_argument("--registry-wait", type=float, default=None,
                   help="seconds the registry may not answer at start (starting, or a loaded "
                        "host) before this worker exits 1 (default 30; env PDMESH_REGISTRY_WAIT)")
    if role == "prefill":
        p.add_argument("--bootstrap-timeout", type=float, default=None,
                       help="seconds a room's KV waits for the decode worker's Transfer before "
                            "it is freed (default 300; env PDMESH_BOOTSTRAP_TIMEOUT)")
    else:
        p.add_argument("--waiting-timeout", type=float, default=None,
                       help="deadline in seconds on the prefill's Transfer (default 300; env "
                            "PDMESH_WAITING_TIMEOUT)")
        p.add_argument("--role", choices=("decode", "colocated"), default="decode",
                       help="decode (KV from prefill workers) or colocated (prefill and decode "
                            "in this engine, no transfer)")
    p.add_argument("--stream-interval", type=int, default=None,
                   help="decode: tokens per stream message after the first (default 1; env "
                        "PDMESH_STREAM_INTERVAL): larger values cost less CPU per token on "
                        "the worker and the gateway at high concurrency (a prefill ignores it)")
    p.add_argument("--shed-queued", type=int, default=None, metavar="N",
                   help="refuse new requests (gRPC RESOURCE_EXHAUSTED; the gateway retries "
                        "another worker, then answers 429) while N already wait here for a "
                        "batch slot or KV pages (default 0 = never; env PDMESH_SHED_QUEUED)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the engine core (engine loop, KV pool, KV transport) in a "
                        "child process, apart from the RPC event loop's GIL (default: on "
                        "when the engine runs on a GPU, off on CPU; env PDMESH_ENGINE_PROCESS)")
    p.add_argument("--tp", type=int, default=None, metavar="N",
                   help="tensor-parallel ranks (processes; gloo on CPU, NCCL on GPUs) that "
                        "shard this worker's model (default 1)")
    p.add_argument("--chaos", action="store_true", default=None,
                   help="serve pdmesh.v1.Chaos: faults armed by RPC (delay/fail/corrupt KV "
                        "writes, stall/drop heartbeats, delay/fail RPCs, slow the engine); "
                        "tests and benchmarks/chaos.py only (env PDMESH_CHAOS=1)")
    auth_flags.add_arguments(p)
    telemetry_flags.add_arguments(p, metrics_port=True, summaries=True)


def configs_from_args(args: argparse.Namespace, role: str) -> tuple[WorkerConfig, EngineConfig]:
    """Defaults, then PDMESH_* env, then flags (flags win)."""
    flags = {"registry": args.registry, "model_id": args.model_id or args.model,
             "host": args.host, "port": args.port, "hostname": args.hostname,
             "transfer_protocol": args.transfer_protocol,
             "transfer_device": args.transfer_device,
             "kv_transfer_mode": args.kv_transfer_mode, "kv_path": args.kv_path,
             "kv_checksum": args.kv_checksum,
             "shutdown_grace_s": args.shutdown_grace,
             "registry_wait_s": args.registry_wait,
             "bootstrap_timeout": getattr(args, "bootstrap_timeout", None),
             "waiting_timeout": getattr(args, "waiting_timeout", None),
             "role": getattr(args, "role", None) or role,
             "stream_interval": getattr(args, "stream_interval", None),
             "chaos": getattr(args, "chaos", None),
             "shed_queued": getattr(args, "shed_queued", None),
             "engine_process": getattr(args, "engine_process", None),
             "tp": getattr(args, "tp", None)}
    worker = worker_config_from_env(WorkerConfig()).replace(
        **{k: v for k, v in flags.items() if v is not None})
    engine_flags = {"model": args.model, "page_size": args.page_size,
                    "kv_cache_bytes": args.kv_cache_bytes,
                    "max_running_requests": args.max_running_requests,
                    "prefix_cache": args.prefix_cache,
                    "decode_prefix_cache": getattr(args, "decode_prefix_cache", None),
                    "num_threads": getattr(args, "threads", None),
                    "prefill_threads": getattr(args, "prefill_threads", None)}
    engine = engine_config_from_env(EngineConfig()).replace(
        **{k: v for k, v in engine_flags.items() if v is not None})
    return worker, engine


def run_worker(args: argparse.Namespace, role: str, create_server) -> int:
    """Build the worker, serve until SIGTERM/SIGINT, then shut down gracefully."""
    try:
        worker, engine = configs_from_args(args, role)
        telemetry = telemetry_flags.config_from_args(args)
        auth = auth_flags.config_from_args(args)
    except ValueError as e:
        print(f"pdmesh {role}: {e}", file=sys.stderr)
        return 2
    telemetry_flags.setup(telemetry, f"pdmesh-{worker.role}")
    auth_flags.setup(auth)
    from pdmesh.services.common.worker import WorkerHost

    from pdmesh.worker.engine_proxy import EngineProcessError

    try:
        host = WorkerHost(worker, engine, use_transport=worker.role != "colocated")
    except EngineProcessError as e:  # the child printed its traceback; one line here
        print(f"error: pdmesh {role}: {e}", file=sys.stderr, flush=True)
        return 1
    except ValueError as e:  # a setting the model refuses, e.g. --tp that splits no heads
        print(f"error: pdmesh {role}: {e}", file=sys.stderr, flush=True)
        return 1
    from pdmesh import aio

    sys.setswitchinterval(worker.gil_switch_interval_s)
    return aio.run(_serve(host, telemetry, create_server))


async def _serve(host, telemetry, create_server) -> int:
    """The worker's life on its event loop: serve, register, wait for a signal, drain."""
    import grpc

    from pdmesh import tls
    from pdmesh.grpc_util import stop_aio_gracefully
    from pdmesh.registry_client import NOT_ANSWERING
    from pdmesh.services.common.observe import WorkerObservability

    worker = host.config
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await host.start()
    failed: list[BaseException] = []

    def engine_failed(error: BaseException) -> None:
        # the engine's state is unknown: every request on it has failed already; stop
        # (deregister, exit 1) so that `pdmesh serve` or the orchestrator replaces us
        failed.append(error)
        print(f"error: the {worker.role} engine failed ({type(error).__name__}: {error}); "
              f"this worker stops (exit 1) to be replaced", file=sys.stderr, flush=True)
        stop.set()
    host.engine.add_failure_listener(engine_failed)
    obs = WorkerObservability(host.metrics.registry, telemetry, worker.role)
    interceptors = [obs.aio_rpc_interceptor]
    if worker.chaos:  # fault injection (services/common/chaos.py), armed by RPC
        from pdmesh.services.common.chaos import Chaos, served_methods

        host.chaos = Chaos(worker.role, engine=host.engine)
        interceptors.append(host.chaos.interceptor)
        print(f"{worker.role}: chaos on (pdmesh.v1.Chaos): never for serving", flush=True)
    server, port, servicer, health = await create_server(
        f"{worker.host}:{worker.port}", host, interceptors=interceptors)
    if host.chaos is not None:
        from pdmesh.grpc_util import Servicer

        name = "pdmesh.v1.Prefill" if worker.role == "prefill" else "pdmesh.v1.Decode"
        host.chaos.methods = served_methods([Servicer(None, None, name)])
    obs.start(servicer.snapshot, worker.host)
    metrics = "" if obs.metrics_port is None else \
        f", metrics http://{worker.advertise_host}:{obs.metrics_port}/metrics"
    address = f"{worker.advertise_host}:{port}"
    try:
        await host.start_registry(address, servicer.load, servicer.peer_gone)
    except grpc.RpcError as e:  # refused (wrong cluster token, layout...): one line, no traceback
        waited = (f" (asked for {worker.registry_wait_s:g} s)"
                  if e.code() in NOT_ANSWERING else "")
        print(f"error: the registry at {worker.registry} refused this {worker.role} worker: "
              f"{e.code().name}: {e.details()}{tls.unavailable_hint(e.code().name)}{waited}",
              file=sys.stderr, flush=True)
        await server.stop(0)
        obs.stop()
        await servicer.close()
        await host.close(deregister=False)
        return 1
    print(f"{worker.role} listening on {worker.host}:{port} (registered as "
          f"{host.registry.worker_id} at {address}, model {worker.model_id}{metrics})", flush=True)
    freeze_startup_objects()
    print(f"{worker.role} ready {host.startup.line()}", flush=True)
    await stop.wait()
    await stop_aio_gracefully(server, health, worker.shutdown_grace_s)
    obs.stop()
    await servicer.close()
    await host.close(deregister=True)
    try:
        print(f"{worker.role} stopped", flush=True)
    except BrokenPipeError:  # `pdmesh serve` (our stdout) is gone already
        pass
    return 1 if failed else 0
