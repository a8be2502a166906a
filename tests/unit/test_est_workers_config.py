"""fleet.toml [est] workers (hub/config.py), the limits the pool holds and each worker's share (hub/est/pool.py)."""

from __future__ import annotations

import os
import re

import pytest

from hub.config import MAX_EST_WORKERS, ConfigError, HubConfig, load_config
from hub.est.pool import hub_limits, share


def write(tmp_path, **values: str) -> HubConfig:
    text = HubConfig(root=tmp_path, fleet="acme").to_toml()
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, key
    (tmp_path / "fleet.toml").write_text(text)
    return load_config(tmp_path)


def test_default_is_one_per_cpu_capped(tmp_path):
    cfg = write(tmp_path)
    assert cfg.est_workers == 0
    assert cfg.workers == max(1, min(len(os.sched_getaffinity(0)), MAX_EST_WORKERS))


def test_an_explicit_count_is_kept(tmp_path):
    assert write(tmp_path, workers="3").workers == 3


@pytest.mark.parametrize("value", ["-1", "65", '"two"', "true"])
def test_bad_counts_are_one_clear_error(tmp_path, value):
    with pytest.raises(ConfigError) as err:
        write(tmp_path, workers=value)
    assert "[est] workers" in str(err.value) and "\n" not in str(err.value)


def test_the_pool_holds_the_hub_wide_limits_as_configured(tmp_path):
    cfg = write(tmp_path, rate_per_source="100.0", rate_burst="200", failures_per_minute="30",
                source_failures_per_minute="301", global_failures_per_minute="3000", max_connections_per_source="5")
    limiter, limits = hub_limits(cfg)
    assert (limiter.rate, limiter.burst, limiter.max_failures) == (100.0, 200, 30)
    assert (limiter.max_source_failures, limiter.max_global_failures) == (301, 3000)
    assert limits.max_per_source == 5
    assert (limits.header_timeout, limits.request_timeout) == (cfg.header_timeout, cfg.request_timeout)


def test_each_worker_has_its_share_of_every_limit_for_when_the_supervisor_does_not_answer(tmp_path):
    cfg = write(tmp_path, rate_per_source="100.0", rate_burst="200", failures_per_minute="30",
                source_failures_per_minute="301", global_failures_per_minute="3000", max_connections_per_source="5")
    limiter, limits = share(cfg, 2)
    assert (limiter.rate, limiter.burst, limiter.max_failures) == (50.0, 100, 15)
    assert (limiter.max_source_failures, limiter.max_global_failures) == (151, 1500)  # rounded up
    assert limits.max_per_source == 3
    assert (limits.header_timeout, limits.request_timeout) == (cfg.header_timeout, cfg.request_timeout)
    one, one_limits = share(cfg, 1)
    assert (one.rate, one.burst, one.max_failures, one_limits.max_per_source) == (100.0, 200, 30, 5)
    tiny, tiny_limits = share(write(tmp_path, failures_per_minute="1", max_connections_per_source="1"), 4)
    assert tiny.max_failures == 1 and tiny_limits.max_per_source == 1  # never below one
