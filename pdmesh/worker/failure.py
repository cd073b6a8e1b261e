"""Who is told when a worker's engine fails: a list of listeners, each told once.

Several parts of a worker react to its engine failing: the prefill protocol fails every
room at once, the worker process deregisters and exits. Each adds its own listener
(`AsyncEngine.add_failure_listener`) instead of wrapping whatever callback was set
before it, so none can drop another by replacing it and the order of set-up does not
matter.

Invariants: the failure is reported once (a second `notify` is ignored); every listener
is called once, in the order added; one that raises is logged and the next is still
called.
"""
from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger(__name__)
Listener = Callable[[BaseException], object]


class FailureListeners:
    """`add(fn)` before the failure; `notify(error)` calls every fn(error) once."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self.error: BaseException | None = None  # the failure, once reported

    def add(self, fn: Listener) -> None:
        """Call fn(error) when the engine fails (at once if it failed already)."""
        self._listeners.append(fn)
        if self.error is not None:
            self._call(fn, self.error)

    def notify(self, error: BaseException) -> bool:
        """Report the failure to every listener; False (nobody told) if it was reported
        already."""
        if self.error is not None:
            return False
        self.error = error
        for fn in list(self._listeners):
            self._call(fn, error)
        return True

    @staticmethod
    def _call(fn: Listener, error: BaseException) -> None:
        try:
            fn(error)
        except Exception:  # one listener's bug must not keep the others from hearing
            log.exception("engine failure listener %r raised", fn)
