"""schemathesis against the fleet API's served OpenAPI document: a real `tessera-hub serve` over real TLS.

The schema is the document the hub serves at /api/v1/openapi.json (fetched with an `admin` identity's client
certificate); every request goes through a `requests.Session` with that certificate and the fleet root as the
trust anchor. Checks: no 5xx, status codes, content types (problem+json for errors) and response bodies as
documented. Bounded (hypothesis `max_examples`) and derandomized so CI reruns the same cases.

The hub is this module's own (the bulk actions revoke and suspend whatever a generated selector matches): a few
devices, one enrolled (so certificates and cert_not_after are not empty), in groups with labels.
"""

from __future__ import annotations

import base64

import pytest

schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,  # noqa: E402
                                               status_code_conformance)

from hub.api.routes import all_routes  # noqa: E402
from tests.helpers import free_port  # noqa: E402
from tests.integration.brokerfixtures import BROKER_LIMITS, enroll_device, wait_ready  # noqa: E402
from tests.integration.hubfixtures import running_hub  # noqa: E402

pytestmark = pytest.mark.integration
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MAX_EXAMPLES = 60  # per operation; the module takes well under a minute


class FuzzHub:
    def __init__(self, hub, port: int):
        self.hub, self.port = hub, port
        self.base_url = f"https://127.0.0.1:{port}"
        d = hub.dir / "identities" / "fuzz"
        self.session = requests.Session()
        self.session.trust_env = False  # else REQUESTS_CA_BUNDLE (set on many machines) overrides `verify`
        self.session.cert = (str(d / "fuzz.pem"), str(d / "fuzz.key"))
        self.session.verify = str(hub.root_pem)


@pytest.fixture(scope="module")
def fuzz_hub(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzzhub")
    port = free_port()
    with running_hub(base, api_port=port, **BROKER_LIMITS) as hub:
        wait_ready(hub)
        hub.cli_ok("identity", "add", "fuzz", "--role", "admin")
        enroll_device(hub, "fz-enrolled", base / "dev", groups=("lab",))
        for n in range(4):
            hub.add_device(f"fz-{n}", "--group", "lab" if n % 2 else "field", "--label", f"site=s{n}")
        f = FuzzHub(hub, port)
        yield f
        f.session.close()


@pytest.fixture(scope="module")
def api_schema(fuzz_hub):
    resp = fuzz_hub.session.get(f"{fuzz_hub.base_url}/api/v1/openapi.json", timeout=30)
    assert resp.status_code == 200, resp.text
    return schemathesis.openapi.from_dict(resp.json())


def _cases():
    for route in all_routes():
        yield pytest.param(route, GenerationMode.POSITIVE, id=f"{route.method} {route.path} positive")
        if route.body or any(p.where == "query" for p in route.params):  # a string path id cannot be invalid
            yield pytest.param(route, GenerationMode.NEGATIVE, id=f"{route.method} {route.path} negative")


@pytest.mark.parametrize(("route", "mode"), list(_cases()))
def test_served_openapi_document_holds(api_schema, fuzz_hub, route, mode):
    """Generated requests (valid ones, and with `negative` ones the document says are invalid) get documented
    answers: no 5xx, a documented status, its content type (problem+json for errors) and body schema."""
    operation = api_schema[route.path][route.method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):  # every check on every answer, CSV exports too (text/csv is a documented 200 type)
        case.call_and_validate(base_url=fuzz_hub.base_url, session=fuzz_hub.session, checks=CHECKS, timeout=30,
                              verify=fuzz_hub.session.verify, cert=fuzz_hub.session.cert)  # else its own defaults

    try:
        check()
    except Unsatisfiable:  # nothing in this operation can be generated wrong (or right): a generation limit
        pytest.skip(f"schemathesis cannot generate {mode.value} cases for {route.method} {route.path}")


# --- what schemathesis found: each a reproducer of a fixed bug (they must keep passing) -----------------------------

def _documented_200_types(api_schema, path: str, method: str) -> set[str]:
    return set(api_schema.raw_schema["paths"][path][method]["responses"]["200"]["content"])


def test_csv_export_content_type_is_documented(api_schema, fuzz_hub):
    """Was schemathesis ST105 (Undocumented Content-Type): the 200 of GET /api/v1/devices documented only
    application/json, but format=csv answers text/csv (now Route.also)."""
    resp = fuzz_hub.session.get(f"{fuzz_hub.base_url}/api/v1/devices?format=csv", timeout=30)
    assert resp.status_code == 200
    media = resp.headers["content-type"].split(";")[0].strip()
    assert media == "text/csv"
    assert media in _documented_200_types(api_schema, "/api/v1/devices", "get")


#: (method, path, body) the served document calls valid and the server refuses with 400 (schemathesis ST202,
#: "schema-valid request rejected", with its positive_data_acceptance check): the document is looser than the API
_LOOSE = [  # each was an xfail (the document looser than the API); the document now says "invalid" to each
    pytest.param("PATCH", "/api/v1/devices/fz-0", {"groups": ["Not Valid"]}, id="patch-group-name"),
    pytest.param("PATCH", "/api/v1/devices/fz-0", {"labels": {"Site": "s1"}}, id="patch-label-key"),
    pytest.param("PATCH", "/api/v1/devices/fz-0", {"labels": {"site": " s1"}}, id="patch-label-value"),
    pytest.param("POST", "/api/v1/devices", {"id": "fz-new", "groups": ["Not Valid"]}, id="create-group-name"),
    pytest.param("POST", "/api/v1/devices/actions/suspend", {"selector": {"ids": ["fz-0"], "status": "active"}},
                 id="selector-ids-and-filters"),
    pytest.param("POST", "/api/v1/devices/actions/suspend", {"selector": {"label": "site"}}, id="selector-label"),
    pytest.param("POST", "/api/v1/devices/actions/suspend", {"selector": {"group": "Lab"}}, id="selector-group"),
    pytest.param("POST", "/api/v1/devices/actions/suspend", {"selector": {"ids": ["fz-0"]}, "reason": "caf\u00e9"},
                 id="bulk-reason-ascii"),
]


@pytest.mark.parametrize(("method", "path", "body"), _LOOSE)
def test_schema_valid_requests_are_not_refused(api_schema, fuzz_hub, method, path, body):
    """A request the served document calls valid is not refused as bad input (dry runs: nothing changes)."""
    import jsonschema

    doc = api_schema.raw_schema
    template = "/api/v1/devices/{id}" if path.startswith("/api/v1/devices/fz-") else path
    ref = doc["paths"][template][method.lower()]["requestBody"]["content"]["application/json"]["schema"]
    valid = jsonschema.Draft202012Validator({**ref, "components": doc["components"]}).is_valid(body)
    resp = fuzz_hub.session.request(method, f"{fuzz_hub.base_url}{path}", json=body, timeout=30)
    assert not (valid and resp.status_code == 400), (valid, resp.status_code, resp.text)


def _cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


#: (method, path, body): inputs that made hub/api answer 500 (found probing past what the fuzz generates): an
#: OverflowError in queries.parse_time (a time at the edge of the datetime range with an offset), str.isdigit taking
#: '\u00b2' in routing.page_limit, a cursor of deeply nested JSON (RecursionError) or with a lone surrogate (the SQLite
#: bind's UnicodeEncodeError), a deeply nested JSON body (RecursionError in routing.json_body). Each is a 400 problem.
_CRASHERS = [
    pytest.param("GET", "/api/v1/devices?cert_expires_before=0001-01-01T00:00:00%2B01:00", None,
                 id="time-underflow"),
    pytest.param("GET", "/api/v1/devices?last_seen_before=9999-12-31T23:59:59-01:00", None,
                 id="time-overflow"),
    pytest.param("POST", "/api/v1/devices/actions/suspend",
                 {"selector": {"cert_expires_before": "0001-01-01T00:00:00+01:00"}}, id="selector-time-underflow"),
    pytest.param("GET", "/api/v1/devices?limit=%C2%B2", None, id="limit-superscript-digit"),
    pytest.param("GET", "/api/v1/devices?cursor=" + _cursor(b"[" * 5000), None, id="cursor-nested-json"),
    pytest.param("GET", "/api/v1/devices?cursor=" + _cursor(b'{"after": "\\ud800"}'), None,
                 id="cursor-lone-surrogate"),
    pytest.param("POST", "/api/v1/devices/actions/suspend", b"[" * 200_000, id="body-nested-json"),
    pytest.param("PATCH", "/api/v1/devices/fz-0", b"[" * 200_000, id="patch-body-nested-json"),
    pytest.param("POST", "/api/v1/devices", b"[" * 200_000, id="create-body-nested-json"),
    pytest.param("GET", "/api/v1/devices?cursor=", None, id="cursor-empty"),
    pytest.param("GET", "/api/v1/devices?cursor=" + _cursor(b'{"after": "fz-0", "x": 1}'), None,
                 id="cursor-extra-key"),
    pytest.param("POST", "/api/v1/devices/actions/suspend", {"selector": {"label": "site=\ud800"}},
                 id="selector-label-lone-surrogate"),
]


@pytest.mark.parametrize(("method", "path", "body"), _CRASHERS)
def test_bad_input_is_a_problem_not_a_crash(fuzz_hub, method, path, body):
    kwargs = ({"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes)
              else {"json": body} if body is not None else {})
    resp = fuzz_hub.session.request(method, f"{fuzz_hub.base_url}{path}", timeout=30, **kwargs)
    assert resp.status_code == 400, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/problem+json")
    detail = resp.json()["detail"]
    assert detail and "\n" not in detail and len(detail) < 200, detail
