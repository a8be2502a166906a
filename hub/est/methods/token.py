"""EST simpleenroll authenticated by a single-use bootstrap token (HTTP Basic device_id:token over TLS, RFC 7030
3.2.3): the registry checks and spends the token in one transaction (hub/registry/store.py `enroll`).

Every token problem (unknown, used, expired, another device's) is answered with the one generic 401 of
hub.est.service (the audit keeps the precise reason); a device that is not pending or active gets a 403.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import est
from est.errors import EstError, Forbidden, Unauthorized

from hub.ca.policy import PolicyError, check_device_id
from hub.registry.store import DeviceNotActive, RegistryError, TokenRejected
from hub.serve import stats

if TYPE_CHECKING:
    from hub.est.service import EstRequest, EstResponse, EstService

log = logging.getLogger("tessera.hub.est")


def simpleenroll(service: "EstService", req: "EstRequest") -> "EstResponse":
    """simpleenroll with Basic device_id:token (the 401 challenge when the header is missing)."""
    device_id = None
    try:
        service._admit(req)
        creds = est.parse_basic_auth(req.headers.get("authorization"))
        try:
            device_id = check_device_id(creds.user)
        except PolicyError as exc:
            raise Unauthorized("bad_device_id", str(exc)) from None
        service._budget(req, device_id)
        csr = est.parse_enroll_request(req.headers.get("content-type"), req.body, device_id,
                                       key_policy=service.key_policy)
        now = service.clock()
        cert = service.registry.enroll(
            device_id, creds.password, now,
            lambda: service.ca.issue_device_cert(csr.public_key(), device_id, service.policy, now, service.crl_urls),
            source=req.source, audit_denied=False)
    except EstError as exc:
        return service._deny("enroll", req, exc, device_id)
    except TokenRejected as exc:  # answered with the generic 401 (the audit row keeps the precise reason)
        return service._deny("enroll", req, Unauthorized(exc.code, str(exc)), device_id)
    except DeviceNotActive as exc:
        return service._deny("enroll", req, Forbidden("device_not_active", str(exc)), device_id,
                              audit_code=exc.code)
    except RegistryError as exc:
        if exc.code == "closed":
            raise  # handle(): 503
        return service._deny("enroll", req, Forbidden(getattr(exc, "code", "registry"), str(exc)), device_id)
    log.info("enrolled %s from %s (serial %x)", device_id, req.source, cert.serial_number)
    stats.of(service.registry).enrolled()
    return service._issued(cert)
