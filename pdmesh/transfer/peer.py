"""A KV pool served by a child process, for tests and benchmarks of a transport.

The child builds a transport, allocates a pool filled with a sentinel byte, registers it
and then answers requests over a multiprocessing Pipe. Page contents are compared by
digest so that checking a large pool costs a few bytes on the pipe, not the pool.

    peer = PoolPeer.start(num_pages=64, page_shape=(4096,))
    transport.write_pages(peer.session_id, src_base, peer.base, peer.bytes_per_page, ...)
    assert peer.digests() == expected
    peer.stop()
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
from dataclasses import dataclass
from typing import Any, Sequence

SENTINEL = 0xA5  # what every byte of a fresh pool holds


def page_digest(page_bytes: bytes) -> str:
    """Short digest of one page's bytes (the same on both sides of the pipe)."""
    return hashlib.blake2b(page_bytes, digest_size=16).hexdigest()


def tensor_page_digests(pool: Any) -> list[str]:
    """Digest of every page of a [num_pages, ...] contiguous tensor."""
    import torch

    raw = pool.contiguous().view(torch.uint8).reshape(pool.shape[0], -1)
    return [page_digest(raw[p].numpy().tobytes()) for p in range(pool.shape[0])]


def make_pool(num_pages: int, page_shape: Sequence[int], dtype: str = "float32",
              fill: int | None = SENTINEL, seed: int | None = None) -> Any:
    """A [num_pages, *page_shape] tensor, every byte `fill`, or random bytes from `seed`."""
    import torch

    pool = torch.empty(num_pages, *page_shape, dtype=getattr(torch, dtype))
    raw = pool.view(torch.uint8)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
    else:
        raw.fill_(fill)
    return pool


def _serve(conn: Any, transport: str, kwargs: dict, num_pages: int, page_shape: tuple,
           dtype: str) -> None:
    # Child process body: requests are (op, *args); every request gets one reply.
    import torch

    from pdmesh.transfer import get_transport

    t = get_transport(transport)(**kwargs)
    pool = make_pool(num_pages, page_shape, dtype)
    base = t.register(pool)
    conn.send(("ready", t.session_id, base, pool[0].numel() * pool.element_size()))
    while True:
        op, *args = conn.recv()
        if op == "digests":
            conn.send(tensor_page_digests(pool))
        elif op == "reset":
            pool.view(torch.uint8).fill_(SENTINEL)
            conn.send("ok")
        elif op == "stop":
            t.close()
            conn.send("stopped")
            return


@dataclass
class PoolPeer:
    """Handle on a child process serving a registered pool."""

    process: Any
    conn: Any
    session_id: str
    base: int
    bytes_per_page: int
    num_pages: int

    @classmethod
    def start(cls, num_pages: int, page_shape: Sequence[int], dtype: str = "float32",
              transport: str = "mooncake", timeout: float = 60.0, **kwargs: Any) -> "PoolPeer":
        """Spawn the child and wait until its pool is registered."""
        ctx = mp.get_context("spawn")  # no fork: the parent may hold engine threads
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, daemon=True,
                           args=(child, transport, kwargs, num_pages, tuple(page_shape), dtype))
        proc.start()
        if not parent.poll(timeout):
            proc.kill()
            raise TimeoutError(f"pool peer did not start within {timeout} s")
        _, session, base, bpp = parent.recv()
        return cls(proc, parent, session, base, bpp, num_pages)

    def _ask(self, *request: Any, timeout: float = 60.0) -> Any:
        self.conn.send(request)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"pool peer did not answer {request[0]!r} within {timeout} s")
        return self.conn.recv()

    def digests(self) -> list[str]:
        """Digest of each of the child's pages, in page order."""
        return self._ask("digests")

    def reset(self) -> None:
        """Refill the child's pool with the sentinel."""
        self._ask("reset")

    def stop(self) -> None:
        """Close the child's transport and end the process."""
        if self.process.is_alive():
            try:
                self._ask("stop", timeout=30.0)
            except (TimeoutError, EOFError, BrokenPipeError):
                pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
