"""EngineConfig.numerics="reference": transformers' op order (separate q/k/v and gate/up
GEMMs on views of the fused weights, 4-D SDPA, the LM head over every new row), so bf16
rounds as transformers does. Rotary frequencies are float32 in both modes.

On CPU: the knob's validation and env override; the separate GEMMs and 4-D SDPA really
run; reference and fast logits agree to fp32 tolerance; and bf16 greedy tokens equal
transformers' bf16 greedy tokens at batch 1 (the GPU twin is in test_gpu_runtime.py).
Measured on an H100 (teacher-forced on transformers' tokens): reference bf16 logits equal
transformers' bit for bit; dropping the float32 rotary frequencies or the 4-D SDPA breaks
that at the first step, dropping the separate GEMMs or the whole-prompt LM head did not.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pdmesh import Engine, SamplingParams
from pdmesh.config import EngineConfig, engine_config_from_env
from pdmesh.runtime.fused import CpuForward
from pdmesh.runtime.model import CausalLM
from pdmesh.runtime.model_runner import ModelRunner
from pdmesh.runtime.loader import resolve_model_path
from test_engine_hf import QUESTIONS, hf_greedy

BF16_TOKENS = 32


def test_config_numerics_validated_and_read_from_env():
    assert EngineConfig().numerics == "fast"
    assert EngineConfig(numerics="reference", attention_backend="torch").numerics == "reference"
    with pytest.raises(ValueError, match="numerics must be fast or reference, got 'exact'"):
        EngineConfig(numerics="exact")
    with pytest.raises(ValueError, match="attention_backend='triton' conflicts"):
        EngineConfig(numerics="reference", attention_backend="triton")
    assert engine_config_from_env(env={"PDMESH_NUMERICS": "reference"}).numerics == "reference"
    assert engine_config_from_env(env={}).numerics == "fast"
    with pytest.raises(ValueError, match="numerics"):
        engine_config_from_env(env={"PDMESH_NUMERICS": "bitexact"})
    with pytest.raises(ValueError, match="conflicts"):
        engine_config_from_env(env={"PDMESH_NUMERICS": "reference",
                                    "PDMESH_ATTENTION_BACKEND": "triton"})


def test_runner_rejects_bad_numerics(default_model):
    net = CausalLM(default_model.config)
    with pytest.raises(ValueError, match="conflicts"):
        ModelRunner(net, 4, 16, torch.float32, "cpu", attention_backend="triton",
                    numerics="reference")
    with pytest.raises(ValueError, match="numerics must be"):
        ModelRunner(net, 4, 16, torch.float32, "cpu", numerics="fastest")
    # "auto" resolves to the torch backend in reference mode, with no fused path
    r = ModelRunner(net, 4, 16, torch.float32, "cpu", numerics="reference")
    assert r.backend == "torch" and r.fused is None and r.graphs is None and net.reference
    assert r.cpu_forward is None


class _Calls(TorchFunctionMode):
    """Records the weight shape of every F.linear and the rank of every SDPA call."""

    def __init__(self) -> None:
        super().__init__()
        self.linear: list[tuple[tuple[int, ...], int]] = []  # (weight shape, storage ptr)
        self.sdpa_dims: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            self.linear.append((tuple(w.shape), w.untyped_storage().data_ptr()))
        elif func is F.scaled_dot_product_attention:
            self.sdpa_dims.add(args[0].dim())
        return func(*args, **kwargs)


def _prefill_and_decode(engine: Engine, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Greedy-run `prompts` for `steps` forwards (prefill, then decodes); each step's logits."""
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    for ids in prompts:
        engine.add_request(prompt_token_ids=ids, params=params)
    out = []
    for _ in range(steps):
        batch = engine.scheduler.schedule()
        logits = engine.runner.run(batch)
        engine.scheduler.computed(batch)
        for r, t in zip([s.req for s in batch.seqs if s.sample], logits.argmax(-1).tolist()):
            engine._append(r, t, None)
        out.append(logits)
    for rid in list(engine.requests):
        engine.abort(rid)
    return out


def test_reference_runs_separate_gemms_on_views_and_4d_sdpa(default_model):
    c = default_model.config
    engine = Engine(loaded=default_model, page_size=16, num_pages=64, numerics="reference")
    attn0 = engine.runner.model.model.layers[0].self_attn
    qkv_ptr = attn0.qkv_proj.weight.untyped_storage().data_ptr()
    with _Calls() as calls:
        _prefill_and_decode(engine, [list(range(100, 120))], steps=2)
    shapes = [s for s, _ in calls.linear]
    d, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = [(q, d), (kv, d), (kv, d), (d, q), (c.intermediate_size, d),
                 (c.intermediate_size, d), (d, c.intermediate_size)]
    # two forwards: every layer's seven GEMMs in transformers' order, then the LM head
    assert shapes == 2 * (per_layer * c.num_layers + [(c.vocab_size, d)])
    # q/k/v weights are views into the fused qkv_proj weight, not copies
    assert [p for _, p in calls.linear[:3]] == [qkv_ptr] * 3
    assert calls.sdpa_dims == {4}

    fast = Engine(loaded=default_model, dtype="float32", page_size=16, num_pages=64)
    fwd = fast.runner.cpu_forward
    assert isinstance(fwd, CpuForward)  # the CPU fast path: packed oneDNN linears
    shapes_of = {id(w): tuple(lin.weight.shape) for lin, w in _packed(fwd)}
    seen, linear = [], fwd._linear
    fwd._linear = lambda x, w, b=None: seen.append(shapes_of[id(w)]) or linear(x, w, b)
    with _Calls() as calls:
        _prefill_and_decode(fast, [list(range(100, 120))], steps=1)
    # one fused qkv and one fused gate_up GEMM per layer, then the LM head on the last row
    assert seen == [(q + 2 * kv, d), (d, q), (2 * c.intermediate_size, d),
                    (d, c.intermediate_size)] * c.num_layers + [(c.vocab_size, d)]
    assert calls.linear == [] and calls.sdpa_dims == {4}


def _packed(fwd: CpuForward):
    """(nn.Linear, the weight CpuForward passes for it) for every linear of the model."""
    out = [(fwd.lm.lm_head, fwd.head)]
    for layer, (_, w_qkv, _, w_o, _, w_gu, w_down, _) in zip(fwd.lm.model.layers, fwd.layers):
        a, mlp = layer.self_attn, layer.mlp
        out += [(a.qkv_proj, w_qkv), (a.o_proj, w_o), (mlp.gate_up_proj, w_gu),
                (mlp.down_proj, w_down)]
    return out


def test_reference_logits_equal_fast_in_fp32(default_model):
    fast = Engine(loaded=default_model, dtype="float32", page_size=16, num_pages=256)
    ref = Engine(loaded=default_model, dtype="float32", page_size=16, num_pages=256,
                 numerics="reference")
    prompts = [fast.tokenizer.apply_chat_template([{"role": "user", "content": q}])
               for q in QUESTIONS[:3]]
    a, b = _prefill_and_decode(fast, prompts, 5), _prefill_and_decode(ref, prompts, 5)
    v = default_model.config.vocab_size
    assert [x.shape for x in a] == [x.shape for x in b] == [(3, v)] * 5
    for x, y in zip(a, b):  # prefill of 3 prompts, then batched decodes
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
        assert torch.equal(x.argmax(-1), y.argmax(-1))


@pytest.fixture(scope="module")
def hf_bf16():
    from transformers import AutoModelForCausalLM

    path = resolve_model_path("default")
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.bfloat16).eval()


def test_reference_bf16_greedy_matches_transformers_bf16(default_model, hf_bf16):
    """bf16 on CPU, each prompt alone (prefill, then one token per step) as transformers
    runs it: every token equals transformers' bf16 greedy token. (The fast torch path rounded
    differently through bf16-rounded rotary frequencies, now float32 in both modes, and
    3-D SDPA inputs; on a 2-core x86 CPU it left transformers' tokens at tokens 10-46 of 6
    of these 8 prompts.)"""
    engine = Engine(loaded=default_model, dtype="bfloat16", page_size=16, num_pages=512,
                    numerics="reference")
    net = engine.runner.model
    assert net.lm_head.weight.dtype == torch.bfloat16
    assert net._rope_inv_freq(torch.device("cpu")).dtype == torch.float32
    params = SamplingParams(max_tokens=BF16_TOKENS, temperature=0, ignore_eos=True)
    for q in QUESTIONS:
        ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": q}])
        got = engine.generate(prompt_token_ids=ids, params=params)[0].token_ids
        assert got == hf_greedy(hf_bf16, ids, BF16_TOKENS), q
    assert engine.stats()["used_pages"] == 0


def test_rotary_frequencies_stay_float32_at_bf16(default_model):
    """Both modes: casting the model to bf16 leaves the rotary frequencies float32 (a bf16
    inv_freq puts SmolLM2's angles at position 4000 off by up to 5.6 radians)."""
    from pdmesh.runtime.model import rope_inv_freq

    cfg = default_model.config
    net = CausalLM(cfg).to(torch.bfloat16)
    want = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    for on in (False, True):
        net.set_reference_numerics(on)
        got = net._rope_inv_freq(torch.device("cpu"))
        assert got.dtype == torch.float32 and torch.equal(got, want)
