"""Tensor-parallel workers served end to end: `pdmesh serve` with --tp / --prefill-tp /
--decode-tp 2 (real processes: a worker's rank 0 in its engine, rank 1 a child process,
gloo on CPU; KV between workers by Mooncake tcp), the real `openai` client, on a tiny
random Llama with SmolLM2's tokenizer (4 heads, 2 KV heads: SmolLM2 itself has 9 heads,
which 2 does not divide), float32.

Colocated at TP 2, prefill TP 2 -> decode TP 1 and prefill TP 1 -> decode TP 2: greedy
chat equals the runtime alone (pdmesh's Engine, TP 1); a request moves exactly its
prompt's KV pages once (pdmesh_kv_transfer_bytes_total = pages x the logical page bytes,
every KV head once); every page is back on both workers afterwards (one allocator serves
all of a worker's ranks).
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time

import grpc
import openai
import pytest

from mesh_procs import (SERVE_TOKEN, chat_when_routable, metric, metrics_urls, pools_free,
                        start_serve, wait_until)
from pdmesh import Engine, SamplingParams, auth
from pdmesh.v1 import chaos_pb2 as cpb
from pdmesh.v1 import chaos_pb2_grpc as cgrpc
from pdmesh.v1 import prefill_pb2 as ppb
from pdmesh.v1 import prefill_pb2_grpc as pgrpc
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.v1 import registry_pb2_grpc as rgrpc
from tiny_models import write_tiny_hf_model

MESSAGES = [{"role": "user", "content": "Name three colours of the sea."}]
MAX_TOKENS = 12
# the tiny model's logical page: 2 layers x 16 tokens x K,V x 2 heads x 16 dims x 4 bytes
PAGE_BYTES = 2 * 16 * 2 * 2 * 16 * 4
POOL = f"--worker-arg=--kv-cache-bytes={128 * PAGE_BYTES}"
MESHES = {"colocated-tp2": ("--prefill", "0", "--decode", "0", "--colocated", "1", "--tp", "2"),
          # --chaos: the kill test holds a room's KV on the prefill by delaying its Transfer
          "prefill-tp2-decode-tp1": ("--prefill", "1", "--decode", "1", "--prefill-tp", "2",
                                     "--chaos"),
          "prefill-tp1-decode-tp2": ("--prefill", "1", "--decode", "1", "--decode-tp", "2")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model's folder (with tokenizer) and the runtime's own greedy answer."""
    folder = tmp_path_factory.mktemp("tiny_tp_serve")
    write_tiny_hf_model(folder, "llama", seed=3)
    want = Engine(model=str(folder), dtype="float32", num_pages=64).generate(
        messages=MESSAGES, params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                 ignore_eos=True))[0]
    return str(folder), want


# float32: exactness. One attempt per request: a failed prefill leg reaches the client
# (the kill test) instead of being retried on the restarted prefill.
ENV = {"PDMESH_DTYPE": "float32", "PDMESH_GATEWAY_RETRY_MAX_ATTEMPTS": "1"}


def serve(model: str, *layout: str):
    """`pdmesh serve` of `model` (ENV), and an openai client on it."""
    os.environ.update(ENV)  # start_serve passes our environment on
    try:
        proc, base, lines = start_serve("--model", model, *layout, POOL)
    finally:
        for k in ENV:
            del os.environ[k]
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    return proc, client, lines


def stop(proc, lines) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, "".join(lines[-40:])


def workers(lines, role: int) -> list[str]:
    """Addresses of the registry's `role` workers now (a restarted one has a new address)."""
    registry = re.search(r"ready — registry (\S+),", "".join(lines)).group(1)
    stub = rgrpc.RegistryStub(auth.insecure_channel(registry, token=SERVE_TOKEN))
    return [w.address for w in stub.ListWorkers(rpb.ListWorkersRequest(role=role),
                                                timeout=10).workers]


def pages_back(lines) -> bool:
    """Every pool fully free, no room left (one allocator serves all of a worker's ranks);
    False while a listed worker does not answer (one stopping after a kill)."""
    try:
        return _pages_back(lines)
    except grpc.RpcError:
        return False


def _pages_back(lines) -> bool:
    return pools_free(workers(lines, rpb.WORKER_ROLE_PREFILL),
                      workers(lines, rpb.WORKER_ROLE_DECODE)
                      + workers(lines, rpb.WORKER_ROLE_COLOCATED))


def chat(client, model: str, stream: bool = False):
    kw = dict(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
              extra_body={"ignore_eos": True})
    if not stream:
        return chat_when_routable(client, **kw)
    return "".join(c.choices[0].delta.content or ""
                   for c in client.chat.completions.create(stream=True, **kw) if c.choices)


@pytest.fixture(scope="module", params=list(MESHES))
def mesh(request, tiny):
    """One `pdmesh serve` per layout, shared by the tests of that layout."""
    proc, client, lines = serve(tiny[0], *MESHES[request.param])
    yield request.param, client, lines
    stop(proc, lines)


def test_greedy_chat_equals_runtime_alone_and_moves_the_kv_once(mesh, tiny):
    name, client, lines = mesh
    model, want = tiny
    assert sum("tensor-parallel ranks (tp 2)" in line for line in lines) == 1, "".join(lines)
    res = chat(client, model)
    assert res.choices[0].message.content == want.text
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (
        len(want.prompt_token_ids), MAX_TOKENS)
    urls = metrics_urls(lines)
    moved = sum(metric(u, "pdmesh_kv_transfer_bytes_total", path="mooncake")
                for n, u in urls.items() if n.startswith("prefill"))
    pages = -(-res.usage.prompt_tokens // 16)
    assert moved == (0 if name.startswith("colocated") else pages * PAGE_BYTES)
    assert chat(client, model, stream=True) == want.text  # prefix caches hit, too
    assert wait_until(lambda: pages_back(lines), 10)


def test_registry_announces_each_ranks_kv_heads(mesh):
    """A TP 2 worker's Register carries its logical layout plus each rank's KV heads, pool
    base and page bytes, which is what a peer writes by; a TP 1 worker has no ranks."""
    name, _, lines = mesh
    registry = re.search(r"ready — registry (\S+),", "".join(lines)).group(1)
    stub = rgrpc.RegistryStub(auth.insecure_channel(registry, token=SERVE_TOKEN))
    workers = stub.ListWorkers(rpb.ListWorkersRequest(), timeout=10).workers
    tp2 = {"colocated-tp2": rpb.WORKER_ROLE_COLOCATED,
           "prefill-tp2-decode-tp1": rpb.WORKER_ROLE_PREFILL,
           "prefill-tp1-decode-tp2": rpb.WORKER_ROLE_DECODE}[name]
    for w in workers:
        lay = w.kv_layout
        assert (lay.num_kv_heads, lay.bytes_per_page) == (2, PAGE_BYTES)  # logical
        if w.role != tp2:
            assert (lay.tp_size, len(lay.ranks)) == (1, 0)
            continue
        assert lay.tp_size == 2
        assert [(r.rank, r.kv_head_start, r.kv_head_end, r.bytes_per_page)
                for r in lay.ranks] == [(0, 0, 1, PAGE_BYTES // 2), (1, 1, 2, PAGE_BYTES // 2)]
        if w.role != rpb.WORKER_ROLE_COLOCATED:  # a pool the transfer engine reaches
            assert lay.ranks[0].kv_base_address == w.transfer.kv_base_address
            assert lay.ranks[1].kv_base_address not in (0, lay.ranks[0].kv_base_address)
            assert not w.transfer.local_endpoints  # whole-page paths cannot split heads


def followers(pid: int) -> list[int]:
    """Tensor-parallel follower ranks among `pid`'s descendants."""
    kids: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            with open(f"/proc/{p}/cmdline") as f:
                if "pdmesh.runtime.tp.follower" in f.read():
                    out.append(p)
        except OSError:
            pass
    return out


DELAY_S = 20.0  # the room's Transfer waits this long: far longer than the failure takes


@pytest.mark.parametrize("mesh", ["prefill-tp2-decode-tp1"], indirect=True)
def test_kill9_of_a_prefill_rank_holding_kv_fails_the_request_and_frees_every_page(mesh, tiny):
    """kill -9 of rank 1 of the TP 2 prefill while it holds a room's computed KV (the
    decode's Transfer for it held back by a chaos delay, the decode's pages held for it):
    the request fails at once with an error naming the dead rank, not after the delay
    or a timeout; every page comes back."""
    name, client, lines = mesh
    model, want = tiny
    (prefill,) = workers(lines, rpb.WORKER_ROLE_PREFILL)
    chaos = cgrpc.ChaosStub(auth.insecure_channel(prefill, token=SERVE_TOKEN))
    chaos.Inject(cpb.ChaosFault(rpc=cpb.RpcFault(
        method="Transfer", action=cpb.RPC_ACTION_DELAY, count=1, delay_s=DELAY_S)), timeout=10)
    result: dict = {}

    def ask() -> None:
        try:  # once: chat() retries a 503 until the mesh is routable
            result["ok"] = client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
        except openai.APIError as e:
            result["error"], result["at"] = e, time.monotonic()

    asker = threading.Thread(target=ask)
    asker.start()
    ps = pgrpc.PrefillStub(auth.insecure_channel(prefill, token=SERVE_TOKEN))

    def holding() -> bool:
        s = ps.Stats(ppb.PrefillStatsRequest(), timeout=10)
        return s.rooms == 1 and s.free_pages < s.total_pages  # computed, not yet written
    assert wait_until(holding, 30)
    assert not pages_back(lines)  # the decode holds the room's pages too
    (rank1,) = followers(os.getpid())
    killed = time.monotonic()
    os.kill(rank1, signal.SIGKILL)
    asker.join(DELAY_S + 30)
    assert "error" in result, result
    assert result["at"] - killed < DELAY_S  # not after the Transfer, nor a timeout
    err = result["error"]
    assert isinstance(err, openai.APIStatusError) and err.status_code == 503, err
    rid = re.search(r"Request id (req-[0-9a-f]+)", str(err)).group(1)  # the gateway's log:
    assert wait_until(lambda: any(rid in line and "tensor-parallel rank 1" in line
                                  and "exited with code -9" in line for line in lines), 10)
    assert wait_until(lambda: pages_back(lines), 30)
    # (that the supervisor restarts a dead worker and the mesh serves again is
    # test_serve_supervise's; here the ranks' failure and the pages are what is tested)
