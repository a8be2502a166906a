"""Where third parties fetch the CRL: `init --hostname` / `--public-url` decide the distribution point."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from hub.ca.authority import load_ca
from hub.config import ConfigError, load_config
from hub.setup import create_fleet

NOW = datetime(2027, 1, 1, tzinfo=timezone.utc)


def _dp(cfg) -> str:
    ca = load_ca(cfg.ca_dir)
    try:
        cert = ca.issue_device_cert(ec.generate_private_key(ec.SECP256R1()).public_key(), "dev-1", cfg.policy, NOW,
                                    cfg.crl_url)
    finally:
        ca.close()
    dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    return dp[0].full_name[0].value


def test_the_first_hostname_is_the_public_one(tmp_path):
    create_fleet(tmp_path / "h", "acme", NOW, hostnames=["hub.example.com", "10.0.0.5"])
    cfg = load_config(tmp_path / "h")
    assert cfg.public_host == "hub.example.com" and "10.0.0.5" in cfg.server_names
    assert _dp(cfg) == "https://hub.example.com:8443/crl/device.crl"


def test_a_public_url_is_the_distribution_point(tmp_path):
    create_fleet(tmp_path / "h", "acme", NOW, hostnames=["hub.example.com"], public_url="http://crl.example.com/pki/")
    cfg = load_config(tmp_path / "h")
    assert cfg.public_url == "http://crl.example.com/pki" and _dp(cfg) == "http://crl.example.com/pki/crl/device.crl"


@pytest.mark.parametrize("bad", ["ftp://crl.example.com", "crl.example.com", "https://", "https://x/?a=1"])
def test_a_bad_public_url_is_refused_before_anything_is_written(tmp_path, bad):
    with pytest.raises(ConfigError, match="--public-url"):
        create_fleet(tmp_path / "h", "acme", NOW, public_url=bad)
    assert not (tmp_path / "h").exists()
