"""A checksum of a room's KV pages, to catch silent corruption on the way to a decode.

`pages_checksum(pool, pages)` digests pool[pages[0]], pool[pages[1]], ... in that order:
it depends on the pages' bytes and their order in the list, never on the page ids, so
the prefill's source pages and the decode's destination pages (other ids, maybe another
pool layout of the same bytes) give the same value when the KV arrived intact. `pool` is
page-major: [num_pages, ...] of any dtype (the bytes are what counts), or a uint8
[n, bytes_per_page] read back from a peer.

Three algorithms; the writer picks one by where its pool lives, sends its name with the
value, and the verifier computes that one, wherever its own pages are:

- "xxh3" (CPU pools, the default since 2026-11-30): XXH3-64 (PyPI `xxhash`) streamed over
  the pages' bytes in order, runs of consecutive pages as one buffer (the value is that
  of the concatenated bytes, however they are cut). ~80 GB/s on cached data, ~14 GB/s
  from DRAM on the dev machine, 9-12x zlib's crc32 (benchmarks/checksum_speed.py);
  `xxh3_64.update` releases the GIL. A 64-bit hash: any change, flipped bits, swapped,
  stale, zeroed or missing pages, goes unseen with probability about 2^-64. Not a MAC.
- "crc32" (CPU pools before 2026-11-30; still verified, so a new decode checks an older
  prefill's KV): zlib.crc32 chained page to page, releases the GIL on big buffers.
  Catches every burst error up to 32 bits and, with probability 1 - 2^-32, the rest.
  PDMESH_KV_CHECKSUM_ALGO=crc32 makes a CPU writer name it (A/B runs; a mesh whose
  decodes are older than their prefills: an older decode knows crc32 and wsum64 only).
- "wsum64" (GPU pools): on the device, each page viewed as int32 words x, its sum
  s = sum_j x_j * w_j with a fixed pseudo-random odd weight per word, then
  sum_i s_i * m_i with a fixed odd multiplier per position in the list, all mod 2^64.
  Integer adds commute mod 2^64, so the value is exact and the same on any device.
  Catches every single-bit flip (an odd weight times 2^k is never 0 mod 2^64), swapped
  pages (different multipliers) and stale or zeroed pages, unless the changes cancel
  exactly mod 2^64 (random corruption: about 2^-64). Not a defence against an adversary
  who knows the weights: it is an integrity check, not a MAC.
Pages whose size is not a multiple of 4 bytes use the CPU algorithm.

Where it runs: never on an event loop or the engine-loop thread. The prefill's source
digest and the decode's check run on KV threads (asyncio.to_thread in the RPC process;
the engine core process's "kv" pool with --engine-process), the byte hashes with the
GIL released. On a GPU the digest's kernels go on a non-blocking side stream and the
caller sleeps until that stream's event completes (polled), never waiting for the
engine's steps.
"""
from __future__ import annotations

import functools
import os
import time
import zlib
from typing import Any, Iterator, Sequence

import torch
import xxhash

from pdmesh.transfer.plan import page_runs

XXH3, CRC32, WSUM64 = "xxh3", "crc32", "wsum64"
ALGOS = (XXH3, CRC32, WSUM64)
# what a writer with a CPU pool names (the module doc: crc32 for an A/B or older decodes)
CPU_ALGO = os.environ.get("PDMESH_KV_CHECKSUM_ALGO", XXH3)
if CPU_ALGO not in (XXH3, CRC32):
    raise ValueError(f"PDMESH_KV_CHECKSUM_ALGO must be {XXH3} or {CRC32}, got {CPU_ALGO!r}")
_MASK = (1 << 64) - 1
_SEED = 0x5EED_C0DE
_CHUNK_WORDS = 16 << 20  # int64 words per wsum64 temporary (128 MiB)
_POLL_S = 50e-6  # between polls of a GPU digest's completion (Linux sleeps >= ~60 us)
_weights: dict[tuple[int, str], torch.Tensor] = {}  # (words per page, device) -> int64


def algo_for(pool: Any) -> str:
    """The algorithm a writer with this pool uses: wsum64 on a GPU, CPU_ALGO (xxh3)
    elsewhere."""
    words_ok = _page_bytes(pool) % 4 == 0
    return WSUM64 if pool.device.type == "cuda" and words_ok else CPU_ALGO


def pages_checksum(pool: Any, pages: Sequence[int], algo: str | None = None) -> int:
    """The checksum (unsigned 64-bit int) of pool[pages] in list order; `algo` defaults
    to `algo_for(pool)`. Blocks (run it off the event loop); reads the pages only.
    Raises IndexError for a page outside the pool."""
    algo = algo or algo_for(pool)
    n = pool.shape[0]
    for p in pages:  # a negative id would index from the end: never a room's page
        if not 0 <= p < n:
            raise IndexError(f"page {p} is outside the pool's {n} pages")
    if algo == XXH3:
        h = xxhash.xxh3_64()
        for run in _byte_runs(pool, pages):
            h.update(run)  # releases the GIL
        return h.intdigest()
    if algo == CRC32:
        crc = 0
        for run in _byte_runs(pool, pages):
            crc = zlib.crc32(run, crc)  # chained: the crc of the concatenated runs
        return crc
    if algo == WSUM64:
        return _wsum64(pool, pages)
    raise ValueError(f"unknown KV checksum algorithm {algo!r} (known: {', '.join(ALGOS)})")


def warm_up(pool: Any) -> None:
    """Digest a run of consecutive pages and a scattered list once, at start-up, so that
    no request pays for either path's first use (the gather in `_chunked`, lazily loaded
    kernels). Aimed at a 300-400 ms first digest inside a served request on an H200
    (every later one ~1 ms). The first digest on each new thread is slow as well: an
    engine process runs this on every KV thread at start (core_process.py). Reads
    pages 0 and 1 only; a no-op off a GPU."""
    if pool.device.type != "cuda" or pool.shape[0] < 2 or algo_for(pool) != WSUM64:
        return
    pages_checksum(pool, [0, 1])
    pages_checksum(pool, [1, 0])


def _page_bytes(pool: Any) -> int:
    return pool[0].numel() * pool.element_size() if pool.shape[0] else 0


def _byte_runs(pool: Any, pages: Sequence[int]) -> Iterator[memoryview]:
    """The pages' bytes in list order, consecutive ids as one buffer. A contiguous CPU
    pool is sliced in place (no copy, no per-page tensor); otherwise page by page, a
    GPU pool's pages copied to the host (a GPU verifier of a CPU writer's KV)."""
    if pool.device.type != "cpu" or not pool.is_contiguous():
        for p in pages:
            yield _byte_view(pool[p].cpu())
        return
    b = _page_bytes(pool)
    flat = _byte_view(pool)  # the whole pool, [num_pages * b] bytes: a view
    for first, count in page_runs(pages):
        yield flat[first * b:(first + count) * b]


def _byte_view(t: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes, flat, without a copy when it is contiguous."""
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def _wsum64(pool: Any, pages: Sequence[int]) -> int:
    if not pages:
        return 0
    if pool.device.type != "cuda":
        w, m = _tables(pool, pages)
        return int(_per_page(pool, pages, w, m).item()) & _MASK
    # a stream of its own: the digest neither queues behind the engine's forward steps
    # nor makes them wait (a non-blocking stream: no implicit sync with the default
    # one), and its wait is for its own kernels only. The pages' writers synchronized
    # before anyone asks for a digest (a room's prefill has sampled its token; a
    # transfer returns once its copy is done). The tables too are made on this stream:
    # a first upload on the engine's stream would wait for its queued steps.
    with torch.cuda.stream(_side_stream(pool.device)):
        w, m = _tables(pool, pages)
        total = _chunked(pool, pages, w, m)
        host = torch.empty((), dtype=torch.int64, pin_memory=True)
        host.copy_(total, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    _wait(done)
    return int(host.item()) & _MASK


def _tables(pool: Any, pages: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-word weights and the per-position multipliers (swapped pages differ);
    int64 wraps mod 2^64: exact and associative, so any grouping gives one value."""
    return (_table(_page_bytes(pool) // 4, pool.device),
            _table(len(pages), pool.device, offset=1))


def _wait(done: Any) -> None:
    """Return once `done` (a recorded CUDA event) has completed, asleep between polls:
    not `.item()`'s blocking copy, whose driver wait spins a core for the digest's
    whole run (the digests were a fifth of an H200 engine core's py-spy samples at
    c=64), GIL released throughout either way. Adds at most one poll interval."""
    while not done.query():
        time.sleep(_POLL_S)


@functools.cache
def _side_stream(device: Any) -> Any:
    return torch.cuda.Stream(device=device)


def _per_page(pool: Any, pages: Sequence[int], w: torch.Tensor, m: torch.Tensor) -> Any:
    """One page at a time: no [n, words] temporary (on a CPU it stays in cache)."""
    total = torch.zeros((), dtype=torch.int64, device=pool.device)
    for i, p in enumerate(pages):
        x = pool[p].contiguous().view(torch.int32).reshape(-1).to(torch.int64)
        total += (x * w).sum() * m[i]
    return total


def _chunked(pool: Any, pages: Sequence[int], w: torch.Tensor, m: torch.Tensor) -> Any:
    """Pages in chunks of _CHUNK_WORDS int64 temporaries: a handful of device ops per
    chunk, not per page (benchmarks/checksum_speed.py times both on a GPU). A chunk of
    consecutive page ids is read in place; a scattered one is gathered first (a copy)."""
    dev = pool.device
    pages = list(pages)
    ids = torch.tensor(pages, dtype=torch.int64)
    if dev.type == "cuda":  # no pageable copy: that would wait for the whole device
        ids = ids.pin_memory().to(dev, non_blocking=True)
    flat = pool.reshape(pool.shape[0], -1)  # [num_pages, page elements]: a view
    total = torch.zeros((), dtype=torch.int64, device=dev)
    step = max(1, _CHUNK_WORDS // w.numel())
    for i in range(0, len(pages), step):
        run = pages[i:i + step]
        if run[-1] - run[0] == len(run) - 1 and run == list(range(run[0], run[-1] + 1)):
            x = flat[run[0]:run[-1] + 1]  # [c, page elements]: a view
        else:
            x = flat.index_select(0, ids[i:i + step])  # [c, page elements]: a copy
        x = x.view(torch.int32).to(torch.int64)    # [c, words]
        total += ((x * w).sum(1) * m[i:i + step]).sum()
    return total


def _table(n: int, device: Any, offset: int = 0) -> torch.Tensor:
    """n fixed odd pseudo-random int64 values (the same in every process)."""
    key = (n * 2 + offset, str(device))
    t = _weights.get(key)
    if t is None:
        g = torch.Generator().manual_seed(_SEED + offset)
        t = torch.randint(-(1 << 31), 1 << 31, (n,), generator=g, dtype=torch.int64) | 1
        t = _weights[key] = t.to(device)
    return t
