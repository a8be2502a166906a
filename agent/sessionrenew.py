"""Renewal inside `tessera-agent run`: when it is due (agent.renewal), EST in a short-lived child
(agent.renewchild), and adopting a certificate another process stored (agent.certwatch); the Agent's mixin.

Either way the session then reconnects with the new certificate; the spool keeps every unacknowledged QoS 1
message, so the switch loses nothing (messages in flight are sent again: at-least-once).

A rotated key may be invisible to this process: tpm2-pkcs11 (1.9.0) reads its store's objects once, at
C_Initialize, so a key another process (the renewal child, `tessera-agent renew`) generated afterwards is "not
found" through either OpenSSL route until the module is initialized again; OpenSSL offers no way to do that for
a loaded engine or provider. So when a key this process has not loaded before cannot be loaded, and another key
was, the session ends with RESTART_EXIT and `tessera-agent run` re-executes itself (same pid, same arguments;
agent.entry), handing over what the new image must continue (telemetry seq, the renew-command rate limit) in
$TESSERA_AGENT_RESUME. SoftHSM2 shows new objects at once, so there the switch stays in-process.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime

from hsm.errors import HsmError, PinError

from .config import to_dict
from .renewal import decide, next_check_delay, renew_command_refusal
from .state import StateError, load_identity

log = logging.getLogger("tessera.agent")

RENEW_RETRY = 60.0      # seconds before retrying a failed renewal
RENEW_MIN_INTERVAL = 600.0  # a renewed certificate that is due again at once means the clock is wrong
RESTART_EXIT = 75           # Agent.run's answer when the process must restart to load a new key (EX_TEMPFAIL)
RESUME_ENV = "TESSERA_AGENT_RESUME"
#: never retried by a restart: each wrong PIN counts towards the token's lockout. Anything else about a key new to
#: this process is worth one restart (pkcs11-provider reports the invisible key as "no private key found ...
#: (missing token?)", a TlsRouteError, as its login session is already open); a fresh image that fails again has
#: loaded no key yet, so it fails as any agent would, once
_NOT_THE_KEY = (PinError,)


class KeyReload(Exception):
    """A key this process has not loaded before is not visible to its PKCS#11 module: restart to load it."""


def take_resume() -> dict | None:
    """What the previous image of this process handed over (and removed from the environment), or None."""
    raw = os.environ.pop(RESUME_ENV, None)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        log.warning("ignoring an unreadable $%s", RESUME_ENV)
        return None
    return value if isinstance(value, dict) else None


def reexec(resume: dict) -> None:
    """Replace this process by a fresh `tessera-agent run` with the same arguments (returns only on failure)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[RESUME_ENV] = json.dumps(resume)
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    os.execv(sys.executable, [sys.executable, *argv[1:]])


class RenewalMixin:
    """Needs the Agent's cfg, state, ident, device, status, clock, monotonic, stop_event, _ctx, _set_state,
    _identity_watch, _seq and _renew_command_at."""

    _loaded_keys: frozenset = frozenset()   # key URIs this process has built a TLS context with

    def _key_context(self, build):
        """build() (the TLS context with self.ident's key); KeyReload when the key is new to this process, cannot
        be loaded, and an older key could: the module probably does not see keys made after it started."""
        key = self.ident.key_uri
        try:
            ctx = build()
        except _NOT_THE_KEY:
            raise
        except HsmError as exc:
            if self._loaded_keys and key not in self._loaded_keys:
                raise KeyReload(f"a key new to this process cannot be loaded ({exc}): its PKCS#11 module may not "
                                "show keys made after it started (tpm2-pkcs11 does not); restarting the agent to "
                                "load it") from exc
            raise
        self._loaded_keys = self._loaded_keys | {key}
        return ctx

    def _stop_for_restart(self, exc: KeyReload) -> int:
        """End the session so that agent.entry re-executes the agent (the spool closed, nothing lost)."""
        log.warning("%s", exc)
        if self._acked:
            self.spool.ack_many(self._acked)
            self._acked = []
        self._set_state("restarting")
        self.spool.close()
        return RESTART_EXIT

    def resume_state(self) -> dict:
        """What a re-executed agent continues from (agent.entry hands it over): no secrets."""
        ago = None if self._renew_command_at is None else max(0.0, self.monotonic() - self._renew_command_at)
        return {"telemetry_seq": self._seq, "renew_command_ago": ago, "renewed_at": self.status.get("renewed_at"),
                "serial": self.ident.serial}

    def _resume(self, resume: dict | None) -> None:
        if not resume:
            return
        if isinstance(resume.get("telemetry_seq"), int):
            self._seq = resume["telemetry_seq"]
        ago = resume.get("renew_command_ago")
        if isinstance(ago, (int, float)):
            self._renew_command_at = self.monotonic() - float(ago)
        if resume.get("renewed_at"):
            self.status["renewed_at"] = resume["renewed_at"]
        log.info("restarted to load the key of certificate %s; telemetry continues after seq %d", self.ident.serial,
                 self._seq)

    def _request_renewal(self, args: dict | None = None) -> dict:
        now = self.monotonic()
        refused = renew_command_refusal(self._renew_command_at, now, self.cfg.renew_command_min_interval)
        if refused:
            raise RuntimeError(refused)  # a failed ack with this message
        self._renew_command_at = now
        self._renew_requested = "rotate" if (args or {}).get("rotate_key") else "renew"
        return {"renewal": "scheduled", "rotate_key": self._renew_requested == "rotate"}


    def _renewal_due(self) -> str | None:
        """'renew'/'rotate' when a renewal is due or asked for; otherwise schedules the next look (no parsing of
        the certificate dates on every loop turn)."""
        if self._renew_requested:
            return self._renew_requested
        d = decide(datetime.fromisoformat(self.ident.not_before), datetime.fromisoformat(self.ident.not_after),
                   self.clock(), fraction=self.cfg.renewal.fraction)
        if d.action == "renew":
            return "renew"
        self._next_renew_try = self.monotonic() + max(1.0, next_check_delay(d, self.clock()))
        return None

    def _renew(self, mode: str) -> bool:
        """Renew in a child process (agent.renewchild), then switch to the new certificate."""
        import subprocess
        import sys

        self._renew_requested = None
        request = json.dumps({"config": to_dict(self.cfg), "rotate": mode == "rotate",
                              "now": self.clock().isoformat()})
        try:
            proc = subprocess.run([sys.executable, "-m", "agent.renewchild"], input=request, capture_output=True,
                                  text=True, timeout=180)
            answer = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
        except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
            answer = {"ok": False, "error": f"renewal process failed: {exc}"}
        else:
            for line in proc.stderr.splitlines():  # the child's log, in ours
                log.info("renewal: %s", line)
        if not answer.get("ok"):
            error = answer.get("error") or (proc.stderr.strip().splitlines() or ["renewal failed"])[-1]
            log.error("renewal failed: %s", error)
            self.status["last_error"] = f"renewal failed: {error}"
            self._next_renew_try = self.monotonic() + RENEW_RETRY
            return False
        self.ident = load_identity(self.state)
        self._identity_watch.mark()  # our own renewal, not another process's
        self._ctx = None  # the next connection uses the new certificate
        self.status["renewed_at"] = self.ident.renewed_at
        again = decide(datetime.fromisoformat(self.ident.not_before), datetime.fromisoformat(self.ident.not_after),
                       self.clock(), fraction=self.cfg.renewal.fraction)
        if again.action != "none":
            log.warning("the new certificate is already due for renewal: this device's clock is probably wrong "
                        "(%s); next automatic renewal in %.0f s", self.clock().isoformat(), RENEW_MIN_INTERVAL)
            self._next_renew_try = self.monotonic() + RENEW_MIN_INTERVAL
        log.info("renewed: certificate %s valid until %s", self.ident.serial, self.ident.not_after)
        return True

    def _renewed_elsewhere(self, now: bool = False) -> bool:
        """True (and the new identity adopted: the next connection uses it) when another process stored a new
        certificate for this device (`tessera-agent renew` or `enroll` from a shell; agent.certwatch)."""
        if not self._identity_watch.changed(now=now):
            return False
        try:
            new = load_identity(self.state)
        except StateError as exc:
            log.warning("identity.json changed but cannot be read (%s); keeping certificate %s", exc,
                        self.ident.serial)
            return False
        if new is None or new.serial == self.ident.serial:
            return False
        if new.device_id != self.device:
            log.error("identity.json now names device %r, not %r; keeping certificate %s (restart the agent)",
                      new.device_id[:64], self.device, self.ident.serial)
            return False
        log.info("certificate %s stored by another process (renewed at %s): switching the session to it",
                 new.serial, new.renewed_at or new.enrolled_at)
        self.ident, self._ctx = new, None
        self.status["renewed_at"] = new.renewed_at
        self._set_state("switching")
        return True

    def _wait_or_renewed(self, delay: float) -> None:
        """Wait `delay` s, ending early on SIGTERM or when another process stored a new certificate."""
        end = time.monotonic() + delay
        while not self.stop_event.wait(max(0.0, min(1.0, end - time.monotonic()))):
            if time.monotonic() >= end or self._renewed_elsewhere(now=True):
                return
