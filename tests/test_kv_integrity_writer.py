"""The workers' integrity plumbing without processes: TransportWriter's checksum modes
over a Router into a real shared-memory pool, the chaos hook, the config."""
from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from pdmesh.config import WorkerConfig, worker_config_from_env
from pdmesh.disagg.ports import TransferTarget
from pdmesh.services.common.kv import CorruptKV, TransportReceiver, TransportWriter
from pdmesh.transfer import shm
from pdmesh.transfer import checksum as ck
from pdmesh.transfer.checksum import pages_checksum
from pdmesh.transfer.route import Router

SHAPE = (8, 2, 4, 2, 1, 8)  # [page, layer, offset, kv, head, dim], like pdmesh's pool


def pools():
    src = torch.randn(SHAPE).to(torch.bfloat16)
    dst = shm.alloc_pool(SHAPE, torch.bfloat16)
    router = Router(None, 0, src, src[0].numel() * 2, path="shm", my_host="h")
    tgt = TransferTarget("d:1", 0, (5, 2), None, room=9, host_id="h",
                         local_endpoints=(shm.export_pool(dst),))
    return src, dst, router, tgt


def metrics():
    counter = SimpleNamespace(labels=lambda *a: counter, inc=lambda *a: None,
                              observe=lambda *a: None)
    return SimpleNamespace(transfer_bytes=counter, transfer_pages=counter,
                           transfer_seconds=counter, transfer_failures=counter)


@pytest.mark.parametrize("algo", ["xxh3", "crc32"])
@pytest.mark.parametrize("mode", ["on", "decode", "off"])
def test_modes(mode, algo, monkeypatch):
    monkeypatch.setattr(ck, "CPU_ALGO", algo)  # crc32: PDMESH_KV_CHECKSUM_ALGO, older writers

    async def main():
        src, dst, router, tgt = pools()
        writer = TransportWriter(router, metrics(), threads=1, checksum=mode)
        await writer.write([1, 3], tgt)
        want = await writer.checksum([1, 3])
        got = await writer.read_checksum(tgt, None)
        mine = await TransportReceiver(lambda op, args: pages_checksum(dst, *args),
                                       checksum=mode != "off").checksum(
            [5, 2], want.algo if want else algo)
        writer.close()
        return want, got, mine
    want, got, mine = asyncio.run(main())
    if mode == "off":
        assert want is got is mine is None
    else:
        assert want == mine and want.algo == algo  # relocated pages, equal checksums
        assert got == (want if mode == "on" else None)  # read back only when "on"


def test_chaos_corrupts_through_the_route_and_never_touches_the_source(monkeypatch):
    """The source pool is as it was at every write (the prefill's engine and the source
    checksum, which runs beside the write, read it meanwhile): one byte changes in the
    destination only."""
    src, dst, router, tgt = pools()
    before, seen = src.clone(), []
    write = shm.ShmPeer.write_pages

    def spy(self, *args):
        seen.append(torch.equal(before.view(torch.uint8), src.view(torch.uint8)))
        return write(self, *args)
    monkeypatch.setattr(shm.ShmPeer, "write_pages", spy)

    async def main():
        writer = TransportWriter(router, metrics(), threads=1, chaos=CorruptKV(1.0))
        await writer.write([1, 3], tgt)
        want, got = await writer.checksum([1, 3]), await writer.read_checksum(tgt, None)
        changed = (dst[5].view(torch.uint8) != src[1].view(torch.uint8)).sum().item()
        await writer.write([1, 3], tgt)  # the room's rewrite: clean
        again = await writer.read_checksum(tgt, None)
        writer.close()
        return want, got, changed, again
    want, got, changed, again = asyncio.run(main())
    assert seen and all(seen) and torch.equal(before.view(torch.uint8), src.view(torch.uint8))
    assert changed == 1 and got != want and again == want


@pytest.mark.parametrize("algo", ["xxh3", "crc32"])
def test_every_corrupted_write_is_caught_by_the_decode_check(algo, monkeypatch):
    """40 rooms written through the real shm route with the chaos hook corrupting every
    write (a byte of the first page): the decode's check of its pool mismatches the
    prefill's source checksum every time; a clean rewrite matches. (Random corruptions
    of every kind: tests/test_kv_checksum.py.)"""
    monkeypatch.setattr(ck, "CPU_ALGO", algo)

    async def main():
        src, dst, router, tgt = pools()
        writer = TransportWriter(router, metrics(), threads=1, checksum="decode",
                                 chaos=CorruptKV(1.0, rewrites=True, seed=3))
        decode = TransportReceiver(lambda op, args: pages_checksum(dst, *args))
        seen = []
        for room in range(40):
            await writer.write([1, 3], replace(tgt, room=room))
            want = await writer.checksum([1, 3])
            seen.append((want, await decode.checksum([5, 2], want.algo)))
        writer.chaos = None
        await writer.write([1, 3], tgt)
        clean = await decode.checksum([5, 2], algo) == await writer.checksum([1, 3])
        writer.close()
        return seen, clean
    seen, clean = asyncio.run(main())
    assert all(want.algo == got.algo == algo and want != got for want, got in seen)
    assert clean


def test_corrupt_kv_first_write_only_unless_rewrites():
    once, always = CorruptKV(1.0), CorruptKV(1.0, rewrites=True)
    assert [once.hit(1), once.hit(1), once.hit(2)] == [True, False, True]
    assert [always.hit(1), always.hit(1)] == [True, True]
    assert not any(CorruptKV(0.0).hit(r) for r in range(50))


def test_config():
    assert WorkerConfig().kv_checksum == "decode" and WorkerConfig().chaos_corrupt_kv == 0
    cfg = worker_config_from_env(env={"PDMESH_KV_CHECKSUM": "decode",
                                      "PDMESH_CHAOS_CORRUPT_KV": "0.5",
                                      "PDMESH_CHAOS_CORRUPT_KV_REWRITES": "1"})
    assert (cfg.kv_checksum, cfg.chaos_corrupt_kv, cfg.chaos_corrupt_kv_rewrites) == (
        "decode", 0.5, True)
    with pytest.raises(ValueError, match="kv_checksum"):
        WorkerConfig(kv_checksum="maybe")
    with pytest.raises(ValueError, match="probability"):
        WorkerConfig(chaos_corrupt_kv=2.0)
