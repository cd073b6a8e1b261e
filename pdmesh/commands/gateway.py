"""`pdmesh gateway`: the public API (gRPC pdmesh.v1.Gateway + OpenAI REST) over the mesh.

Prints `gateway listening on HOST:PORT (REST) and HOST:PORT (gRPC)` once serving, then
runs until SIGINT or SIGTERM and stops gracefully (in-flight requests may finish).
"""
from __future__ import annotations

import argparse
import sys

from pdmesh.commands import auth_flags, telemetry_flags
from pdmesh.config import GatewayConfig, gateway_config_from_env


def _read_key_file(path: str) -> str:
    """--api-key-file: the key is read at parse time, so the file path is all `ps` shows."""
    from pdmesh.auth import read_secret_file

    try:
        return read_secret_file(path)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default=None,
                   help="registry address HOST:PORT (default 127.0.0.1:50050, env PDMESH_REGISTRY)")
    p.add_argument("--model", default="default",
                   help="model whose tokenizer and context length the gateway uses: 'default', "
                        "a HF folder or a .gguf file (no weights are loaded)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: --model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; 0.0.0.0 to serve other hosts)")
    p.add_argument("--port", type=int, default=8000, help="REST port (default 8000; 0 = free)")
    p.add_argument("--grpc-port", type=int, default=50051,
                   help="gRPC port (default 50051; 0 = free)")
    add_routing_arguments(p)
    p.add_argument("--mode", default=None,
                   help="pd | colocated | auto (default: a prefill+decode pair when one "
                        "exists, else a colocated worker; env PDMESH_ROUTING_MODE)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' (shows in `ps`: prefer "
                          "--api-key-file or env PDMESH_API_KEY)")
    key.add_argument("--api-key-file", dest="api_key", type=_read_key_file, metavar="PATH",
                     help="require the key held in this file (env PDMESH_API_KEY)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context limit for prompt + output (default: the model's)")
    p.add_argument("--processes", type=int, default=None,
                   help="gateway processes sharing the ports (default 1; env "
                        "PDMESH_GATEWAY_PROCESSES): one process streams from one core")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="REST request bodies beyond this get 413 (default 32 MiB; env "
                        "PDMESH_GATEWAY_MAX_BODY_BYTES; other limits: PDMESH_GATEWAY_MAX_*)")
    add_admission_arguments(p)
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    auth_flags.add_arguments(p)
    telemetry_flags.add_arguments(p, metrics_port=False)  # /metrics is on the REST port


class _ToGateway(argparse.Action):
    """`pdmesh serve`: the flag goes to the gateway child, as --gateway-arg would take it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.gateway_arg = [*(namespace.gateway_arg or []), f"{option_string}={values}"]


def add_routing_arguments(p: argparse.ArgumentParser, to_gateway: bool = False) -> None:
    """Routing policy flags (services/gateway/routing.py). `to_gateway` (pdmesh serve):
    append them to the gateway child's argv instead."""
    def add(flag: str, kind: type, text: str) -> None:
        p.add_argument(flag, type=kind, default=None, help=text,
                       action=_ToGateway if to_gateway else "store")
    add("--prefill-policy", str, "random | round_robin (default) | power_of_two | "
        "least_load | cache_aware | cache_cost | prefix_hash (env PDMESH_PREFILL_POLICY)")
    add("--decode-policy", str, "same choices, for decode and colocated workers (env "
        "PDMESH_DECODE_POLICY)")
    add("--cache-threshold", float, "cache_aware: prefix match rate above which the "
        "worker with the longest match wins (default 0.3; env PDMESH_GATEWAY_CACHE_THRESHOLD)")
    add("--balance-abs-threshold", int, "cache_aware: load is imbalanced (least loaded "
        "wins) when max - min load exceeds this (default 64; env "
        "PDMESH_GATEWAY_BALANCE_ABS_THRESHOLD) ...")
    add("--balance-rel-threshold", float, "... and max load exceeds min load times this "
        "(default 1.5; env PDMESH_GATEWAY_BALANCE_REL_THRESHOLD)")
    add("--max-tree-size", int, "cache_aware: token ids kept per worker's prefix tree, "
        "least recently used evicted first (default 2**26; env PDMESH_GATEWAY_MAX_TREE_SIZE)")
    add("--prefix-token-count", int, "prefix_hash: leading tokens hashed (default 256; env "
        "PDMESH_GATEWAY_PREFIX_TOKEN_COUNT)")
    add("--pd-mode", str, "per-request disaggregation, when a prefill + decode pair "
        "exists: always (default: prefill on the prefill worker) | never (prefill on the "
        "decode worker itself) | auto (per request, from predicted TTFT and decode stall; "
        "env PDMESH_GATEWAY_PD_MODE)")
    add("--pd-mode-profile", str, "auto: the cost model's starting coefficients, a "
        "Profile JSON as `pdmesh plan --output` writes (default: built-in 2-core CPU "
        "figures); calibrated online from PD requests' timings either way (env "
        "PDMESH_GATEWAY_PD_MODE_PROFILE)")
    add("--pd-mode-stall-weight", float, "auto: seconds of a request's TTFT that one second "
        "of stall of one running decode stream is worth (default 0.1; env "
        "PDMESH_GATEWAY_PD_MODE_STALL_WEIGHT)")
    add("--pd-mode-max-stall", float, "auto: never prefill locally when that would stall "
        "the decode's streams longer than this many seconds (default 0.25; env "
        "PDMESH_GATEWAY_PD_MODE_MAX_STALL)")


def add_admission_arguments(p: argparse.ArgumentParser, to_gateway: bool = False) -> None:
    """Admission flags (services/gateway/admission.py); each limit is per gateway process.
    `to_gateway` (pdmesh serve): append them to the gateway child's argv instead."""
    def add(flag: str, kind: type, text: str) -> None:
        p.add_argument(flag, type=kind, default=None, help=text,
                       action=_ToGateway if to_gateway else "store")
    add("--max-inflight", int, "requests in flight per gateway process; beyond it they "
        "queue, then get 429 / RESOURCE_EXHAUSTED (default 0 = no limit; with --processes N "
        "the gateway admits N times this; env PDMESH_GATEWAY_MAX_INFLIGHT)")
    add("--max-queued", int, "requests waiting for a slot per process, beyond "
        "--max-inflight (default: = --max-inflight; env PDMESH_GATEWAY_MAX_QUEUED)")
    add("--queue-timeout", float, "seconds a queued request may wait before it gets 429 "
        "too (default 30; 0 = until a slot frees; env PDMESH_GATEWAY_QUEUE_TIMEOUT)")
    add("--retry-after", float, "retry hint of a 429 in seconds, jittered ±50%% (default 1; "
        "env PDMESH_GATEWAY_RETRY_AFTER)")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """Defaults, then PDMESH_* env, then flags (flags win)."""
    config = gateway_config_from_env(GatewayConfig())
    flags = {"registry": args.registry, "prefill_policy": args.prefill_policy,
             "decode_policy": args.decode_policy, "mode": args.mode, "api_key": args.api_key,
             "processes": args.processes, "max_inflight": args.max_inflight,
             "max_queued": args.max_queued, "queue_timeout_s": args.queue_timeout,
             "retry_after_s": args.retry_after, "max_body_bytes": args.max_body_bytes,
             "cache_threshold": args.cache_threshold,
             "balance_abs_threshold": args.balance_abs_threshold,
             "balance_rel_threshold": args.balance_rel_threshold,
             "max_tree_size": args.max_tree_size, "prefix_token_count": args.prefix_token_count,
             "pd_mode": args.pd_mode, "pd_mode_profile": args.pd_mode_profile,
             "pd_mode_stall_weight": args.pd_mode_stall_weight,
             "pd_mode_max_stall_s": args.pd_mode_max_stall}
    return config.replace(model=args.model, served_model_name=args.served_model_name,
                          host=args.host, port=args.port, grpc_port=args.grpc_port,
                          max_model_len=args.max_model_len, reuse_port=args.reuse_port,
                          **{k: v for k, v in flags.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from pdmesh.services.gateway.app import run as run_app

    try:
        config = config_from_args(args)
        telemetry = telemetry_flags.config_from_args(args)
        auth = auth_flags.config_from_args(args)
    except ValueError as e:
        print(f"pdmesh gateway: {e}", file=sys.stderr)
        return 2
    auth_flags.setup(auth)  # the token its worker channels and registry watch carry
    if config.processes > 1:
        from pdmesh.commands.gateway_group import run_group

        return run_group(config)
    telemetry_flags.setup(telemetry, "pdmesh-gateway")

    def ready(rest_port: int, grpc_port: int) -> None:
        print(f"gateway listening on {config.host}:{rest_port} (REST) and "
              f"{config.host}:{grpc_port} (gRPC), metrics http://{config.host}:{rest_port}"
              "/metrics", flush=True)

    try:
        run_app(config, ready)
    except (FileNotFoundError, ValueError) as e:
        print(f"pdmesh gateway: {e}", file=sys.stderr)
        return 2
    print("gateway stopped", flush=True)
    return 0
