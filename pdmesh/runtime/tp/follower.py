"""A follower rank of a worker's tensor-parallel group (ranks.py starts it).

`python -m pdmesh.runtime.tp.follower RANK PORT PARENT SPEC_JSON`: join the group whose
store rank 0 hosts on 127.0.0.1:PORT, load this rank's shards, allocate its KV pool in
shared memory and publish the pool's URI in the store (rank 0 maps it), then forward
rank 0's steps until it says stop. Dies with its parent (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


def main(argv: list[str]) -> int:
    rank, port, parent = (int(x) for x in argv[:3])
    _die_with_parent(parent)
    import torch
    import torch.distributed as dist

    from pdmesh.runtime.tp.comm import TIMEOUT, TPGroup
    from pdmesh.runtime.tp.launch import TPSpec, build_runner
    from pdmesh.runtime.tp.ranks import pool_key
    from pdmesh.transfer import shm

    spec = TPSpec(**json.loads(argv[3]))
    if spec.device == "cpu":
        torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // spec.tp))
    group = TPGroup.join(rank, spec.tp, port, spec.device)
    runner = build_runner(spec, group, kv_alloc=shm.alloc_pool)
    from pdmesh.transfer import cuda_ipc

    uri = shm.export_pool(runner.kv) or cuda_ipc.export_pool(runner.kv) or ""
    store = dist.TCPStore("127.0.0.1", port, spec.tp + 1, is_master=False, timeout=TIMEOUT)
    store.set(pool_key(rank), uri)
    try:
        runner.follow()
    finally:
        group.close()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # no interpreter teardown: extension modules' leak reports are noise
