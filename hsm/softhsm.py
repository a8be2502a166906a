"""Throwaway SoftHSM2 tokens for development and tests: a private token directory and SOFTHSM2_CONF."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HsmError
from .token import TokenConfig, default_module
from .tokeninit import init_token


_CONF = "directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"


@dataclass
class SoftToken:
    """A SoftHSM2 token living in `directory`, reachable only with `env` (its own SOFTHSM2_CONF)."""

    directory: Path
    label: str
    pin_file: Path
    module: str
    conf: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> TokenConfig:
        return TokenConfig(label=self.label, pin_source=f"file:{self.pin_file}", module=self.module,
                           softhsm_conf=str(self.conf))

    @property
    def pin(self) -> str:
        return self.pin_file.read_text().strip()

    def activate(self) -> None:
        """Point this process's environment at the token (for code that reads SOFTHSM2_CONF itself)."""
        os.environ["SOFTHSM2_CONF"] = str(self.conf)

    def destroy(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def write_secret(path: Path, text: str) -> None:
    """Create `path` with mode 0600 from the start (no window where it is world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    os.chmod(path, 0o600)


def write_conf(directory: Path) -> Path:
    """Write a SoftHSM2 config whose token store is `directory/tokens`."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = directory / "softhsm2.conf"
    conf.write_text(_CONF.format(tokens=tokens))
    return conf


def ensure_conf(conf: str | os.PathLike) -> bool:
    """Make sure the SoftHSM2 config `conf` exists; True if it was created here.

    A missing config is written (0600) with its token directory `<conf's directory>/tokens` (0700), the
    directories created as needed. HsmError naming the path when that fails, or when an existing config names a
    token directory that does not exist (SoftHSM would only say "C_Initialize failed with CKR 0x00000005").
    """
    conf = Path(conf).absolute()
    if conf.exists():
        tokendir = _tokendir(conf)
        if tokendir is not None and not tokendir.is_dir():
            raise HsmError(f"SoftHSM2 config {conf} names token directory {tokendir}, which does not exist "
                           f"(create it: mkdir -m 0700 {tokendir})")
        return False
    tokens = conf.parent / "tokens"
    try:
        conf.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tokens.mkdir(exist_ok=True, mode=0o700)
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(_CONF.format(tokens=tokens))
    except OSError as exc:
        raise HsmError(f"cannot create SoftHSM2 config {conf}: {exc.strerror or exc}") from None
    return True


def _tokendir(conf: Path) -> Path | None:
    try:
        for line in conf.read_text(errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "directories.tokendir":
                return Path(value.strip())
    except OSError as exc:
        raise HsmError(f"cannot read SoftHSM2 config {conf}: {exc.strerror}") from None
    return None


def create_token(directory: str | os.PathLike | None = None, label: str = "tessera",
                 module: str | None = None, pin: str | None = None) -> SoftToken:
    """Create a fresh SoftHSM2 token in a private directory and return how to reach it.

    The user PIN (random unless given) is written to `directory/pin` with mode 0600.
    """
    base = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="tessera-softhsm-"))
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(base, 0o700)
    conf = write_conf(base)
    module = module or default_module()
    pin = pin or secrets.token_hex(8)
    pin_file = base / "pin"
    write_secret(pin_file, pin)
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    init_token(module, label, so_pin=secrets.token_hex(16), user_pin=pin, env=env)
    return SoftToken(directory=base, label=label, pin_file=pin_file, module=module, conf=conf,
                     env={"SOFTHSM2_CONF": str(conf)})
