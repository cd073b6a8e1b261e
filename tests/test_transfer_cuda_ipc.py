"""pdmesh.transfer.cuda_ipc: the URI format and IpcPeer's checks and copies everywhere
(IpcPeer over host tensors runs the page-copy kernel under TRITON_INTERPRET=1); export,
open and write between two real processes on one GPU only where CUDA is available."""
from __future__ import annotations

import base64
import json
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1", "conftest must set TRITON_INTERPRET"

from pdmesh.transfer import cuda_ipc  # noqa: E402
from pdmesh.transfer.base import TransferError  # noqa: E402
from pdmesh.transfer.cuda_ipc import IpcPeer, decode_uri, encode_uri, export_pool, open_peer  # noqa: E402

SENTINEL = 0xA5
DEV = "cuda" if CUDA else "cpu"  # IpcPeer over two pools of this process (no IPC)
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA IPC needs a GPU")


def fields(**over) -> dict:
    """A well-formed field set, as export_pool would build it (values made up)."""
    info = dict(v=1, proc="123:abcd", export="00ff", uuid="GPU-1234", share_device=0,
                handle=b"\x01\x00" + bytes(range(64)), storage_size=1 << 20,
                storage_offset=512, ref_counter=b"/torch_123_456_0", ref_counter_offset=7,
                event_handle=bytes(64), event_sync=True, offset=4096, nbytes=8192)
    info.update(over)
    return info


def raw_uri(doc) -> str:
    """An ipc: URI around any JSON document (to build malformed ones)."""
    return "ipc:" + base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


def test_uri_round_trip():
    info = fields()
    uri = encode_uri(info)
    assert uri.startswith("ipc:") and "=" not in uri and "/" not in uri and "+" not in uri
    assert decode_uri(uri) == info


def test_module_api():
    assert cuda_ipc.NAME == "ipc" and IpcPeer.name == "ipc"


def _jsonable(info):
    return {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v
            for k, v in info.items()}


@pytest.mark.parametrize("uri", [
    "", "shm:/proc/1/fd/3?bytes=8", "ipc", "ipc:", "ipc:!!!", "ipc:" + "A" * 5,
    raw_uri([1, 2]), raw_uri("text"),
    "ipc:" + base64.urlsafe_b64encode(b"\xff\xfe").decode(),           # not UTF-8
    raw_uri({k: v for k, v in _jsonable(fields()).items() if k != "handle"}),  # missing
    raw_uri({**_jsonable(fields()), "extra": 1}),                        # unknown field
    raw_uri({**_jsonable(fields()), "nbytes": "8192"}),                  # str for int
    raw_uri({**_jsonable(fields()), "nbytes": True}),                    # bool for int
    raw_uri({**_jsonable(fields()), "offset": 1.5}),                     # float for int
    raw_uri({**_jsonable(fields()), "handle": 5}),                       # int for bytes
    raw_uri({**_jsonable(fields()), "handle": "not base64!"}),
    raw_uri({**_jsonable(fields()), "event_sync": 1}),                   # int for bool
    raw_uri({**_jsonable(fields()), "uuid": None}),
    encode_uri(fields(storage_offset=-1)),
    encode_uri(fields(v=2)),
    encode_uri(fields(nbytes=0)),
    encode_uri(fields(offset=1 << 20, nbytes=1)),                         # past the storage
])
def test_malformed_uris_raise_value_error(uri):
    with pytest.raises(ValueError):
        decode_uri(uri)
    with pytest.raises(ValueError):
        open_peer(uri, torch.zeros(4, 8, dtype=torch.uint8))


def test_non_string_uri_raises_value_error():
    with pytest.raises(ValueError):
        decode_uri(None)  # type: ignore[arg-type]


def test_export_of_a_host_pool_is_none():
    assert export_pool(torch.zeros(4, 16)) is None


def test_open_with_a_host_local_pool_is_refused():
    with pytest.raises(ValueError, match="GPU"):
        open_peer(encode_uri(fields()), torch.zeros(4, 16))


# IpcPeer over two pools of this process (host memory without a GPU): the same checks
# and kernel as between processes.
BPP = 420  # not a multiple of 8: int32 words


@pytest.fixture
def pools():
    gen = torch.Generator().manual_seed(0)
    local = torch.randint(0, 256, (6, BPP), dtype=torch.uint8, generator=gen).to(DEV)
    peer = torch.full((10, BPP // 4), 0, dtype=torch.float32, device=DEV)
    peer.view(torch.uint8).fill_(SENTINEL)
    return local.view(torch.float16).view(6, 3, BPP // 6), peer  # any dtypes and shapes


def peer_bytes(peer):
    return peer.view(torch.uint8).view(-1, BPP).cpu()


def test_write_pages_lands_scattered_pages_and_nothing_else(pools):
    local, peer = pools
    p = IpcPeer(peer, local)
    src, dst = [5, 0, 3, 3], [9, 2, 0, 6]  # unsorted, a source twice
    stats = p.write_pages(src, dst, BPP)
    assert (stats.bytes, stats.descriptors) == (4 * BPP, 1) and stats.seconds > 0
    got, want = peer_bytes(peer), local.view(torch.uint8).view(-1, BPP).cpu()
    for s, d in zip(src, dst):
        assert torch.equal(got[d], want[s])
    assert (got[[1, 3, 4, 5, 7, 8]] == SENTINEL).all()
    assert torch.equal(p.read_pages([9, 9, 0], BPP).cpu(), want[[5, 5, 3]])
    p.close()


def test_poke_sets_one_byte_of_the_peer_pool(pools):
    local, peer = pools
    p = IpcPeer(peer, local)
    p.poke(2 * BPP + 5, 7)
    got = peer_bytes(peer).view(-1)
    assert got[2 * BPP + 5] == 7 and int((got != SENTINEL).sum()) == 1
    with pytest.raises(ValueError, match="outside the peer pool"):
        p.poke(10 * BPP, 1)
    p.close()
    with pytest.raises(TransferError):
        p.poke(0, 1)


@pytest.mark.parametrize("src,dst", [
    ([0, 1, 2, 3], [4, 5, 6, 7]),                  # one run: a single copy_
    ([4, 5, 0, 1], [8, 9, 2, 3]),                  # two runs: copy_ per run
    ([5, 0, 3, 1, 4, 2], [9, 2, 0, 6, 4, 7]),      # six runs: the copy_pages kernel
])
def test_runs_and_scattered_pages_land_and_nothing_else(pools, src, dst):
    local, peer = pools
    p = IpcPeer(peer, local)
    p.write_pages(src, dst, BPP)
    got, want = peer_bytes(peer), local.view(torch.uint8).view(-1, BPP).cpu()
    for s, d in zip(src, dst):
        assert torch.equal(got[d], want[s]), f"page {s} -> {d}"
    rest = [i for i in range(10) if i not in dst]
    assert (got[rest] == SENTINEL).all()
    p.close()


def test_ids_as_tensor_or_numpy(pools):
    local, peer = pools
    p = IpcPeer(peer, local)
    p.write_pages(torch.tensor([1, 2]), np.array([3, 4]), BPP)
    assert torch.equal(peer_bytes(peer)[3], local.view(torch.uint8).view(-1, BPP)[1].cpu())


def test_empty_write_moves_nothing(pools):
    local, peer = pools
    stats = IpcPeer(peer, local).write_pages([], [], BPP)
    assert (stats.bytes, stats.descriptors) == (0, 0)
    assert (peer_bytes(peer) == SENTINEL).all()


@pytest.mark.parametrize("src,dst,bpp,match", [
    ([0, 1], [0], BPP, "ids"),                 # unequal lengths
    ([-1], [0], BPP, "invalid"),
    ([0, 1], [2, 2], BPP, "more than once"),
    ([6], [0], BPP, "src_pages"),              # past the local pool (6 pages)
    ([0], [10], BPP, "dst_pages"),             # past the peer pool (10 pages)
    ([0.0], [1], BPP, "integers"),
    ([0], [1], 0, "bytes_per_page"),
    ([0], [1], 400, "whole number"),
])
def test_bad_writes_raise_value_error_and_write_nothing(pools, src, dst, bpp, match):
    local, peer = pools
    with pytest.raises(ValueError, match=match):
        IpcPeer(peer, local).write_pages(src, dst, bpp)
    assert (peer_bytes(peer) == SENTINEL).all()


def test_bad_reads_raise_value_error(pools):
    local, peer = pools
    p = IpcPeer(peer, local)
    for ids in ([10], [-1], ["x"]):
        with pytest.raises(ValueError):
            p.read_pages(ids, BPP)


def test_close_is_idempotent_and_final(pools):
    local, peer = pools
    p = IpcPeer(peer, local)
    p.close()
    p.close()
    with pytest.raises(TransferError):
        p.write_pages([0], [0], BPP)
    with pytest.raises(TransferError):
        p.read_pages([0], BPP)


def test_non_contiguous_pool_is_refused(pools):
    local, peer = pools
    with pytest.raises(ValueError, match="contiguous"):
        IpcPeer(peer.t(), local)


# ---- GPU: one process, then two ------------------------------------------------------

def _gpu_pool(pages: int, bpp: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(whole allocation, pool): the pool starts `offset` bytes into its storage, so the
    URI's offsets are exercised, and the bytes before it catch stray writes."""
    base = torch.full((offset + pages * bpp,), SENTINEL, dtype=torch.uint8, device="cuda")
    return base, base[offset:].view(pages, bpp)


def release(info: dict) -> None:
    """Give back an export nobody opened (else torch warns at exit that a shared block
    was never released)."""
    torch.UntypedStorage._release_ipc_counter_cuda(info["ref_counter"],
                                                   info["ref_counter_offset"])


def _child(conn) -> None:
    # ("alloc", pages, bpp, offset) -> URI of a fresh sentinel pool; ("bytes",) -> the
    # whole allocation on the host; ("stop",). Pools of earlier allocs are dropped.
    held = None
    while True:
        op = conn.recv()
        if op[0] == "alloc":
            held = _gpu_pool(*op[1:])
            conn.send(export_pool(held[1]))
        elif op[0] == "bytes":
            conn.send(held[0].cpu())
        else:
            conn.send("stopped")
            return


@pytest.fixture(scope="module")
def child():
    ctx = mp.get_context("spawn")
    conn, child_end = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child_end,), daemon=True)
    proc.start()

    def ask(*op):
        conn.send(op)
        assert conn.poll(120), f"child did not answer {op[0]}"
        return conn.recv()

    yield ask
    if proc.is_alive():
        ask("stop")
    proc.join(10)


def _check_landed(whole, offset, bpp, local_bytes, src, dst):
    pool = whole[offset:].view(-1, bpp)
    assert (whole[:offset] == SENTINEL).all(), "bytes before the pool were written"
    for s, d in zip(src, dst):
        assert torch.equal(pool[d], local_bytes[s]), f"page {s} -> {d}"
    rest = [p for p in range(pool.shape[0]) if p not in dst]
    assert (pool[rest] == SENTINEL).all(), "a page outside dst_pages was written"


@needs_cuda
@pytest.mark.parametrize("bpp", [4096, 4100, 4099])  # int64, int32, bytewise words
def test_two_processes_write_scattered_pages(child, bpp):
    offset = 3 * 512
    uri = child("alloc", 24, bpp, offset)
    assert decode_uri(uri)["offset"] == offset and decode_uri(uri)["nbytes"] == 24 * bpp
    local = torch.randint(0, 256, (16, bpp), dtype=torch.uint8, device="cuda")
    src, dst = [15, 0, 7, 7, 3, 9], [23, 1, 12, 5, 0, 17]
    with open_peer(uri, local) as peer:
        stats = peer.write_pages(src, dst, bpp)
        assert (stats.bytes, stats.descriptors) == (len(src) * bpp, 1)
        # visible to the owner as soon as write_pages returns: no sync on this side
        _check_landed(child("bytes"), offset, bpp, local.cpu(), src, dst)
        assert torch.equal(peer.read_pages(dst, bpp), local[src])
        with pytest.raises(ValueError):
            peer.write_pages([0], [24], bpp)
        run_src, run_dst = [1, 2, 3, 4, 5], [18, 19, 20, 21, 22]  # one run: copy_ path
        peer.write_pages(run_src, run_dst, bpp)
        assert torch.equal(peer.read_pages(run_dst, bpp), local[run_src])


@needs_cuda
def test_same_process_open_copies_into_the_exported_tensor():
    whole, pool = _gpu_pool(8, 1024, 512)
    local = torch.randint(0, 256, (4, 1024), dtype=torch.uint8, device="cuda")
    uri = export_pool(pool)
    with open_peer(uri, local) as peer:
        peer.write_pages([3, 1], [6, 0], 1024)
    torch.cuda.synchronize()
    _check_landed(whole.cpu(), 512, 1024, local.cpu(), [3, 1], [6, 0])


@needs_cuda
def test_a_gpu_this_process_cannot_see_is_a_runtime_error():
    _, pool = _gpu_pool(4, 256, 0)
    info = decode_uri(export_pool(pool))
    info.update(proc="1:not-this-process", uuid="GPU-00000000-0000-0000-0000-000000000000")
    with pytest.raises(RuntimeError, match="GPU"):
        open_peer(encode_uri(info), pool)
    release(info)


@needs_cuda
def test_own_handle_opened_as_foreign_is_a_runtime_error():
    """CUDA refuses to open an IPC handle in the process that made it; open_peer turns that
    into the RuntimeError a caller falls back on (the same-process path avoids it)."""
    _, pool = _gpu_pool(4, 256, 0)
    info = decode_uri(export_pool(pool))
    info.update(proc="1:not-this-process")
    with pytest.raises(RuntimeError, match="IPC"):
        open_peer(encode_uri(info), pool)
    release(info)
