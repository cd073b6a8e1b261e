"""GPU runtime benchmark: decode step time and prefill throughput against the hardware's
floors and against Hugging Face transformers on the same GPU.

    python benchmarks/gpu_runtime.py                      # SmolLM2-135M + Llama-3-8B shape
    python benchmarks/gpu_runtime.py --models smollm2 --no-hf --out table.md

Floors come from ceilings measured in the same run: HBM bandwidth (a large device copy,
bytes read + written) and the bf16 matmul rate (8192^3 products). A decode step must read
every weight once plus the batch's KV; its floor is max(bytes / bandwidth, FLOPs / rate).
A prefill's floor is its FLOPs over the matmul rate. The Llama-3-8B-shaped model has
random bf16 weights; SmolLM2 uses the real default model when it can be loaded.
Decode steps are timed as the engine runs them: host-side batch prep, CUDA-graph replay
and the sampler's one host sync (argmax + .tolist()) per step. Decode points of at most
4 sequences are timed a second time with the fused small-batch GEMVs off (graphs captured
again), side by side in the same run: the "fused GEMV off" rows.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import time
import traceback

import torch

from pdmesh.config import ModelConfig
from pdmesh.runtime.attention import SeqSpan
from pdmesh.runtime.cuda_graph import DecodeGraphs
from pdmesh.runtime.model import CausalLM
from pdmesh.runtime.model_runner import ModelRunner

LLAMA8B = ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192)
SMOLLM2 = ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                      rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                      tie_word_embeddings=True)
PAGE = 16


def ceilings(dev: torch.device) -> tuple[float, float]:
    """(HBM bytes/s from a 4 GiB device copy, bf16 matmul FLOP/s at 8192^3)."""
    a = torch.empty(1 << 31, dtype=torch.int16, device=dev).random_()
    b = torch.empty_like(a)
    t = gpu_time(lambda: b.copy_(a), 10)
    bw = 2 * a.numel() * 2 / t
    del a, b
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    rate = 2 * 8192 ** 3 / gpu_time(lambda: x @ y, 20)
    return bw, rate


def gpu_time(fn, n: int, warmup: int = 3) -> float:
    """Median seconds of fn() on the GPU (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times)


def build_model(name: str, dev: torch.device) -> tuple[CausalLM, str]:
    """(model in bf16 on dev, weights description)."""
    if name == "smollm2":
        from pdmesh.runtime.loader import load_model

        try:
            lm = load_model("default")
        except FileNotFoundError as e:
            print(f"default model not loadable ({e}); SmolLM2 shape with random weights")
        else:
            net = CausalLM(lm.config)
            net.load_hf_weights(lm.weights)
            return net.to(device=dev, dtype=torch.bfloat16).eval(), "SmolLM2-135M-Instruct"
    torch.manual_seed(0)
    with torch.device(dev):
        torch.set_default_dtype(torch.bfloat16)
        try:
            net = CausalLM(LLAMA8B if name == "llama8b" else SMOLLM2)
        finally:
            torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    if net.cfg.tie_word_embeddings:
        net.lm_head.weight = net.model.embed_tokens.weight
    return net.eval(), "random bf16 weights"


def weight_bytes(net: CausalLM) -> int:
    """Bytes a decode step reads: every parameter except the embedding table (only B rows
    are gathered) unless the lm_head shares it."""
    seen, total = set(), 0
    for name, p in net.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if name == "model.embed_tokens.weight" and not net.cfg.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def matmul_params(c: ModelConfig) -> int:
    per_layer = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim \
        + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    return c.num_layers * per_layer


def kv_bytes_per_token(c: ModelConfig) -> int:
    return c.num_layers * 2 * c.num_kv_heads * c.head_dim * 2


def decode_step_time(runner: ModelRunner, b: int, ctx: int, steps: int) -> float:
    """Median wall seconds of a decode step for b sequences of ctx tokens (distinct pages)."""
    per = -(-(ctx + steps + 8) // PAGE)
    perm = torch.randperm(runner.kv.shape[0])[: b * per].view(b, per)
    pages = perm.tolist()
    ids = [int(x) for x in torch.randint(0, runner.model.cfg.vocab_size, (b,))]
    times = []
    for step in range(steps + 5):
        t0 = time.perf_counter()
        logits = runner.graphs.run(ids, pages, [ctx + step] * b)
        ids = logits.argmax(-1).tolist()  # the engine's one host sync per step
        times.append(time.perf_counter() - t0)
    return statistics.median(times[5:])


def without_fused_gemv(runner: ModelRunner) -> None:
    """Capture the decode graphs again with the small-batch fused GEMVs off."""
    sizes, ctx = runner.graphs.sizes, runner.graphs.max_context
    runner.graphs = None  # free the old graphs' pool first
    torch.cuda.empty_cache()
    runner.fused.small_rows = 0
    runner.graphs = DecodeGraphs(runner._forward_logits, sizes, ctx, PAGE,
                                 runner.model.cfg.vocab_size, runner.device)


def prefill_time(runner: ModelRunner, n: int) -> float:
    """Median seconds to prefill one n-token prompt (KV stored, last token's logits)."""
    pages = torch.arange(-(-n // PAGE))
    meta = runner.attn_cls.build_metadata([SeqSpan(0, n, n, pages)], PAGE, runner.device)
    ids = torch.randint(0, runner.model.cfg.vocab_size, (n,), device=runner.device)
    pos = torch.arange(n, device=runner.device)
    return gpu_time(lambda: runner.model.logits(runner.fused(ids, pos, runner.kv, meta)[-1:]), 5)


def hf_model(c: ModelConfig, dev: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                     intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                     num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                     head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
                     rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings)
    hc._attn_implementation = "sdpa"
    with torch.device(dev):
        torch.set_default_dtype(torch.bfloat16)
        try:
            m = LlamaForCausalLM(hc)
        finally:
            torch.set_default_dtype(torch.float32)
    return m.eval(), hc


def hf_decode_time(m, hc, b: int, ctx: int, steps: int) -> float:
    """Median seconds of one HF decode forward (static cache of random KV, eager)."""
    from transformers import StaticCache

    dev = next(m.parameters()).device
    cache = StaticCache(config=hc, max_cache_len=ctx + steps + 8)
    ids = torch.randint(0, hc.vocab_size, (b, 1), device=dev)
    times = []
    with torch.inference_mode():
        m(ids, past_key_values=cache, cache_position=torch.tensor([0], device=dev),
          use_cache=True, logits_to_keep=1)
        for layer in cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
        for step in range(steps + 3):
            p = ctx + step
            t0 = time.perf_counter()
            out = m(ids, past_key_values=cache, cache_position=torch.tensor([p], device=dev),
                    position_ids=torch.full((b, 1), p, device=dev), use_cache=True,
                    logits_to_keep=1)
            ids = out.logits[:, -1].argmax(-1, keepdim=True)
            ids.tolist()
            times.append(time.perf_counter() - t0)
    del cache
    return statistics.median(times[3:])


def hf_prefill_time(m, hc, n: int) -> float:
    dev = next(m.parameters()).device
    ids = torch.randint(0, hc.vocab_size, (1, n), device=dev)
    with torch.inference_mode():
        return gpu_time(lambda: m(ids, use_cache=False, logits_to_keep=1), 5)


def bench_model(name: str, args, dev, bw: float, rate: float) -> list[list[str]]:
    net, weights = build_model(name, dev)
    c = net.cfg
    wb, mp = weight_bytes(net), matmul_params(c)
    max_b, max_ctx = max(args.batches), max(args.contexts) + args.steps + 16
    pages = max_b * -(-max_ctx // PAGE) + 8
    runner = ModelRunner(net, pages, PAGE, torch.bfloat16, str(dev), attention_backend="triton",
                         cuda_graphs=True, graph_batch_sizes=args.batches,
                         graph_max_context=max_ctx, max_batch=max_b)
    runner.kv.normal_()
    print(f"{name}: {weights}; {wb / 1e9:.2f} GB of weights read per step; KV pool "
          f"{runner.kv.numel() * 2 / 1e9:.1f} GB; decode linears, speedup of the chosen "
          f"kernel over cuBLAS by shape@rows: {runner.linear_speedups}", flush=True)
    ours: dict[tuple, float] = {}
    for b in args.batches:
        for ctx in args.contexts:
            ours[("decode", b, ctx)] = decode_step_time(runner, b, ctx, args.steps)
            print(f"  decode b={b} ctx={ctx}: {ours[('decode', b, ctx)] * 1e3:.3f} ms", flush=True)
    small = [k for k in ours if k[1] <= runner.fused.small_rows]
    if small:  # the A/B: the same points with the fused GEMVs off
        without_fused_gemv(runner)
        for _, b, ctx in small:
            ours[("decode-unfused", b, ctx)] = decode_step_time(runner, b, ctx, args.steps)
            print(f"  decode b={b} ctx={ctx}, fused GEMV off: "
                  f"{ours[('decode-unfused', b, ctx)] * 1e3:.3f} ms", flush=True)
    for n in args.prefill:
        ours[("prefill", 1, n)] = prefill_time(runner, n)
        print(f"  prefill {n}: {ours[('prefill', 1, n)] * 1e3:.2f} ms", flush=True)
    del runner, net
    gc.collect()
    torch.cuda.empty_cache()
    theirs: dict[tuple, float] = {}
    if not args.no_hf:
        m, hc = hf_model(c, dev)
        for key in ours:
            if key[0] == "decode-unfused":
                continue
            try:
                theirs[key] = (hf_decode_time(m, hc, key[1], key[2], args.steps)
                               if key[0] == "decode" else hf_prefill_time(m, hc, key[2]))
            except torch.OutOfMemoryError:
                theirs[key] = float("nan")
            gc.collect()
            torch.cuda.empty_cache()
            print(f"  transformers {key}: {theirs[key] * 1e3:.2f} ms", flush=True)
        del m
        gc.collect()
        torch.cuda.empty_cache()
    rows = []
    for (phase, b, n), t in ours.items():
        hf = theirs.get((phase, b, n), float("nan"))
        if phase.startswith("decode"):
            attn = 4 * b * n * c.num_heads * c.head_dim * c.num_layers
            fl = 2 * b * (mp + c.vocab_size * c.hidden_size) + attn
            floor = max((wb + b * n * kv_bytes_per_token(c)) / bw, fl / rate)
            what = "decode ms/step" + (" (fused GEMV off)" if phase != "decode" else "")
            rows.append([name, what, str(b), str(n), f"{t * 1e3:.3f}",
                         f"{floor * 1e3:.3f}", f"{t / floor:.2f}x",
                         *_theirs(hf, f"{hf * 1e3:.2f}", t)])
        else:
            attn = 2 * n * n * c.num_heads * c.head_dim * c.num_layers  # causal half of 4 n^2
            fl = 2 * n * mp + 2 * c.vocab_size * c.hidden_size + attn
            rows.append([name, "prefill tok/s", "1", str(n), f"{n / t:,.0f}",
                         f"{n / (fl / rate):,.0f}", f"{fl / t / rate:.0%} of matmul",
                         *_theirs(hf, f"{n / hf:,.0f}" if hf == hf else "", t)])
    return rows


def _theirs(hf: float, shown: str, t: float) -> list[str]:
    """The transformers columns; "-" when it was not run (--no-hf) or failed."""
    return [shown, f"{hf / t:.1f}x"] if hf == hf else ["-", "-"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,llama8b")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--contexts", default="512,4096")
    p.add_argument("--prefill", default="512,4096")
    p.add_argument("--steps", type=int, default=30, help="timed decode steps per point")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    for f in ("batches", "contexts", "prefill"):
        setattr(args, f, [int(x) for x in getattr(args, f).split(",") if x])
    dev = torch.device("cuda")
    bw, rate = ceilings(dev)
    gpu = torch.cuda.get_device_name(dev)
    head = (f"{gpu}, {datetime.date.today()}, torch {torch.__version__}; measured HBM "
            f"{bw / 1e12:.2f} TB/s (device copy), bf16 matmul {rate / 1e12:.0f} TFLOP/s (8192^3)")
    print(head, flush=True)
    rows = []
    for name in args.models.split(","):
        try:
            rows += bench_model(name, args, dev, bw, rate)
        except Exception:  # report what failed, keep the other model's figures
            traceback.print_exc()
        gc.collect()
        torch.cuda.empty_cache()
    cols = ["model", "figure", "batch", "ctx / tokens", "pdmesh", "floor", "vs floor",
            "transformers", "pdmesh speedup"]
    table = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    print(f"\n{head}\n\n{table}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{head}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
