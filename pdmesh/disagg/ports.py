"""What the P/D protocol needs from the outside, as plain types and small interfaces.

`Code` names the status a room ends with (the servicers map it to grpc.StatusCode by
name); `RoomError` carries it. `TransferTarget` is where a prefill writes a room's KV;
`TransferReply` is what the decode gets back. The interfaces are implemented by the
servicers' modules (gRPC peers, Mooncake writer) and by fakes in unit tests.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol, Sequence


class Code(enum.Enum):
    """Status codes a room can end with (the gRPC names)."""

    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    DATA_LOSS = "DATA_LOSS"  # the KV arrived corrupted (checksum mismatch)
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # the worker sheds load (shedding.py)


class RoomError(Exception):
    """A room (or one RPC on it) ends with `code` and a message saying why. `blame`: the
    other worker when this one's room failed because of it: "prefill" on a decode whose
    prefill died, left or failed the Transfer, "decode" on a prefill whose decode left;
    the gateway then retries away from that worker, not from this one."""

    def __init__(self, code: Code, message: str, blame: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.blame = code, message, blame

    def __reduce__(self):  # picklable (a process boundary may carry it)
        return type(self), (self.code, self.message, self.blame)

    def __repr__(self) -> str:
        return f"RoomError({self.code.name}, {self.message!r})"


@dataclass(frozen=True)
class TransferTarget:
    """Where the prefill writes a room's KV: the decode's transfer session, its pool's
    base address, the page ids it holds for the room, and its KV layout."""

    session_id: str
    kv_base: int
    page_ids: tuple[int, ...]
    layout: Any  # pdmesh.transfer.KVLayout (num_pages: the highest page id + 1)
    decode_worker_id: str = ""
    room: int = 0
    host_id: str = ""  # the decode's host (pdmesh.transfer.route.host_id)
    local_endpoints: tuple[str, ...] = ()  # same-host ways into its pool (shm:, ipc:)
    # the prompt's leading pages whose KV the decode has already (its prefix cache):
    # page_ids are the destinations of the prompt's pages after them, in order
    cached_pages: int = 0


@dataclass(frozen=True)
class KVChecksum:
    """A checksum of a room's pages in token order (pdmesh.transfer.checksum): the
    algorithm's name and its unsigned 64-bit value."""

    algo: str
    value: int

    def __str__(self) -> str:
        return f"{self.algo}:{self.value:#018x}"


@dataclass(frozen=True)
class TransferReply:
    """The prefill's answer once the KV is in the decode's pages."""

    first_token: int
    first_logprob: Any = None  # SampledToken or None
    cached_tokens: int = 0
    bytes_moved: int = 0
    descriptors: int = 0
    seconds: float = 0.0
    path: str = ""  # the KV path the bytes took: shm, ipc, mooncake
    checksum: KVChecksum | None = None  # of the source pages; None: checksums off


class KVWriter(Protocol):
    """The prefill's side of the data plane."""

    async def write(self, src_pages: Sequence[int], target: TransferTarget) -> Any:
        """Write local src_pages[i] over target.page_ids[i]; returns TransferStats
        (bytes, descriptors, seconds); raises on failure. Never blocks the event loop."""

    async def checksum(self, src_pages: Sequence[int]) -> KVChecksum | None:
        """The checksum of local src_pages in order; None when checksums are off."""

    async def read_checksum(self, target: TransferTarget, algo: str) -> KVChecksum | None:
        """The checksum (by `algo`) of target's pages as they are now, read back through
        the path the write took; None when that path cannot read pages back."""


class KVReceiver(Protocol):
    """The decode's side of the data plane (a no-op unless KV is staged in host memory)."""

    async def land(self, pages: Sequence[int], path: str) -> None:
        """Make pages written by `path` (TransferReply.path) visible to the engine, e.g.
        host mirror -> device after a transfer-engine write into a staged pool."""

    async def checksum(self, pages: Sequence[int], algo: str) -> KVChecksum | None:
        """The checksum (by `algo`) of this pool's pages in order, computed off the event
        loop (the pages are held, not adopted: nothing else touches them); None when
        this worker's checks are off."""


class PrefillPeers(Protocol):
    """How a decode worker reaches prefill workers (gRPC in production)."""

    async def transfer(self, address: str, room: int, target: TransferTarget,
                       timeout: float) -> TransferReply:
        """Ask `address` to write the room's KV; raises RoomError with the peer's code."""

    async def abort(self, address: str, room: int, timeout: float) -> bool:
        """Ask `address` to drop the room; returns once it confirmed that no write of the
        room is in flight. Raises RoomError when the peer can't be reached."""


class Liveness(Protocol):
    """The registry's view: has this worker expired or left (and not come back)?"""

    def is_gone(self, address: str) -> bool: ...
