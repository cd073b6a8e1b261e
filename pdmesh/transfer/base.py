"""The transport interface every KV data plane implements, and its error type.

A transport moves whole KV pages from this worker's registered pool straight into a
peer's registered pool (one-sided write; the peer's CPU is not involved). Pages are
`bytes_per_page` contiguous bytes at `base + page_id * bytes_per_page` on both sides,
which is what the page-major pool in pdmesh.runtime.model_runner guarantees.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Sequence


class TransferError(RuntimeError):
    """A transfer-engine call failed. `rc` is the engine's return code, `what` the call."""

    def __init__(self, rc: int, what: str) -> None:
        super().__init__(f"{what} failed (return code {rc})")
        self.rc, self.what = rc, what

    def __reduce__(self):  # rebuilt from (rc, what): it crosses the engine process's pipe
        return type(self), (self.rc, self.what)


@dataclass(frozen=True)
class TransferStats:
    """What one write_pages call moved: bytes, descriptors sent, wall seconds."""

    bytes: int
    descriptors: int
    seconds: float
    path: str = ""  # the route's name (pdmesh.transfer.route): shm, ipc, mooncake

    @property
    def gbps(self) -> float:
        """Throughput in GB/s (1e9 bytes), 0 for an empty or instant transfer."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class Transport(abc.ABC):
    """One worker's endpoint of the KV data plane.

    `session_id` is what peers pass as `dst_session` to reach this endpoint (published
    in the registry together with the base pointer that `register` returns).
    """

    session_id: str

    @abc.abstractmethod
    def register(self, tensor: Any) -> int:
        """Register a contiguous tensor's memory (a KV pool) for transfers; returns its base pointer.

        The transport keeps a reference to the tensor so its memory outlives the registration.
        """

    @abc.abstractmethod
    def write_pages(self, dst_session: str, src_base: int, dst_base: int, bytes_per_page: int,
                    src_pages: Sequence[int], dst_pages: Sequence[int]) -> TransferStats:
        """Write local page src_pages[i] over the peer's page dst_pages[i], for every i.

        Blocks until the bytes are in the peer's memory; raises TransferError on failure.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Unregister all memory and release the engine. Idempotent."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
