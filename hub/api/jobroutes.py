"""The fleet API's job routes: create (dry run / confirm_count), list, show, device progress, pause / resume /
cancel; bulk renew and command by selector (each creates a job); one command to one device, waiting for its ack.

Creating a job follows the bulk actions' rule: without `confirm_count` the answer is a dry run (200,
{"matched": N, "dry_run": true}) and nothing is written; with it, the job is created (201) only if the selector
still matches exactly that many devices, else 409 and nothing is written.

`POST /devices/{id}/commands` publishes one command to a connected device and waits up to `wait_s` seconds for its
ack: 200 with the ack when it came in time, 202 with `"ack": null` when it did not (yet); 409 when the device is
not online (commands are not queued for absent devices; a job with `offline: "wait"` waits for them).
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from hub.broker import BrokerError
from hub.jobs import schema, store
from hub.jobs.engine import DEVICE_STATES, JOB_STATES, OFFLINE_POLICIES

from . import queries
from .jobinput import (BULK_FIELDS, COMMAND_PATTERN, DEFAULTS, JOB_FIELDS, JOB_ID_RE, MAX_ARGS, MAX_RATE,
                       MAX_RETRIES, MAX_TIMEOUT, MAX_WAIT, NAME_PATTERN, check_args, check_command, confirm_count,
                       decode_job_cursor, encode_job_cursor, number, only, parse_spec, selector)
from .queries import MAX_LIMIT, BadRequest, Conflict, NotFound
from .routing import PREFIX, Param, Route, json_body, json_response, page_limit, q, query_params


def _job_id(request: web.Request) -> int:
    """The {id} of a /jobs/{id} path (the server's audit rows name it in their device_id column, as for every
    route whose path parameter is `id`; their action, api.jobs.*, tells the two apart)."""
    raw = request.match_info["id"]
    if not JOB_ID_RE.fullmatch(raw):
        raise NotFound(f"no job {raw[:40]!r}")
    return int(raw)


# --- handlers -------------------------------------------------------------------------------------------------------

async def _tables(api) -> None:
    """The jobs tables exist (serve creates them at start; an in-process API, hub.cli.offline, here, once)."""
    if not getattr(api, "jobs_schema_ready", False):
        await api.run(schema.apply_schema, api.registry)
        api.jobs_schema_ready = True


async def _create(api, request: web.Request, principal, body: dict, spec: dict) -> web.Response:
    await _tables(api)
    sel, raw = selector(body)
    confirm = confirm_count(body)
    if confirm is None:
        return json_response({"matched": await api.run(queries.count, api.registry, sel), "dry_run": True})
    spec["selector"] = raw
    job = await api.run(store.create_job, api.registry, spec, sel, confirm, principal.name, api.clock(),
                        request.remote)
    return json_response(job, status=201)


async def create_job(api, request: web.Request, principal) -> web.Response:
    body = await json_body(request)
    unknown = set(body) - JOB_FIELDS
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)}", "body")
    return await _create(api, request, principal, body, parse_spec(body, dry_run=body.get("confirm_count") is None))


async def bulk_renew(api, request: web.Request, principal) -> web.Response:
    body = await json_body(request)
    unknown = set(body) - BULK_FIELDS - {"rotate_key"}
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)}", "body")
    rotate = body.get("rotate_key", False)
    if not isinstance(rotate, bool):
        raise BadRequest("rotate_key must be true or false", "rotate_key")
    return await _create(api, request, principal, body,
                         parse_spec(body, "renew", {"rotate_key": rotate}, name_required=False))


async def bulk_command(api, request: web.Request, principal) -> web.Response:
    body = await json_body(request)
    unknown = set(body) - BULK_FIELDS - {"command", "args"}
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)}", "body")
    return await _create(api, request, principal, body,
                         parse_spec(body, dry_run=body.get("confirm_count") is None, name_required=False))


async def list_jobs(api, request: web.Request, principal) -> web.Response:
    q = query_params(request)
    only(q, {"limit", "cursor", "state"})
    limit = page_limit(q.get("limit"))
    before = decode_job_cursor(q["cursor"]) if "cursor" in q else None
    state = q.get("state")
    if state is not None and state not in JOB_STATES:
        raise BadRequest(f"state must be one of {', '.join(JOB_STATES)}", "state")
    await _tables(api)
    items, last = await api.run(store.list_jobs, api.registry, limit, before, state)
    return json_response({"items": items, "next_cursor": encode_job_cursor(last) if last is not None else None})


async def show_job(api, request: web.Request, principal) -> web.Response:
    await _tables(api)
    return json_response(await api.run(store.get_job, api.registry, _job_id(request)))


async def job_devices(api, request: web.Request, principal) -> web.Response:
    job_id = _job_id(request)
    q = query_params(request)
    only(q, {"limit", "cursor", "state"})
    limit = page_limit(q.get("limit"))
    after = queries.decode_cursor(q["cursor"]) if "cursor" in q else None
    state = q.get("state")
    if state is not None and state not in DEVICE_STATES:
        raise BadRequest(f"state must be one of {', '.join(DEVICE_STATES)}", "state")
    await _tables(api)
    items, last = await api.run(store.list_job_devices, api.registry, job_id, limit, after, state)
    return json_response({"items": items, "next_cursor": queries.encode_cursor(last) if last is not None else None})


def _transition(action: str):
    async def handler(api, request: web.Request, principal) -> web.Response:
        job_id = _job_id(request)
        await _tables(api)
        return json_response(await api.run(store.operator_action, api.registry, job_id, action, principal.name,
                                           api.clock(), request.remote))
    return handler


async def send_command(api, request: web.Request, principal) -> web.Response:
    device_id = request.match_info["id"]
    device = await api.run(queries.get_device, api.registry, device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    body = await json_body(request)
    unknown = set(body) - {"command", "args", "wait_s"}
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)}", "body")
    command = check_command(body.get("command"))
    args = check_args(body.get("args", {}))
    wait = number({"wait_s": body.get("wait_s", 0)}, "wait_s", 0, MAX_WAIT)
    if not device["online"]:
        raise Conflict(f"device {device_id!r} is not online; a command is only sent to a connected device (a job "
                       "with offline: wait waits for it)")
    try:
        cid = await api.run(api.live.send_command, device_id, command, args, principal.name)
    except BrokerError as exc:
        from .server import problem

        return problem(503, "Service Unavailable", f"the broker did not take the command: {exc}", "broker_down")
    deadline = time.monotonic() + wait
    ack = api.live.command_ack(cid)
    while ack is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        ack = api.live.command_ack(cid)
    answer = {"id": cid, "device_id": device_id, "command": command, "ack": ack}
    return json_response(answer, status=200 if ack is not None else 202)


# --- the table ------------------------------------------------------------------------------------------------------

_TIME = {"type": "string", "format": "date-time"}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_INT = {"type": "integer"}
_SPEC_PROPS = {
    "name": {"type": "string", "pattern": NAME_PATTERN, "description": "1-100 printable ASCII characters"},
    "rate_per_minute": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_RATE,
                        "description": "devices sent the command per minute (token bucket, burst one second's worth)",
                        "default": DEFAULTS["rate_per_minute"]},
    "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT,
                  "description": "seconds a device has to ack before it is timed_out",
                  "default": DEFAULTS["timeout_s"]},
    "abort_percent": {"type": "number", "minimum": 0, "maximum": 100, "default": DEFAULTS["abort_percent"],
                      "description": "abort when more than this % of the finished devices (acked, failed, "
                                     "timed_out) failed or timed out; offline devices do not count"},
    "min_finished": {"type": ["integer", "null"], "minimum": 1, "maximum": 100000000,
                     "description": "finished devices needed before the abort rule applies (default min(total, 10))"},
    "offline": {"type": "string", "enum": list(OFFLINE_POLICIES), "default": DEFAULTS["offline"],
                "description": "fail: a device offline when its turn comes is marked offline at once; wait: it "
                               "stays queued until it is online (or the deadline)"},
    "deadline": {"type": ["string", "null"], "format": "date-time",
                 "description": "offline: wait only: devices still queued then become offline"},
    "ramp": {"type": ["object", "null"], "required": ["start_per_minute"], "additionalProperties": False,
             "description": "exponential rollout: start at start_per_minute, multiply the rate by factor for every "
                            "every_acked acked devices, up to rate_per_minute",
             "properties": {"start_per_minute": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_RATE},
                            "factor": {"type": "number", "exclusiveMinimum": 1, "maximum": 10, "default": 2},
                            "every_acked": {"type": "integer", "minimum": 1, "maximum": 1000000, "default": 10}}},
    "max_in_flight": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000000,
                      "description": "devices sent and not yet answered, at most"},
    "retries": {"type": "integer", "minimum": 0, "maximum": MAX_RETRIES, "default": 0,
                "description": "a device that timed out is sent again this many times at most"},
    "selector": {"$ref": "#/components/schemas/Selector"},
    "confirm_count": {"type": "integer", "minimum": 0, "description": "the dry run's matched count; omit for a dry run"},
}
_ARGS = {"type": "object", "description": f"the command's arguments (at most {MAX_ARGS} bytes of JSON)"}
_COMMAND = {"type": "string", "pattern": COMMAND_PATTERN, "description": "ping, report, renew or another command"}
_COUNTS = {"type": "object", "required": list(DEVICE_STATES), "properties": {s: _INT for s in DEVICE_STATES}}
SCHEMAS: dict[str, dict] = {
    "JobCreate": {"type": "object", "required": ["selector"], "additionalProperties": False,
                  "description": "name and command are required with confirm_count (a dry run needs only the "
                                 "selector)",
                  "properties": {**_SPEC_PROPS, "command": _COMMAND, "args": _ARGS}},
    "BulkRenew": {"type": "object", "required": ["selector"], "additionalProperties": False,
                  "properties": {**_SPEC_PROPS, "rotate_key": {"type": "boolean", "default": False}}},
    "BulkCommand": {"type": "object", "required": ["selector"], "additionalProperties": False,
                    "description": "command is required with confirm_count (a dry run needs only the selector)",
                    "properties": {**_SPEC_PROPS, "command": _COMMAND, "args": _ARGS}},
    "DryRun": {"type": "object", "required": ["matched", "dry_run"],
               "properties": {"matched": _INT, "dry_run": {"type": "boolean", "const": True}}},
    "Job": {"type": "object",
            "required": ["id", "name", "command", "args", "selector", "rate_per_minute", "timeout_s",
                         "abort_percent", "offline", "state", "counts", "total", "created_by", "created",
                         "started", "finished", "reason"],
            "properties": {"id": _INT, "name": {"type": "string"}, "command": {"type": "string"},
                           "args": {"type": "object"}, "selector": {"type": "object"},
                           "rate_per_minute": {"type": "number"}, "timeout_s": {"type": "number"},
                           "abort_percent": {"type": "number"}, "min_finished": {"type": ["integer", "null"]},
                           "offline": {"type": "string", "enum": list(OFFLINE_POLICIES)},
                           "deadline": _TIME_OR_NULL, "state": {"type": "string", "enum": list(JOB_STATES)},
                           "ramp": {"type": ["object", "null"]}, "max_in_flight": {"type": ["integer", "null"]},
                           "retries": _INT,
                           "counts": _COUNTS, "total": _INT, "created_by": {"type": "string"}, "created": _TIME,
                           "started": _TIME_OR_NULL, "finished": _TIME_OR_NULL,
                           "reason": {"type": ["string", "null"]}}},
    "JobPage": {"type": "object", "required": ["items", "next_cursor"],
                "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
                               "next_cursor": {"type": ["string", "null"]}}},
    "JobDevicePage": {"type": "object", "required": ["items", "next_cursor"], "properties": {
        "items": {"type": "array", "items": {
            "type": "object", "required": ["device_id", "state", "sent_at", "finished_at", "detail"],
            "properties": {"device_id": {"type": "string"}, "state": {"type": "string", "enum": list(DEVICE_STATES)},
                           "command_id": {"type": ["string", "null"]}, "attempts": _INT, "sent_at": _TIME_OR_NULL,
                           "finished_at": _TIME_OR_NULL, "detail": {"type": ["string", "null"]}}}},
        "next_cursor": {"type": ["string", "null"]}}},
    "CommandSend": {"type": "object", "required": ["command"], "additionalProperties": False,
                    "properties": {"command": _COMMAND, "args": _ARGS,
                                   "wait_s": {"type": "number", "minimum": 0, "maximum": MAX_WAIT, "default": 0,
                                              "description": "seconds to wait for the ack"}}},
    "CommandSent": {"type": "object", "required": ["id", "device_id", "command", "ack"],
                    "properties": {"id": {"type": "string"}, "device_id": {"type": "string"},
                                   "command": {"type": "string"},
                                   "ack": {"type": ["object", "null"],
                                           "description": "the device's ack {id, ok, result | error, ts}; null: "
                                                          "none within wait_s (202)"}}},
}

_JOB = Param("id", "path", {"type": "string", "pattern": "^[0-9]{1,18}$"}, "job id", required=True)
_DEVICE = Param("id", "path", {"type": "string"}, "device id", required=True)
_LIMIT = q("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100}, "page size")
_CURSOR = q("cursor", {"type": "string", "minLength": 1, "maxLength": queries.MAX_CURSOR,
                       "pattern": "^[A-Za-z0-9_-]+$"}, "next_cursor of the previous page")
_CREATE_NOTE = (": a dry run (200, the match count) without confirm_count, else the job (201) if confirm_count is "
                "still the match count (409 otherwise, nothing created)")

ROUTES: tuple[Route, ...] = (
    Route("POST", f"{PREFIX}/jobs", "jobs.create", "act",
          "Create a job: a command rolled out over a selector at a rate, with a per-device timeout and an abort "
          "threshold" + _CREATE_NOTE, create_job, body="JobCreate", response="Job", success=201,
          more=((200, "DryRun"),), errors=(400, 403, 409)),
    Route("GET", f"{PREFIX}/jobs", "jobs.list", "read", "Jobs, newest first (keyset paging)", list_jobs,
          params=(q("state", {"type": "string", "enum": list(JOB_STATES)}, "only jobs in this state"), _LIMIT,
                  _CURSOR),
          response="JobPage", errors=(400, 403)),
    Route("GET", f"{PREFIX}/jobs/{{id}}", "jobs.show", "read",
          "One job: spec, state, counts per device state, who created it, when it started and finished, why it "
          "ended", show_job, params=(_JOB,), response="Job", errors=(403, 404)),
    Route("GET", f"{PREFIX}/jobs/{{id}}/devices", "jobs.devices", "read",
          "A job's devices and their progress (by device id, keyset paging; optionally one state)", job_devices,
          params=(_JOB, q("state", {"type": "string", "enum": list(DEVICE_STATES)}, "only devices in this state"),
                  _LIMIT, _CURSOR),
          response="JobDevicePage", errors=(400, 403, 404)),
    *(Route("POST", f"{PREFIX}/jobs/{{id}}/{action}", f"jobs.{action}", "act",
            f"{action.capitalize()} a job ({what}; no change if it is already so; 409 for a finished job)",
            _transition(action), params=(_JOB,), response="Job", errors=(403, 404, 409))
      for action, what in (("pause", "running -> paused"), ("resume", "paused -> running"),
                           ("cancel", "running or paused -> cancelled"))),
    Route("POST", f"{PREFIX}/devices/actions/renew", "devices.renew", "act",
          "Renew the certificate (rotate_key: with a fresh key) of every device a selector matches, as a job"
          + _CREATE_NOTE, bulk_renew, body="BulkRenew", response="Job", success=201, more=((200, "DryRun"),),
          errors=(400, 403, 409)),
    Route("POST", f"{PREFIX}/devices/actions/command", "devices.command", "act",
          "Send a command to every device a selector matches, as a job" + _CREATE_NOTE, bulk_command,
          body="BulkCommand", response="Job", success=201, more=((200, "DryRun"),), errors=(400, 403, 409)),
    Route("POST", f"{PREFIX}/devices/{{id}}/commands", "devices.send", "act",
          "Send one command to a connected device and wait up to wait_s for its ack: 200 with the ack, 202 when "
          "none came in time (409: the device is not online)", send_command, params=(_DEVICE,),
          body="CommandSend", response="CommandSent", more=((202, "CommandSent"),), errors=(400, 403, 404, 409, 503)),
)
