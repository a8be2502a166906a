"""Tests for agent.config: the renew_command_min_interval key (default, file, --set override, validation)."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, load, load_dict, to_dict


def test_renew_command_min_interval(tmp_path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "dev-1"\n')
    assert load(path).renew_command_min_interval == 600.0
    path.write_text('device_id = "dev-1"\nrenew_command_min_interval = 30\n')
    cfg = load(path)
    assert cfg.renew_command_min_interval == 30.0
    assert load(path, ["renew_command_min_interval=0"]).renew_command_min_interval == 0.0
    assert load_dict(to_dict(cfg)).renew_command_min_interval == 30.0   # what the renewal child gets


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_renew_command_min_interval_invalid(tmp_path, value) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("")
    with pytest.raises(ConfigError, match="renew_command_min_interval"):
        load(path, [f"renew_command_min_interval={value}"])
