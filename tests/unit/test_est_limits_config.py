"""fleet.toml [est] limits: defaults written by init, read back, bad values refused with the key named."""

from __future__ import annotations

import re

import pytest

from hub.config import ConfigError, HubConfig, load_config
from hub.est.connlimits import Limits


def write(tmp_path, **values: str) -> None:
    """fleet.toml as init writes it, with the [est] lines of `values` replaced."""
    text = HubConfig(root=tmp_path, fleet="acme").to_toml()
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, key
    (tmp_path / "fleet.toml").write_text(text)


def test_defaults_round_trip(tmp_path):
    write(tmp_path)
    cfg = load_config(tmp_path)
    assert (cfg.failures_per_minute, cfg.source_failures_per_minute, cfg.global_failures_per_minute) == (30, 300, 3000)
    assert (cfg.max_connections_per_source, cfg.header_timeout, cfg.request_timeout) == (32, 10.0, 30.0)
    assert Limits.from_config(cfg) == Limits()


def test_settings_are_read(tmp_path):
    write(tmp_path, max_connections_per_source="4", header_timeout="2.5", request_timeout="7")
    limits = Limits.from_config(load_config(tmp_path))
    assert (limits.max_per_source, limits.header_timeout, limits.request_timeout) == (4, 2.5, 7.0)


@pytest.mark.parametrize("key, value", [("header_timeout", "0"), ("request_timeout", '"soon"'),
                                        ("max_connections_per_source", "0"), ("source_failures_per_minute", "-1")])
def test_bad_values_are_one_clear_error(tmp_path, key, value):
    write(tmp_path, **{key: value})
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert f"[est] {key}" in str(err.value) and "\n" not in str(err.value)
