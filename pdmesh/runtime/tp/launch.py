"""Start N tensor-parallel ranks as processes and run a lead on rank 0.

`launch(spec, lead)` starts N processes (torch.multiprocessing, forkserver on Linux, else
spawn), hosts their rendezvous store, runs `lead(runner)` on rank 0 while the others
follow its steps, and returns the lead's result; `generate(model, prompts, max_tokens,
tp=N)` is launch with the greedy lead. Each rank loads only its own shards
(shard.load_shard). TP=1 runs in this process through the same code (a group of one
needs no torch.distributed). Any rank's exception ends the run: the
others are stopped and a RuntimeError carries the failing rank's traceback.
"""
from __future__ import annotations

import os
import queue as queue_mod
import traceback
from dataclasses import dataclass
from functools import partial
from typing import Callable, TypeVar

import torch

from pdmesh.runtime.tp.comm import TPGroup, host_store
from pdmesh.runtime.tp.driver import TPRunner, greedy_generate, pages_needed
from pdmesh.runtime.tp.model import TPCausalLM
from pdmesh.runtime.tp.plan import check_tp
from pdmesh.runtime.tp.shard import load_shard, model_config

RESULT_TIMEOUT_S = 600.0
T = TypeVar("T")


@dataclass(frozen=True)
class TPSpec:
    """What every rank needs to build its shard of the model (picklable)."""

    model: str
    tp: int
    dtype: str = "float32"
    device: str = "cpu"
    page_size: int = 16
    num_pages: int = 64
    threads: int | None = None  # torch intra-op threads per rank; default cores / tp
    attention: str = "auto"  # the backend on CUDA (CPU ranks: torch)
    graph_sizes: tuple[int, ...] = ()  # CUDA: decode batch sizes captured as graphs
    graph_max_context: int = 0  # the graphs' page-table width in tokens (0: the pool's)


def build_runner(spec: TPSpec, group: TPGroup, kv_alloc=None) -> TPRunner:
    """Load this rank's shards and allocate its KV pool (with `kv_alloc(shape, dtype)`
    when given, see TPRunner)."""
    from pdmesh.runtime.model_runner import resolve_dtype

    plan, shards = load_shard(spec.model, spec.tp, group.rank)
    model = TPCausalLM.from_shards(plan, group, shards)
    del shards
    model = model.to(device=group.device, dtype=resolve_dtype(spec.dtype, spec.device)).eval()
    runner = TPRunner(model, spec.num_pages, spec.page_size, kv_alloc, spec.attention)
    if spec.graph_sizes and group.device.type == "cuda" and runner.backend == "triton":
        runner.capture_graphs(tuple(spec.graph_sizes),
                              spec.graph_max_context or spec.num_pages * spec.page_size)
    return runner


def run_rank(rank: int, spec: TPSpec, port: int, lead: Callable[[TPRunner], T],
             done: Callable[[T], None] | None = None) -> T | None:
    """One rank's whole life: join, load, then `lead(runner)` on rank 0 (which must send
    the followers stop) or follow rank 0's steps; returns rank 0's result, which goes to
    `done` first, before the group is left (leaving is teardown: never hold a result
    behind it)."""
    if spec.device == "cpu" and (spec.threads or spec.tp > 1):  # TP 1 runs in the caller
        torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // spec.tp))
    group = TPGroup.join(rank, spec.tp, port, spec.device)
    try:
        runner = build_runner(spec, group)
        if rank == 0:
            out = lead(runner)
            if done is not None:
                done(out)
            return out
        runner.follow()
        return None
    finally:
        group.close()


def _entry(rank: int, spec: TPSpec, port: int, lead, results) -> None:
    try:
        run_rank(rank, spec, port, lead, done=lambda out: results.put(("ok", rank, out)))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))
        raise


def launch(spec: TPSpec, lead: Callable[[TPRunner], T]) -> T:
    """Start spec.tp ranks (processes, gloo on CPU / NCCL on CUDA; TP 1 in this process),
    run `lead` (picklable: a module-level function or a partial of one) on rank 0 while the
    others follow, and return its result. Raises ValueError before starting any rank when
    spec.tp cannot shard the model, RuntimeError with the traceback when a rank fails."""
    check_tp(model_config(spec.model), spec.tp)  # also fills a GGUF's weights cache once
    if spec.tp == 1:
        return run_rank(0, spec, 0, lead)
    store = host_store(spec.tp)
    ctx = _context()
    results = ctx.Queue()
    procs = [ctx.Process(target=_entry, daemon=True, name=f"pdmesh-tp{r}",
                         args=(r, spec, store.port, lead, results)) for r in range(spec.tp)]
    for p in procs:
        p.start()
    status, rank, value = "error", 0, "interrupted"
    try:
        status, rank, value = _wait(results, procs)
    finally:  # after an error the others may block in a collective: stop them
        for p in procs:
            p.join(timeout=30 if status == "ok" else 0)
            if p.is_alive():
                p.terminate()
                p.join()
    if status != "ok":
        raise RuntimeError(f"tensor-parallel rank {rank} failed:\n{value}")
    return value


def generate(model: str, prompts: list[list[int]], max_tokens: int, tp: int = 1, *,
             dtype: str = "float32", device: str = "cpu", page_size: int = 16,
             stop_token_ids: tuple[int, ...] = (), threads: int | None = None,
             graph_sizes: tuple[int, ...] = ()) -> list[list[int]]:
    """Greedy token ids for each prompt from `model` ("default", a HF folder or a .gguf)
    sharded over `tp` ranks (see `launch`; the lead is driver.greedy_generate); on CUDA,
    decode steps of `graph_sizes` sequences replay CUDA graphs."""
    spec = TPSpec(str(model), tp, dtype, device, page_size,
                  pages_needed(prompts, max_tokens, page_size), threads,
                  graph_sizes=tuple(graph_sizes))
    return launch(spec, partial(greedy_generate, prompts=prompts, max_tokens=max_tokens,
                                stop_token_ids=stop_token_ids))


def _context():
    """forkserver where there is one (Linux): its server imports torch and this module
    once, then each rank is a fork of it (no per-rank multi-second torch import, and no
    fork of a caller whose OpenMP pool or gRPC threads are running); else spawn."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return torch.multiprocessing.get_context("spawn")
    ctx = torch.multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", __name__])
    return ctx


def _wait(results, procs) -> tuple[str, int, object]:
    """The first result: rank 0's tokens or any rank's error; a rank that died without
    reporting counts as an error."""
    waited = 0.0
    while waited < RESULT_TIMEOUT_S:
        try:
            return results.get(timeout=1.0)
        except queue_mod.Empty:
            waited += 1.0
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead:
            try:  # its traceback may be in flight
                return results.get(timeout=2.0)
            except queue_mod.Empty:
                return "error", procs.index(dead[0]), f"exit code {dead[0].exitcode}"
    return "error", 0, f"no result within {RESULT_TIMEOUT_S:.0f} s"


__all__ = ["TPSpec", "build_runner", "run_rank", "launch", "generate"]
