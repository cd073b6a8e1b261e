"""The tensor-parallel process group: torch.distributed, gloo on CPU, NCCL on CUDA.

A `TPGroup` of size 1 needs no torch.distributed at all (every collective is the
identity), so TP=1 runs in-process through the same code. Larger groups rendezvous on a
TCPStore that the launching process hosts on 127.0.0.1 (port 0: the OS picks a free one,
no race), which ranks join as clients.
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(seconds=120)
log = logging.getLogger(__name__)


def host_store(size: int) -> dist.TCPStore:
    """The rendezvous store, hosted by the launcher (keep it alive while ranks run);
    its `.port` is what ranks join."""
    return dist.TCPStore("127.0.0.1", 0, size + 1, is_master=True, timeout=TIMEOUT,
                         wait_for_workers=False)


class TPGroup:
    """This rank's view of the group: collectives over `device` tensors."""

    def __init__(self, rank: int, size: int, device: torch.device) -> None:
        self.rank, self.size, self.device = rank, size, device

    @classmethod
    def join(cls, rank: int, size: int, port: int, device: str = "cpu") -> "TPGroup":
        """Join the group whose store the launcher hosts on 127.0.0.1:`port`; backend
        gloo on CPU, nccl on CUDA (rank r uses cuda:r)."""
        dev = torch.device(device)
        if size > 1:
            if dev.type == "cuda":
                dev = torch.device("cuda", rank)
                torch.cuda.set_device(dev)
            elif sys.platform.startswith("linux"):
                # ranks on one host: gloo on loopback, whatever the hostname resolves to
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            store = dist.TCPStore("127.0.0.1", port, size + 1, is_master=False, timeout=TIMEOUT)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=store,
                                    rank=rank, world_size=size, timeout=TIMEOUT)
        return cls(rank, size, dev)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks, in place; returns it."""
        if self.size > 1:
            dist.all_reduce(t)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., size * n], rank order along the last dim."""
        if self.size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` into every rank's `t` (same shape and dtype everywhere), in place."""
        if self.size > 1:
            dist.broadcast(t, src=0)
        return t

    def close(self) -> None:
        """Leave the group. NCCL's destroy blocked forever in both ranks of a finished
        two-H200 run (2026-11-30, eager and graphed alike, torch 2.11): on CUDA the
        communicator is aborted instead (not a collective: nothing to wait for), after
        this rank's own work is done."""
        if self.size == 1 or not dist.is_initialized():
            return
        if self.device.type != "cuda":
            dist.destroy_process_group()
            return
        torch.cuda.synchronize(self.device)
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception as e:  # noqa: BLE001 - an abort that fails leaves a process that exits
            log.warning("NCCL process group abort failed (%s); leaving it to process exit", e)


__all__ = ["TPGroup", "host_store"]
