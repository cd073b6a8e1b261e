"""KV data plane: page-run planning, layout checks, and real Mooncake transfers over tcp
loopback into a pool owned by another process (pdmesh.transfer.peer)."""
from __future__ import annotations

import pathlib
import random
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, strategies as st

from pdmesh.transfer import (KVLayout, TransferError, check_compatible, get_transport,
                             plan_runs, register_transport)
from pdmesh.transfer.peer import SENTINEL, PoolPeer, make_pool, page_digest, tensor_page_digests
from pdmesh.transfer.plan import validate_pages

SMOL_PAGE = (30, 16, 2, 3, 64)  # SmolLM2-135M: layers, tokens, K/V, kv heads, head dim (fp32)

# ---------------------------------------------------------------- plan_runs (pure)

pairs = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=40)


def expand(runs):
    return [(s + k, d + k) for s, d, n in runs for k in range(n)]


@given(pairs)
def test_runs_cover_pairs_in_order(ps):
    runs = plan_runs([s for s, _ in ps], [d for _, d in ps])
    assert expand(runs) == ps
    assert all(n >= 1 for _, _, n in runs)


@given(pairs)
def test_runs_are_minimal(ps):
    # Runs covering the pairs in order are minimal iff no two adjacent runs could merge.
    runs = plan_runs([s for s, _ in ps], [d for _, d in ps])
    for (s0, d0, n0), (s1, d1, _) in zip(runs, runs[1:]):
        assert not (s1 == s0 + n0 and d1 == d0 + n0)


def test_runs_examples():
    assert plan_runs([], []) == []
    assert plan_runs([3, 4, 5], [10, 11, 12]) == [(3, 10, 3)]
    assert plan_runs([3, 4, 5], [10, 11, 20]) == [(3, 10, 2), (5, 20, 1)]
    assert plan_runs([5, 4], [1, 2]) == [(5, 1, 1), (4, 2, 1)]
    with pytest.raises(ValueError, match="3 ids.*2"):
        plan_runs([1, 2, 3], [1, 2])


def test_validate_pages():
    validate_pages([0, 1], [5, 6])
    with pytest.raises(ValueError, match="invalid page ids"):
        validate_pages([-1], [0])
    with pytest.raises(ValueError, match="more than once"):
        validate_pages([0, 1], [4, 4])


# ---------------------------------------------------------------- layouts (pure)

def layout(**changes):
    base = dict(model="smollm2", dtype="float32", page_size=16, num_layers=30, num_kv_heads=3,
                head_dim=64, bytes_per_page=737_280, num_pages=64)
    return KVLayout(**{**base, **changes})


def test_compatible_layouts_pass_even_with_different_pool_sizes():
    check_compatible(layout(), layout(num_pages=1000), dst_pages=[0, 999])


@pytest.mark.parametrize("field,value,words", [
    ("model", "qwen", "model"), ("dtype", "bfloat16", "dtype"),
    ("page_size", 32, "page size"), ("num_layers", 24, "layer count"),
    ("num_kv_heads", 8, "head geometry: KV heads"), ("head_dim", 128, "head geometry: head dim"),
    ("bytes_per_page", 1, "bytes per page")])
def test_mismatch_names_the_field(field, value, words):
    with pytest.raises(ValueError, match=f"{words}: source .* != destination {value!r}"):
        check_compatible(layout(), layout(**{field: value}))


def test_every_mismatch_is_named():
    with pytest.raises(ValueError) as e:
        check_compatible(layout(), layout(model="x", num_layers=2, head_dim=8))
    assert all(w in str(e.value) for w in ("model", "layer count", "head dim"))


def test_dst_pages_out_of_range():
    with pytest.raises(ValueError, match=r"destination page ids out of range \[0, 64\): \[64, -1\]"):
        check_compatible(layout(), layout(), dst_pages=[0, 64, -1])


def test_layout_from_tensor_engine_and_dict():
    kv = torch.zeros(7, *SMOL_PAGE[:2], 2, 3, 64)  # [P, L, page, 2, Hkv, Dh]
    mc = SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64)
    engine = SimpleNamespace(runner=SimpleNamespace(kv=kv), model_config=mc,
                             config=SimpleNamespace(model="default", page_size=16))
    got = KVLayout.from_engine(engine)
    assert got == layout(model="default", num_pages=7)
    assert KVLayout.from_dict({**got.to_dict(), "extra": 1}) == got
    with pytest.raises(ValueError, match="missing dtype"):
        KVLayout.from_dict({k: v for k, v in got.to_dict().items() if k != "dtype"})
    with pytest.raises(ValueError, match="num_pages"):
        layout(num_pages=0)


# ---------------------------------------------------------------- registry, imports

def test_registry():
    with pytest.raises(ValueError, match="unknown transport 'nope'.*mooncake"):
        get_transport("nope")
    register_transport("fake", lambda **kw: "built")
    assert get_transport("fake")() == "built"


def test_imports_stay_lazy_and_runtime_stays_clean():
    code = ("import sys, pdmesh.transfer, pdmesh.runtime.engine; "
            "assert not [m for m in sys.modules if m.startswith(('mooncake', 'grpc'))]")
    subprocess.run([sys.executable, "-c", code], check=True)
    runtime = pathlib.Path(__file__).parent.parent / "pdmesh" / "runtime"
    for f in runtime.glob("*.py"):
        assert "mooncake" not in f.read_text() and "import grpc" not in f.read_text(), f


# ---------------------------------------------------------------- real Mooncake, tcp loopback

MooncakeTransport = get_transport("mooncake")  # lazy: mooncake itself loads on first use
NUM_PAGES = 64


@pytest.fixture(scope="module")
def local():
    t = MooncakeTransport()
    yield t
    t.close()


@pytest.fixture(scope="module", params=[(1024,), SMOL_PAGE], ids=["4KiB", "smollm2"])
def pools(request, local):
    """(source pool registered locally, its base, peer process serving a sentinel pool)."""
    src = make_pool(NUM_PAGES, request.param, seed=0)
    base = local.register(src)
    peer = PoolPeer.start(NUM_PAGES, request.param)
    yield src, base, peer
    peer.stop()


CASES = {
    "contiguous": (list(range(8, 24)), list(range(40, 56))),
    "scattered": ([1, 5, 9, 33, 2, 63], [60, 0, 7, 8, 9, 31]),
    "contiguous_to_scattered": ([10, 11, 12, 13], [3, 17, 4, 50]),
    "reversed": ([20, 19, 18], [0, 1, 2]),
    "mixed_runs": ([0, 1, 2, 7, 8, 30], [10, 11, 12, 40, 41, 63]),
    "whole_pool": (list(range(64)), random.Random(1).sample(range(64), 64)),
}


@pytest.mark.parametrize("case", CASES)
def test_pages_land_exactly_where_asked(local, pools, case):
    src, base, peer = pools
    src_pages, dst_pages = CASES[case]
    peer.reset()
    stats = local.write_pages(peer.session_id, base, peer.base, peer.bytes_per_page,
                              src_pages, dst_pages)
    assert stats.bytes == len(src_pages) * peer.bytes_per_page
    assert stats.descriptors == len(plan_runs(src_pages, dst_pages))
    sentinel = page_digest(bytes([SENTINEL]) * peer.bytes_per_page)
    expected = [sentinel] * NUM_PAGES
    src_digests = tensor_page_digests(src)
    for s, d in zip(src_pages, dst_pages):
        expected[d] = src_digests[s]
    assert peer.digests() == expected


def write_with_deadline(fn, seconds=30.0):
    """Run fn in a thread; fail the test if it hangs, return what it raised."""
    box = {}

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), f"transfer still running after {seconds} s"
    return box.get("error")


def test_unknown_session_fails_fast(local, pools):
    src, base, _ = pools
    err = write_with_deadline(lambda: local.write_pages("127.0.0.1:1", base, base, 4096, [0], [0]))
    assert isinstance(err, TransferError) and err.rc != 0
    assert "batch_transfer_sync_write to 127.0.0.1:1" in str(err)


def test_dead_peer_fails_fast(local):
    src = make_pool(4, (1024,), seed=1)
    base = local.register(src)
    peer = PoolPeer.start(4, (1024,))
    local.write_pages(peer.session_id, base, peer.base, 4096, [0], [1])  # handshake done
    peer.stop()
    err = write_with_deadline(lambda: local.write_pages(peer.session_id, base, peer.base,
                                                        4096, [0], [1]))
    assert isinstance(err, TransferError)


def test_destination_outside_registered_memory_is_refused(local, pools):
    _, base, peer = pools
    beyond = peer.base + NUM_PAGES * peer.bytes_per_page
    with pytest.raises(TransferError):
        local.write_pages(peer.session_id, base, beyond, peer.bytes_per_page, [0], [0])


def test_source_outside_registered_memory_is_refused(local, pools):
    _, base, peer = pools
    with pytest.raises(ValueError, match="not in registered memory"):
        local.write_pages(peer.session_id, base, peer.base, peer.bytes_per_page, [NUM_PAGES], [0])


def test_same_process_transfers():
    a, b = MooncakeTransport(), MooncakeTransport()
    try:
        x, y, z = make_pool(8, (256,), seed=2), make_pool(8, (256,)), make_pool(8, (256,))
        xb, yb, zb = a.register(x), b.register(y), a.register(z)
        x8, y8, z8 = (t.view(torch.uint8) for t in (x, y, z))  # random bytes hold NaNs
        a.write_pages(b.session_id, xb, yb, 1024, [0, 1, 5], [7, 6, 0])  # engine to engine
        assert torch.equal(y8[[7, 6, 0]], x8[[0, 1, 5]])
        a.write_pages(a.session_id, xb, zb, 1024, [2, 3], [2, 3])  # engine to itself
        assert torch.equal(z8[2:4], x8[2:4]) and bool((z8[4:] == SENTINEL).all())
    finally:
        a.close()
        b.close()


def test_concurrent_writes_from_threads(local, pools):
    src, base, peer = pools
    peer.reset()
    halves = [(list(range(0, 32)), list(range(32, 64))), (list(range(32, 64)), list(range(0, 32)))]
    threads = [threading.Thread(target=local.write_pages, args=(peer.session_id, base, peer.base,
                                                                peer.bytes_per_page, s, d))
               for s, d in halves]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    src_digests = tensor_page_digests(src)
    assert peer.digests() == src_digests[32:] + src_digests[:32]


def test_closed_transport_refuses_and_close_is_idempotent():
    t = MooncakeTransport()
    x = make_pool(2, (256,))
    t.register(x)
    t.close()
    t.close()
    with pytest.raises(TransferError, match="closed"):
        t.register(make_pool(1, (256,)))
    with pytest.raises(ValueError, match="protocol"):
        MooncakeTransport(protocol="udp")
