"""A worker's tensor-parallel ranks: rank 0 in the engine's process, ranks 1..N-1 as
child processes (pdmesh.runtime.tp.follower) that follow its steps.

`RankGroup.attach(engine, tp)` keeps the whole Engine (scheduler, prefix cache, sampler,
stop handling: lead.py's way) and makes the group its runner: `run(batch)` broadcasts
each scheduled batch as a Step and forwards rank 0's shard. Every rank uses the
Engine's page ids, so one allocator serves all of them. Until Engine takes a runner,
the Engine first builds its own runner (full model and pool on rank 0) and `attach`
drops it: start-up costs one full load, serving holds rank 0's shard only.

Every rank's KV pool is a memfd (pdmesh.transfer.shm.alloc_pool; on GPUs the rank's device
memory, opened here by CUDA IPC) that rank 0 maps (`pools[r]`: [P, L, page, 2, hkv_r, Dh], the KV heads `plans[r].kv_heads`), so rank 0's
process can move any rank's KV heads (pdmesh.runtime.tp.kv) without a collective.

Liveness: a follower that exits (kill -9, a crash) makes `check()` raise; the worker's
engine loop calls it every turn, so the worker fails at once, as when its engine dies.
Followers die with rank 0's process (PR_SET_PDEATHSIG), and a lost peer ends their
collective.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import subprocess
import sys
import threading
from typing import Any

import torch

from pdmesh.runtime.tp.comm import TPGroup, host_store
from pdmesh.runtime.tp.driver import TPRunner
from pdmesh.runtime.tp.launch import TPSpec, build_runner
from pdmesh.runtime.tp.plan import TPPlan
from pdmesh.transfer import ipc_uri

log = logging.getLogger(__name__)
STOP_WAIT_S = 10.0


def pool_key(rank: int) -> str:
    """The rendezvous-store key under which rank `rank` publishes its pool's shm URI."""
    return f"pdmesh/tp/pool/{rank}"


class RankGroup:
    """Rank 0's runner plus the follower processes; the Engine's runner when attached."""

    def __init__(self, spec: TPSpec, runner: TPRunner, procs: list[subprocess.Popen],
                 pools: list[torch.Tensor], store: Any) -> None:
        self.spec, self.runner, self.procs, self.pools = spec, runner, procs, pools
        self._store = store  # hosts the rendezvous: kept alive while ranks run
        cfg = runner.model.cfg
        self.plans = [TPPlan(cfg, spec.tp, r) for r in range(spec.tp)]
        self.kv, self.page_size = runner.kv, runner.page_size
        self.failed: str | None = None  # why the group cannot run any more
        self._closing, self._broken = False, False
        for r, p in enumerate(procs, start=1):
            threading.Thread(target=self._watch, args=(r, p), daemon=True,
                             name=f"tp-rank-{r}-watch").start()

    @classmethod
    def start(cls, spec: TPSpec) -> "RankGroup":
        """Start ranks 1..tp-1, join as rank 0 in this process, map every rank's pool."""
        from pdmesh.transfer import shm

        if spec.device == "cpu":
            torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // spec.tp))
        store = host_store(spec.tp)
        procs = [_spawn(spec, r, store.port) for r in range(1, spec.tp)]
        try:
            group = TPGroup.join(0, spec.tp, store.port, spec.device)
            runner = build_runner(spec, group, kv_alloc=shm.alloc_pool)
            uris = [store.get(pool_key(r)).decode() for r in range(1, spec.tp)]
            pools = [runner.kv] + [_map_pool(u, runner.kv) if u else None for u in uris]
        except BaseException:
            _stop(procs, 0)
            raise
        return cls(spec, runner, procs, pools, store)

    @classmethod
    def attach(cls, engine: Any, tp: int) -> "RankGroup":
        """Start `tp` ranks for `engine`'s model, dtype, page size and page count, and
        make the group the engine's runner (its own runner is dropped)."""
        from pdmesh.runtime.model_runner import resolve_dtype

        from pdmesh.runtime.tp.plan import check_tp

        check_tp(engine.model_config, tp)  # before any process starts: a clear ValueError
        cfg = engine.config
        dtype = str(resolve_dtype(cfg.dtype, cfg.device)).removeprefix("torch.")
        # the engine's own thread budget (num_threads, OMP_NUM_THREADS, else the cores:
        # torch's count now) shared by its ranks
        threads = max(1, (cfg.num_threads or torch.get_num_threads()) // tp)
        from pdmesh.runtime.cuda_graph import graph_batch_sizes

        # the sizes the engine's own runner captures (ModelRunner: capped at max batch)
        graphs = (tuple(graph_batch_sizes(cfg.cuda_graph_batch_sizes, cfg.max_running_requests))
                  if cfg.cuda_graphs and cfg.device != "cpu" and cfg.numerics != "reference"
                  else ())
        spec = TPSpec(str(cfg.model), tp, dtype, cfg.device, cfg.page_size,
                      engine.allocator.num_pages, threads, cfg.attention_backend, graphs,
                      engine.max_model_len)
        group = cls.start(spec)
        engine.runner = group  # Engine.step calls only runner.run(batch)
        return group

    def run(self, batch: Any) -> torch.Tensor:
        """ModelRunner.run's contract: forward `batch` on every rank -> float32 logits."""
        self.check()
        try:
            return self.runner.run(batch)
        except BaseException:
            self._broken = True  # followers may be inside this step's collectives
            raise

    def check(self) -> None:
        """Raise RuntimeError when a rank has exited (the group cannot step any more)."""
        if self.failed is not None:
            raise RuntimeError(self.failed)

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if not self._closing and self.failed is None:
            self.failed = (f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code "
                           f"{code}: this worker's ranks cannot run")
            log.error("%s", self.failed)

    def layout(self, model: str) -> Any:
        """The group's pool as one logical pool: every KV head of a page, as a TP 1
        worker's (what peers' bind checks compare), with each rank's head slice and page
        bytes in `ranks` (base addresses 0 until a transport registers the pools)."""
        from pdmesh.transfer import KVLayout
        from pdmesh.transfer.layout import KVRank

        c, kv = self.runner.model.cfg, self.kv
        bpp = c.num_layers * self.page_size * 2 * c.num_kv_heads * c.head_dim * kv.element_size()
        rank_bpp = kv[0].numel() * kv.element_size()  # every rank holds as many heads
        ranks = tuple(KVRank(p.rank, *p.kv_heads, 0, rank_bpp) for p in self.plans)
        return KVLayout(model, str(kv.dtype).removeprefix("torch."), self.page_size,
                        c.num_layers, c.num_kv_heads, c.head_dim, bpp, int(kv.shape[0]), ranks)

    def close(self) -> None:
        """Tell the followers to stop (if they can still hear it), then end them."""
        self._closing = True
        if self.failed is None and not self._broken:
            try:
                self.runner.send(None)
            except Exception:  # a follower gone meanwhile: it is stopped below anyway
                log.debug("stop broadcast failed", exc_info=True)
        _stop(self.procs, STOP_WAIT_S if self.failed is None else 0)
        self.runner.group.close()


def _spawn(spec: TPSpec, rank: int, port: int) -> subprocess.Popen:
    """`python -m pdmesh.runtime.tp.follower RANK PORT PARENT SPEC` (stdout: ours)."""
    argv = [sys.executable, "-m", "pdmesh.runtime.tp.follower", str(rank), str(port),
            str(os.getpid()), json.dumps(dataclasses.asdict(spec))]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)


def _stop(procs: list[subprocess.Popen], wait_s: float) -> None:
    for p in procs:
        try:
            p.wait(timeout=wait_s) if wait_s else None
        except subprocess.TimeoutExpired:
            pass
        if p.poll() is None:
            p.kill()
            p.wait()


def _map_pool(uri: str, like: torch.Tensor) -> torch.Tensor:
    """A follower's pool mapped here, shaped and typed as `like`: a host pool by its shm
    URI, a GPU pool (on the follower's GPU) by its CUDA IPC URI."""
    if uri.startswith(ipc_uri.PREFIX):
        from pdmesh.transfer.cuda_ipc import open_pool  # torch's CUDA side only when needed

        flat = open_pool(uri)
    else:
        flat = _map_shm(uri)
    want = like.numel() * like.element_size()
    if flat.numel() != want:
        raise ValueError(f"rank pool {uri[:48]} has {flat.numel()} bytes, expected {want}")
    return flat.view(like.dtype).view(like.shape)


def _map_shm(uri: str) -> torch.Tensor:
    """The memfd behind a shm URI, mapped here as flat uint8."""
    from pdmesh.transfer.shm import _parse

    pid, fd_no, nbytes = _parse(uri)
    fd = os.open(f"/proc/{pid}/fd/{fd_no}", os.O_RDWR | os.O_CLOEXEC)
    try:
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    finally:
        os.close(fd)  # the mapping keeps the memfd's pages alive
    return torch.frombuffer(mm, dtype=torch.uint8)


__all__ = ["RankGroup", "pool_key"]
