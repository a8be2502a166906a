"""The registry's errors: every refusal is a RegistryError with a short machine-readable `code`."""

from __future__ import annotations

from hub.ca.policy import PolicyError


class RegistryError(Exception):
    """A registry operation refused; `code` is a short machine-readable reason."""

    code = "registry_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidDeviceId(RegistryError, PolicyError):
    code = "invalid_device_id"


class DeviceExists(RegistryError):
    code = "device_exists"


class UnknownDevice(RegistryError):
    code = "unknown_device"


class DeviceNotActive(RegistryError):
    code = "device_not_active"  # 'device_suspended' or 'device_revoked'


class TokenRejected(RegistryError):
    code = "unknown_token"  # 'unknown_token', 'token_used', 'token_expired' or 'token_device_mismatch'


class CertRejected(RegistryError):
    """code: 'unknown_cert', 'cert_revoked', 'cert_superseded', 'cert_expired' or 'cert_device_mismatch'."""
    code = "unknown_cert"


class InvalidName(RegistryError, PolicyError):
    code = "invalid_name"
