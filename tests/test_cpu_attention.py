"""The CPU paged decode attention kernel (pdmesh/runtime/csrc/paged_decode_cpu.cpp) and its
backend (pdmesh/runtime/cpu_attention.py), against the plain torch reference.

Outputs start NaN-filled, so an element the kernel never writes fails the comparison.
The compiled .so is cached per machine (cpu_ext.py; scripts/install.sh builds it), so
only the first run on a machine compiles (~10 s). Greedy tokens of the default model
through the Engine are checked against transformers in test_engine_hf (auto picks this
backend on CPU) and against the torch backend here.
"""
from __future__ import annotations

import logging
import threading

import pytest
import torch

from pdmesh import Engine, SamplingParams
from pdmesh.runtime import attention, cpu_attention, cpu_ext
from pdmesh.runtime.attention import AttnMetadata, SeqSpan, TorchAttention
from pdmesh.runtime.cpu_attention import (CpuPagedAttention, paged_decode_attention,
                                          paged_decode_attention_ref)

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert cpu_attention.available(), "the CPU attention extension must build on this machine"


def _pool(pages, layers, page, hkv, d, dtype, gen):
    """kv [P, L, page, 2, Hkv, D] in the runtime's layout; tests use layer 1's strided view."""
    return torch.randn(pages, layers, page, 2, hkv, d, generator=gen).to(dtype)


def _case(gen, b, page, hkv, g, d, dtype, max_ctx=300):
    lens = torch.randint(1, max_ctx, (b,), generator=gen)
    # lengths at the edges: one token, a full page, one past it
    lens[: min(b, 3)] = torch.tensor([1, page, page + 1])[: min(b, 3)]
    width = int((lens.max() + page - 1) // page)
    kv = _pool(b * width + 3, 2, page, hkv, d, dtype, gen)
    table = torch.randperm(kv.shape[0], generator=gen)[: b * width].view(b, width)
    q = torch.randn(b, hkv * g + 2, d, generator=gen).to(dtype)[:, 1: 1 + hkv * g]  # strided
    return q, kv[:, 1], table, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g", [1, 3])
def test_kernel_matches_reference(dtype, g):
    gen = torch.Generator().manual_seed(g)
    for b in (1, 2, 5, 16):
        for page, d, generic in ((16, 64, False), (16, 64, True), (5, 32, False), (4, 128, False)):
            q, kv, table, lens = _case(gen, b, page, 3 if g == 1 else 2, g, d, dtype)
            out = torch.full(q.shape, float("nan"), dtype=dtype)
            paged_decode_attention(q, kv, table, lens, d ** -0.5, out, generic=generic)
            want = paged_decode_attention_ref(q, kv, table, lens, d ** -0.5)
            torch.testing.assert_close(out, want, **TOL[dtype],
                                       msg=lambda m: f"b={b} page={page} d={d}: {m}")


def test_kernel_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(5)
    q, kv, table, lens = _case(gen, 2, 16, 3, 3, 64, torch.float32)
    out = torch.empty(q.shape)
    bad = table.clone()
    bad[1, 0] = kv.shape[0]  # one past the pool
    with pytest.raises(RuntimeError, match=r"table\[1\]\[0\] = .* is not a page of the pool"):
        paged_decode_attention(q, kv, bad, lens, 0.125, out)
    with pytest.raises(RuntimeError, match=r"lens\[0\] = .* does not fit"):
        paged_decode_attention(q, kv, table, lens + table.shape[1] * 16, 0.125, out)
    with pytest.raises(RuntimeError, match="share a dtype"):
        paged_decode_attention(q, kv.double(), table, lens, 0.125, out)
    with pytest.raises(RuntimeError, match="contiguous int64"):
        paged_decode_attention(q, kv, table.int(), lens, 0.125, out)


def test_bf16_kernel_as_accurate_as_the_torch_path():
    """bf16 K/V and queries: the kernel (fp32 softmax and sums) is no further from a
    float64 softmax than the torch path (gather + SDPA) is."""
    gen = torch.Generator().manual_seed(7)
    q, kv, table, lens = _case(gen, 16, 16, 3, 3, 64, torch.bfloat16, max_ctx=400)
    exact = paged_decode_attention_ref(q.double(), kv.double(), table, lens, 0.125)
    spans = [SeqSpan(i, 1, int(n), table[i, : (int(n) + 15) // 16]) for i, n in enumerate(lens)]
    torch_out = TorchAttention(9, 3, 64).forward(q, kv, AttnMetadata.build(spans, 16))
    ours = paged_decode_attention(q, kv, table, lens, 0.125)
    err = {n: (o.double() - exact).abs().mean().item() for n, o in (("ours", ours), ("torch", torch_out))}
    assert err["ours"] <= err["torch"] * 1.05, err


def test_backend_equals_torch_attention_on_decode_and_prefill():
    gen = torch.Generator().manual_seed(3)
    kv = _pool(40, 2, 4, 2, 32, torch.float32, gen)[:, 0]
    torch_attn, ours = TorchAttention(6, 2, 32), CpuPagedAttention(6, 2, 32)
    for spans in ([SeqSpan(0, 1, 9, torch.tensor([5, 17, 2]))],  # one sequence
                  [SeqSpan(i, 1, 3 + 5 * i, torch.arange(4 * i, 4 * i + 2 + i)) for i in range(4)],
                  [SeqSpan(0, 3, 7, torch.tensor([8, 9])), SeqSpan(3, 1, 5, torch.tensor([1, 3]))]):
        t = sum(s.q_len for s in spans)
        q = torch.randn(t, 6, 32, generator=gen)
        meta = CpuPagedAttention.build_metadata(spans, 4)
        assert (meta.kernel_lens is not None) == all(s.q_len == 1 for s in spans)
        want = torch_attn.forward(q, kv, AttnMetadata.build(spans, 4))
        torch.testing.assert_close(ours.forward(q, kv, meta), want, atol=1e-5, rtol=1e-5)
        # TorchAttention reads this backend's metadata as its own (a shared model's layers)
        torch.testing.assert_close(torch_attn.forward(q, kv, meta), want, atol=0, rtol=0)


def test_backend_selection(monkeypatch):
    assert attention.resolve_attention_backend("auto", "cpu") == "cpu"
    assert attention.resolve_attention_backend("cpu", "cpu") == "cpu"
    assert attention.resolve_attention_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        attention.resolve_attention_backend("cpu", "cuda")
    monkeypatch.setattr(cpu_attention, "available", lambda: False)  # e.g. no g++
    assert attention.resolve_attention_backend("auto", "cpu") == "torch"
    assert attention.resolve_attention_backend("cpu", "cpu") == "torch"


def test_failed_build_logs_one_line_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PDMESH_CACHE_DIR", str(tmp_path))

    def broken(out):
        raise RuntimeError("g++ failed (1): paged_decode_cpu.cpp:1: error: boom\nmore")

    monkeypatch.setattr(cpu_ext, "_compile", broken)
    with caplog.at_level(logging.WARNING, logger="pdmesh.runtime.cpu_ext"):
        assert cpu_ext.build_and_load() is False
    assert [r.getMessage() for r in caplog.records] == [
        "CPU paged decode attention unavailable, using the torch path: "
        "g++ failed (1): paged_decode_cpu.cpp:1: error: boom"]


def test_build_once_under_the_lock(monkeypatch, tmp_path):
    """Concurrent builders compile once; a changed source gets its own build."""
    monkeypatch.setenv("PDMESH_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_compile(out):
        calls.append(out)
        threading.Event().wait(0.2)  # the others reach the lock meanwhile
        out.write_bytes(b"so")

    monkeypatch.setattr(cpu_ext, "_compile", fake_compile)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(cpu_ext.build())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(paths)) == 1 and paths[0].read_bytes() == b"so"
    assert paths[0].parent.parent == tmp_path / "cpu_ext"
    src = tmp_path / "changed.cpp"
    src.write_text(cpu_ext.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(cpu_ext, "SOURCE", src)
    assert cpu_ext.build() != paths[0] and len(calls) == 2


def test_engine_greedy_tokens_equal_the_torch_backend(default_model):
    """fp32 (the suite's dtype): batched decode steps of mixed lengths, then one
    sequence alone, give the torch backend's tokens."""
    prompts = [[100 + 7 * i + j for j in range(5 + 13 * i)] for i in range(4)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = {}
    for be in ("torch", "cpu"):
        e = Engine(loaded=default_model, attention_backend=be, page_size=16, num_pages=128)
        assert e.runner.backend == be
        outs[be] = [o.token_ids for o in e.generate(prompt_token_ids=prompts, params=params)]
        outs[be].append(e.generate(prompt_token_ids=prompts[2], params=params)[0].token_ids)
    assert outs["cpu"] == outs["torch"]
