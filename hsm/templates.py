"""Key-pair templates every conforming token accepts, the sign-only policy a token key must meet, and refusals.

Policy as data, read by hsm.keys:

- The *private* template states every usage: sign yes; decrypt, unwrap, derive no; private, sensitive, not
  extractable, a token object. These are what make a key sign-only, so they are always sent, and checked again
  on the key the token made (a token that ignored one gets its key pair destroyed) and on any existing key
  Tessera is asked to reuse.
- The *public* template leaves CKA_VERIFY and CKA_ENCRYPT to the token. tpm2-pkcs11 (1.9.0, still so upstream)
  derives both from the TPM object's flags (CKA_VERIFY from TPMA_OBJECT_DECRYPT, CKA_ENCRYPT from
  TPMA_OBJECT_SIGN_ENCRYPT), refuses any other value ("User specified and TPM specified attr mismatch: 0x10a",
  CKR_GENERAL_ERROR), and a public CKA_VERIFY=true even makes it create a TPM key that can decrypt. What the token
  does with a public key is no secret anyway: anyone holding the public key can verify or encrypt without it.
- Import (C_CreateObject, CA keys moved into a token) derives nothing, so its public template says it all.

Refusals: PKCS#11 return codes name no attribute, so a refused template is reported with the key type, the
templates as sent and whatever the module wrote to stderr during the call (see hsm.modulelog).
"""

from __future__ import annotations

import re
from typing import Mapping

from .errors import HsmError, MechanismRefused, TemplateRefused

#: The private key of every key pair Tessera generates or imports: attribute -> value.
PRIVATE_TEMPLATE: dict[str, bool] = {
    "TOKEN": True, "PRIVATE": True, "SENSITIVE": True, "EXTRACTABLE": False,
    "SIGN": True, "DECRYPT": False, "UNWRAP": False, "DERIVE": False,
}
#: The public half on generation: only attributes no token derives itself.
PUBLIC_TEMPLATE: dict[str, bool] = {"TOKEN": True, "PRIVATE": False, "WRAP": False, "DERIVE": False}
#: Left to the token on generation (see the module docstring).
TOKEN_DERIVED_PUBLIC: tuple[str, ...] = ("VERIFY", "ENCRYPT")
#: The public half on import: the token derives nothing from a created object.
IMPORT_PUBLIC_TEMPLATE: dict[str, bool] = {**PUBLIC_TEMPLATE, "VERIFY": True, "ENCRYPT": False}

#: What a key must be for Tessera to use it: attribute -> required value (unreadable counts as "no": PKCS#11's
#: CKR_ATTRIBUTE_TYPE_INVALID means the object has no such capability).
SIGN_ONLY_POLICY: dict[str, bool] = {name: value for name, value in PRIVATE_TEMPLATE.items() if name != "TOKEN"}

#: python-pkcs11 sets these from its `capabilities` argument unless the template says otherwise.
_CAPABILITY_ATTRIBUTES = {"public": ("ENCRYPT", "WRAP", "VERIFY"), "private": ("DECRYPT", "UNWRAP", "SIGN", "DERIVE")}

#: PKCS#11 return codes (python-pkcs11 exception names) that mean "this template", or "this mechanism/size".
_TEMPLATE_CODES = {"AttributeValueInvalid", "AttributeTypeInvalid", "AttributeReadOnly", "TemplateInconsistent",
                   "TemplateIncomplete", "GeneralError", "FunctionFailed", "ArgumentsBad"}
_MECHANISM_CODES = {"MechanismInvalid", "MechanismParamInvalid", "DomainParamsInvalid", "KeySizeRange",
                    "FunctionNotSupported", "KeyTypeInconsistent"}


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def python_pkcs11_templates(public: Mapping[str, bool], private: Mapping[str, bool]) -> tuple[dict, dict]:
    """python-pkcs11 public_template/private_template dicts that send exactly these usage attributes.

    python-pkcs11 fills every capability attribute from its `capabilities` argument; an attribute our template
    leaves out (because the token derives it) is mapped to its DEFAULT sentinel, which python-pkcs11 drops.
    """
    from pkcs11 import Attribute
    from pkcs11.constants import DEFAULT

    out = []
    for side, template in (("public", public), ("private", private)):
        attrs = {getattr(Attribute, name): value for name, value in template.items()}
        for name in _CAPABILITY_ATTRIBUTES[side]:
            attrs.setdefault(getattr(Attribute, name), DEFAULT)
        out.append(attrs)
    return out[0], out[1]


def describe(template: Mapping[str, bool]) -> str:
    """A template in one short line: ``sign=yes decrypt=no ...``."""
    return " ".join(f"{name.lower()}={_yes(value)}" for name, value in template.items())


def policy_violations(attributes: Mapping[str, bool | None]) -> list[str]:
    """Where a key's attributes (lower-case name -> value, None = unreadable) break the sign-only policy."""
    bad = []
    for name, want in SIGN_ONLY_POLICY.items():
        have = bool(attributes.get(name.lower()))
        if have != want:
            bad.append(f"{name.lower()}={_yes(have)}")
    return bad


def return_code(exc: BaseException) -> str:
    """CKR_... for a python-pkcs11 exception (its class name is the return code in CamelCase)."""
    name = type(exc).__name__
    return "CKR_" + re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def _attribute_names(text: str) -> str:
    """Hex numbers in a module's message that are PKCS#11 attribute types, named: ' (0x10a = CKA_VERIFY)'."""
    from pkcs11 import Attribute

    names = []
    for hexnum in dict.fromkeys(re.findall(r"0x([0-9a-fA-F]{1,8})\b", text)):
        try:
            names.append(f"0x{hexnum.lower()} = CKA_{Attribute(int(hexnum, 16)).name}")
        except ValueError:
            continue
    return f" ({', '.join(names)})" if names else ""


def generation_refused(exc: BaseException, token_label: str, key_type: str, mechanism: str,
                       public: Mapping[str, bool], private: Mapping[str, bool], module_said: str = "") -> HsmError:
    """The one-line error for a token that refused C_GenerateKeyPair."""
    code = return_code(exc)
    said = f"; the module said {module_said!r}{_attribute_names(module_said)}" if module_said else ""
    if type(exc).__name__ in _MECHANISM_CODES:
        return MechanismRefused(f"token {token_label!r} refused {mechanism} for a {key_type} key ({code}){said}")
    if type(exc).__name__ in _TEMPLATE_CODES:
        return TemplateRefused(f"token {token_label!r} refused the {key_type} key-pair template ({code}): "
                               f"public {describe(public)}; private {describe(private)}{said}")
    return HsmError(f"token {token_label!r} could not generate a {key_type} key ({code}){said}")


def signing_refused(exc: BaseException, token_label: str, key_label: str, key_type: str, mechanism: str,
                    module_said: str = "") -> HsmError:
    """The one-line error for a token that refused to sign with one of its keys."""
    code = return_code(exc)
    said = f"; the module said {module_said!r}" if module_said else ""
    if type(exc).__name__ in _MECHANISM_CODES:
        return MechanismRefused(f"token {token_label!r} refused {mechanism} with {key_type} key {key_label!r} "
                                f"({code}){said}")
    return HsmError(f"token {token_label!r} could not sign with {key_type} key {key_label!r} ({mechanism}, {code})"
                    f"{said}")
