"""`pdmesh bench` end to end: the real CLI against a `pdmesh serve` 1P1D mesh (real workers,
Mooncake over tcp), then `--compare` of two result files; plus CLI input validation."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from mesh_procs import worker_env
from pdmesh.bench.report import load_results
from pdmesh.cli import main
from test_serve import chat_when_routable, start_serve

OUT_LEN = 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdmesh.cli", "bench", *args], text=True,
                          capture_output=True, env=worker_env(), timeout=300)


def test_bench_against_a_1p1d_mesh(tmp_path):
    import openai

    proc, base, lines = start_serve("--worker-arg=--kv-cache-bytes=50000000")
    try:
        chat_when_routable(openai.OpenAI(base_url=base, api_key="unused"), model="default",
                           messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        out = tmp_path / "1p1d.json"
        res = bench("--base-url", base, "--input-len", "16", "24", "--output-len", str(OUT_LEN),
                    "--parallel", "1", "3", "--number", "2", "4", "--request-rate", "5",
                    "--max-concurrency", "2", "--number", "2", "4", "3", "--label", "1P1D",
                    "--slo-ttft", "60", "--output", str(out), "--plot-dir", str(tmp_path / "p"))
        chat = bench("--base-url", base, "--backend", "chat", "--input-len", "16",
                     "--output-len", "4", "--parallel", "2", "--number", "2", "--warmup", "0",
                     "--label", "chat", "--output", str(tmp_path / "chat.json"), "--no-progress")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)
    assert res.returncode == 0, res.stdout + res.stderr
    assert chat.returncode == 0, chat.stdout + chat.stderr

    runs, config = load_results(out.read_text())
    assert config["model"] == "default" and config["output_len"] == [OUT_LEN]
    assert [(s.concurrency, s.request_rate, s.number) for s in runs] == [
        (1, None, 2), (3, None, 4), (2, 5.0, 3)]
    for s in runs:
        assert (s.completed, s.failed, s.label) == (s.number, 0, "1P1D")
        assert s.total_output_tokens == OUT_LEN * s.number  # ignore_eos: exactly max_tokens
        assert s.ttft.mean > 0 and s.tpot.mean > 0 and s.itl.mean > 0
        assert s.e2e.mean > s.ttft.mean and s.output_tok_s > 0
        assert 16 <= s.total_input_tokens / s.number <= 48  # usage prompt_tokens
        assert s.goodput_req_s == pytest.approx(s.req_s) and s.slo_attainment == 1.0
    table = res.stdout[res.stdout.index("label  concurrency"):].splitlines()
    assert "output tok/s" in table[0] and "P99 TTFT s" in table[0]
    assert [row.split()[1] for row in table[2:5]] == ["1", "3", "rate=5,c=2"]
    assert all(row.split()[-1] == "0" for row in table[2:5])
    for name in ("ttft", "throughput", "tpot"):
        assert (tmp_path / "p" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC

    (chat_run,), _ = load_results((tmp_path / "chat.json").read_text())
    assert (chat_run.completed, chat_run.total_output_tokens) == (2, 8)

    cmp = bench("--compare", str(out), str(tmp_path / "chat.json"), "--markdown",
                "--plot-dir", str(tmp_path / "cmp"))
    assert cmp.returncode == 0, cmp.stderr
    assert cmp.stdout.count("| 1P1D |") == 3 and cmp.stdout.count("| chat |") == 1
    assert (tmp_path / "cmp" / "ttft.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("args, message", [
    (["--parallel", "2", "--number", "1", "2"], "--number takes one value"),
    (["--input-len", "9", "3", "--parallel", "1"], "--input-len takes N or MIN MAX"),
    (["--output-len", "0", "--parallel", "1"], "--output-len takes N or MIN MAX"),
    ([], "give --parallel"),
    (["--parallel", "0"], "must be positive"),
    (["--compare", "/nonexistent.json"], "--compare /nonexistent.json"),
])
def test_bad_input_exits_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unreachable_endpoint_is_a_clear_error(capsys):
    rc = main(["bench", "--base-url", "http://127.0.0.1:9/v1", "--parallel", "1"])
    assert rc == 1 and "127.0.0.1:9" in capsys.readouterr().err
