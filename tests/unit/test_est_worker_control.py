"""The EST worker's control socket (hub/est/worker.py `_Control`): how a worker learns that its supervisor is gone."""

from __future__ import annotations

import socket

from hub.est.worker import _Control


def test_a_supervisor_killed_with_unread_counts_reads_as_gone():
    """A supervisor killed (SIGKILL) before it read what the worker sent resets the Unix socket instead of closing
    it: the worker's next read raised ConnectionResetError in its watch thread, which died, and the worker went on
    serving (and holding the EST port) without a supervisor for ever. It must read as "gone", like an EOF."""
    supervisor, worker = socket.socketpair()
    control = _Control(worker)
    control.send({"counts": {"enrolled": 1}})  # the worker's counts, never read by the supervisor
    supervisor.close()  # what the kernel does to a killed process's sockets
    assert control.read() is None


def test_messages_then_eof():
    supervisor, worker = socket.socketpair()
    control = _Control(worker)
    supervisor.sendall(b'{"index": 0}\n')
    supervisor.close()
    assert control.read() == {"index": 0}
    assert control.read() is None
