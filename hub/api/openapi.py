"""The OpenAPI 3.1 document of the fleet API, generated from the route table the server itself uses.

Nothing here lists endpoints: `document(all_routes())` walks the one route table (hub/api/routes.py), so the served document and the
served routes cannot drift. Schemas the routes name are the components below.
"""

from __future__ import annotations

from typing import Any

from hub.authz.policy import API_PERMISSIONS
from hub.registry.store import DEVICE_STATUSES

#: what the server takes (hub.authz.policy NAME_RE / check_labels): device ids, group names, label keys ...
_NAME_RE = "[a-z0-9][a-z0-9-]{0,62}"
NAME_PATTERN = f"^{_NAME_RE}$"
#: ... label values: 1-128 printable ASCII characters, no leading or trailing space ...
_LABEL_VALUE_RE = r"[\x21-\x7e]([\x20-\x7e]{0,126}[\x21-\x7e])?"
LABEL_VALUE_PATTERN = f"^{_LABEL_VALUE_RE}$"
#: ... and a label filter, key=value
LABEL_PATTERN = f"^{_NAME_RE}={_LABEL_VALUE_RE}$"

#: a reason (bulk body, decommission query): printable ASCII, as routes._REASON_RE takes it
MAX_REASON = 200
REASON = {"type": "string", "maxLength": MAX_REASON, "pattern": f"^[\\x20-\\x7e]{{0,{MAX_REASON}}}$",
          "description": f"at most {MAX_REASON} printable ASCII characters (kept in the audit log)"}

_STR = {"type": "string"}
_NAME = {"type": "string", "pattern": NAME_PATTERN}
_GROUPS = {"type": "array", "items": _NAME}
_LABELS = {"type": "object", "propertyNames": _NAME,
           "additionalProperties": {"type": "string", "pattern": LABEL_VALUE_PATTERN}}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_FILTERS = {
    "status": {"type": "string", "enum": list(DEVICE_STATUSES)},
    "group": _NAME, "label": {"type": "string", "pattern": LABEL_PATTERN, "description": "key=value"},
    "online": {"oneOf": [{"type": "boolean"}, {"type": "string", "enum": ["true", "false"]}]},
    "id_prefix": _NAME, "cert_expires_before": {"type": "string", "format": "date-time"},
    "last_seen_before": {"type": "string", "format": "date-time"},
}
DEVICE = {
    "type": "object",
    "required": ["id", "status", "groups", "labels", "online", "last_seen", "created", "cert_not_after"],
    "properties": {
        "id": _STR, "status": _FILTERS["status"], "groups": {"type": "array", "items": _STR},
        "labels": {"type": "object", "additionalProperties": _STR}, "online": {"type": "boolean"},
        "last_seen": _TIME_OR_NULL, "created": {"type": "string", "format": "date-time"},
        "cert_not_after": _TIME_OR_NULL,
    },
}
COMPONENTS: dict[str, dict] = {
    "Problem": {
        "type": "object", "required": ["type", "title", "status", "detail"],
        "properties": {"type": _STR, "title": _STR, "status": {"type": "integer"}, "detail": _STR,
                       "param": {"type": "string", "description": "the offending parameter, for 400"}},
    },
    "Device": DEVICE,
    "DevicePage": {
        "type": "object", "required": ["items", "next_cursor"],
        "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Device"}},
                       "next_cursor": {"type": ["string", "null"]}},
    },
    "DeviceDetail": {
        "allOf": [{"$ref": "#/components/schemas/Device"},
                  {"type": "object", "properties": {"certificates": {"type": "array", "items": {
                      "type": "object", "properties": {k: _STR for k in (
                          "serial", "subject", "not_before", "not_after", "status", "issued_at")}}}}}],
    },
    "DevicePatch": {
        "type": "object", "minProperties": 1, "additionalProperties": False,
        "properties": {"groups": _GROUPS, "labels": _LABELS},
    },
    "Selector": {
        "description": "either ids, or filters (all must hold); not both",
        "type": "object", "minProperties": 1, "additionalProperties": False,
        "properties": {**_FILTERS, "ids": {"type": "array", "items": {"type": "string", "maxLength": 64},
                                           "minItems": 1, "maxItems": 100000}},
        "oneOf": [{"required": ["ids"], "maxProperties": 1}, {"not": {"required": ["ids"]}}],
    },
    "BulkRequest": {
        "type": "object", "required": ["selector"], "additionalProperties": False,
        "properties": {"selector": {"$ref": "#/components/schemas/Selector"},
                       "reason": REASON,
                       "confirm_count": {"type": "integer", "minimum": 0,
                                         "description": "the dry run's matched count; omit for a dry run"}},
    },
    "BulkResult": {
        "type": "object", "required": ["matched", "dry_run"],
        "properties": {"matched": {"type": "integer"}, "dry_run": {"type": "boolean"},
                       "changed": {"type": "integer"}, "skipped": {"type": "integer"},
                       "revoked_certificates": {"type": "integer"},
                       "sessions_cut": {"type": ["integer", "null"]}, "broker_note": {"type": ["string", "null"]},
                       "timings": {"type": "object", "additionalProperties": {"type": "number"}}},
    },
    "NewDevice": {
        "type": "object", "required": ["id"], "additionalProperties": False,
        "properties": {"id": _NAME, "groups": _GROUPS, "labels": _LABELS},
    },
    "DeviceCreate": {
        "oneOf": [{"$ref": "#/components/schemas/NewDevice"},
                  {"type": "object", "required": ["devices"], "additionalProperties": False,
                   "properties": {"devices": {"type": "array", "minItems": 1, "maxItems": 10000,
                                              "items": {"$ref": "#/components/schemas/NewDevice"}}}}],
    },
    "DevicesCreated": {
        "type": "object", "required": ["created", "token_expires", "devices"],
        "properties": {"created": {"type": "integer"}, "token_expires": {"type": "string", "format": "date-time"},
                       "devices": {"type": "array", "items": {
                           "type": "object", "required": ["id", "status", "token"],
                           "properties": {"id": _STR, "status": _STR,
                                          "token": {"type": "string", "description": "shown only here"}}}}},
    },
    "TokenIssued": {
        "type": "object", "required": ["id", "token", "token_expires"],
        "properties": {"id": _STR, "token": _STR, "token_expires": {"type": "string", "format": "date-time"}},
    },
    "Decommissioned": {
        "allOf": [{"$ref": "#/components/schemas/DeviceDetail"},
                  {"type": "object", "properties": {
                      "revoked_serials": {"type": "array", "items": _STR},
                      "sessions_cut": {"type": ["integer", "null"]},
                      "broker_note": {"type": ["string", "null"]}}}],
    },
    "Status": {"type": "object", "properties": {"status": _STR}},
    "OpenApiDocument": {"type": "object"},
}
_TITLES = {400: "bad input", 403: "not an operator, or the role lacks the permission", 404: "no such device",
           413: "the body is too large (8 MiB at most)", 415: "the body is not application/json",
           409: "conflict: the confirmed count is no longer the match count, the device id exists, or the device's "
                "status does not allow this", 503: "not ready", 500: "internal error"}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(status: int) -> dict:
    return {"description": _TITLES.get(status, "error"), "content": {"application/problem+json": {
        "schema": _ref("Problem")}}}


def _operation(route) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.name.replace(".", "_"), "summary": route.summary,
                          "x-permission": route.permission}
    if route.permission is None:
        op["security"] = [{}, {"clientCertificate": []}]
    else:
        roles = sorted(r for r, perms in API_PERMISSIONS.items() if route.permission in perms)
        op["description"] = f"Needs the `{route.permission}` permission (roles: {', '.join(roles)})."
    if route.params:
        op["parameters"] = [{"name": p.name, "in": p.where, "required": p.required, "description": p.description,
                             "schema": p.schema} for p in route.params]
    if route.body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(route.body)}}}
    if route.response:
        content = {"application/json": {"schema": _ref(route.response)}}
    else:
        content = {route.content_type.split(";")[0]: {"schema": {"type": "string"}}}
    for media in route.also:
        content[media.split(";")[0]] = {"schema": {"type": "string"}}
    op["responses"] = {str(route.success): {"description": {200: "OK", 201: "Created"}.get(route.success, "OK"),
                                             "content": content},
                       **{str(status): {"description": {200: "OK", 201: "Created", 202: "Accepted"}.get(status, "OK"),
                                        "content": {"application/json": {"schema": _ref(schema)}}}
                          for status, schema in route.more},
                       **{str(s): _problem(s) for s in sorted({*route.errors, *((413, 415) if route.body else ()),
                                                                500})}}
    return op


def document(routes=None, schemas: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document for `routes` and the component `schemas` they name besides COMPONENTS (default:
    the whole API, hub.api.routes.all_routes() and all_schemas())."""
    if routes is None or schemas is None:
        from .routes import all_routes, all_schemas

        routes = all_routes() if routes is None else routes
        schemas = all_schemas() if schemas is None else schemas
    paths: dict[str, dict] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tessera fleet API", "version": "1",
                 "description": "Operators authenticate with a service identity's client certificate (service "
                                "CA); its role decides every endpoint. Errors are application/problem+json."},
        "paths": paths,
        "components": {"schemas": {**COMPONENTS, **schemas},
                       "securitySchemes": {"clientCertificate": {"type": "mutualTLS",
                                                                 "description": "a service identity certificate"}}},
        "security": [{"clientCertificate": []}],
    }
