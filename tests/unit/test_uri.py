"""Tests for hsm.uri: RFC 7512 PKCS#11 URI parsing, formatting, errors and pin-value redaction."""

from __future__ import annotations

import dataclasses

import pytest

from hsm.uri import OBJECT_TYPES, Pkcs11Uri, UriError, parse

RFC_ID = bytes.fromhex("69953e5cf4bdec91")

# RFC 7512 section 6, every example, with the fields it decodes to and its canonical form
# (None: the canonical form is the input itself).
RFC_EXAMPLES: list[tuple[str, dict, str | None]] = [
    ("pkcs11:", {}, None),
    ("pkcs11:object=my-pubkey;type=public", {"object": "my-pubkey", "type": "public"}, None),
    (
        "pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
        {"object": "my-key", "type": "private", "pin_source": "file:/etc/token"},
        None,
    ),
    (
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;"
        "model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial="
        "?pin-source=file:/etc/token_pin",
        {
            "token": "The Software PKCS#11 Softtoken",
            "manufacturer": "Snake Oil, Inc.",
            "model": "1.0",
            "object": "my-certificate",
            "type": "cert",
            "id": RFC_ID,
            "serial": "",
            "pin_source": "file:/etc/token_pin",
        },
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;"
        "serial=;model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91"
        "?pin-source=file:/etc/token_pin",
    ),
    (
        "pkcs11:object=my-sign-key;type=private?module-name=mypkcs11",
        {"object": "my-sign-key", "type": "private", "module_name": "mypkcs11"},
        None,
    ),
    (
        "pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
        {"object": "my-sign-key", "type": "private", "module_path": "/mnt/libmypkcs11.so.1"},
        None,
    ),
    (
        "pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.?pin-value=the-pin",
        {"token": "Software PKCS#11 softtoken", "manufacturer": "Snake Oil, Inc.", "pin_value": "the-pin"},
        None,
    ),
    ("pkcs11:slot-description=Sun%20Metaslot", {"slot_description": "Sun Metaslot"}, None),
    (
        "pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;library-description=Soft%20Token%20Library;"
        "library-version=1.23",
        {
            "library_manufacturer": "Snake Oil, Inc.",
            "library_description": "Soft Token Library",
            "library_version": (1, 23),
        },
        None,
    ),
    # As printed in RFC 7512 (the brief quoted a shorter id; that form is tested separately).
    (
        "pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;id=%01%02%03%Ba%dd%Ca%fe%04%05%06",
        {
            "token": "My token% created by Joe",
            "library_version": (3,),
            "id": bytes.fromhex("010203baddcafe040506"),
        },
        "pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;id=%01%02%03%BA%DD%CA%FE%04%05%06",
    ),
    (
        "pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
        {"token": "A name with a substring %;", "object": "my-certificate", "type": "cert"},
        None,
    ),
    (
        "pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;object=my-certificate;type=cert",
        {"token": "Name with a small A with acute: \u00e1", "object": "my-certificate", "type": "cert"},
        None,
    ),
    (
        "pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a"
        "?pin-source=file:/etc/token_pin&vendor-bbb=value-b",
        {
            "token": "my-token",
            "object": "my-certificate",
            "type": "cert",
            "pin_source": "file:/etc/token_pin",
            "vendor_path": {"vendor-aaa": "value-a"},
            "vendor_query": {"vendor-bbb": "value-b"},
        },
        None,
    ),
]


def _error(text: str) -> str:
    with pytest.raises(UriError) as info:
        parse(text)
    return str(info.value)


# --- RFC 7512 examples ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected", "canonical"), RFC_EXAMPLES, ids=range(len(RFC_EXAMPLES)))
def test_rfc_example_decodes_to_expected_fields(text: str, expected: dict, canonical: str | None) -> None:
    uri = parse(text)
    assert uri == Pkcs11Uri(**expected)  # every other attribute is absent
    for name, value in expected.items():
        got = getattr(uri, name)
        assert (dict(got) if name.startswith("vendor_") else got) == value, name


@pytest.mark.parametrize(("text", "expected", "canonical"), RFC_EXAMPLES, ids=range(len(RFC_EXAMPLES)))
def test_rfc_example_round_trips(text: str, expected: dict, canonical: str | None) -> None:
    uri = parse(text)
    assert str(uri) == uri.format() == (canonical or text)
    assert parse(str(uri)) == uri
    assert parse(uri.format()).format() == uri.format()


def test_vendor_attributes_keep_their_component_and_order() -> None:
    uri = parse("pkcs11:x-b=2;vendor-a=1;token=t?x-b=q&Zed_9=z")
    assert list(uri.vendor_path.items()) == [("x-b", "2"), ("vendor-a", "1")]
    assert list(uri.vendor_query.items()) == [("x-b", "q"), ("Zed_9", "z")]
    assert str(uri) == "pkcs11:token=t;x-b=2;vendor-a=1?x-b=q&Zed_9=z"


# --- id bytes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pkcs11:id=%01%02", b"\x01\x02"),
        ("pkcs11:id=%01%02%03%Ba%dd%Ef%08", b"\x01\x02\x03\xba\xdd\xef\x08"),
        ("pkcs11:id=%ff%FF%fF", b"\xff\xff\xff"),
        ("pkcs11:id=abc", b"abc"),
        ("pkcs11:id=a%00b", b"a\x00b"),
        ("pkcs11:id=", b""),
    ],
)
def test_id_is_raw_bytes(text: str, expected: bytes) -> None:
    assert parse(text).id == expected


def test_id_with_invalid_utf8_is_fine_because_id_is_binary() -> None:
    assert parse("pkcs11:id=%C3%28%FF").id == b"\xc3\x28\xff"


def test_id_always_formats_every_byte_as_percent_escape() -> None:
    assert str(Pkcs11Uri(id=b"\x01")) == "pkcs11:id=%01"
    assert str(Pkcs11Uri(id=b"abc-")) == "pkcs11:id=%61%62%63%2D"
    assert str(Pkcs11Uri(id=b"")) == "pkcs11:id="
    assert str(parse("pkcs11:id=%ba%dd")) == "pkcs11:id=%BA%DD"


def test_id_every_byte_value_round_trips() -> None:
    uri = Pkcs11Uri(id=bytes(range(256)))
    assert str(uri) == "pkcs11:id=" + "".join(f"%{b:02X}" for b in range(256))
    assert parse(str(uri)).id == bytes(range(256))


def test_id_hex() -> None:
    assert parse("pkcs11:id=%01%02%AB").id_hex == "0102ab"
    assert parse("pkcs11:id=").id_hex == ""
    assert parse("pkcs11:token=t").id_hex is None


def test_id_accepts_bytearray_and_stores_bytes() -> None:
    uri = Pkcs11Uri(id=bytearray(b"\x01\x02"))
    assert type(uri.id) is bytes and uri.id == b"\x01\x02"


# --- percent-encoding on output ----------------------------------------------------------------


def test_path_value_encoding_keeps_pchar_and_escapes_the_rest() -> None:
    uri = Pkcs11Uri(token="a b#c;d?e/f%g&h:[]@!$'()*+,=-._~\u00e1")
    assert str(uri) == "pkcs11:token=a%20b%23c%3Bd%3Fe%2Ff%25g&h:[]@!$'()*+,=-._~%C3%A1"
    assert parse(str(uri)) == uri


def test_query_value_encoding_keeps_qchar_and_escapes_the_rest() -> None:
    uri = Pkcs11Uri(pin_source="|/bin/get pin?x&y;z#", module_path="/usr/lib/p11 kit/%.so")
    assert str(uri) == "pkcs11:?pin-source=|/bin/get%20pin?x%26y%3Bz%23&module-path=/usr/lib/p11%20kit/%25.so"
    assert parse(str(uri)) == uri


def test_unnecessary_escapes_decode_and_are_dropped_on_output() -> None:
    uri = parse("pkcs11:token=%41%62%2d%3a")
    assert uri.token == "Ab-:"
    assert str(uri) == "pkcs11:token=Ab-:"


def test_query_may_contain_unencoded_slash_question_and_pipe() -> None:
    uri = parse("pkcs11:?pin-source=|/usr/bin/pin?a=b&x-q=/?|")
    assert uri.pin_source == "|/usr/bin/pin?a=b"
    assert dict(uri.vendor_query) == {"x-q": "/?|"}


def test_path_may_contain_unencoded_ampersand() -> None:
    assert parse("pkcs11:token=Smith&Sons").token == "Smith&Sons"


# --- round trip over constructed values ---------------------------------------------------------

ALL_ASCII = "".join(map(chr, range(128)))


@pytest.mark.parametrize(
    "uri",
    [
        Pkcs11Uri(),
        Pkcs11Uri(token=ALL_ASCII, object=ALL_ASCII, serial="", model="\u00e1\u4e2d\U0001f600"),
        Pkcs11Uri(pin_value=ALL_ASCII, module_name=ALL_ASCII, module_path=ALL_ASCII),
        Pkcs11Uri(pin_source=ALL_ASCII, vendor_query={"x-a": ALL_ASCII}, vendor_path={"x-a": ALL_ASCII}),
        Pkcs11Uri(slot_id=0, library_version=(0,), type="data", id=b""),
        Pkcs11Uri(slot_id=2**64 - 1, library_version=(255, 255), type="secret-key", id=bytes(range(256))),
        Pkcs11Uri(
            token="t", manufacturer="m", serial="s", model="mo", library_manufacturer="lm",
            library_description="ld", library_version=(2, 40), slot_description="sd",
            slot_manufacturer="sm", slot_id=7, object="o", type="private", id=b"\x00",
            pin_value="p", module_name="mn", module_path="/mp",
        ),
    ],
    ids=["empty", "path-text", "query-text", "vendor", "minimums", "maximums", "everything"],
)
def test_constructed_uri_round_trips(uri: Pkcs11Uri) -> None:
    assert parse(str(uri)) == uri
    assert str(parse(str(uri))) == str(uri)


def test_every_standard_attribute_is_formatted_with_its_rfc_name() -> None:
    uri = Pkcs11Uri(
        token="t", manufacturer="m", serial="s", model="mo", library_manufacturer="lm",
        library_description="ld", library_version=(2, 40), slot_description="sd",
        slot_manufacturer="sm", slot_id=7, object="o", type="private", id=b"\x00",
        pin_source="ps", module_name="mn", module_path="/mp",
    )
    assert str(uri) == (
        "pkcs11:token=t;manufacturer=m;serial=s;model=mo;library-manufacturer=lm;"
        "library-description=ld;library-version=2.40;slot-description=sd;slot-manufacturer=sm;"
        "slot-id=7;object=o;type=private;id=%00?pin-source=ps&module-name=mn&module-path=/mp"
    )


# --- accepted variants --------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["pkcs11", "PKCS11", "Pkcs11", "pKcS11"])
def test_scheme_is_case_insensitive(scheme: str) -> None:
    uri = parse(f"{scheme}:object=k;type=public")
    assert uri == Pkcs11Uri(object="k", type="public")
    assert str(uri).startswith("pkcs11:")


def test_standard_names_and_type_values_are_case_insensitive() -> None:
    uri = parse("pkcs11:TOKEN=a;Type=PUBLIC?Pin-Source=file:/p")
    assert (uri.token, uri.type, uri.pin_source) == ("a", "public", "file:/p")
    assert str(uri) == "pkcs11:token=a;type=public?pin-source=file:/p"


@pytest.mark.parametrize("value", sorted(OBJECT_TYPES))
def test_every_object_type_is_accepted(value: str) -> None:
    assert parse(f"pkcs11:type={value}").type == value


@pytest.mark.parametrize(
    ("text", "expected"), [("0", 0), ("42", 42), ("007", 7), ("18446744073709551615", 2**64 - 1)]
)
def test_slot_id_is_decimal_int(text: str, expected: int) -> None:
    uri = parse(f"pkcs11:slot-id={text}")
    assert uri.slot_id == expected
    assert str(uri) == f"pkcs11:slot-id={expected}"


@pytest.mark.parametrize(
    ("text", "expected"), [("3", (3,)), ("1.23", (1, 23)), ("0.0", (0, 0)), ("255.255", (255, 255))]
)
def test_library_version_forms(text: str, expected: tuple[int, ...]) -> None:
    uri = parse(f"pkcs11:library-version={text}")
    assert uri.library_version == expected
    assert str(uri) == f"pkcs11:library-version={text}"


def test_empty_query_and_empty_values() -> None:
    assert parse("pkcs11:?") == Pkcs11Uri()
    uri = parse("pkcs11:token=;object=?pin-source=")
    assert (uri.token, uri.object, uri.pin_source) == ("", "", "")
    assert str(uri) == "pkcs11:token=;object=?pin-source="


def test_same_vendor_name_in_path_and_query_is_not_a_duplicate() -> None:
    uri = parse("pkcs11:x-a=1?x-a=2")
    assert (uri.vendor_path["x-a"], uri.vendor_query["x-a"]) == ("1", "2")


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        # wrong scheme
        ("http://example.com", ["pkcs11:", "'http'"]),
        ("pkcs1:token=a", ["pkcs11:", "'pkcs1'"]),
        ("pkcs11 token=a", ["pkcs11:", "no scheme"]),
        ("", ["pkcs11:", "no scheme"]),
        # duplicates
        ("pkcs11:token=a;token=b", ["duplicate", "path", "'token'"]),
        ("pkcs11:token=a;TOKEN=b", ["duplicate", "'token'"]),
        ("pkcs11:id=%01;object=o;id=%02", ["duplicate", "'id'"]),
        ("pkcs11:x-a=1;x-a=2", ["duplicate", "'x-a'"]),
        ("pkcs11:?module-name=a&module-name=b", ["duplicate", "query", "'module-name'"]),
        ("pkcs11:?x-v=1&x-v=2", ["duplicate", "query", "'x-v'"]),
        # standard names in the wrong component, malformed and empty names
        ("pkcs11:module-path=/x", ["'module-path'", "query attribute", "path component"]),
        ("pkcs11:?token=a", ["'token'", "path attribute", "query component"]),
        ("pkcs11:tok.en=a", ["malformed", "'tok.en'"]),
        ("pkcs11:tok%65n=a", ["malformed", "'tok%65n'"]),
        ("pkcs11:?x a=b", ["malformed", "query", "'x a'"]),
        ("pkcs11://token=a", ["malformed", "'//token'"]),
        ("pkcs11:=a", ["empty name", "path"]),
        ("pkcs11:?=a", ["empty name", "query"]),
        ("pkcs11:token=a;;object=b", ["empty path attribute #2", "';'"]),
        ("pkcs11:token=a;", ["empty path attribute #2"]),
        ("pkcs11:?pin-source=a&", ["empty query attribute #2", "'&'"]),
        ("pkcs11:token", ["'token'", "name=value"]),
        # percent-escapes and raw characters
        ("pkcs11:token=%G1", ["'token'", "invalid percent-escape", "'%G1'"]),
        ("pkcs11:object=ab%4", ["'object'", "truncated percent-escape", "'%4'"]),
        ("pkcs11:object=ab%", ["'object'", "truncated percent-escape", "'%'"]),
        ("pkcs11:id=%0x", ["'id'", "invalid percent-escape", "'%0x'"]),
        ("pkcs11:token=a b", ["'token'", "' '", "must be percent-encoded"]),
        ("pkcs11:token=a/b", ["'token'", "'/'", "must be percent-encoded"]),
        ("pkcs11:token=\u00e1", ["'token'", "must be percent-encoded"]),
        ("pkcs11:?module-name=a;b", ["'module-name'", "';'", "must be percent-encoded"]),
        # invalid UTF-8 in text attributes
        ("pkcs11:token=%FF", ["'token'", "UTF-8", "0xff"]),
        ("pkcs11:object=ok%C3", ["'object'", "UTF-8", "0xc3"]),
        ("pkcs11:?module-path=%80", ["'module-path'", "UTF-8"]),
        ("pkcs11:x-v=%FE", ["'x-v'", "UTF-8"]),
        # type, slot-id, library-version
        ("pkcs11:type=privat", ["'type'", "'privat'", "secret-key"]),
        ("pkcs11:type=", ["'type'", "''"]),
        ("pkcs11:type=%70ublic%00", ["'type'"]),
        ("pkcs11:slot-id=abc", ["'slot-id'", "'abc'", "decimal integer"]),
        ("pkcs11:slot-id=-1", ["'slot-id'", "decimal integer"]),
        ("pkcs11:slot-id=+1", ["'slot-id'", "decimal integer"]),
        ("pkcs11:slot-id=1.5", ["'slot-id'", "decimal integer"]),
        ("pkcs11:slot-id=", ["'slot-id'", "decimal integer"]),
        ("pkcs11:slot-id=%EF%BC%91", ["'slot-id'", "decimal integer"]),  # fullwidth digit one
        ("pkcs11:slot-id=18446744073709551616", ["'slot-id'", "64-bit"]),
        ("pkcs11:slot-id=" + "9" * 5000, ["'slot-id'", "64-bit"]),
        ("pkcs11:library-version=1.2.3", ["'library-version'", "'1.2.3'", "M.N"]),
        ("pkcs11:library-version=", ["'library-version'", "M.N"]),
        ("pkcs11:library-version=1.", ["'library-version'", "M.N"]),
        ("pkcs11:library-version=.1", ["'library-version'", "M.N"]),
        ("pkcs11:library-version=v1", ["'library-version'", "M.N"]),
        ("pkcs11:library-version=256", ["'library-version'", "0..255"]),
        ("pkcs11:library-version=1.256", ["'library-version'", "0..255"]),
        # pin-source together with pin-value
        ("pkcs11:?pin-source=file:/p&pin-value=1234", ["pin-source", "pin-value", "SHOULD be refused"]),
    ],
)
def test_parse_errors_name_the_problem(text: str, needles: list[str]) -> None:
    message = _error(text)
    for needle in needles:
        assert needle in message, (needle, message)


def test_uri_error_is_a_value_error() -> None:
    assert issubclass(UriError, ValueError)
    with pytest.raises(ValueError):
        parse("pkcs11:type=nope")


def test_parse_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="str"):
        parse(b"pkcs11:")  # type: ignore[arg-type]


# --- pin-value redaction ------------------------------------------------------------------------

PIN = "Zq7-secret"


def test_repr_redacts_pin_value() -> None:
    uri = parse(f"pkcs11:token=t?pin-value={PIN}")
    assert uri.pin_value == PIN
    assert PIN not in repr(uri)
    assert "pin_value='<redacted>'" in repr(uri)
    assert PIN not in repr(Pkcs11Uri(pin_value=PIN))
    assert PIN not in repr([uri])


def test_repr_shows_the_other_fields() -> None:
    uri = parse("pkcs11:token=t;id=%01?pin-source=file:/p&x-q=v")
    assert repr(uri) == (
        "Pkcs11Uri(token='t', id=b'\\x01', pin_source='file:/p', vendor_query={'x-q': 'v'})"
    )


def test_format_keeps_pin_value_so_the_uri_round_trips() -> None:
    uri = Pkcs11Uri(pin_value=PIN)
    assert str(uri) == f"pkcs11:?pin-value={PIN}"


@pytest.mark.parametrize(
    "text",
    [
        f"pkcs11:?pin-value={PIN}%G1",
        f"pkcs11:?pin-value={PIN}%4",
        f"pkcs11:?pin-value={PIN}%FF",
        f"pkcs11:?pin-value={PIN};x",
        f"pkcs11:?pin-value={PIN} ",
        f"pkcs11:?pin-source=file:/p&pin-value={PIN}",
        f"pkcs11:?pin-value={PIN}&pin-value={PIN}",
        f"pkcs11:pin-value={PIN}",
        f"pkcs11:?pin-value={PIN}&{PIN}",
        f"pkcs11:?{PIN}",
        f"{PIN}",
    ],
)
def test_errors_never_contain_the_pin_value(text: str) -> None:
    with pytest.raises(UriError) as info:
        parse(text)
    for part in (PIN, "Zq7", "%G1", "0xff", "';'", "' '"):
        assert part not in str(info.value), (part, str(info.value))
    assert PIN not in repr(info.value)
    # No chained exception (e.g. a UnicodeDecodeError holding the bytes) is shown in tracebacks.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_pin_value_errors_still_name_the_attribute() -> None:
    assert "'pin-value'" in _error(f"pkcs11:?pin-value={PIN}%G1")
    assert "percent-escape" in _error(f"pkcs11:?pin-value={PIN}%G1")
    assert "UTF-8" in _error(f"pkcs11:?pin-value={PIN}%FF")


# --- construction, with_, immutability -----------------------------------------------------------


def test_with_returns_changed_copy() -> None:
    base = parse("pkcs11:token=t;object=o;type=private")
    changed = base.with_(object="other", id=b"\x05")
    assert (changed.object, changed.id, changed.token) == ("other", b"\x05", "t")
    assert (base.object, base.id) == ("o", None)
    assert str(changed) == "pkcs11:token=t;object=other;type=private;id=%05"


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"type": "bogus"}, "'type'"),
        ({"slot_id": -1}, "'slot-id'"),
        ({"slot_id": True}, "'slot-id'"),
        ({"library_version": (1, 2, 3)}, "'library-version'"),
        ({"library_version": (300,)}, "'library-version'"),
        ({"pin_value": PIN}, "pin-value"),  # base has a pin-source
        ({"vendor_path": {"token": "x"}}, "clashes"),
        ({"vendor_query": {"PIN-VALUE": "x"}}, "clashes"),
        ({"vendor_path": {"bad name": "x"}}, "malformed"),
        ({"vendor_query": {"": "x"}}, "empty name"),
        ({"token": "\ud800"}, "UTF-8"),
    ],
)
def test_with_and_constructor_validate(changes: dict, needle: str) -> None:
    base = Pkcs11Uri(token="t", pin_source="file:/p")
    with pytest.raises(UriError) as info:
        base.with_(**changes)
    assert needle in str(info.value)
    assert PIN not in str(info.value)


@pytest.mark.parametrize(
    "changes", [{"token": b"t"}, {"id": "0102"}, {"type": 3}, {"vendor_path": {"x-a": 1}}, {"nope": 1}]
)
def test_wrong_python_types_raise_type_error(changes: dict) -> None:
    with pytest.raises(TypeError):
        Pkcs11Uri().with_(**changes)


def test_constructor_normalises_type_and_version() -> None:
    uri = Pkcs11Uri(type="CERT", library_version="1.23", slot_id="7")  # type: ignore[arg-type]
    assert (uri.type, uri.library_version, uri.slot_id) == ("cert", (1, 23), 7)


def test_instances_are_frozen_and_hashable() -> None:
    uri = parse("pkcs11:token=t;x-a=1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        uri.token = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        uri.vendor_path["x-a"] = "2"  # type: ignore[index]
    assert hash(uri) == hash(parse("pkcs11:token=t;x-a=1"))
    assert len({uri, parse("pkcs11:token=t;x-a=1")}) == 1


def test_vendor_mapping_is_copied_not_shared() -> None:
    source = {"x-a": "1"}
    uri = Pkcs11Uri(vendor_path=source)
    source["x-a"] = "2"
    assert uri.vendor_path["x-a"] == "1"


def test_equality_distinguishes_absent_from_empty() -> None:
    assert parse("pkcs11:serial=") != parse("pkcs11:")
    assert parse("pkcs11:id=") != parse("pkcs11:")
    assert parse("pkcs11:library-version=1") != parse("pkcs11:library-version=1.0")
