"""Every offline `tessera-hub` command on a PostgreSQL registry gives what it gives on SQLite.

Two hub directories made by `tessera-hub init` (module scope): one on its SQLite file, one whose fleet.toml names a
database of the session's PostgreSQL server (with `[broker] kind = "rabbitmq"`, the pairing a PG registry needs; no
broker runs: every command answers in-process, hub/cli/offline.py). The same sequence of commands (STEPS) runs on
both, each hub in its own thread; between the CLI phases some devices enroll in this process through the
registry's own enroll transaction (the one the EST service runs), so listings, reports, revocations and the CRL
have certificates to show. Then, per step: the exit codes are equal; `--json` outputs are equal once `normal()`
has replaced what differs by nature (timestamps, serials, MACs, tokens, the hub's own paths); human outputs both
succeed; bad input gives the same one error line on both.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from tests.helpers import free_port
from tests.integration.hubfixtures import Hub, init_hub, new_key, one_line, write_pem
from tests.integration.pgfixtures import pg_server  # noqa: F401

pytestmark = pytest.mark.integration

# --- the normaliser -----------------------------------------------------------------------------------------------

_TS = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:?\d\d)?")
_HEX = re.compile(r"\b[0-9a-fA-F]{16,}\b")
_TOKEN = re.compile(r"\b[A-Za-z0-9_-]{32}\b")
_MS = re.compile(r"\b\d+ ms\b")
#: keys whose values differ by nature between two hubs (random or time-made), compared only as set / not set
_OPAQUE = {"token", "serial", "mac", "head_mac", "prev_mac", "next_cursor", "cursor", "duration_ms", "total_ms",
           "sync_ms", "timings"}
_SHIFTED_AUDIT = {"id"}
_SHIFTED_VERIFY = {"checked", "head_id", "broken_at"}


def normal(value: Any, base: str, shift: int = 0) -> Any:
    """`value` (parsed JSON or text) with timestamps, serials, MACs, tokens, durations and `base` (the hub's
    scratch directory) replaced by placeholders, and audit row numbers less `shift` (the rows the hub's registry
    held before the first compared command: init writes a few into SQLite only; those rows are left out), so two
    hubs' answers to the same commands compare equal."""
    if isinstance(value, dict):
        shifted = _SHIFTED_AUDIT if {"action", "actor"} <= value.keys() else _SHIFTED_VERIFY
        return {k: (("<set>" if v is not None else None) if k in _OPAQUE else
                    v - shift if k in shifted and isinstance(v, int) else
                    round(v) if k == "days_left" else normal(v, base, shift))
                for k, v in value.items()}
    if isinstance(value, list):  # (audit rows from before the first compared command are left out)
        return [normal(v, base, shift) for v in value
                if not (isinstance(v, dict) and {"action", "actor"} <= v.keys() and v.get("id", 1) <= shift)]
    if isinstance(value, str):
        text = value.replace(base, "<base>")
        text = _TS.sub("<ts>", text)
        text = _HEX.sub("<hex>", text)
        text = _MS.sub("<n> ms", text)
        return _TOKEN.sub("<token>", text)
    return value


# --- the steps ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Step:
    """One command (args; `{base}` is the hub's scratch directory, `{maker}` the shared manufacturer files) and
    what is compared: 'json' (stdout, normalised), 'text' (stdout, normalised), 'ok' (both exit 0), 'error'
    (the same exit code != 0 and the same one error line)."""

    name: str
    args: tuple[str, ...] = ()
    expect: str = "json"
    #: instead of a command: a function of (the hub's Run) returning a comparable result, None or {what: outcome},
    #: each outcome a dict with the key `expect`
    call: Callable[["Run"], Any] | None = None


def cmd(name: str, *args: str, expect: str = "json") -> Step:
    return Step(name, (*args, "--json") if expect == "json" else args, expect)


def _tokens(run: "Run", step: str) -> str:
    return json.loads(run.results[step]["stdout"])["token"]


def _enroll_all(run: "Run") -> dict:
    """The first enrollment of five devices (tokens from add, token, --out and the token CSV)."""
    fac = dict(csv.reader((run.base / "fac.csv").read_text().splitlines()[1:]))
    tokens = {"dev-a": _tokens(run, "add dev-a"), "dev-b": _tokens(run, "add dev-b"),
              "dev-c": _tokens(run, "token dev-c"), "dev-e": (run.base / "dev-e.token").read_text().strip(),
              "fac-00001": fac["fac-00001"]}
    return {d: run.enroll(d, t) for d, t in tokens.items()}


def _enroll_refused(run: "Run") -> dict:
    """Tokens that must not enroll: spent, superseded by `device token`, another device's, unknown."""
    return {"spent": run.enroll("dev-a", _tokens(run, "add dev-a")),
            "superseded": run.enroll("dev-c", _tokens(run, "add dev-c")),
            "other device's": run.enroll("dev-b", run.results["add dev-d"]["stdout"].strip()),
            "unknown": run.enroll("dev-d", "x" * 32)}


def _audit_base(run: "Run") -> None:
    """Note the audit rows the registry holds now (not compared: init wrote some into the SQLite file only)."""
    run.shift = run.registry().query("SELECT coalesce(max(id), 0) AS n FROM audit")[0]["n"]


STEPS: list[Step] = [
    # the first command on the PostgreSQL registry records the hub's identity (init recorded it in SQLite)
    cmd("identity list (first command)", "identity", "list"),
    Step("audit rows so far", call=_audit_base),
    # devices and tokens
    cmd("add dev-a", "device", "add", "dev-a", "--label", "site=north", "--group", "g1"),
    cmd("add dev-b", "device", "add", "dev-b", "--group", "g1", "--group", "g2"),
    cmd("add dev-c", "device", "add", "dev-c", "--label", "site=south"),
    cmd("add dev-d", "device", "add", "dev-d", expect="ok"),
    cmd("add dev-e --out", "device", "add", "dev-e", "--out", "{base}/dev-e.token"),
    cmd("token create", "token", "create", "--count", "3", "--prefix", "fac", "--out", "{base}/fac.csv",
        "--group", "line1"),
    cmd("add an existing id", "device", "add", "dev-a", expect="error"),
    cmd("token dev-c", "device", "token", "dev-c"),
    cmd("token of an unknown device", "device", "token", "nope", expect="error"),
    cmd("edit dev-b", "device", "edit", "dev-b", "--label", "tier=gold"),
    Step("enroll", expect="enrolled", call=_enroll_all),
    Step("enroll refused", expect="refused", call=_enroll_refused),
    # listings (the group and label filters are the dialects' JSON functions)
    cmd("list", "device", "list"),
    cmd("list --group --offline", "device", "list", "--group", "g1", "--offline"),
    cmd("list --label", "device", "list", "--label", "site=north"),
    cmd("list --status --id-prefix --expires-before", "device", "list", "--status", "active", "--id-prefix", "fac",
        "--expires-before", "2100-01-01"),
    cmd("list --all in pages of 2 --sort -created", "device", "list", "--all", "--limit", "2", "--sort=-created"),
    cmd("list --sort cert_expires (nulls too)", "device", "list", "--sort", "cert_expires"),
    cmd("list --csv", "device", "list", "--csv", "--sort", "id", expect="text"),
    cmd("list a bad status", "device", "list", "--status", "bogus", expect="error"),
    cmd("show dev-a", "device", "show", "dev-a"),
    cmd("show an unknown device", "device", "show", "nope", expect="error"),
    cmd("revoke a bad id (checked by the API)", "device", "revoke", "Bad_Id", "--reason", "x", expect="error"),
    # status changes
    cmd("suspend dev-b", "device", "suspend", "dev-b", "--reason", "maintenance"),
    cmd("resume dev-b", "device", "resume", "dev-b"),
    cmd("revoke dev-c", "device", "revoke", "dev-c", "--reason", "keyCompromise"),
    cmd("revoke dev-c again", "device", "revoke", "dev-c", "--reason", "keyCompromise"),
    cmd("suspend a revoked device", "device", "suspend", "dev-c", expect="error"),
    cmd("decommission dev-e", "device", "decommission", "dev-e"),
    # an edit moves a device out of the group and label lookups (PG: tables kept by triggers)
    cmd("edit dev-b again", "device", "edit", "dev-b", "--group", "g3", "--no-labels"),
    cmd("list --group after the edit", "device", "list", "--group", "g1"),
    cmd("list --label after the edit", "device", "list", "--label", "tier=gold"),
    cmd("token of a revoked device", "device", "token", "dev-c", expect="error"),
    cmd("send with no hub running", "device", "send", "dev-a", "ping", expect="error"),
    # reports, audit, CRL
    cmd("report expiring --all in pages of 2", "report", "expiring", "--days", "3650", "--include-due", "--all",
        "--limit", "2"),
    cmd("report expiring (table)", "report", "expiring", expect="ok"),
    cmd("audit", "audit", "--limit", "200"),
    cmd("audit --device dev-c --calls", "audit", "--device", "dev-c", "--calls"),
    cmd("audit --actor --action --since", "audit", "--actor", "est", "--action", "enroll", "--since", "2020-01-01"),
    cmd("crl", "crl"),
    cmd("broker render", "broker", "render", "--out", "{base}/nodes", "--node", "n1:5672:25672:1883:15672",
        expect="text"),
    # identities and roles
    cmd("identity add", "identity", "add", "alice", "--role", "viewer", "--out", "{base}/alice"),
    cmd("identity add an existing name", "identity", "add", "alice", "--role", "viewer", "--out",
        "{base}/alice2", expect="error"),
    cmd("identity add an unknown role", "identity", "add", "bob", "--role", "nosuchrole", "--out", "{base}/bob",
        expect="error"),
    cmd("identity revoke", "identity", "revoke", "alice", "--reason", "keyCompromise"),
    cmd("identity show", "identity", "show", "alice"),
    cmd("role set", "role", "set", "ops", "--rule", "publish:ops/{id}/#", "--rule", "subscribe:ops/{group}/#",
        "--description", "operations", expect="ok"),
    cmd("role list", "role", "list"),
    cmd("role show", "role", "show", "ops"),
    cmd("role show an unknown role", "role", "show", "nope", expect="error"),
    # manufacturers
    cmd("manufacturer add", "manufacturer", "add", "maker", "--ca", "{maker}/ca.pem"),
    cmd("manufacturer add again", "manufacturer", "add", "maker", "--ca", "{maker}/ca.pem", expect="error"),
    cmd("manufacturer import-batch", "manufacturer", "import-batch", "maker", "{maker}/batch-1.csv"),
    cmd("manufacturer import-batch unknown", "manufacturer", "import-batch", "nobody", "{maker}/batch-1.csv",
        expect="error"),
    cmd("allow-reprovision a pending device", "manufacturer", "allow-reprovision", "idev-1"),
    cmd("allow-reprovision a batch", "manufacturer", "allow-reprovision", "--batch", "batch-1", "--manufacturer",
        "maker"),
    cmd("manufacturer list", "manufacturer", "list"),
    cmd("manufacturer remove", "manufacturer", "remove", "maker"),
    # jobs
    cmd("job create", "job", "create", "ping-g1", "--command", "ping", "--group", "g1", "--yes"),
    cmd("job devices", "job", "devices", "1"),
    cmd("job pause", "job", "pause", "1"),
    cmd("job resume", "job", "resume", "1"),
    cmd("job cancel", "job", "cancel", "1"),
    cmd("job show an unknown job", "job", "show", "99", expect="error"),
    # last: the chain still verifies
    cmd("audit verify", "audit", "verify"),
]

#: differences found on PostgreSQL that are not fixed here (step name -> reason); strict: a fix shows up
KNOWN: dict[str, str] = {}


# --- running them -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """One hub's pass through STEPS: its directory, its scratch directory and every step's result."""

    hub: Hub
    base: Path
    maker: Path
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    shift: int = 0
    _registry: Any = None
    _ca: Any = None

    def registry(self):
        """The hub's registry, opened in this process (fleet.toml's dialect)."""
        from hub.config import load_config

        if self._registry is None:
            self._registry = load_config(self.hub.dir).open_registry()
        return self._registry

    def enroll(self, device_id: str, token: str) -> dict:
        """The registry's enroll transaction with a fresh key (what the EST service does after its checks)."""
        from hub.ca.authority import load_ca
        from hub.config import load_config
        from hub.registry.store import RegistryError

        cfg = load_config(self.hub.dir)
        if self._ca is None:
            self._ca = load_ca(cfg.ca_dir)
        now = dt.datetime.now(dt.timezone.utc)
        key = new_key()
        try:
            self.registry().enroll(device_id, token, now, lambda: self._ca.issue_device_cert(
                key.public_key(), device_id, cfg.policy, now, cfg.crl_urls), source="127.0.0.1")
        except RegistryError as exc:
            return {"refused": exc.code, "error": str(exc)}
        return {"enrolled": device_id}

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()
        if self._ca is not None:
            self._ca.close()
        self._registry = self._ca = None

    def run(self) -> None:
        try:
            for step in STEPS:
                if step.call is not None:
                    try:
                        self.results[step.name] = {"value": step.call(self)}
                    except Exception as exc:  # noqa: BLE001  (compared: the other hub should not raise)
                        self.results[step.name] = {"raised": f"{type(exc).__name__}: {exc}"}
                    continue
                args = [a.replace("{base}", str(self.base)).replace("{maker}", str(self.maker)) for a in step.args]
                proc = self.hub.cli(*args)
                self.results[step.name] = {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
        finally:
            self.close()


def maker_files(directory: Path) -> Path:
    """A manufacturer CA (file key) and a batch CSV of two birth-certificate serials, shared by both hubs."""
    directory.mkdir()
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Maker Devices"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Maker Birth CA")])
    now = dt.datetime.now(dt.timezone.utc)
    usage = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                           "key_agreement", "encipher_only", "decipher_only"), False)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(key_cert_sign=True, crl_sign=True, **usage), critical=True)
            .sign(key, hashes.SHA256()))
    write_pem(directory / "ca.pem", cert)
    (directory / "batch-1.csv").write_text("serial,device_id,cert_sha256\nSN-0001,idev-1,\nSN-0002,,\n")
    return directory


@pytest.fixture(scope="module")
def pg_url(pg_server):  # noqa: F811
    name = pg_server.create_database()
    yield pg_server.url(name)
    pg_server.drop_database(name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pg_url) -> dict[str, Run]:
    """Both hubs' passes through STEPS, run at once (a thread each): {'sqlite': Run, 'postgresql': Run}."""
    base = tmp_path_factory.mktemp("cli-pg")
    maker = maker_files(base / "maker")
    made: dict[str, Hub] = {}

    def make(kind: str) -> None:
        made[kind] = pg_hub(base / kind, pg_url) if kind == "postgresql" else init_hub(base / kind)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(make, ["sqlite", "postgresql"]))
        runs = {kind: Run(hub, hub.dir.parent, maker) for kind, hub in made.items()}
        list(pool.map(Run.run, runs.values()))
    return runs


# --- the comparisons ----------------------------------------------------------------------------------------------

def _params() -> list:
    return [pytest.param(s, id=s.name.replace(" ", "_"),
                         marks=[pytest.mark.xfail(strict=True, reason=KNOWN[s.name])] if s.name in KNOWN else [])
            for s in STEPS]


@pytest.mark.parametrize("step", _params())
def test_the_step_gives_the_same_on_postgresql_as_on_sqlite(runs, step: Step):
    lite, pg = runs["sqlite"], runs["postgresql"]
    a, b = lite.results[step.name], pg.results[step.name]
    if step.call is not None:
        assert "raised" not in a, a
        assert all(step.expect in r for r in (a["value"] or {}).values()), a  # on SQLite, as meant
        assert normal(b, str(pg.base), pg.shift) == normal(a, str(lite.base), lite.shift)
        return
    where = f"tessera-hub {' '.join(step.args)}"
    if step.expect == "error":
        assert a["rc"] != 0, f"{where} on SQLite should fail: {a}"
        assert len(a["stderr"].strip().splitlines()) == 1, f"{where}: not one error line on SQLite: {a['stderr']}"
        assert (b["rc"], normal(one_line(b["stderr"]), str(pg.base))) == \
               (a["rc"], normal(one_line(a["stderr"]), str(lite.base))), where
        return
    assert a["rc"] == 0, f"{where} failed on SQLite: {a['stderr']}"
    assert b["rc"] == 0, f"{where} failed on PostgreSQL: {b['stderr']}"
    if step.expect == "json":
        assert normal(json.loads(b["stdout"]), str(pg.base), pg.shift) == \
            normal(json.loads(a["stdout"]), str(lite.base), lite.shift), \
            where
    elif step.expect == "text":
        assert normal(b["stdout"], str(pg.base)) == normal(a["stdout"], str(lite.base)), where
    else:
        assert a["stdout"].strip() and b["stdout"].strip(), where


def pg_hub(base: Path, url: str) -> Hub:
    hub = init_hub(base)
    hub.configure(kind="rabbitmq", management_urls=[f"http://127.0.0.1:{free_port()}"], auth_port=free_port(),
                  url=url)
    return hub


def test_commands_from_another_fleets_directory_are_refused_and_change_nothing(runs, tmp_path, pg_url):
    """A hub directory of another fleet (own root CA and audit key) pointed at the registry: every command is
    refused in one line, through the API or directly (role), before it writes (its audit rows would break the
    chain for every hub)."""
    pg = runs["postgresql"]
    other = pg_hub(tmp_path / "other", pg_url)
    before = pg.registry().query("SELECT max(id) AS n FROM audit")[0]["n"]
    for args in (("device", "add", "intruder"), ("role", "set", "intruder", "--rule", "publish:x/{id}"),
                 ("identity", "list", "--json")):
        proc = other.cli(*args)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        assert "belongs to a fleet with another root CA" in one_line(proc.stderr), (args, proc.stderr)
    registry = pg.registry()
    try:
        assert registry.query("SELECT max(id) AS n FROM audit")[0]["n"] == before
        assert registry.query("SELECT id FROM devices WHERE id = 'intruder'") == []
        assert registry.query("SELECT name FROM roles WHERE name = 'intruder'") == []
    finally:
        pg.close()
    assert pg.hub.cli("audit", "verify").returncode == 0


def test_an_unreachable_postgresql_registry_is_one_error_line(tmp_path):
    hub = pg_hub(tmp_path, f"postgresql+psycopg://tessera@127.0.0.1:{free_port()}/tessera")
    for args in (("role", "list"), ("device", "list"),
                 ("broker", "render", "--out", str(tmp_path / "nodes"), "--node", "n1:5672:25672:1883:15672")):
        proc = hub.cli(*args)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        assert "cannot connect" in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_the_normaliser_keeps_what_matters():
    """normal() hides only what differs by nature: a changed status, id or count still differs."""
    base = "/tmp/x"
    one = {"id": "dev-a", "status": "active", "serial": "ab" * 10, "created": "2026-01-01T00:00:00+00:00",
           "detail": "serial 0123456789abcdef01 at 2026-01-01T00:00:00Z", "file": "/tmp/x/fac.csv", "n": 3}
    other = {**one, "serial": "cd" * 10, "created": "2027-02-02T01:01:01.5+00:00",
             "detail": "serial fedcba9876543210ff at 2027-02-02T01:01:01Z", "file": "/tmp/y/fac.csv"}
    assert normal(one, base) == normal(other, "/tmp/y")
    for key, value in (("status", "revoked"), ("id", "dev-b"), ("n", 4), ("serial", None), ("detail", "other")):
        assert normal({**one, key: value}, base) != normal(one, base), key
    row = {"id": 7, "actor": "est", "action": "enroll"}
    assert normal([row], base, 4) == normal([{**row, "id": 5}], base, 2) != normal([{**row, "id": 6}], base, 2)
    assert normal([row], base, 7) == []  # a row from before the first compared command
