"""agent.certwatch.FileWatch: a replaced identity.json is noticed once, a file this process wrote itself is not."""

from __future__ import annotations

from agent.certwatch import FileWatch
from agent.state import write_atomic


def test_a_replacement_is_noticed_once_and_at_most_every_interval(tmp_path):
    path = tmp_path / "identity.json"
    write_atomic(path, b"one")
    t = [0.0]
    watch = FileWatch(path, every=1.0, monotonic=lambda: t[0])
    assert not watch.changed(now=True)
    write_atomic(path, b"two")                  # same size, new inode (rename)
    assert not watch.changed()                  # within the interval: not looked at yet
    t[0] = 1.5
    assert watch.changed() and not watch.changed(now=True)
    write_atomic(path, b"three")
    watch.mark()                                # our own write
    assert not watch.changed(now=True)
    path.unlink()
    assert not watch.changed(now=True)          # gone is no new certificate
    write_atomic(path, b"four")
    assert watch.changed(now=True)
