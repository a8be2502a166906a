"""EST's answer to a request that meets its registry closed (the process stopping: an EST worker whose supervisor
died, a hub at SIGTERM, a request still running past the server's drain): 503 with Retry-After, never a 403 (the
device would take its good token as refused; test_crash_consistency saw `403 closed: registry is closed`) nor a
500, and nothing decided: the token stays unused and enrolls once the hub is back. Real CA and registry
(`tessera-hub init`), no HTTP: EstService.handle() itself. Cost: ~3 s.
"""

from __future__ import annotations

import pytest

from tests.integration.hubfixtures import b64_body, basic, init_hub, make_csr, new_key

pytestmark = pytest.mark.integration


def _service(hub):
    from hub.ca.authority import load_ca
    from hub.config import load_config
    from hub.est.ratelimit import RateLimiter
    from hub.est.service import EstService
    from hub.registry.store import Registry

    cfg = load_config(hub.dir)
    limiter = RateLimiter(cfg.rate_per_source, cfg.rate_burst, cfg.failures_per_minute,
                          cfg.source_failures_per_minute, cfg.global_failures_per_minute)
    registry = Registry(cfg.registry_path)
    return EstService(load_ca(cfg.ca_dir, cfg.ca_token), registry, cfg.policy, cfg.crl_dir, cfg.crl_url,
                      limiter), registry


def test_a_closed_registry_is_a_503_to_retry_not_a_refusal(tmp_path):
    from hub.est.service import EstRequest

    hub = init_hub(tmp_path)
    token = hub.add_device("sd-1")
    req = EstRequest("POST", "/.well-known/est/simpleenroll",
                     {"content-type": "application/pkcs10", "authorization": basic("sd-1", token)},
                     b64_body(make_csr(new_key(), "sd-1")), "127.0.0.1")
    service, registry = _service(hub)
    registry.close()  # what a stopping process does under its last requests
    resp = service.handle(req)
    assert (resp.status, resp.body.split(b":")[0], resp.headers.get("Retry-After")) == (503, b"unavailable", "5"), \
        (resp.status, resp.body)
    credential = service.handle(EstRequest("GET", "/tessera/v1/credential", {}, b"", "127.0.0.1",
                                           peer_cert_der=None))
    assert credential.status == 401  # no client certificate: decided before the registry is read
    assert hub.query("SELECT used_at FROM tokens WHERE device_id = 'sd-1'") == [{"used_at": None}]

    service, registry = _service(hub)  # the hub back: the same token enrolls
    try:
        assert service.handle(req).status == 200
    finally:
        registry.close()
