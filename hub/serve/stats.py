"""The running hub's event counters for Prometheus: enrollments, renewals, EST denials by reason, revocation latency.

One `HubStats` per hub, with its own prometheus `CollectorRegistry` (never the process-wide default registry, so
two hubs in one process, or a test, never share counts). A hub is its `Registry` object: the EST service, the
live hub and the fleet API of one `serve` share one, so `of(registry)` finds the same counters from each of them
without any of them having to be handed a stats object.

Labels are a small fixed set (cardinality): EST denials are bucketed into `DENIAL_REASONS` from the service's
machine code, never the code itself, free text or a device id; revocation latency is by `ACTIONS` only.
"""

from __future__ import annotations

import threading
import weakref

from prometheus_client import CollectorRegistry, Counter, Histogram

#: tessera_est_denials_total{reason}: every EST refusal lands in exactly one of these.
#: `connection`: refused by the listener itself (too many connections from an address, a full queue, a deadline).
DENIAL_REASONS = ("bad_token", "rate_limited", "bad_csr", "bad_certificate", "suspended", "revoked", "connection",
                  "other")
_TOKEN_CODES = frozenset({"unknown_token", "token_used", "token_expired", "token_device_mismatch", "bad_device_id",
                          "missing_auth"})
_CERT_CODES = frozenset({"client_cert_required", "bad_client_cert", "unknown_cert", "cert_superseded",
                         "cert_expired", "cert_device_mismatch"})
_REVOKED_CODES = frozenset({"device_revoked", "device_decommissioned", "cert_revoked"})
_CSR_CODES = frozenset({"name_mismatch", "ca_requested"})  # CSR refusals answered 403 (the rest are 400/413/415)
#: device status set by a status change -> the `action` label of tessera_revocation_seconds (resume: not measured)
ACTIONS = {"suspended": "suspend", "revoked": "revoke", "decommissioned": "decommission"}
#: seconds; the goal is a cut inside the hub at p99 <= 20 ms, a bulk change of 10,000 devices takes seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def denial_reason(code: str, status: int | None = None) -> str:
    """The `reason` label for an EST refusal with machine `code` (and HTTP `status`)."""
    if code == "rate_limited" or status == 429:
        return "rate_limited"
    if code in _TOKEN_CODES or code.startswith("bad_auth"):
        return "bad_token"
    if code == "device_suspended":
        return "suspended"
    if code in _REVOKED_CODES:
        return "revoked"
    if code in _CERT_CODES:
        return "bad_certificate"
    if status in (408, 503):
        return "connection"
    if code in _CSR_CODES or status in (400, 411, 413, 415):
        return "bad_csr"  # the CSR or its body: bad_csr*, bad_pem, unsupported_key, weak_key, content type, size
    return "other"


class HubStats:
    """The counters of one hub (thread-safe: prometheus_client metrics lock themselves)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.enrollments = Counter("tessera_enrollments", "Devices enrolled (EST simpleenroll answered 200)",
                                   registry=r)
        self.renewals = Counter("tessera_renewals", "Certificates renewed (EST simplereenroll answered 200)",
                                registry=r)
        self.denials = Counter("tessera_est_denials", "EST requests refused, by reason", ["reason"], registry=r)
        self.revocations = Histogram("tessera_revocation_seconds",
                                     "Status change with immediate effect: registry commit to the broker's "
                                     "confirmation that the sessions are cut (single and bulk)", ["action"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.unconfirmed = Counter("tessera_revocation_unconfirmed",
                                   "Status changes the broker did not confirm in time (it applies them on its "
                                   "next tick; not in tessera_revocation_seconds)", ["action"], registry=r)
        for reason in DENIAL_REASONS:  # every label present from the start (rate() needs the zero)
            self.denials.labels(reason)
        for action in ACTIONS.values():
            self.revocations.labels(action)
            self.unconfirmed.labels(action)

    def enrolled(self) -> None:
        self.enrollments.inc()

    def renewed(self) -> None:
        self.renewals.inc()

    def denied(self, code: str, status: int | None = None) -> None:
        self.denials.labels(denial_reason(code, status)).inc()

    def enforced(self, status: str, seconds: float, confirmed: bool = True) -> None:
        """A status change to `status` took `seconds` from its registry commit to the broker's confirmation
        (`confirmed` False: the broker did not confirm; counted apart). Statuses without an action are ignored."""
        action = ACTIONS.get(status)
        if action is None:
            return
        if confirmed:
            self.revocations.labels(action).observe(max(0.0, seconds))
        else:
            self.unconfirmed.labels(action).inc()


def counts(hub: HubStats) -> dict:
    """The EST event counters as plain numbers: {"enrollments": n, "renewals": n, "denials": {reason: n}}."""
    out: dict = {"enrollments": 0.0, "renewals": 0.0, "denials": {}}
    for metric in hub.registry.collect():
        for sample in metric.samples:
            if not sample.name.endswith("_total"):
                continue
            if metric.name == "tessera_enrollments":
                out["enrollments"] = sample.value
            elif metric.name == "tessera_renewals":
                out["renewals"] = sample.value
            elif metric.name == "tessera_est_denials":
                out["denials"][sample.labels["reason"]] = sample.value
    return out


def add(hub: HubStats, delta: dict) -> None:
    """Add counts in the shape of `counts()` (another process's events: hub/est/pool.py). Unknown reasons count
    as `other` (the label set stays fixed)."""
    if delta.get("enrollments"):
        hub.enrollments.inc(float(delta["enrollments"]))
    if delta.get("renewals"):
        hub.renewals.inc(float(delta["renewals"]))
    for reason, n in (delta.get("denials") or {}).items():
        if n:
            hub.denials.labels(reason if reason in DENIAL_REASONS else "other").inc(float(n))


def install(registry: object, hub: HubStats) -> HubStats:
    """Make `hub` the counters of `registry` (an EST worker process installs one that reports its events)."""
    with _lock:
        _hubs[registry] = hub
    return hub


_hubs: "weakref.WeakKeyDictionary[object, HubStats]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def of(registry: object) -> HubStats:
    """The counters of the hub whose registry is `registry` (made on first use)."""
    with _lock:
        stats = _hubs.get(registry)
        if stats is None:
            stats = _hubs[registry] = HubStats()
        return stats
