"""Where third parties fetch the CRL: `init --hostname` / `--public-url` / `--public-crl-url` and fleet.toml [crl]
decide the distribution points (the plain-http one first, RFC 5280 8, then the https one)."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from hub.ca.authority import CaError, load_ca
from hub.config import ConfigError, load_config
from hub.setup import create_fleet

NOW = datetime(2027, 1, 1, tzinfo=timezone.utc)


def _dp(cfg) -> list[str]:
    """The URIs of a new device certificate's one distribution point, in order."""
    ca = load_ca(cfg.ca_dir)
    try:
        cert = ca.issue_device_cert(ec.generate_private_key(ec.SECP256R1()).public_key(), "dev-1", cfg.policy, NOW,
                                    cfg.crl_urls)
    finally:
        ca.close()
    dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert len(dp) == 1 and dp[0].relative_name is None and dp[0].reasons is None and dp[0].crl_issuer is None
    return [name.value for name in dp[0].full_name]


def test_the_first_hostname_is_the_public_one(tmp_path):
    create_fleet(tmp_path / "h", "acme", NOW, hostnames=["hub.example.com", "10.0.0.5"])
    cfg = load_config(tmp_path / "h")
    assert cfg.public_host == "hub.example.com" and "10.0.0.5" in cfg.server_names
    assert _dp(cfg) == ["http://hub.example.com:8080/crl/device.crl", "https://hub.example.com:8443/crl/device.crl"]


def test_a_public_url_is_the_distribution_point(tmp_path):
    create_fleet(tmp_path / "h", "acme", NOW, hostnames=["hub.example.com"], public_url="http://crl.example.com/pki/")
    cfg = load_config(tmp_path / "h")
    assert cfg.public_url == "http://crl.example.com/pki"
    assert _dp(cfg) == ["http://hub.example.com:8080/crl/device.crl", "http://crl.example.com/pki/crl/device.crl"]


def test_a_public_crl_url_is_the_http_distribution_point(tmp_path):
    create_fleet(tmp_path / "h", "acme", NOW, hostnames=["hub.example.com"], public_url="https://cdn.example.com",
                 public_crl_url="http://crl.example.com/pki/")
    cfg = load_config(tmp_path / "h")
    assert cfg.crl_public_url == "http://crl.example.com/pki"
    assert _dp(cfg) == ["http://crl.example.com/pki/crl/device.crl", "https://cdn.example.com/crl/device.crl"]


def test_the_fleet_toml_crl_port_names_the_listener_and_0_leaves_only_https(tmp_path):
    create_fleet(tmp_path / "h", "acme", NOW, hostnames=["hub.example.com"])
    toml = tmp_path / "h" / "fleet.toml"
    assert "# http_port = 8080" in toml.read_text()  # the default is written as a comment (like [api] port)
    toml.write_text(toml.read_text().replace("# http_port = 8080", "http_port = 8081"))
    assert _dp(load_config(tmp_path / "h"))[0] == "http://hub.example.com:8081/crl/device.crl"
    toml.write_text(toml.read_text().replace("http_port = 8081", "http_port = 0"))
    assert _dp(load_config(tmp_path / "h")) == ["https://hub.example.com:8443/crl/device.crl"]


def test_the_same_url_twice_is_named_once(tmp_path):
    create_fleet(tmp_path / "h", "acme", NOW, public_url="http://crl.example.com", public_crl_url="http://crl.example.com")
    assert _dp(load_config(tmp_path / "h")) == ["http://crl.example.com/crl/device.crl"]


@pytest.mark.parametrize("bad", ["https://crl.example.com", "ftp://crl.example.com", "crl.example.com", "http://",
                                 "http://x/?a=1", "http://x/#f"])
def test_a_bad_public_crl_url_is_refused_before_anything_is_written(tmp_path, bad):
    with pytest.raises(ConfigError, match="--public-crl-url"):
        create_fleet(tmp_path / "h", "acme", NOW, public_crl_url=bad)
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("line, message", [
    ("http_port = 70000", "[crl] http_port must be a port number"),
    ('http_port = "8080"', "[crl] http_port must be a port number"),
    ("http_port = true", "[crl] http_port must be a port number"),
    ('public_url = "https://crl.example.com"', "[crl] public_url must be a plain http base URL"),
])
def test_bad_crl_settings_in_fleet_toml_are_one_clear_error(tmp_path, line, message):
    (tmp_path / "fleet.toml").write_text(f'[fleet]\nname = "acme"\n[crl]\n{line}\n')
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(tmp_path)


def test_a_certificate_needs_a_distribution_point(tmp_path):
    cfg = create_fleet(tmp_path / "h", "acme", NOW)
    ca = load_ca(cfg.ca_dir)
    try:
        with pytest.raises(CaError, match="CRL distribution point"):
            ca.issue_device_cert(ec.generate_private_key(ec.SECP256R1()).public_key(), "dev-1", cfg.policy, NOW, [])
        with pytest.raises(CaError, match="CRL distribution point"):
            ca.issue_device_cert(ec.generate_private_key(ec.SECP256R1()).public_key(), "dev-1", cfg.policy, NOW,
                                 ["http://ok.example.com/crl/device.crl", "ldap://x/"])
    finally:
        ca.close()


@pytest.mark.parametrize("bad", ["ftp://crl.example.com", "crl.example.com", "https://", "https://x/?a=1"])
def test_a_bad_public_url_is_refused_before_anything_is_written(tmp_path, bad):
    with pytest.raises(ConfigError, match="--public-url"):
        create_fleet(tmp_path / "h", "acme", NOW, public_url=bad)
    assert not (tmp_path / "h").exists()
