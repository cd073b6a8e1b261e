"""Where `pdmesh serve` puts its workers: their roles and TP sizes in start order, the
GPUs each one sees (`--gpus`) and the CPU threads each kind of its steps gets. Plain
functions of the arguments, no processes.
"""
from __future__ import annotations

import argparse


ROLE_ARGV = {"prefill": ["prefill"], "decode": ["decode"],
             "colocated": ["decode", "--role", "colocated"]}


def worker_roles(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(role, TP size) of each worker, in start order."""
    return ([("prefill", args.prefill_tp or args.tp)] * args.prefill
            + [("decode", args.decode_tp or args.tp)] * args.decode
            + [("colocated", args.tp)] * args.colocated)


def gpu_assignment(gpus: str | None, tps: list[int]) -> list[str | None]:
    """Each worker's CUDA_VISIBLE_DEVICES, in start order: worker i takes the next tps[i]
    ids of the comma list `gpus`, wrapping around; all None without a list."""
    if gpus is None:
        return [None] * len(tps)
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or any(not g.isdigit() for g in ids):
        raise ValueError(f"--gpus wants comma-separated GPU ids like 0,1, not {gpus!r}")
    out, at = [], 0
    for tp in tps:
        if tp > len(ids):
            raise ValueError(f"a worker at TP {tp} needs {tp} GPUs; --gpus lists {len(ids)}")
        out.append(",".join(ids[(at + k) % len(ids)] for k in range(tp)))
        at += tp
    return out


def _tp(n: int) -> list[str]:
    """A worker's tensor-parallel flag (none at the default, 1)."""
    return ["--tp", str(n)] if n != 1 else []


def worker_threads(roles: list[str], i: int, cores: int, env: dict[str, str]) -> dict[str, str]:
    """Thread settings of worker `i` of `roles` on `cores` cores, each unless `env` sets it
    (an OMP_NUM_THREADS given sets all of a worker's steps: then nothing here).

    Several engines share the cores (one OpenMP pool each would oversubscribe them), each
    kind of step among the workers that run it. Decode steps (PDMESH_NUM_THREADS): the
    decode and colocated workers share all cores but one, left to the gateway and the RPC
    threads, which stream tokens then (vLLM's CPU engine keeps a core for its API server
    likewise). Prefill steps (PDMESH_PREFILL_THREADS): the prefill and colocated workers
    share all cores (while a colocated worker prefills nothing streams; a prefill worker's
    threads beside a busy decode worker cost it little with passive waits); a decode
    worker, whose steps are mostly decode ones, takes cores // workers. So a prefill and
    a decode step at once may hold up to about twice the cores in threads. Where several
    workers share the cores, OMP_WAIT_POLICY=passive: a thread waiting at a barrier sleeps
    instead of spinning on a core another engine needs (a 2-thread prefill beside one busy
    core: 372 ms a step passive, 592 spinning). A lone worker keeps OpenMP's default waits
    (spin ~3 ms, then sleep): its threads have the cores, and passive waits made its
    512-token prefill step 288 ms instead of 197. So do the prefill workers of a mesh of
    prefill and decode workers only, whose decode workers step at nice 19
    (PDMESH_CPU_NICE, runtime/threads.py): a prefill step's threads then find their cores
    free, as a lone worker's do, and prompts go first across processes. Measured on 2
    cores: benchmarks/results/2026-11-30-cpu-spin-idle.md, 2026-11-30-cpu-vs-vllm-threads.md,
    2026-11-30-cpu-nice-decode.md."""
    if "OMP_NUM_THREADS" in env:
        return {}
    prefillers = sum(r != "decode" for r in roles) or 1
    decoders = sum(r != "prefill" for r in roles) or 1
    prefill = max(1, cores // (prefillers if roles[i] != "decode" else len(roles)))
    out = {"OMP_NUM_THREADS": str(prefill), "PDMESH_PREFILL_THREADS": str(prefill),
           "PDMESH_NUM_THREADS": str(max(1, (cores - 1) // decoders))}
    pd = set(roles) == {"prefill", "decode"}  # prefill first across the processes
    if pd and roles[i] == "decode":
        out["PDMESH_CPU_NICE"] = "19"
    if len(roles) > 1 and not (pd and roles[i] == "prefill"):
        out["OMP_WAIT_POLICY"] = "PASSIVE"
    return {k: v for k, v in out.items() if k not in env}


__all__ = ["ROLE_ARGV", "_tp", "worker_roles", "gpu_assignment", "worker_threads"]
