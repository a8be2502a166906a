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
import http.client
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import free_port
from tests.integration.agentfixtures import new_device
from tests.integration.brokerfixtures import wait_ready
from tests.integration.hubfixtures import LENIENT_LIMITS, running_hub

BROWSER = "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
AGENTS = ("lab-01", "lab-02", "lab-03")


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


# --- the console tests' fleet: a hub, operators, real agents, a browser ------------------------------------------

class Fleet:
    def __init__(self, hub, port: int, shots: Path):
        self.hub, self.port, self.shots = hub, port, shots
        self.origin = f"https://127.0.0.1:{port}"
        self.agents: list = []

    def identity(self, name: str, role: str):
        self.hub.cli_ok("identity", "add", name, "--role", role)
        return operator_files(self.hub, name)

    def call(self, method: str, path: str, body=None, who: str = "ops", headers: dict | None = None,
             raw: bytes | None = None) -> tuple[int, dict, bytes]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.hub.root_pem))
        d = self.hub.dir / "identities" / who
        ctx.load_cert_chain(str(d / f"{who}.pem"), str(d / f"{who}.key"))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=30)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            hdrs = {"Content-Type": "application/json"} if data is not None else {}
            hdrs.update(headers or {})
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def shot(self, page, name: str) -> Path:
        path = self.shots / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    base = tmp_path_factory.mktemp("console")
    shots = Path(os.environ.get("TESSERA_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots: {shots}")
    port = free_port()
    with running_hub(base, api_port=port, **LENIENT_LIMITS) as hub:
        wait_ready(hub)
        f = Fleet(hub, port, shots)
        f.ops, f.viewer = f.identity("ops", "operator"), f.identity("eve", "viewer")
        try:
            for device_id in AGENTS:
                token = hub.add_device(device_id, "--group", "lab")
                dev, _ = new_device(hub, base / "agents", device_id, interval=2.0, register=False)
                dev.enroll_ok(token)
                dev.start()
                f.agents.append(dev)
            for dev in f.agents:
                dev.wait_state("online", 60)
            with chromium(hub.root_pem) as browser:
                f.browser = browser
                yield f
        finally:
            for dev in f.agents:
                dev.destroy()


def page_for(fleet, op, viewport=None):
    ctx = context_for(fleet.browser, fleet.origin, op, viewport)
    page = ctx.new_page()
    page.set_default_timeout(20_000)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.dialogs = dialogs
    return ctx, page
