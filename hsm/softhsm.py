"""Throwaway SoftHSM2 tokens for development and tests: a private token directory and SOFTHSM2_CONF."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .token import TokenConfig, default_module
from .tokeninit import init_token


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
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
    )
    return conf


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
