"""The RabbitMQ driver without RabbitMQ: fleet.toml [broker], the rendered node files, the auth back end's answers
over a real registry and its HTTP endpoint (wrong secret: 404). Seconds.

The back end's requests are the ones RabbitMQ 3.10 sends (rabbitmq_auth_backend_http, POST form fields): user
(username, password when CONNECT carried one, client_id, vhost), vhost (username, vhost, ip, client_id), resource
(username, vhost, resource, name, permission) and topic (... routing_key, variable_map.client_id).
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import timedelta

import pytest

from hub.broker import BrokerError
from hub.broker.rabbitmq import authserver, read_secret
from hub.broker.rabbitmq.auth import MGMT_USER, AuthBackend, amqp_to_mqtt
from hub.broker.rabbitmq.config import ClusterTls, Node, write_node_files
from hub.ca.credential import credential_uri
from hub.config import ConfigError, load_config
from tests.integration.pgfixtures import pg_server  # noqa: F401
from tests.integration.test_authz_plugin import Pki, utcnow

pytestmark = pytest.mark.integration

SECRET = "0123456789abcdef"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(request, tmp_path_factory) -> Pki:
    """One fleet per registry dialect: the back end decides the same over either."""
    url = None
    if request.param == "postgresql":
        server = request.getfixturevalue("pg_server")
        name = server.create_database()
        request.addfinalizer(lambda: server.drop_database(name))
        url = server.url(name)
    pki = Pki(tmp_path_factory.mktemp("rmq-cfg"), url)
    request.addfinalizer(pki.reg.close)
    creds = {"rc-dev": pki.device("rc-dev", groups=("g1",)), "rc-other": pki.device("rc-other"),
             "rc-revoked": pki.device("rc-revoked")}
    pki.reg.set_status("rc-revoked", "revoked", utcnow(), actor="test")
    creds["rc-renewed-old"] = pki.device("rc-renewed")
    creds["rc-renewed"] = pki.renew(creds["rc-renewed-old"], grace=timedelta(0))
    creds["svc.rc"] = pki.identity("rc", "service", "admin")
    # the user names RabbitMQ passes: each certificate's credential URI (ssl_cert_login from the URI SAN)
    U.clear()
    U.update({name: cred_uri(c) for name, c in creds.items()})
    return pki


@pytest.fixture(scope="module")
def backend(fleet) -> Iterator[AuthBackend]:
    backend = AuthBackend(fleet.registry, SECRET)
    yield backend
    backend.close()


#: principal -> its certificate's credential URI, for the current `fleet` (module scope: one dialect at a time)
U: dict[str, str] = {}


def cred_uri(cred) -> str:
    issuer = "service" if cred.principal.startswith("svc.") or cred.principal == "tessera-hub" else "device"
    return credential_uri(issuer, int(cred.serial, 16))


def _toml(tmp_path, broker: str):
    (tmp_path / "fleet.toml").write_text(f'[fleet]\nname = "acme"\n[broker]\n{broker}\n')
    return load_config(tmp_path)


def test_broker_section(tmp_path):
    assert _toml(tmp_path, "").broker_kind == "mosquitto"
    cfg = _toml(tmp_path, 'kind = "rabbitmq"\nmanagement_urls = ["http://127.0.0.1:15672"]\nauth_port = 9000')
    assert (cfg.broker_kind, cfg.rabbitmq_management, cfg.rabbitmq_auth_port) == \
        ("rabbitmq", ["http://127.0.0.1:15672"], 9000)
    for bad, says in (('kind = "kafka"', "[broker] kind"), ('kind = "rabbitmq"', "needs management_urls"),
                      ('kind = "rabbitmq"\nmanagement_urls = ["ftp://x"]', "management_urls"),
                      ('kind = "rabbitmq"\nmanagement_urls = ["http://a:1"]\nauth_port = 0', "auth_port")):
        with pytest.raises(ConfigError, match="fleet.toml is not valid") as exc:
            _toml(tmp_path, bad)
        assert says in str(exc.value) and "\n" not in str(exc.value)


def test_node_files(tmp_path):
    tls = ClusterTls(tmp_path / "ca.pem", tmp_path / "srv.pem", tmp_path / "srv.key", tmp_path / "crl")
    files = write_node_files(tmp_path / "r1", Node("r1", 1, 2, 3, 4), tls, f"http://127.0.0.1:5/{SECRET}")
    for path in files.values():
        assert path.stat().st_mode & 0o777 == 0o600, path
    conf = files["rabbitmq.conf"].read_text()
    for line in ("auth_backends.1 = http", "mqtt.listeners.tcp = none", "mqtt.listeners.ssl.default = 127.0.0.1:3",
                 "mqtt.ssl_cert_login = true", "ssl_cert_login_from = subject_alternative_name",
                 "ssl_cert_login_san_type = uri", "ssl_cert_login_san_index = 0", "mqtt.allow_anonymous = false",
                 "max_message_size = 262144",
                 f"auth_http.user_path = http://127.0.0.1:5/{SECRET}/user", "management.tcp.ip = 127.0.0.1"):
        assert line in conf.splitlines(), line
    assert "default_user" not in conf and "auth_cache" not in conf  # no password user, no cache
    adv = files["advanced.config"].read_text()
    assert "{crl_check, peer}" in adv and f'{{dir, "{tls.crl_dir}"}}' in adv and "{fail_if_no_peer_cert, true}" in adv
    assert "'tlsv1.1'" not in adv and "'tlsv1'" not in adv


def test_user_answers(backend):
    assert backend.user({"username": U["rc-dev"], "client_id": "rc-dev", "vhost": "/"}) == "allow"
    refused = [{"username": U["rc-dev"], "password": "x"}, {"username": U["rc-other"], "password": ""},
               {"username": U["rc-dev"], "client_id": "rc-other"}, {"username": U["rc-revoked"]},
               {"username": "nobody"}, {"username": "urn:tessera:cred:device:1234"},  # unknown credential
               {"username": "rc-dev"},  # a bare CN (a certificate without its credential URI)
               {"username": MGMT_USER}, {"username": MGMT_USER, "password": "wrong"},
               {"username": U["svc.rc"], "password": SECRET}]
    for params in refused:
        assert backend.user(params).startswith("deny"), params
    assert backend.user({"username": MGMT_USER, "password": SECRET}) == "allow administrator"
    assert backend.user({"username": U["rc-renewed"]}) == "allow"  # its new certificate
    assert backend.user({"username": U["rc-renewed-old"]}) == "deny superseded"  # the old one, grace over


def test_a_login_on_the_current_certificate_ends_the_grace_of_superseded_ones(fleet):
    """The Mosquitto plugin refuses a superseded certificate once the new one connected; the back end tells the
    driver (`on_active`), which ends the grace in the registry for every node. Only then, and only for a principal
    with a superseded certificate still in its grace."""
    calls: list[str] = []
    backend = AuthBackend(fleet.registry, SECRET, on_active=calls.append)
    try:
        old = fleet.device("rc-graced")
        new = fleet.renew(old, grace=timedelta(days=1))  # (test_listener_crls: no entry changes in 6 h)
        assert backend.user({"username": cred_uri(old), "client_id": "rc-graced"}) == "allow"  # in its grace
        assert calls == []  # a superseded certificate ends nothing
        assert backend.user({"username": U["rc-dev"], "client_id": "rc-dev"}) == "allow"
        assert calls == []  # nothing superseded to end
        assert backend.user({"username": cred_uri(new), "client_id": "rc-graced"}) == "allow"
        assert calls == ["rc-graced"]
    finally:
        backend.close()


def test_an_empty_or_damaged_secret_never_lets_the_management_user_in(fleet, tmp_path):
    # a back end given an empty secret (what a crash between creating and writing the file used to leave)
    empty = AuthBackend(fleet.registry, "")
    assert empty.user({"username": MGMT_USER, "password": ""}).startswith("deny")
    # the driver's secret files: made whole (0600, 48 hex digits); an empty, short or widely readable one refused
    path = tmp_path / "mgmt.secret"
    made = read_secret(path)
    assert len(made) == 48 and oct(path.stat().st_mode & 0o777) == "0o600" and read_secret(path) == made
    assert not list(tmp_path.glob(".*.tmp"))
    for text, mode, needle in (("", 0o600, "no whole secret"), ("abc", 0o600, "no whole secret"),
                               (made, 0o644, "0600")):
        path.write_text(text)
        path.chmod(mode)
        with pytest.raises(BrokerError, match=needle):
            read_secret(path)


def test_vhost_and_resource_answers(backend):
    assert backend.vhost({"username": U["rc-dev"], "vhost": "/", "client_id": "rc-dev"}) == "allow"
    for params in ({"username": U["rc-dev"], "vhost": "other"}, {"username": MGMT_USER, "vhost": "/"},
                   {"username": U["rc-dev"], "vhost": "/", "client_id": "rc-other"},
                   {"username": U["rc-revoked"], "vhost": "/"}):
        assert backend.vhost(params).startswith("deny"), params
    base = {"username": U["rc-dev"], "vhost": "/"}
    allowed = [{"resource": "exchange", "name": "amq.topic", "permission": "write"},
               {"resource": "exchange", "name": "amq.topic", "permission": "read"},
               {"resource": "queue", "name": "mqtt-subscription-rc-devqos1", "permission": "configure"}]
    for params in allowed:
        assert backend.resource({**base, **params}) == "allow", params
    refused = [{"resource": "exchange", "name": "amq.topic", "permission": "configure"},
               {"resource": "exchange", "name": "amq.direct", "permission": "write"},
               {"resource": "queue", "name": "mqtt-subscription-rc-otherqos1", "permission": "read"},
               {"resource": "queue", "name": "anything", "permission": "configure"}]
    for params in refused:
        assert backend.resource({**base, **params}).startswith("deny"), params


def test_topic_answers(backend):
    def topic(perm, key, user="rc-dev", cid=None):
        return backend.topic({"username": U[user], "vhost": "/", "resource": "topic", "name": "amq.topic",
                              "permission": perm, "routing_key": key, "variable_map.client_id": cid or user})
    assert amqp_to_mqtt("devices.rc-dev.*") == "devices/rc-dev/+"
    assert topic("write", "devices.rc-dev.telemetry") == "allow"
    assert topic("read", "devices.rc-dev.commands") == "allow"
    assert topic("read", "fleet.groups.g1.#") == "allow"
    for perm, key, user, cid in (("write", "devices.rc-other.telemetry", "rc-dev", None),
                                 ("write", "devices.rc-dev.commands", "rc-dev", None),
                                 ("read", "devices.rc-other.commands", "rc-dev", None),
                                 ("read", "#", "rc-dev", None), ("read", "devices.*.commands", "rc-dev", None),
                                 ("read", "$share.s.devices.rc-dev.commands", "rc-dev", None),
                                 ("write", "devices.rc-dev.telemetry", "rc-dev", "rc-other"),
                                 ("write", "devices.rc-revoked.telemetry", "rc-revoked", None),
                                 ("write", "devices.rc-dev.*", "rc-dev", None)):
        assert topic(perm, key, user, cid).startswith("deny"), (perm, key, user, cid)


def test_http_endpoint_needs_the_secret(backend):
    server = authserver.start(backend, SECRET)
    try:
        def post(path, **form):
            data = urllib.parse.urlencode(form).encode()
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", data=data, timeout=5) as resp:
                return resp.read().decode()
        assert post(f"/{SECRET}/user", username=U["rc-dev"]) == "allow"
        assert post(f"/{SECRET}/user", username=U["rc-dev"], password="x").startswith("deny")
        for path in (f"/{SECRET[:-1]}x/user", f"/{SECRET}/nothing", "/user"):
            with pytest.raises(urllib.error.HTTPError) as exc:
                post(path, username=U["rc-dev"])
            assert exc.value.code in (404, 405), path
    finally:
        server()


def test_render_command(tmp_path):
    """`tessera-hub broker render`: every node's files (0600) and the listener CRLs; a bad --node is one line."""
    from tests.integration.hubfixtures import init_hub

    hub = init_hub(tmp_path)
    hub.configure(auth_port=9123)
    said = hub.cli_ok("broker", "render", "--out", str(tmp_path / "nodes"), "--node", "r1:5001:5002:5003:5004",
                      "--node", "r2:5011:5012:5013:5014")
    assert "r1@localhost" in said and "r2@localhost" in said
    for name in ("r1", "r2"):
        for f in ("rabbitmq.conf", "advanced.config", "enabled_plugins"):
            assert (tmp_path / "nodes" / name / f).stat().st_mode & 0o777 == 0o600
    conf = (tmp_path / "nodes" / "r2" / "rabbitmq.conf").read_text()
    assert "mqtt.listeners.ssl.default = 127.0.0.1:5013" in conf and "127.0.0.1:9123/" in conf
    assert len(list((hub.dir / "broker" / "rabbitmq" / "crl").glob("*.r0"))) == 2
    for bad in ("r1:5001:5002:5003", "R1:1:2:3:4", "r1:1:1:2:3", "r1:1:2:3:99999"):
        proc = hub.cli("broker", "render", "--out", str(tmp_path / "x"), "--node", bad)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "--node" in proc.stderr, \
            (bad, proc.stderr)


def test_listener_crls(fleet, tmp_path):
    """The hash directory holds one CRL per CA, signed by it: revoked and spent superseded certificates; unchanged
    entries are not rewritten until REFRESH, then they are (a CRL past its nextUpdate would fail every handshake)."""
    from cryptography import x509

    from hub.broker.rabbitmq.crl import LIFETIME, REFRESH, CrlDir, name_hash

    crls = CrlDir(fleet.ca, tmp_path / "crl", fleet.ca.paths.device_ca, fleet.ca.paths.service_ca)
    t0 = utcnow()
    assert crls.write(fleet.reg, t0)
    device = x509.load_pem_x509_crl((tmp_path / "crl" / f"{name_hash(fleet.ca.paths.device_ca)}.r0").read_bytes())
    assert device.is_signature_valid(fleet.ca.device_ca.public_key())
    assert device.next_update_utc - device.last_update_utc == LIFETIME
    listed = {format(r.serial_number, "x") for r in device}
    revoked = fleet.reg.query("SELECT serial FROM certificates WHERE device_id = 'rc-revoked'")[0]["serial"]
    superseded = fleet.reg.query("SELECT serial FROM certificates WHERE device_id = 'rc-renewed' "
                                 "AND status = 'superseded'")[0]["serial"]
    current = fleet.reg.query("SELECT serial FROM certificates WHERE device_id = 'rc-dev'")[0]["serial"]
    assert {revoked.lstrip("0"), superseded.lstrip("0")} <= listed and current.lstrip("0") not in listed
    assert (tmp_path / "crl" / f"{name_hash(fleet.ca.paths.service_ca)}.r0").exists()
    assert not crls.write(fleet.reg, t0 + REFRESH / 2)
    assert crls.due(t0 + REFRESH) and crls.write(fleet.reg, t0 + REFRESH)


def test_connect_rate_per_principal(fleet):
    """[mqtt] connect_rate / connect_burst, as the Mosquitto plugin has them: a bucket per principal, refilled
    with the clock passed in (a fake one here)."""
    import datetime as dt

    now = [utcnow()]
    limited = AuthBackend(fleet.registry, SECRET, clock=lambda: now[0], connect_rate=60, connect_burst=2)
    answers = [limited.user({"username": U["rc-dev"]}) for _ in range(3)]
    assert answers[:2] == ["allow", "allow"] and answers[2] == "deny rate limited"
    assert limited.user({"username": U["rc-other"]}) == "allow"  # its own bucket
    now[0] += dt.timedelta(seconds=1)  # 60 a minute: one more token
    assert [limited.user({"username": U["rc-dev"]}) for _ in range(2)] == ["allow", "deny rate limited"]
