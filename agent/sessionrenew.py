"""Renewal inside `tessera-agent run`: when it is due (agent.renewal), EST in a short-lived child
(agent.renewchild), and adopting a certificate another process stored (agent.certwatch); the Agent's mixin.

Either way the session then reconnects with the new certificate; the spool keeps every unacknowledged QoS 1
message, so the switch loses nothing (messages in flight are sent again: at-least-once).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime

from .config import to_dict
from .renewal import decide, next_check_delay, renew_command_refusal
from .state import StateError, load_identity

log = logging.getLogger("tessera.agent")

RENEW_RETRY = 60.0      # seconds before retrying a failed renewal
RENEW_MIN_INTERVAL = 600.0  # a renewed certificate that is due again at once means the clock is wrong


class RenewalMixin:
    """Needs the Agent's cfg, state, ident, device, status, clock, monotonic, stop_event, _ctx, _set_state and
    _identity_watch."""

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
