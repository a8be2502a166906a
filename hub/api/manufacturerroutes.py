"""The fleet API's manufacturer routes: trust a manufacturer CA (admin), list them, remove one (admin), import a factory batch of
expected birth certificates (the allowlist: pending devices that enroll with their birth certificate, no token),
and let one device's birth certificate enroll once more (re-provisioning). All audited (hub/manufacturer/store.py).
"""

from __future__ import annotations

from aiohttp import web

from hub.manufacturer import store
from hub.registry.errors import DeviceExists, RegistryError

from .openapi import NAME_PATTERN
from .queries import BadRequest, Conflict, NotFound
from .routing import PREFIX, Param, Route, json_body, json_response


def _api_error(exc: RegistryError) -> Exception:
    if isinstance(exc, DeviceExists) or exc.code == "exists":
        return Conflict(str(exc))
    if exc.code == "unknown":
        return NotFound(str(exc))
    return BadRequest(str(exc), {"bad_ca": "ca", "fleet_ca": "ca", "bad_name": "name"}.get(exc.code, "body"))


def _call(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except (store.ManufacturerError, DeviceExists) as exc:
        raise _api_error(exc) from None


def _add(api, body: dict, actor: str, source: str | None) -> dict:
    unknown = set(body) - {"name", "ca"}
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)} (a manufacturer has name and ca)", "body")
    ca = api.live.ca
    fleet_cas = [ca.root, ca.device_ca, ca.service_ca]
    cert = _call(store.load_ca, body.get("ca"), fleet_cas)
    return _call(store.add_manufacturer, api.registry, body.get("name"), cert, api.clock(), actor, source)


async def add(api, request: web.Request, principal) -> web.Response:
    body = await json_body(request)
    return json_response(await api.run(_add, api, body, principal.name, request.remote), status=201)


async def list_all(api, request: web.Request, principal) -> web.Response:
    return json_response({"items": await api.run(store.list_manufacturers, api.registry)})


async def remove(api, request: web.Request, principal) -> web.Response:
    return json_response(await api.run(_call, store.remove_manufacturer, api.registry, request.match_info["name"],
                                       api.clock(), principal.name, request.remote))


def _import(api, name: str, body: dict, actor: str, source: str | None) -> dict:
    if not any(m["name"] == name for m in store.list_manufacturers(api.registry)):
        raise NotFound(f"no manufacturer {name!r}")
    unknown = set(body) - {"batch", "rows"}
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)} (a batch has batch and rows)", "body")
    rows = body.get("rows")
    if not isinstance(rows, list):
        raise BadRequest("rows must be a list of {serial, device_id, cert_sha256}", "rows")
    return _call(store.import_batch, api.registry, name, body.get("batch"), rows, api.cfg.fleet, api.clock(), actor,
                 source)


async def import_batch(api, request: web.Request, principal) -> web.Response:
    name = request.match_info["name"]
    body = await json_body(request)
    return json_response(await api.run(_import, api, name, body, principal.name, request.remote), status=201)


async def allow_reprovision(api, request: web.Request, principal) -> web.Response:
    return json_response(await api.run(_call, store.allow_reprovision, api.registry, request.match_info["id"],
                                       api.clock(), principal.name, request.remote))


async def allow_reprovision_batch(api, request: web.Request, principal) -> web.Response:
    return json_response(await api.run(_call, store.allow_reprovision_batch, api.registry, request.match_info["name"],
                                       request.match_info["batch"], api.clock(), principal.name, request.remote))


_STR = {"type": "string"}
_NULLABLE = {"type": ["string", "null"]}
SCHEMAS: dict[str, dict] = {
    "Manufacturer": {"type": "object", "required": ["name", "subject", "ca_sha256"],
                     "properties": {"name": _STR, "subject": _STR, "ca_sha256": _STR, "added": _STR,
                                    "added_by": _STR, "births": {"type": "integer"}, "used": {"type": "integer"}}},
    "ManufacturerList": {"type": "object", "required": ["items"], "properties": {
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Manufacturer"}}}},
    "ManufacturerCreate": {"type": "object", "required": ["name", "ca"], "additionalProperties": False,
                           "properties": {"name": {"type": "string", "pattern": NAME_PATTERN},
                                          "ca": {"type": "string", "maxLength": store.MAX_CA_PEM,
                                                 "description": "PEM, the CA that signs the birth certificates"}}},
    "ManufacturerRemoved": {"type": "object", "required": ["name", "births", "used", "pending"], "properties": {
        "name": _STR, "subject": _STR, "ca_sha256": _STR,
        "births": {"type": "integer", "description": "allowlist entries dropped"},
        "used": {"type": "integer", "description": "of which enrolled (those devices keep their certificates)"},
        "pending": {"type": "integer", "description": "devices of its batches that never enrolled (still pending)"}}},
    "BirthBatch": {"type": "object", "required": ["batch", "rows"], "additionalProperties": False, "properties": {
        "batch": {"type": "string", "pattern": NAME_PATTERN},
        "rows": {"type": "array", "minItems": 1, "maxItems": store.MAX_BATCH, "items": {
            "type": "object", "required": ["serial"], "additionalProperties": False,
            "properties": {"serial": {"type": "string", "pattern": f"^{store.SERIAL_RE.pattern}$"},
                           "device_id": {"type": "string", "pattern": NAME_PATTERN},
                           "cert_sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}}}}}},
    "BirthBatchImported": {"type": "object", "required": ["manufacturer", "batch", "imported"], "properties": {
        "manufacturer": _STR, "batch": _STR, "imported": {"type": "integer"},
        "devices": {"type": "array", "items": _STR, "description": "the first 100 device ids"}}},
    "BatchReprovision": {"type": "object", "required": ["manufacturer", "batch", "allowed"], "properties": {
        "manufacturer": _STR, "batch": _STR, "allowed": {"type": "integer"}}},
    "Birth": {"type": "object", "required": ["manufacturer", "serial", "device_id", "reprovision"], "properties": {
        "manufacturer": _STR, "serial": _STR, "device_id": _STR, "batch": _STR, "imported": _STR,
        "used_at": _NULLABLE, "used_from": _NULLABLE, "reprovision": {"type": "boolean"}}},
}

_NAME = Param("name", "path", {"type": "string"}, "manufacturer name", required=True)
_ID = Param("id", "path", {"type": "string"}, "device id", required=True)
_BATCH = Param("batch", "path", {"type": "string"}, "batch name (as imported)", required=True)

ROUTES: tuple[Route, ...] = (
    Route("GET", f"{PREFIX}/manufacturers", "manufacturers.list", "read",
          "Manufacturer CAs trusted for birth certificates, with their allowlist counts", list_all,
          response="ManufacturerList", errors=(403,)),
    Route("POST", f"{PREFIX}/manufacturers", "manufacturers.add", "admin",
          "Trust a manufacturer CA for birth certificates (IEEE 802.1AR IDevIDs; never a fleet CA)", add,
          body="ManufacturerCreate", response="Manufacturer", errors=(400, 403, 409), success=201),
    Route("DELETE", f"{PREFIX}/manufacturers/{{name}}", "manufacturers.remove", "admin",
          "Stop trusting a manufacturer CA: its allowlist goes, births under it are refused at once; devices "
          "enrolled through it keep their certificates", remove, params=(_NAME,), response="ManufacturerRemoved",
          errors=(400, 403, 404)),
    Route("POST", f"{PREFIX}/manufacturers/{{name}}/batches", "manufacturers.import", "act",
          "Allowlist a factory batch: a pending device per birth certificate serial (one transaction)",
          import_batch, params=(_NAME,), body="BirthBatch", response="BirthBatchImported",
          errors=(400, 403, 404, 409), success=201),
    Route("POST", f"{PREFIX}/manufacturers/{{name}}/batches/{{batch}}/reprovision", "manufacturers.reprovision",
          "act", "Let every birth certificate of a batch that enrolled already enroll once more", allow_reprovision_batch,
          params=(_NAME, _BATCH), response="BatchReprovision", errors=(403, 404)),
    Route("POST", f"{PREFIX}/devices/{{id}}/reprovision", "devices.reprovision", "act",
          "Let the device's birth certificate enroll once more (used up by that enrollment)", allow_reprovision,
          params=(_ID,), response="Birth", errors=(403, 404)),
)
