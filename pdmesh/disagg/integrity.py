"""KV integrity on the prefill side: write a room's pages, then prove they arrived.

After the write, the checksum of the source pages (pdmesh.transfer.checksum, computed by
the KVWriter while the write runs) is compared with the destination pages read back through the same path. A
mismatch (a page reused too early, a bad write) is rewritten once; a second mismatch
fails the room with DATA_LOSS, so wrong KV is never decoded from. The decode checks its
pages against the same checksum again right before adopting them (pdmesh/disagg/decode.py),
which also covers paths that cannot read back and bytes changed after this check.
Plain Python over asyncio (no torch): the writer computes checksums on its threads.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from pdmesh.disagg.ports import Code, KVChecksum, KVWriter, RoomError, TransferTarget

log = logging.getLogger(__name__)


async def write_verified(writer: KVWriter, room: int, src: list[int], target: TransferTarget,
                         abandoned: Callable[[], bool], on_retry: Callable[[], None]
                         ) -> tuple[Any, KVChecksum | None]:
    """Write src into target's pages and verify them; (TransferStats of the last write,
    source checksum or None when checksums are off). `abandoned()`: the room failed
    meanwhile (no rewrite then; its error wins). Raises RoomError(DATA_LOSS) after a
    second mismatch, or what the writer raises."""
    # the source pages are final: digest them while the write runs (on a GPU the two go
    # on different streams; it took ~1 ms off a 4k-token prompt's TTFT on an H200)
    source = asyncio.ensure_future(writer.checksum(src))
    try:
        stats = await writer.write(src, target)
    except BaseException:
        source.cancel()
        source.add_done_callback(_consume)
        raise
    want, got = await asyncio.gather(source, writer.read_checksum(target, None))
    if want is None:  # checksums off on this prefill
        return stats, None
    if _matches(want, got) or abandoned():
        return stats, want
    on_retry()
    log.warning("room %d: KV in %s differs from the source after the write (source %s, "
                "read back %s); rewriting once", room, target.session_id, want, got)
    stats = await writer.write(src, target)
    got = await writer.read_checksum(target, want.algo)
    if _matches(want, got) or abandoned():
        return stats, want
    raise RoomError(Code.DATA_LOSS, f"KV of room {room} is corrupted in {target.session_id}: "
                    f"read back {got} != source {want}, again after a rewrite; the room "
                    f"failed and its pages were freed")


def _consume(task: "asyncio.Future[Any]") -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a write's failure is the one reported


def _matches(want: KVChecksum, got: KVChecksum | None) -> bool:
    # None: the path cannot read pages back; the decode's own check still runs
    return got is None or got == want
