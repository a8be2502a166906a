"""Shared fixtures: throwaway SoftHSM tokens, a throwaway file-key CA, free loopback ports.

Rules every test here follows (see hsm.worker / hsm.tls): python-pkcs11 and the OpenSSL engine initialise the
PKCS#11 module once per process with the SOFTHSM2_CONF they see first, so the pytest process never opens a
per-test token itself. Token work runs in spawned children (hsm.worker.run_isolated) or in
``python -m tests.helpers`` subprocesses.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

ROOT = Path(__file__).resolve().parent.parent

# hsm.tokeninit runs `python -m hsm.tokeninit` with the caller's environment: make the repository importable
# there (and in our own `python -m tests.helpers` children) whatever the current directory is.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
_pp = os.environ.get("PYTHONPATH", "")
if str(ROOT) not in _pp.split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), _pp) if p)

from tests.helpers import CA, ROUTES_ENV, free_port, selected_routes  # noqa: E402  (after the sys.path fix above)

# hypothesis profiles: "ci" (CI=true, as .ci/run has it) replays the same examples on every run, keeps no
# database and sets no deadline (what recent hypothesis versions' own "ci" profile does, spelled out so every
# version does it); "dev" (elsewhere) explores new examples each run and remembers failures in .hypothesis/
# (gitignored). HYPOTHESIS_PROFILE picks one explicitly.
hypothesis_settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True,
                                     suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.register_profile("dev")
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

__all__ = ["free_port"]

# The TLS routes: `tls_route` below runs a test on each route this run selects ($TESSERA_TEST_ROUTES, see
# tests.helpers.selected_routes); agentfixtures.make_token_device crosses it with the token types.

# `token` (SoftHSM and TPM 2.0 in turn), `tpmtoken` and the session's `tpm_stack`.
pytest_plugins = ["tests.integration.tpmfixtures"]


@pytest.fixture(params=selected_routes())
def tls_route(request) -> str:
    """The OpenSSL route (provider | engine) of a TLS test: each route $TESSERA_TEST_ROUTES selects in turn (unset:
    both; the test id shows it, e.g. [softhsm-provider]). Give it to children explicitly: run_tls_child(...,
    route=tls_route), child_env(tls_route). A selected route that is not installed fails the test (./dev.sh setup
    installs both). A test decorated with tests.helpers.one_tls_route gets the first selected route only."""
    from hsm.tls import available_routes

    if request.param not in available_routes():
        pytest.fail(f"TLS route {request.param!r} is not installed here (./dev.sh setup installs it; "
                    f"{ROUTES_ENV}=... selects the routes a run tests)")
    return request.param


@pytest.fixture
def softtoken(tmp_path):
    """A fresh SoftHSM2 token (label 'tessera', random PIN in a 0600 file) in its own directory."""
    from hsm.softhsm import create_token

    token = create_token(tmp_path / "softhsm", label="tessera")
    try:
        yield token
    finally:
        token.destroy()


@pytest.fixture
def ca(tmp_path) -> CA:
    """A throwaway EC P-256 root CA with file keys (see tests.helpers.CA)."""
    return CA(tmp_path / "ca")


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_port()
