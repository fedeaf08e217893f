"""The PROXY protocol parser: whole, incomplete and impossible headers, v1 and v2.

Headers are built here byte by byte from the specification's layout, not
by the code under test.  Hypothesis then feeds random bytes, truncated
headers and headers followed by client data.
"""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastpoetry.proxy_protocol import (
    MALFORMED,
    OVERSIZED,
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    Header,
    HeaderError,
    parse,
)

# -- headers, built from the specification --------------------------------------

#: v2's thirteenth byte: version 2, and the command.
LOCAL, PROXY = 0x20, 0x21

#: v2's fourteenth byte: family (high nibble) and transport (low nibble).
UNSPEC, TCP4, TCP6, UNIX_STREAM, UDP4 = 0x00, 0x11, 0x21, 0x31, 0x12


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body


def v2_inet(source: str, source_port: int, destination: str = "192.0.2.1", port: int = 10000, tlvs: bytes = b"") -> bytes:
    body = socket.inet_pton(socket.AF_INET, source) + socket.inet_pton(socket.AF_INET, destination)
    return v2(PROXY, TCP4, body + struct.pack("!HH", source_port, port) + tlvs)


def v2_inet6(source: str, source_port: int, destination: str = "2001:db8::1", port: int = 10000) -> bytes:
    body = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, destination)
    return v2(PROXY, TCP6, body + struct.pack("!HH", source_port, port))


def v2_unix(source: bytes, destination: bytes = b"/run/haproxy.sock") -> bytes:
    return v2(PROXY, UNIX_STREAM, source.ljust(108, b"\0") + destination.ljust(108, b"\0"))


def v1(text: str) -> bytes:
    return text.encode("ascii") + b"\r\n"


#: One valid header of each kind, and what it names.
VALID = {
    "v1 TCP4": (v1("PROXY TCP4 198.51.100.7 192.0.2.1 40123 10000"), socket.AF_INET, ("198.51.100.7", 40123)),
    "v1 TCP6": (v1("PROXY TCP6 2001:db8::7 2001:db8::1 65535 10000"), socket.AF_INET6, ("2001:db8::7", 65535)),
    "v1 UNKNOWN": (v1("PROXY UNKNOWN"), 0, None),
    "v1 UNKNOWN with addresses": (v1("PROXY UNKNOWN ffff:f...f:ffff 1 2"), 0, None),
    "v2 TCP4": (v2_inet("198.51.100.7", 40123), socket.AF_INET, ("198.51.100.7", 40123)),
    "v2 TCP4 with TLVs": (
        v2_inet("198.51.100.7", 1, tlvs=b"\x04\x00\x05hello" + b"\x05\x00\x01x"),
        socket.AF_INET,
        ("198.51.100.7", 1),
    ),
    "v2 TCP6": (v2_inet6("2001:db8::7", 40123), socket.AF_INET6, ("2001:db8::7", 40123)),
    "v2 UNIX": (v2_unix(b"/run/client.sock"), socket.AF_UNIX, "/run/client.sock"),
    "v2 UNIX abstract": (v2_unix(b"\0balancer"), socket.AF_UNIX, b"\0balancer"),
    "v2 UNSPEC": (v2(PROXY, UNSPEC, b""), 0, None),
    "v2 LOCAL": (v2(LOCAL, UNSPEC, b""), 0, None),
    "v2 LOCAL with addresses": (v2(LOCAL, TCP4, bytes(12)), 0, None),
}


@pytest.mark.parametrize("name", VALID)
def test_a_whole_header_is_read_with_its_length_and_client(name: str) -> None:
    data, family, source = VALID[name]
    header = parse(data + b"and then the client's own bytes")
    assert header == Header(len(data), 2 if data.startswith(V2_SIGNATURE) else 1, family, source, "LOCAL" in name)


@pytest.mark.parametrize("name", VALID)
def test_every_beginning_of_a_header_asks_for_more(name: str) -> None:
    data = VALID[name][0]
    for end in range(len(data)):
        assert parse(data[:end]) is None, data[:end]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTP/1.0\r\n\r\n", id="http"),
        pytest.param(b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", id="v1 lower case"),
        pytest.param(v1("PROXY TCP5 1.2.3.4 5.6.7.8 1 2"), id="v1 unknown protocol"),
        pytest.param(v1("PROXY TCP4 1.2.3.4 5.6.7.8 1"), id="v1 missing port"),
        pytest.param(v1("PROXY TCP4 1.2.3.4  5.6.7.8 1 2"), id="v1 two spaces"),
        pytest.param(v1("PROXY TCP4 1.2.3 5.6.7.8 1 2"), id="v1 short address"),
        pytest.param(v1("PROXY TCP4 2001:db8::1 5.6.7.8 1 2"), id="v1 IPv6 in TCP4"),
        pytest.param(v1("PROXY TCP6 1.2.3.4 ::1 1 2"), id="v1 IPv4 in TCP6"),
        pytest.param(v1("PROXY TCP4 1.2.3.4 5.6.7.8 65536 2"), id="v1 port too big"),
        pytest.param(v1("PROXY TCP4 1.2.3.4 5.6.7.8 080 2"), id="v1 leading zero"),
        pytest.param(v1("PROXY TCP4 1.2.3.4 5.6.7.8 -1 2"), id="v1 negative port"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", id="v1 bare LF"),
        pytest.param(b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", id="v1 bare CR"),
        pytest.param(V2_SIGNATURE[:5] + b"x", id="v2 broken signature"),
        pytest.param(V2_SIGNATURE + b"\x11", id="v2 version 1"),
        pytest.param(V2_SIGNATURE + b"\x22", id="v2 command 2"),
        pytest.param(V2_SIGNATURE + b"\x21\x41", id="v2 family 4"),
        pytest.param(v2(PROXY, UDP4, bytes(12)), id="v2 datagram"),
        pytest.param(v2(PROXY, TCP4, bytes(11)), id="v2 short IPv4 block"),
        pytest.param(v2(PROXY, TCP6, bytes(35)), id="v2 short IPv6 block"),
        pytest.param(v2(PROXY, UNIX_STREAM, bytes(215)), id="v2 short UNIX block"),
    ],
)
def test_a_header_that_cannot_be_valid_is_malformed(data: bytes) -> None:
    with pytest.raises(HeaderError) as caught:
        parse(data)
    assert caught.value.kind == MALFORMED
    assert str(caught.value).startswith("malformed PROXY protocol header: ")


def test_a_v1_header_without_crlf_in_107_bytes_is_oversized() -> None:
    longest = v1("PROXY UNKNOWN " + "x" * (V1_MAX_LENGTH - 16))
    assert len(longest) == V1_MAX_LENGTH and parse(longest) is not None
    with pytest.raises(HeaderError) as caught:
        parse(longest[:-2] + b"x\r\n")
    assert caught.value.kind == OVERSIZED


def test_a_v2_header_over_the_limit_is_oversized_as_soon_as_its_length_arrives() -> None:
    at_limit = v2_inet("198.51.100.7", 1, tlvs=bytes(V2_MAX_LENGTH - 28))
    assert parse(at_limit) == Header(V2_MAX_LENGTH, 2, socket.AF_INET, ("198.51.100.7", 1))
    over = v2_inet("198.51.100.7", 1, tlvs=bytes(V2_MAX_LENGTH - 27))
    with pytest.raises(HeaderError) as caught:
        parse(over[:16])  # the rest has not even arrived
    assert caught.value.kind == OVERSIZED


def test_an_impossible_start_is_malformed_at_its_first_byte() -> None:
    """A client speaking another protocol is told apart without waiting for more."""
    for first in (b"G", b"\x16", b"\n", b"\0"):
        with pytest.raises(HeaderError):
            parse(first)


# -- properties -----------------------------------------------------------------------

valid_headers = st.sampled_from([data for data, _, _ in VALID.values()])
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
#: Headers naming a random TCP client.
naming_a_client = st.one_of(
    st.builds(lambda a, p: v2_inet(a, p), ipv4, ports),
    st.builds(lambda a, p: v2_inet6(a, p), ipv6, ports),
    st.builds(lambda a, b, p, q: v1(f"PROXY TCP4 {a} {b} {p} {q}"), ipv4, ipv4, ports, ports),
    st.builds(lambda a, b, p, q: v1(f"PROXY TCP6 {a} {b} {p} {q}"), ipv6, ipv6, ports, ports),
)
generated = st.one_of(naming_a_client, valid_headers)


@settings(max_examples=500)
@given(st.binary(max_size=300))
@example(V2_SIGNATURE)
@example(b"PROXY ")
def test_random_bytes_are_a_header_incomplete_or_refused(data: bytes) -> None:
    """parse() never fails otherwise, and a header it finds lies inside the data."""
    try:
        header = parse(data)
    except HeaderError as exc:
        assert exc.kind in (MALFORMED, OVERSIZED)
        return
    if header is not None:
        assert 0 < header.length <= len(data)
        assert data.startswith((b"PROXY ", V2_SIGNATURE))


@given(generated, st.binary(max_size=64))
def test_a_header_reads_the_same_whatever_the_client_sends_after_it(data: bytes, after: bytes) -> None:
    header = parse(data)
    assert header is not None and header.length == len(data)
    assert parse(data + after) == header


@given(generated, st.data())
def test_a_truncated_header_is_never_taken_for_a_whole_one(data: bytes, draw: st.DataObject) -> None:
    end = draw.draw(st.integers(0, len(data) - 1))
    assert parse(data[:end]) is None


@given(naming_a_client)
def test_the_client_address_survives_the_round_trip(data: bytes) -> None:
    header = parse(data)
    assert header is not None
    host, port = header.source  # type: ignore[misc]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    assert header.family == family
    assert socket.inet_pton(family, host)
    assert 0 <= port <= 65535
