"""phrases.py: counts, error reasons and addresses, as every message words them."""

from __future__ import annotations

import errno
import socket

import pytest

from fastpoetry.phrases import count, host_port, reason


@pytest.mark.parametrize(
    ("number", "noun", "plural", "expected"),
    [
        (0, "poem", None, "0 poems"),
        (1, "poem", None, "1 poem"),
        (2, "poem", None, "2 poems"),
        (1, "failed fetch", "failed fetches", "1 failed fetch"),
        (3, "failed fetch", "failed fetches", "3 failed fetches"),
    ],
)
def test_count_says_the_number_with_the_noun_in_the_right_number(
    number: int, noun: str, plural: str | None, expected: str
) -> None:
    assert count(number, noun, plural) == expected


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "connection reset"),
        (OSError(errno.ECONNRESET, "whatever the text"), "connection reset"),
        # The error's own text may name the address; strerror does not.
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 7)"),
         "connection refused"),
        (OSError(errno.EADDRINUSE, "Address already in use: ('127.0.0.1', 10000)"), "address already in use"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/etc/poem"), "no such file or directory"),
        (OSError("All Attempts Failed"), "all attempts failed"),
        (ValueError("Not A Socket Error"), "not a socket error"),
        # A resolver's errno is an EAI_ code, not an errno: its own text is the reason.
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "name or service not known"),
    ],
)
def test_reason_says_an_error_in_lower_case_without_the_address(exc: BaseException, expected: str) -> None:
    assert reason(exc) == expected


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("127.0.0.1", 10000, "127.0.0.1:10000"),
        ("poems.example", 7, "poems.example:7"),
        ("::1", 10000, "[::1]:10000"),
        ("fe80::1%eth0", 1, "[fe80::1%eth0]:1"),
    ],
)
def test_host_port_puts_ipv6_addresses_in_brackets(host: str, port: int, expected: str) -> None:
    assert host_port(host, port) == expected
