"""`pdmesh bench` and sglang bench_serving 0.5.2 measure the same numbers on a paced server.

The scripted server (tests/test_bench_loadgen.py, paced mode) streams one chunk per
requested token on a fixed schedule, so any difference between the two clients is a
difference in measurement, not server noise. (Against a real mesh: benchmarks/bench_vs_sglang.sh.)
"""
from __future__ import annotations

import asyncio
import json
import sys

import pytest

from pdmesh.bench.loadgen import ClientConfig, run_fixed
from pdmesh.bench.workload import Workload, WorkloadSpec
from test_bench_loadgen import FIRST, GAP, serving

IN, OUT, CONC, NUM = 16, 5, 2, 8


def test_same_numbers_as_bench_serving(smollm2_tokenizer_dir, tmp_path):
    out = tmp_path / "sgl.jsonl"

    async def go(url, server):
        root = url.removesuffix("/v1")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang-oai",
            "--base-url", root, "--dataset-name", "random-ids", "--random-input-len", str(IN),
            "--random-output-len", str(OUT), "--random-range-ratio", "1", "--num-prompts",
            str(NUM), "--max-concurrency", str(CONC), "--model", "m", "--tokenizer",
            str(smollm2_tokenizer_dir), "--disable-tqdm", "--output-file", str(out),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        log = (await proc.communicate())[0].decode()
        assert proc.returncode == 0, log
        sgl_prompts = [b["prompt"] for b in server.bodies[1:]]  # after its warm-up
        del server.bodies[:]
        work = Workload.load(WorkloadSpec((IN, IN), (OUT, OUT), str(smollm2_tokenizer_dir)))
        ours, _ = await run_fixed(ClientConfig(url, model="m"), work, CONC, NUM,
                                  warmup_requests=1, progress=False)
        return ours, sgl_prompts, [b["prompt"] for b in server.bodies[1:]]

    ours, sgl_prompts, our_prompts = asyncio.run(serving(go, paced=True))
    theirs = json.loads(out.read_text().splitlines()[0])
    assert sorted(our_prompts) == sorted(sgl_prompts)  # the very same workload
    assert ours.completed == theirs["completed"] == NUM
    assert ours.total_output_tokens == theirs["total_output_tokens"] == NUM * OUT
    assert ours.ttft.mean == pytest.approx(theirs["mean_ttft_ms"] / 1e3, rel=0.05)
    assert ours.ttft.mean == pytest.approx(FIRST, rel=0.15)
    assert ours.tpot.mean == pytest.approx(theirs["mean_tpot_ms"] / 1e3, rel=0.05)
    assert ours.tpot.mean == pytest.approx(GAP, rel=0.15)
    assert ours.itl.mean == pytest.approx(theirs["mean_itl_ms"] / 1e3, rel=0.05)
    # rates divide by each tool's own wall time, which holds its client's gaps between
    # requests: on a loaded 2-core CI run 8% apart with every per-request mean within 5%
    assert ours.output_tok_s == pytest.approx(theirs["output_throughput"], rel=0.15)
    assert ours.req_s == pytest.approx(theirs["request_throughput"], rel=0.15)
