"""A TPM 2.0 test token: swtpm on loopback, tpm2-abrmd on a private D-Bus, tpm2-pkcs11 with a store of its own.

One TPM stack per test session (`tpm_stack`: starting it costs about a second), one fresh token per test
(`tpmtoken`: a new tpm2-pkcs11 store initialized through C_InitToken/C_InitPIN, PINs never in argv, ~0.2 s).
tpm2-pkcs11 is reached only through its module path and three environment variables (TPM2_PKCS11_STORE,
TPM2_PKCS11_TCTI, DBUS_SESSION_BUS_ADDRESS), which `tpmtoken` sets for the test, so the spawned key workers and
TLS children inherit them; nothing goes through p11-kit (dev.sh setup keeps p11-kit from loading the module).
The resource manager is not optional: without it tpm2-pkcs11 runs out of TPM object contexts.

`token` is parametrized over SoftHSM and TPM: a test that takes it runs once per token type.
Skipped with the reason when a package is missing (dev.sh setup installs them all). bench/token_bench.py starts
the same stack (TpmStack, create_tpm_token) outside pytest.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hsm.softhsm import write_secret
from hsm.token import TokenConfig
from tests.helpers import free_port, stop_process

MODULE_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/arm-linux-gnueabihf/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/x86_64-linux-gnu/libtpm2_pkcs11.so.1",
    "/usr/lib/aarch64-linux-gnu/libtpm2_pkcs11.so.1",
)
PROGRAMS = {"swtpm": "swtpm", "tpm2-abrmd": "tpm2-abrmd", "dbus-daemon": "dbus-daemon", "dbus-send": "dbus-bin",
            "tpm2_dictionarylockout": "tpm2-tools"}
TCTI = "tabrmd:bus_type=session"
TABRMD_NAME = "com.intel.tss2.Tabrmd"
TCTI_LIBS = {"libtss2-tcti-tabrmd.so.0": "libtss2-tcti-tabrmd0", "libtss2-tcti-swtpm.so.0": "libtss2-tcti-swtpm0"}

_DBUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={bus}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    <allow user="*"/>
  </policy>
</busconfig>
"""


def tpm_module() -> str:
    return next((m for m in MODULE_CANDIDATES if os.path.exists(m)), "")


def missing_reason() -> str:
    """Why the TPM token cannot run here ('' when it can)."""
    lacking = [pkg for prog, pkg in PROGRAMS.items() if not shutil.which(prog)]
    if not tpm_module():
        lacking.append("libtpm2-pkcs11-1")
    libdirs = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib/arm-linux-gnueabihf", "/usr/lib")
    for lib, pkg in TCTI_LIBS.items():
        if not any(os.path.exists(os.path.join(d, lib)) for d in libdirs):
            lacking.append(pkg)
    if lacking:
        return f"TPM test token needs {', '.join(sorted(set(lacking)))} (./dev.sh setup installs them)"
    return ""


@dataclass
class TpmStack:
    """swtpm + a private dbus-daemon + tpm2-abrmd, all in `directory`; env reaches them."""

    directory: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def _start(self, argv: list[str], name: str, **kw) -> subprocess.Popen:
        log = open(self.directory / f"{name}.log", "wb")  # noqa: SIM115 (kept open for the process' lifetime)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kw)
        log.close()
        self.procs.append(proc)
        return proc

    def _log(self, name: str) -> str:
        try:
            return (self.directory / f"{name}.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def start(self) -> "TpmStack":
        d = self.directory
        (d / "state").mkdir(mode=0o700, parents=True)
        port = _port_pair()  # the swtpm TCTI finds the control channel at port + 1
        ctrl = port + 1
        self._start(["swtpm", "socket", "--tpm2", "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                     "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1", "--tpmstate", f"dir={d / 'state'}",
                     "--flags", "not-need-init,startup-clear"], "swtpm")
        bus = d / "bus"
        (d / "dbus.conf").write_text(_DBUS_CONF.format(bus=bus))
        self._start(["dbus-daemon", "--config-file", str(d / "dbus.conf"), "--nofork", "--nopidfile"], "dbus")
        self.env = {"DBUS_SESSION_BUS_ADDRESS": f"unix:path={bus}", "TPM2_PKCS11_TCTI": TCTI, "TPM2TOOLS_TCTI": TCTI}
        self._wait(lambda: bus.exists(), "dbus-daemon", "dbus")
        self._wait(lambda: _port_open(port), "swtpm", "swtpm")
        argv = ["tpm2-abrmd", "--session", f"--tcti=swtpm:host=127.0.0.1,port={port}", "--flush-all"]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        self._start(argv, "tpm2-abrmd", env=dict(os.environ, **self.env))
        self._wait(self._abrmd_ready, "tpm2-abrmd", "tpm2-abrmd")
        # Wrong-PIN tests count against the TPM's dictionary-attack protection, which then locks every key out:
        # a recovery time of 0 turns that off for this throwaway TPM.
        proc = subprocess.run(["tpm2_dictionarylockout", "--setup-parameters", "--max-tries=32",
                               "--recovery-time=0", "--lockout-recovery-time=0"], capture_output=True, text=True,
                              timeout=30, env=dict(os.environ, **self.env))
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"tpm2_dictionarylockout failed: {proc.stderr.strip()[-500:]}")
        return self

    def _abrmd_ready(self) -> bool:
        proc = subprocess.run(["dbus-send", "--session", "--print-reply", "--dest=org.freedesktop.DBus",
                               "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
                               f"string:{TABRMD_NAME}"], capture_output=True, text=True, timeout=10,
                              env=dict(os.environ, **self.env))
        return proc.returncode == 0 and "boolean true" in proc.stdout

    def _wait(self, ready, what: str, log: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) while waiting for {what}: "
                                       f"{self._log(log)}")
            if ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{what} not ready after {timeout:.0f} s: {self._log(log)}")

    def stop(self) -> None:
        for proc in reversed(self.procs):  # abrmd first, then the bus, then the TPM
            stop_process(proc)
        self.procs.clear()


def _port_pair() -> int:
    """A loopback port P with P + 1 free as well (a moment ago)."""
    import socket

    for _ in range(50):
        port = free_port()
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free loopback ports")


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class TpmToken:
    """A tpm2-pkcs11 token in its own store `directory/store`, reachable with `env` (the SoftToken interface)."""

    directory: Path
    label: str
    pin_file: Path
    module: str
    env: dict[str, str] = field(default_factory=dict)
    kind: str = "tpm"

    @property
    def config(self) -> TokenConfig:
        return TokenConfig(label=self.label, pin_source=f"file:{self.pin_file}", module=self.module)

    @property
    def pin(self) -> str:
        return self.pin_file.read_text().strip()

    def activate(self) -> None:
        os.environ.update(self.env)

    def destroy(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def create_tpm_token(stack: TpmStack, directory: Path, label: str = "tessera", store: Path | None = None) -> TpmToken:
    """A new token in `store` (default: a store of its own, `directory/store`); its PIN file in `directory`."""
    from hsm.tokeninit import init_token

    directory.mkdir(mode=0o700, parents=True)
    if store is None:
        store = directory / "store"
        store.mkdir(mode=0o700)
    pin = secrets.token_hex(8)
    pin_file = directory / "pin"
    write_secret(pin_file, pin)
    env = dict(stack.env, TPM2_PKCS11_STORE=str(store))
    module = tpm_module()
    init_token(module, label, so_pin=secrets.token_hex(16), user_pin=pin, env=dict(os.environ, **env))
    return TpmToken(directory=directory, label=label, pin_file=pin_file, module=module, env=env)


@pytest.fixture(scope="session")
def tpm_stack(tmp_path_factory):
    """The session's TPM: swtpm, its D-Bus and resource manager (skipped with the reason if not installed)."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    stack = TpmStack(tmp_path_factory.mktemp("tpm-stack")).start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def tpmtoken(tpm_stack, tmp_path, monkeypatch):
    """A fresh tpm2-pkcs11 token (label 'tessera', random PIN in a 0600 file); its env is set for the test."""
    token = create_tpm_token(tpm_stack, tmp_path / "tpm")
    for name, value in token.env.items():
        monkeypatch.setenv(name, value)
    try:
        yield token
    finally:
        token.destroy()


@pytest.fixture(params=["softhsm", "tpm"])
def token(request):
    """A fresh token of each type in turn: SoftHSM2, then TPM 2.0 (tpm2-pkcs11 on swtpm)."""
    if request.param == "tpm":
        return request.getfixturevalue("tpmtoken")
    soft = request.getfixturevalue("softtoken")
    soft.kind = "softhsm"
    return soft
