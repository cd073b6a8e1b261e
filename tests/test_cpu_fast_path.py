"""The CPU fast path (fused.CpuForward, TorchAttention's fast layouts) and dtype="auto".

CpuForward computes CausalLM.forward's function with oneDNN-packed linears; its fp32
logits equal the reference forward's to fp32 tolerance and greedy tokens equal
transformers' fp32 ones (test_engine_hf, test_numerics); here: each attention layout
against plain softmax attention, every architecture's branches (qkv bias, q/k norm, tied
head) against CausalLM.forward, bf16 against fp32, and how "auto" picks the dtype.
"""
from __future__ import annotations

import pytest
import torch

from pdmesh import Engine, SamplingParams
from pdmesh.runtime import model_runner
from pdmesh.runtime.attention import AttnMetadata, SeqSpan, TorchAttention, gather_pages
from pdmesh.runtime.fused import CpuForward, onednn_linear_supported
from pdmesh.runtime.model_runner import cpu_has_native_bf16, resolve_dtype
from tiny_models import ARCHS, write_tiny_hf_model


def _cpuinfo(tmp_path, flags: str):
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n\n"
                 f"processor\t: 1\nflags\t\t: {flags}\n")
    return str(p)


def test_native_bf16_from_cpu_flags(tmp_path):
    cases = {"zen4": ("fpu sse2 avx2 avx512f avx512_bf16 avx512bw", True),
             "sapphire": ("fpu avx512f amx_tile amx_bf16", True),
             "skylake": ("fpu sse2 avx2 avx512f avx512bw", False)}
    for name, (flags, want) in cases.items():
        (tmp_path / name).mkdir()
        assert cpu_has_native_bf16(_cpuinfo(tmp_path / name, flags)) == want, name
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_follows_the_cpu(monkeypatch, native):
    monkeypatch.setattr(model_runner, "cpu_has_native_bf16", lambda: native)
    want = torch.bfloat16 if native and onednn_linear_supported(torch.bfloat16) else torch.float32
    assert resolve_dtype("auto", "cpu") == want
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float32", "cpu") == torch.float32  # explicit always wins
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_dtype_env_pins_float32(monkeypatch, default_model):
    monkeypatch.setattr(model_runner, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv("PDMESH_DTYPE", "float32")
    e = Engine(loaded=default_model, num_pages=8)
    assert e.runner.kv.dtype == torch.float32
    assert e.runner.model.lm_head.weight.dtype == torch.float32


def test_gather_pages_equals_indexing():
    kv = torch.randn(11, 3, 4, 2, 2, 8)  # [P, L, page, 2, Hkv, D]
    table = torch.tensor([[7, 2, 9], [0, 10, 4]])
    for layer in range(3):
        got = gather_pages(kv[:, layer], table)
        assert torch.equal(got, kv[:, layer][table].flatten(1, 2))


def _reference_attention(q, k, v, prefix):
    """q [S, H, D], k/v [ctx, Hkv, D]: softmax attention in float64, causal after `prefix`."""
    h, hkv = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(h // hkv, 1)
    v = v.double().repeat_interleave(h // hkv, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * q.shape[-1] ** -0.5
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(prefix)
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", p, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_layouts_match_softmax_attention(dtype):
    """Prefill without a prefix (over the new K/V), chunk after a prefix, one-token decode
    and batched decode (grouped query heads), each against float64 softmax attention."""
    torch.manual_seed(0)
    h, hkv, d, page, pages = 6, 2, 16, 4, 40
    kv = torch.zeros(pages, 1, page, 2, hkv, d, dtype=dtype)
    layer = kv[:, 0]
    attn = TorchAttention(h, hkv, d)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    tables = [torch.tensor([5, 17, 3, 30, 8, 25]), torch.tensor([21, 1, 12]), torch.tensor([9, 33])]
    full = {}
    # step 1: two prompts (lengths 13, 9) in one forward, no prefix
    lens = [13, 9]
    spans, start = [], 0
    for t, n in zip(tables, lens):
        spans.append(SeqSpan(start, n, n, t[: -(-n // page)]))
        start += n
    q, k, v = (torch.randn(sum(lens), x, d, dtype=dtype) for x in (h, hkv, hkv))
    meta = AttnMetadata.build(spans, page)
    attn.store(layer, k, v, meta)
    out = attn.forward(q, layer, meta, k, v)
    for s in spans:
        r = slice(s.q_start, s.q_start + s.q_len)
        full[s.q_len] = (k[r], v[r])
        torch.testing.assert_close(out[r].double(), _reference_attention(q[r], k[r], v[r], 0), **tol)
    # step 2: a 6-token chunk after the 13-token prefix (masked, read from the pages)
    s = SeqSpan(0, 6, 19, tables[0][:5])
    q2, k2, v2 = (torch.randn(6, x, d, dtype=dtype) for x in (h, hkv, hkv))
    meta = AttnMetadata.build([s], page)
    attn.store(layer, k2, v2, meta)
    kc, vc = torch.cat((full[13][0], k2)), torch.cat((full[13][1], v2))
    got = attn.forward(q2, layer, meta, k2, v2)
    torch.testing.assert_close(got.double(), _reference_attention(q2, kc, vc, 13), **tol)
    # step 3: one decode token for seq 0 alone, then a batched decode of both
    ctx = {0: (kc, vc), 1: full[9]}
    for batch in ([0], [0, 1]):
        spans = []
        for j, i in enumerate(batch):
            n = ctx[i][0].shape[0] + 1
            spans.append(SeqSpan(j, 1, n, tables[i][: -(-n // page)]))
        qd, kd, vd = (torch.randn(len(batch), x, d, dtype=dtype) for x in (h, hkv, hkv))
        meta = AttnMetadata.build(spans, page)
        assert (meta.decode_table is not None) == (len(batch) > 1)
        attn.store(layer, kd, vd, meta)
        got = attn.forward(qd, layer, meta, kd, vd)
        for j, i in enumerate(batch):
            ctx[i] = (torch.cat((ctx[i][0], kd[j: j + 1])), torch.cat((ctx[i][1], vd[j: j + 1])))
            want = _reference_attention(qd[j: j + 1], *ctx[i], ctx[i][0].shape[0] - 1)
            torch.testing.assert_close(got[j: j + 1].double(), want, **tol)


def _logits(engine: Engine, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    for ids in prompts:
        engine.add_request(prompt_token_ids=ids, params=params)
    out = []
    orig = engine.runner.run

    def run(batch):
        r = orig(batch)
        out.append(r.clone())
        return r

    engine.runner.run = run
    while engine.has_unfinished():
        engine.step()
    engine.runner.run = orig
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_forward_matches_torch_forward_every_arch(tmp_path, arch):
    """qkv bias (qwen2), q/k norm (qwen3), tied head, llama3 rope: CpuForward's fp32 logits
    equal CausalLM.forward's (numerics=reference runs it) through prefill and decodes."""
    overrides = {"qwen2": {"tie_word_embeddings": True}}.get(arch, {})
    write_tiny_hf_model(tmp_path, arch, seed=5, **overrides)
    fast = Engine(model=str(tmp_path), dtype="float32", page_size=4, num_pages=128)
    ref = Engine(model=str(tmp_path), dtype="float32", page_size=4, num_pages=128,
                 numerics="reference")
    assert isinstance(fast.runner.cpu_forward, CpuForward) and ref.runner.cpu_forward is None
    prompts = [[5, 9, 13, 2, 7, 7, 1], [3, 4], [11] * 10]
    a, b = _logits(fast, prompts, 4), _logits(ref, prompts, 4)
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not onednn_linear_supported(torch.bfloat16), reason="no oneDNN bf16 here")
def test_bf16_fast_path_tracks_fp32(default_model):
    """bf16 CpuForward (packed oneDNN weights, eager prefill attention with bf16 scores) on
    the default model: logits off the fp32 run's by at most twice what transformers' op
    order in bf16 (numerics=reference) is off, the same argmax unless fp32's top two are
    closer than that bf16 error (a tie bf16 may break either way: it did on a CPU without
    native bf16, margin 0.08 against an error of 1.0), and the same values as the unpacked
    F.linear fallback where the CPU has native bf16 (both the same oneDNN kernel; elsewhere
    as close as the reference). A sequence whose token differed is compared no further:
    its next logits are for another text."""
    mk = lambda **kw: Engine(loaded=default_model, page_size=16, num_pages=64, **kw)  # noqa: E731
    bf = mk(dtype="bfloat16")
    assert bf.runner.kv.dtype == torch.bfloat16 and bf.runner.cpu_forward.onednn
    prompts = [bf.tokenizer.apply_chat_template([{"role": "user", "content": q}])
               for q in ("What is the capital of France?", "Name three colours.")]
    a = _logits(bf, prompts, 3)
    b = _logits(mk(dtype="float32"), prompts, 3)
    ref = _logits(mk(dtype="bfloat16", numerics="reference"), prompts, 3)
    alive = torch.ones(len(prompts), dtype=torch.bool)  # same tokens so far in all three
    rows, errs = [], []  # per step: the rows compared, the bf16 reference's error there
    for x, y, r in zip(a, b, ref):
        rows.append(alive.clone())
        x, y, r = x[alive], y[alive], r[alive]
        err = (r - y).abs().max()
        errs.append(err)
        assert (x - y).abs().max() <= 2 * err, ((x - y).abs().max(), err)
        top = y.topk(2, -1).values
        same = x.argmax(-1) == y.argmax(-1)
        assert bool((same | (top[:, 0] - top[:, 1] <= err)).all()), (x.argmax(-1), y.argmax(-1))
        same &= r.argmax(-1) == y.argmax(-1)
        alive[alive.clone()] = same
    assert alive.any()  # at least one sequence was compared at every step
    plain = Engine(loaded=default_model, dtype="bfloat16", page_size=16, num_pages=64)
    fwd = plain.runner.cpu_forward
    fwd.onednn = False
    fwd.head = fwd.lm.lm_head.weight.detach()
    fwd.layers = [(w_in, lin.self_attn.qkv_proj.weight.detach(), b_qkv,
                   lin.self_attn.o_proj.weight.detach(), w_post,
                   lin.mlp.gate_up_proj.weight.detach(), lin.mlp.down_proj.weight.detach(), a_)
                  for (w_in, _, b_qkv, _, w_post, _, _, a_), lin
                  in zip(fwd.layers, fwd.lm.model.layers)]
    c = _logits(plain, prompts, 3)
    for x, y, alive, err in zip(a, c, rows, errs):
        if cpu_has_native_bf16():  # one oneDNN kernel either way
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        else:  # F.linear takes another bf16 kernel there: as close as the reference
            assert (x[alive] - y[alive]).abs().max() <= 2 * err
