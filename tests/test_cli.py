"""The `pdmesh` console script, run as a real subprocess."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pdmesh import Engine, SamplingParams

PDMESH = [str(Path(sys.executable).parent / "pdmesh")]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(PDMESH + list(args), capture_output=True, text=True, timeout=300)


def test_generate_json_greedy_chat_matches_engine(default_model):
    res = run("generate", "--model", "default", "--prompt", "What is 2+2?", "--chat",
              "--max-tokens", "12", "--temperature", "0", "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    want = Engine(loaded=default_model, num_pages=64).generate(
        messages=[{"role": "user", "content": "What is 2+2?"}],
        params=SamplingParams(max_tokens=12, temperature=0))[0]
    assert got == {"text": want.text, "token_ids": want.token_ids,
                   "finish_reason": want.finish_reason}


def test_generate_seeded_sampling_is_reproducible():
    args = ("generate", "--prompt", "Once upon a time", "--max-tokens", "8",
            "--temperature", "1.0", "--seed", "7", "--ignore-eos", "--json")
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]
    assert len(json.loads(a.stdout)["token_ids"]) == 8


def test_generate_bad_model_path_is_a_clear_error(tmp_path):
    res = run("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert res.returncode == 2
    assert "does not exist" in res.stderr and "nope" in res.stderr


def test_generate_bad_sampling_value_is_a_clear_error():
    res = run("generate", "--prompt", "hi", "--temperature", "-1")
    assert res.returncode == 2 and "temperature" in res.stderr
