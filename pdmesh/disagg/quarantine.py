"""Decode pages a prefill may still be writing (plain Python over asyncio).

A room whose Transfer was sent but not answered may have a write in flight into its
pages. Those pages go here, and come back to the pool only when the prefill confirms
the room is aborted (its Abort returns only once no write is in flight) or its lease
expires. Confirmation is tried at once and then every `retry_s` until it succeeds.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

RETRY_S = 1.0
Confirm = Callable[[str, str], Awaitable[bool]]  # (prefill address, request id) -> confirmed


class Quarantine:
    """request id -> (prefill address, page count)."""

    def __init__(self, confirm: Confirm, free: Callable[[str], object],
                 retry_s: float = RETRY_S) -> None:
        self._confirm, self._free, self._retry_s = confirm, free, retry_s
        self._entries: dict[str, tuple[str, int]] = {}
        self._task: asyncio.Task | None = None

    def add(self, request_id: str, address: str, num_pages: int) -> None:
        """Hold the request's pages until `address` confirms or is gone."""
        self._entries[request_id] = (address, num_pages)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def release(self, request_id: str) -> bool:
        """Free the request's pages now; True when it was quarantined."""
        if self._entries.pop(request_id, None) is None:
            return False
        self._free(request_id)
        return True

    def release_peer(self, address: str) -> None:
        """`address` expired or left: everything it could have been writing is free."""
        for rid in [r for r, (a, _) in self._entries.items() if a == address]:
            self.release(rid)

    @property
    def pages(self) -> int:
        return sum(n for _, n in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    async def _run(self) -> None:
        while self._entries:
            for rid, (address, _) in list(self._entries.items()):
                try:
                    ok = await self._confirm(address, rid)
                except Exception:  # a bug in confirm must not keep pages forever: retry
                    ok = False
                if ok:
                    self.release(rid)
            if self._entries:
                await asyncio.sleep(self._retry_s)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
