"""`pdmesh serve --gpus`: which GPUs each worker sees (CUDA_VISIBLE_DEVICES), and a bad
list refused before any child starts."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pdmesh.commands.serve import gpu_assignment


def test_workers_take_the_next_ids_in_start_order():
    # 1P1D on two GPUs: prefill on 0, decode on 1
    assert gpu_assignment("0,1", [1, 1]) == ["0", "1"]
    # a TP 2 prefill takes both, the TP 1 decode wraps around to the first
    assert gpu_assignment("0,1", [2, 1]) == ["0,1", "0"]
    # more workers than GPUs: they share, round robin
    assert gpu_assignment("2,3", [1, 1, 1]) == ["2", "3", "2"]
    assert gpu_assignment(None, [1, 2]) == [None, None]


@pytest.mark.parametrize("gpus,tps,why", [("", [1], "comma-separated"),
                                          ("0,x", [1], "comma-separated"),
                                          ("0", [2], "needs 2 GPUs")])
def test_a_bad_list_is_refused(gpus, tps, why):
    with pytest.raises(ValueError, match=why):
        gpu_assignment(gpus, tps)


def test_serve_refuses_a_bad_list_before_starting_anything():
    r = subprocess.run([sys.executable, "-m", "pdmesh.cli", "serve", "--colocated", "1",
                        "--prefill", "0", "--decode", "0", "--tp", "2", "--gpus", "0",
                        "--port", "0", "--grpc-port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "--gpus lists 1" in r.stderr and "Traceback" not in r.stderr
    assert "listening" not in r.stdout
