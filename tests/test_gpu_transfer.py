"""KV transfer modes for pools in GPU memory: direct (device memory registered with
Mooncake) and staged (a pinned host mirror). The staging logic runs on CPU too, with a
CPU tensor standing in for the device pool; the GPU cases skip without CUDA."""
from __future__ import annotations

import pytest
import torch

from pdmesh.transfer import plan
from pdmesh.transfer import choose_mode, make_kv_transport
from pdmesh.transfer.staged import StagedTransport

CUDA = torch.cuda.is_available()


def test_choose_mode():
    assert choose_mode("auto", pool_on_gpu=True, engine_reaches_gpu=True) == "direct"
    assert choose_mode("auto", pool_on_gpu=True, engine_reaches_gpu=False) == "staged"
    assert choose_mode("staged", pool_on_gpu=True, engine_reaches_gpu=True) == "staged"
    assert choose_mode("auto", pool_on_gpu=False, engine_reaches_gpu=False) == "host"
    assert choose_mode("staged", pool_on_gpu=False, engine_reaches_gpu=False) == "staged"
    with pytest.raises(ValueError, match="CUDA"):
        choose_mode("direct", pool_on_gpu=True, engine_reaches_gpu=False)
    with pytest.raises(ValueError, match="one of"):
        choose_mode("fast", pool_on_gpu=True, engine_reaches_gpu=True)


def test_page_runs():
    assert plan.page_runs([3, 4, 5, 9, 1, 2]) == [(3, 3), (9, 1), (1, 2)]
    assert plan.page_runs([]) == []


def _pools(device: str, pages: int = 12):
    shape = (pages, 2, 4, 2, 3, 8)  # [P, L, page, 2, Hkv, D]
    src = torch.randn(shape, device=device).to(torch.bfloat16)
    dst = torch.zeros(shape, device=device, dtype=torch.bfloat16)
    return src, dst


def _move(device: str, mode: str):
    """Write 3 pages src -> dst through `mode`; returns (src, dst, mode run, dst transport)."""
    src, dst = _pools(device)
    kw = dict(hostname="127.0.0.1", protocol="tcp")
    ts, sbase, smode = make_kv_transport("mooncake", src, mode, **kw)
    td, dbase, dmode = make_kv_transport("mooncake", dst, mode, **kw)
    try:
        bpp = src[0].numel() * src.element_size()
        stats = ts.write_pages(td.session_id, sbase, dbase, bpp, [1, 2, 7], [4, 5, 0])
        assert stats.bytes == 3 * bpp and stats.descriptors == 2
        if dmode == "staged":
            assert not dst.any()  # bytes are in the mirror until the pages land
            td.land([4, 5, 0])
        torch.testing.assert_close(dst[[4, 5, 0]], src[[1, 2, 7]], rtol=0, atol=0)
        untouched = [p for p in range(dst.shape[0]) if p not in (4, 5, 0)]
        assert not dst[untouched].any()
    finally:
        ts.close()
        td.close()
    return smode, dmode, td


def test_staged_through_host_mirror_cpu():
    """The staged path end to end over real Mooncake tcp, a CPU pool as the 'device'."""
    smode, dmode, td = _move("cpu", "staged")
    assert (smode, dmode) == ("staged", "staged") and isinstance(td, StagedTransport)


def test_each_staged_transport_owns_its_mirror():
    """Two workers' pools in one process: each transport lands only into its own pool."""
    a, b = torch.zeros(4, 3), torch.zeros(4, 3)
    ta, tb = StagedTransport(_Null()), StagedTransport(_Null())
    ta.register(a), tb.register(b)
    next(iter(ta._mirrors.values())).host[1] = 7.0
    next(iter(tb._mirrors.values())).host[1] = 3.0
    ta.land([1])
    tb.land([1])
    assert a[1].eq(7).all() and b[1].eq(3).all() and not a[[0, 2, 3]].any()


class _Null:
    """A transport that registers memory and moves nothing."""

    session_id = "null"

    def register(self, tensor) -> int:
        return tensor.data_ptr()

    def close(self) -> None:
        pass


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["direct", "staged", "auto"])
def test_gpu_pool_transfer(mode):
    from pdmesh.transfer.mooncake_transport import MooncakeTransport

    if mode == "direct" and not MooncakeTransport.reaches_gpu_memory():
        pytest.skip("this Mooncake build has no CUDA support (direct mode needs it)")
    smode, dmode, _ = _move("cuda", mode)
    want = {"direct": "direct", "staged": "staged",
            "auto": "direct" if MooncakeTransport.reaches_gpu_memory() else "staged"}[mode]
    print(f"mode {mode}: ran {smode} -> {dmode}")
    assert smode == dmode == want
