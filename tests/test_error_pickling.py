"""Errors that cross the engine process's pipe arrive whole: exception classes with their
own constructor rebuild from pickles, and one that cannot be rebuilt reaches the front
as a RuntimeError naming it, never as a failed unpickle that would leave its request
waiting (seen on the H200, 2026-11-30: TransferError(rc, what) broke the front's reader)."""
from __future__ import annotations

import multiprocessing
import pickle
import threading
from types import SimpleNamespace

import pytest

from pdmesh.disagg.ports import Code, RoomError
from pdmesh.transfer.base import TransferError
from pdmesh.worker.core_process import CoreServer


@pytest.mark.parametrize("err", [TransferError(-1, "batch_transfer_sync_write to x"),
                                 RoomError(next(iter(Code)), "peer gone")])
def test_errors_with_their_own_constructor_survive_pickling(err):
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err)
    assert vars(back) == vars(err)


class Unrebuildable(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def test_an_error_the_front_cannot_rebuild_arrives_as_a_runtime_error():
    front, back = multiprocessing.Pipe()
    server = SimpleNamespace(conn=back, _send_lock=threading.Lock())
    CoreServer.send(server, ("res", 7, False, Unrebuildable(1, 2)))
    kind, mid, ok, err = front.recv()
    assert (kind, mid, ok) == ("res", 7, False)
    assert type(err) is RuntimeError and str(err) == "Unrebuildable: 1/2"
    CoreServer.send(server, ("res", 8, False, TransferError(-1, "write")))
    assert isinstance(front.recv()[3], TransferError)  # rebuildable ones pass as they are


def test_an_unreadable_message_fails_the_waiting_calls_instead_of_hanging_them():
    from concurrent.futures import Future

    from pdmesh.worker.engine_proxy import EngineProcess, EngineProcessError

    front, back = multiprocessing.Pipe()
    proxy = object.__new__(EngineProcess)  # only the reader's state, no process
    waiting, failures = Future(), []
    proxy.conn, proxy._aio, proxy.error, proxy._pending = front, None, None, {1: waiting}
    proxy._on_failure, proxy._stopping = failures.append, False
    back.send_bytes(b"\x80\x05not a pickle")
    proxy._readable()
    with pytest.raises(EngineProcessError, match="unreadable message"):
        waiting.result(timeout=1)
    assert failures and proxy.error is failures[0]
