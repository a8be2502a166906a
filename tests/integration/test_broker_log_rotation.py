"""The broker's log is rotated by size without a signal (copy + truncate): a real Mosquitto, writing with
O_APPEND, carries on at the start of the emptied file; older generations shift and only `keep` remain.
Mosquitto only: the hub writes and rotates Mosquitto's log file; RabbitMQ's nodes keep their own logs."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import time

from hub.broker.mosquitto import Limits, MosquittoBroker
from tests.helpers import free_port


def _broker(tmp_path) -> MosquittoBroker:
    dummy = tmp_path / "unused.pem"
    return MosquittoBroker(tmp_path, "127.0.0.1", free_port(), cafile=dummy, certfile=dummy, keyfile=dummy,
                           registry_path=tmp_path / "r.sqlite3", device_ca=dummy, service_ca=dummy, limits=Limits(),
                           on_event=lambda kind, detail: None)


def _wait_for(path, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never appeared in {path}")


def test_a_running_mosquitto_keeps_logging_into_the_truncated_file(tmp_path):
    broker = _broker(tmp_path)
    port = free_port()
    conf = tmp_path / "plain.conf"  # a bare Mosquitto logging connections to the driver's log file
    conf.write_text(f"user {pwd.getpwuid(os.getuid()).pw_name}\n"  # as the driver does (root would drop to 'mosquitto')
                    f"listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest file {broker.logfile}\n"
                    "log_type all\nconnection_messages true\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(broker.logfile, "running")
        with open(broker.logfile, "a") as fh:
            fh.write("filler line\n" * 2000)  # ~24 KB
        assert not broker.rotate_log(max_bytes=10 ** 6)  # under the limit: nothing happens
        assert broker.rotate_log(max_bytes=10_000, keep=3)
        assert broker.logfile.stat().st_size == 0
        assert "filler line" in broker.logfile.with_name("mosquitto.log.1").read_text()
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # Mosquitto logs a new connection ...
        text = _wait_for(broker.logfile, "New connection")
        assert not text.startswith("\0") and "filler" not in text  # ... at the start of the emptied file
        for _ in range(4):  # more rotations: .1 is the newest, at most `keep` generations
            with open(broker.logfile, "a") as fh:
                fh.write("more filler\n" * 1000)
            assert broker.rotate_log(max_bytes=10_000, keep=3)
        names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("mosquitto.log"))
        assert names == ["mosquitto.log", "mosquitto.log.1", "mosquitto.log.2", "mosquitto.log.3"]
        assert "more filler" in broker.logfile.with_name("mosquitto.log.1").read_text()
    finally:
        proc.terminate()
        proc.wait(10)
