"""`./dev.sh demo`: a real token flow — create a throwaway SoftHSM token, generate a device key, show it.

Runs the installed `tessera-agent` commands against a SoftHSM token in a temporary directory, so what it shows
is what a device does: the key is generated inside the token and only its URI and public half ever come out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

console = Console()


def run(*args: str, env: dict[str, str]) -> None:
    console.print(f"[dim]$ {' '.join(args)}[/]")
    subprocess.run(args, env=env, check=True)


def main() -> int:
    from hsm.softhsm import create_token

    workdir = Path(tempfile.mkdtemp(prefix="tessera-demo-"))
    agent = str(Path(sys.executable).with_name("tessera-agent"))
    try:
        console.rule("[bold]Tessera demo: a device key that never leaves its token")
        token = create_token(workdir / "token", label="demo-device")
        console.print(f"SoftHSM token [bold]demo-device[/] created in {token.directory} (PIN in a 0600 file)")
        env = dict(os.environ, SOFTHSM2_CONF=str(token.conf), TESSERA_TOKEN_LABEL=token.label,
                   TESSERA_PIN_SOURCE=f"file:{token.pin_file}")
        run(agent, "key", "generate", "--label", "device-key", "--type", "ec-p256", env=env)
        run(agent, "key", "csr", "--label", "device-key", "--cn", "demo-device", "--out",
            str(workdir / "device.csr"), env=env)
        run("openssl", "req", "-verify", "-noout", "-in", str(workdir / "device.csr"), env=env)
        console.print("[green]done[/]: the CSR was signed inside the token and verifies with the public key")
        return 0
    except subprocess.CalledProcessError as exc:
        console.print(f"[red]demo failed[/]: {exc}")
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
