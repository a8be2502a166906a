"""RFC 7512 PKCS#11 URI parsing and formatting: pure Python, stdlib only, no I/O.

Choices where RFC 7512 leaves room:
* Vendor attributes: any well-formed name (``pk11-v-attr-nm-char``: letters, digits, ``-``, ``_``)
  that is not a standard one is accepted and kept in order in ``vendor_path`` / ``vendor_query``.
  No ``x-`` prefix is required (the RFC's own example uses ``vendor-aaa``). Malformed names, and
  standard names in the wrong component, are refused.
* Standard names and ``type`` values match case-insensitively (ABNF literals, RFC 5234 sec. 2.3)
  and are written in lower case. Every attribute may appear once per component (the RFC lets the
  consumer refuse repeated vendor query attributes, and this one does).
* Both ``pin-source`` and ``pin-value`` present is refused (RFC 7512 sec. 2.3: SHOULD be refused).
* Raw characters outside the RFC's pchar/qchar sets must be percent-encoded.
* ``slot-id`` must fit a 64-bit CK_SLOT_ID; each ``library-version`` part must fit a CK_BYTE.
The pin-value never appears in repr() or error messages; it does appear in str()/format(), which
is the URI itself, so do not log that.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["OBJECT_TYPES", "Pkcs11Uri", "UriError", "parse"]

OBJECT_TYPES = frozenset({"public", "private", "cert", "secret-key", "data"})

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_RES_AVAIL = frozenset(":[]@!$'()*+,=")
_PCHAR = _UNRESERVED | _RES_AVAIL | {"&"}
_QCHAR = _UNRESERVED | _RES_AVAIL | {"/", "?", "|"}
_HEX = frozenset("0123456789abcdefABCDEF")
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}")
_VERSION_RE = re.compile(r"([0-9]{1,3})(?:\.([0-9]{1,3}))?")
_SECRET = frozenset({"pin-value"})
_SLOT_ID_MAX = 2**64 - 1

# wire name -> (field name, kind); the order is the canonical output order.
_KINDS = {"library-version": "version", "slot-id": "int", "type": "type", "id": "bytes"}
_PATH, _QUERY = (
    {wire: (wire.replace("-", "_"), _KINDS.get(wire, "text")) for wire in names.split()}
    for names in (
        "token manufacturer serial model library-manufacturer library-description library-version"
        " slot-description slot-manufacturer slot-id object type id",
        "pin-source pin-value module-name module-path",
    )
)
_COMPONENTS = (("path", _PATH, _QUERY, _PCHAR), ("query", _QUERY, _PATH, _QCHAR))


class UriError(ValueError):
    """A PKCS#11 URI (or a Pkcs11Uri field) is invalid. The message never contains a pin-value."""


def _fail(attr: str, detail: str, redacted: str) -> UriError:
    """An error about attribute `attr`; `redacted` replaces `detail` when the value is secret."""
    return UriError(f"attribute {attr!r}: {redacted if attr in _SECRET else detail}")


def _check_name(name: str, where: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"{where} attribute names must be str, not {type(name).__name__}")
    if not name:
        raise UriError(f"{where} attribute has an empty name")
    if not _NAME_RE.fullmatch(name):
        raise UriError(f"malformed {where} attribute name {name!r}: use letters, digits, '-', '_'")


def _decode(raw: str, attr: str, allowed: frozenset[str]) -> bytes:
    """Percent-decode `raw` to bytes, refusing characters outside `allowed` and bad escapes."""
    out = bytearray()
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "%":
            pair = raw[i + 1 : i + 3]
            if len(pair) < 2 or not set(pair) <= _HEX:
                kind = "truncated" if len(pair) < 2 and set(pair) <= _HEX else "invalid"
                raise _fail(attr, f"{kind} percent-escape {'%' + pair!r} at offset {i}",
                            f"{kind} percent-escape in the value")
            out.append(int(pair, 16))
            i += 3
        elif ch in allowed:
            out.append(ord(ch))
            i += 1
        else:
            raise _fail(attr, f"character {ch!r} at offset {i} must be percent-encoded",
                        "the value holds a character that must be percent-encoded")
    return bytes(out)


def _convert(attr: str, kind: str, data: bytes) -> Any:
    """Turn decoded bytes into the field's Python value, validating it."""
    if kind == "bytes":
        return data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = f"byte 0x{data[exc.start]:02x} at offset {exc.start}"
        raise _fail(attr, f"value is not valid UTF-8 ({bad})", "value is not valid UTF-8") from None
    if kind == "type":
        if text.lower() not in OBJECT_TYPES:
            raise UriError(f"attribute 'type': {text!r} is not one of {', '.join(sorted(OBJECT_TYPES))}")
        return text.lower()
    if kind == "int":
        if not re.fullmatch(r"[0-9]+", text):
            raise UriError(f"attribute {attr!r}: {text!r} is not a decimal integer")
        if len(text) > 20 or int(text) > _SLOT_ID_MAX:
            raise UriError(f"attribute {attr!r}: value does not fit a 64-bit CK_SLOT_ID (max {_SLOT_ID_MAX})")
        return int(text)
    if kind == "version":
        match = _VERSION_RE.fullmatch(text)
        parts = tuple(int(g) for g in match.groups() if g is not None) if match else ()
        if not parts or max(parts) > 255:
            raise UriError(f"attribute {attr!r}: {text!r} is not 'M' or 'M.N' with M, N in 0..255")
        return parts
    return text


def _render(attr: str, kind: str, value: Any) -> bytes:
    """The bytes a field value stands for in the URI, before percent-encoding."""
    if kind == "bytes":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"attribute {attr!r} must be bytes, not {type(value).__name__}")
        return bytes(value)
    if kind == "version" and not isinstance(value, str):
        return ".".join(map(str, value)).encode()
    if kind == "int":
        return str(value).encode()
    if not isinstance(value, str):
        raise TypeError(f"attribute {attr!r} must be str, not {type(value).__name__}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(attr, "value cannot be encoded as UTF-8", "value cannot be encoded as UTF-8") from None


def _quote(data: bytes, safe: frozenset[str]) -> str:
    return "".join(chr(b) if chr(b) in safe else f"%{b:02X}" for b in data)


@dataclass(frozen=True, repr=False)
class Pkcs11Uri:
    """A parsed RFC 7512 URI. None means "attribute absent"; "" / b"" means present but empty."""

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: tuple[int, ...] | None = None  # (M,) or (M, N)
    slot_description: str | None = None
    slot_manufacturer: str | None = None
    slot_id: int | None = None
    object: str | None = None
    type: str | None = None  # one of OBJECT_TYPES
    id: bytes | None = None
    pin_source: str | None = None
    pin_value: str | None = None
    module_name: str | None = None
    module_path: str | None = None
    vendor_path: Mapping[str, str] = field(default_factory=dict, hash=False)
    vendor_query: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Normalise and validate each standard field through the same code the parser uses.
        for table in (_PATH, _QUERY):
            for wire, (name, kind) in table.items():
                value = getattr(self, name)
                if value is not None:
                    object.__setattr__(self, name, _convert(wire, kind, _render(wire, kind, value)))
        if self.pin_source is not None and self.pin_value is not None:
            raise UriError("'pin-source' and 'pin-value' are both present; RFC 7512 says such a URI "
                           "SHOULD be refused, so give only one")
        for where, own, other, _ in _COMPONENTS:
            attr = f"vendor_{where}"
            items = dict(getattr(self, attr))
            for name, value in items.items():
                _check_name(name, where)
                if name.lower() in own or name.lower() in other:
                    raise UriError(f"vendor {where} attribute {name!r} clashes with a standard attribute")
                _render(name, "text", value)
            object.__setattr__(self, attr, MappingProxyType(items))

    def format(self) -> str:
        """The canonical URI: standard attributes in a fixed order, then vendor ones as given."""
        parts: list[list[str]] = []
        for where, own, _, safe in _COMPONENTS:
            attrs = [
                f"{wire}={_quote(_render(wire, kind, value), frozenset() if kind == 'bytes' else safe)}"
                for wire, (name, kind) in own.items()
                if (value := getattr(self, name)) is not None
            ]
            vendor: Mapping[str, str] = getattr(self, f"vendor_{where}")
            attrs += [f"{name}={_quote(value.encode('utf-8'), safe)}" for name, value in vendor.items()]
            parts.append(attrs)
        path, query = parts
        return "pkcs11:" + ";".join(path) + ("?" + "&".join(query) if query else "")

    __str__ = format

    def __repr__(self) -> str:
        """Only the attributes present; the pin-value is shown as '<redacted>'."""
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and value != {}:
                value = "<redacted>" if f.name == "pin_value" else value
                shown.append(f"{f.name}={dict(value) if isinstance(value, Mapping) else value!r}")
        return f"Pkcs11Uri({', '.join(shown)})"

    def with_(self, **changes: Any) -> Pkcs11Uri:
        """A copy with `changes` applied (dataclasses.replace); validated like the original."""
        return dataclasses.replace(self, **changes)

    @property
    def id_hex(self) -> str | None:
        """The id as lower-case hex ("0102"), or None when the URI has no id."""
        return None if self.id is None else self.id.hex()


def parse(text: str) -> Pkcs11Uri:
    """Parse an RFC 7512 PKCS#11 URI; raise UriError naming the attribute and the problem."""
    if not isinstance(text, str):
        raise TypeError(f"parse() expects str, not {type(text).__name__}")
    scheme, colon, rest = text.partition(":")
    if not colon or scheme.lower() != "pkcs11":
        got = f"got scheme {scheme!r}" if colon and _SCHEME_RE.fullmatch(scheme) else "no scheme found"
        raise UriError(f"not a PKCS#11 URI: it must start with 'pkcs11:' ({got})")
    path, _, query = rest.partition("?")
    fields: dict[str, Any] = {}
    vendors: dict[str, dict[str, str]] = {}
    for (where, own, other, allowed), component, sep in zip(_COMPONENTS, (path, query), ";&"):
        vendor = vendors[f"vendor_{where}"] = {}
        seen: set[str] = set()
        for pos, segment in enumerate(component.split(sep) if component else (), 1):
            name, eq, raw = segment.partition("=")
            if not segment:
                raise UriError(f"empty {where} attribute #{pos} (stray {sep!r})")
            if not eq:  # a query segment might be a mistyped pin-value: do not echo it
                label = repr(segment) if where == "path" else f"#{pos}"
                raise UriError(f"{where} attribute {label} is not of the form name=value")
            _check_name(name, where)
            key = name.lower() if name.lower() in own or name.lower() in other else name
            if key in other:
                raise UriError(f"{key!r} is a {'query' if where == 'path' else 'path'} attribute "
                               f"and cannot appear in the {where} component")
            if key in seen:
                raise UriError(f"duplicate {where} attribute {key!r}: each attribute may appear only once")
            seen.add(key)
            data = _decode(raw, key, allowed)
            if key in own:
                fields[own[key][0]] = _convert(key, own[key][1], data)
            else:
                vendor[key] = _convert(key, "text", data)
    return Pkcs11Uri(**fields, **vendors)
