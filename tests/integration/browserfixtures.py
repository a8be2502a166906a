"""Headless Chromium for the console tests (tests/integration/test_console.py): Debian's /usr/bin/chromium driven by
Playwright, operators logged in with their PKCS#12 from `tessera-hub identity add NAME --role R`.

- Nothing is downloaded: Playwright launches `executable_path=BROWSER` (PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 is set
  for the driver too); without the system browser or the playwright package the console tests are skipped.
- The client certificate is given per context (`client_certificates`, pfxPath + passphrase): the passphrase is read
  from the identity's 0600 .pass file and handed over through Playwright's API, never on a command line.
- Trust: with client certificates, Playwright's driver (Node) makes the TLS connection to the hub itself and
  verifies the hub's server certificate with Node's trust store. The fleet root is added to it properly
  (NODE_EXTRA_CA_CERTS=ca/root.pem for the driver process); nothing ignores certificate errors there. Only the
  no-client-certificate context sets ignore_https_errors (Chromium connects directly and does not know the fleet
  root), so that its failure is the missing client certificate and nothing else.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

BROWSER = "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@dataclass
class Operator:
    name: str
    p12: Path
    passphrase: str


def operator_files(hub, name: str) -> Operator:
    d = hub.dir / "identities" / name
    p12, secret = d / f"{name}.p12", d / f"{name}.p12.pass"
    assert os.stat(secret).st_mode & 0o777 == 0o600
    return Operator(name, p12, secret.read_text().strip())


@contextlib.contextmanager
def chromium(root_pem: Path) -> Iterator:
    """A Playwright Chromium (the system browser) whose driver trusts the fleet root."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(BROWSER, os.X_OK):
        pytest.skip(f"{BROWSER} is not installed (./dev.sh setup installs Debian's chromium)")
    saved = {k: os.environ.get(k) for k in ("NODE_EXTRA_CA_CERTS", "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD")}
    os.environ["NODE_EXTRA_CA_CERTS"] = str(root_pem)  # read once, when the driver starts
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=BROWSER, headless=True)
            try:
                yield browser
            finally:
                browser.close()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def context_for(browser, origin: str, op: Operator | None, viewport: dict | None = None):
    """A browser context presenting `op`'s PKCS#12 to `origin` (None: no client certificate at all)."""
    if op is None:
        return browser.new_context(ignore_https_errors=True, viewport=viewport or VIEWPORT)
    return browser.new_context(client_certificates=[{"origin": origin, "pfxPath": str(op.p12),
                                                     "passphrase": op.passphrase}],
                               viewport=viewport or VIEWPORT)
