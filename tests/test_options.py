"""The value parsers, defaults and configurations of :mod:`fastpoetry.options`, in-process.

Every parser is a pure function from the text of one option to its value:
each is called directly with text that must be taken (and what it gives)
and text that must be refused, where the refusal is an
:exc:`argparse.ArgumentTypeError` whose message is checked whole, since
argparse prints it as the one line of a usage error.  The command line
around them (exit status 2, the option's name in front of the message) is
``test_cli.py``'s; here is what each parser takes and says.

``control_path`` reads RUNTIME_DIRECTORY, which each of its tests sets or
removes with monkeypatch.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fastpoetry import options
from fastpoetry.options import (
    CONTROL_SOCKET_NAME,
    DEFAULT_MAX_POEM_SIZE,
    DEFAULT_MAX_POEM_SIZE_TEXT,
    DEFAULT_POEM_PATH,
    MAX_WORKERS,
    Address,
    PoemSpec,
    ServeConfig,
    UpstreamSpec,
)


def refusal(parser: Callable[[str], Any], text: str) -> str:
    """The message ``parser`` refuses ``text`` with; fails if it takes it, or raises anything else."""
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        parser(text)
    message = str(caught.value)
    assert "\n" not in message, "a usage error is one line"
    return message


# -- port ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [("0", 0), ("1", 1), ("10000", 10000), ("65535", 65535), ("007", 7)])
def test_port_takes_0_to_65535(text: str, value: int) -> None:
    assert options.port(text) == value


@pytest.mark.parametrize(
    "text",
    ["", "-1", "65536", "8_0", "+8", " 8", "8 ", "8.0", "0x50", "abc", "\u0663", "\uff18"],
    ids=["empty", "-1", "65536", "underscore", "plus", "leading-space", "trailing-space",
         "decimal", "hex", "abc", "arabic-indic-digit", "fullwidth-digit"],
)
def test_port_refuses_anything_but_ascii_digits_in_range(text: str) -> None:
    assert refusal(options.port, text) == f"{text!r} is not a port number (0 to 65535)"


# -- named_port ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [("a=1", ("a", 1)), ("1", (None, 1)), ("ballad=0", ("ballad", 0)), ("a=b=7", ("a=b", 7))],
)
def test_named_port_is_an_optional_name_and_a_port(text: str, value: tuple[str | None, int]) -> None:
    assert options.named_port(text) == value


def test_named_port_refuses_an_empty_name() -> None:
    assert refusal(options.named_port, "=1") == "'=1' has an empty NAME before '='"


@pytest.mark.parametrize("text, port", [("a=", ""), ("a=65536", "65536"), ("a=x", "x")])
def test_named_port_refuses_a_bad_port_after_the_name(text: str, port: str) -> None:
    """The message names the whole option value, so the NAME= it came with shows."""
    assert refusal(options.named_port, text) == f"{text!r}: {port!r} is not a port number (0 to 65535)"


# -- workers ---------------------------------------------------------------------------


@pytest.mark.parametrize("number", [1, 2, MAX_WORKERS])
def test_workers_takes_1_to_max_workers(number: int) -> None:
    assert options.workers(str(number)) == number


@pytest.mark.parametrize("text", ["0", str(MAX_WORKERS + 1), "-1", "", "1.0", "+2", "\u0663"])
def test_workers_refuses_numbers_out_of_bounds_and_non_numbers(text: str) -> None:
    assert refusal(options.workers, text) == f"{text!r} is not a number of workers (1 to {MAX_WORKERS})"


def test_max_workers_is_64() -> None:
    # test_workers.py's command-line test, and --help, say "1 to 64".
    assert MAX_WORKERS == 64


# -- seconds ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [("1", 1.0), ("0.5", 0.5), ("1e3", 1000.0), ("5e-324", 5e-324)])
def test_seconds_takes_a_positive_finite_number(text: str, value: float) -> None:
    assert options.seconds(text) == value


@pytest.mark.parametrize(
    "text", ["0", "-0", "-1", "nan", "inf", "-inf", "1e400", "abc", "", "1_0", " 1", "1 ", "\u0663"]
)
def test_seconds_refuses_zero_negative_non_finite_and_non_numbers(text: str) -> None:
    assert refusal(options.seconds, text) == f"{text!r} is not a positive number of seconds"


# -- size ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("1", 1),
        ("512", 512),
        ("1K", 1024),
        ("1k", 1024),
        ("16M", 16 * 1024**2),
        ("16m", 16 * 1024**2),
        ("2G", 2 * 1024**3),
        ("2g", 2 * 1024**3),
    ],
)
def test_size_takes_bytes_or_binary_multiples_in_either_case(text: str, value: int) -> None:
    assert options.size(text) == value


@pytest.mark.parametrize("text", ["0", "0K", "1.5M", "M", "", "1T", "1KB", "-5K", "+5K", "1 K", "\u0663K"])
def test_size_refuses_zero_fractions_missing_numbers_and_other_suffixes(text: str) -> None:
    assert refusal(options.size, text) == (
        f"{text!r} is not a size: a positive number of bytes, optionally followed by K, M or G"
    )


# -- poem ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, spec",
    [
        ("poems/lantern.txt", PoemSpec("poems/lantern.txt")),
        ("ballad=poems/lantern.txt", PoemSpec("poems/lantern.txt", "ballad")),
        # Only the first '=' separates: the rest belongs to the path.
        ("ballad=poems/a=b.txt", PoemSpec("poems/a=b.txt", "ballad")),
        # A '/' before the first '=' makes it all a path.
        ("poems/a=b.txt", PoemSpec("poems/a=b.txt")),
        ("./x=y", PoemSpec("./x=y")),
        ("/srv/poems/key=value.txt", PoemSpec("/srv/poems/key=value.txt")),
        ("my ballad=x", PoemSpec("x", "my ballad")),
        (f"{'n' * 255}=x", PoemSpec("x", "n" * 255)),
    ],
    ids=["plain", "named", "named-path-with-equals", "path-with-equals", "dot-slash",
         "absolute-with-equals", "name-with-space", "name-of-255"],
)
def test_poem_is_an_optional_name_and_a_file(text: str, spec: PoemSpec) -> None:
    assert options.poem(text) == spec


def test_poem_refuses_an_empty_name() -> None:
    assert refusal(options.poem, "=x.txt") == "'=x.txt' has an empty NAME before '='"


@pytest.mark.parametrize("text", ["name=", ""])
def test_poem_refuses_an_empty_file(text: str) -> None:
    assert refusal(options.poem, text) == f"{text!r} names no FILE"


@pytest.mark.parametrize(
    "name",
    ["a:b", ":", "n" * 256, "a\tb", "a\x7fb", "a\x1bb", "ballade-\u00e9"],
    ids=["colon", "only-colon", "256-characters", "tab", "delete", "escape", "not-ascii"],
)
def test_poem_refuses_what_cannot_be_a_socket_name(name: str) -> None:
    """systemd refuses these as FileDescriptorName= (fdname_is_valid): no socket could carry them."""
    assert refusal(options.poem, f"{name}=x.txt") == (
        f"{name!r} cannot be a socket name (FileDescriptorName=: up to 255 printable ASCII characters, no ':')"
    )


# -- address ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("example.org:70", Address("example.org", 70)),
        ("127.0.0.1:10000", Address("127.0.0.1", 10000)),
        ("localhost:1", Address("localhost", 1)),
        ("[::1]:80", Address("::1", 80)),
        ("[2001:db8::7]:65535", Address("2001:db8::7", 65535)),
        ("10000", Address("localhost", 10000)),
    ],
    ids=["name", "ipv4", "localhost", "ipv6", "ipv6-long", "bare-port"],
)
def test_address_takes_host_port_bracketed_ipv6_or_a_bare_port(text: str, value: Address) -> None:
    assert options.address(text) == value


@pytest.mark.parametrize(
    "text, message",
    [
        ("0", "'0': '0' is not a port number (1 to 65535)"),
        ("localhost:0", "'localhost:0': '0' is not a port number (1 to 65535)"),
        ("[::1]:0", "'[::1]:0': '0' is not a port number (1 to 65535)"),
        ("65536", "'65536': '65536' is not a port number (1 to 65535)"),
        ("host:65536", "'host:65536': '65536' is not a port number (1 to 65535)"),
        ("host:", "'host:': '' is not a port number (1 to 65535)"),
        ("host:+80", "'host:+80': '+80' is not a port number (1 to 65535)"),
        ("host:\u0663", "'host:\u0663': '\u0663' is not a port number (1 to 65535)"),
        ("::1:80", "'::1:80': write an IPv6 address in brackets, as [IPV6-ADDRESS]:PORT"),
        ("[nothost]:1", "'[nothost]:1': 'nothost' in brackets is not an IPv6 address"),
        ("[127.0.0.1]:1", "'[127.0.0.1]:1': '127.0.0.1' in brackets is not an IPv6 address"),
        ("[::1]", "'[::1]' is not HOST:PORT, [IPV6-ADDRESS]:PORT or PORT"),
        ("[::1]80", "'[::1]80' is not HOST:PORT, [IPV6-ADDRESS]:PORT or PORT"),
        ("[::1:80", "'[::1:80' is not HOST:PORT, [IPV6-ADDRESS]:PORT or PORT"),
        ("localhost", "'localhost' is not HOST:PORT, [IPV6-ADDRESS]:PORT or PORT"),
        ("", "'' is not HOST:PORT, [IPV6-ADDRESS]:PORT or PORT"),
        ("\u0663", "'\u0663' is not HOST:PORT, [IPV6-ADDRESS]:PORT or PORT"),
        (":80", "':80' names no host"),
        ("my host:80", "'my host:80': 'my host' is not a host name"),
        ("host\t:80", "'host\\t:80': 'host\\t' is not a host name"),
        ("ho\x00st:80", "'ho\\x00st:80': 'ho\\x00st' is not a host name"),
    ],
    ids=["bare-0", "port-0", "ipv6-port-0", "bare-65536", "port-65536", "empty-port", "plus-port",
         "arabic-indic-port", "unbracketed-ipv6", "bracketed-name", "bracketed-ipv4", "bracket-no-port",
         "bracket-no-colon", "unclosed-bracket", "no-port", "empty", "arabic-indic-bare", "no-host",
         "space-in-host", "tab-in-host", "nul-in-host"],
)
def test_address_refuses_with_a_message_naming_the_text(text: str, message: str) -> None:
    assert refusal(options.address, text) == message


@pytest.mark.parametrize(
    "address, shown",
    [
        (Address("localhost", 7), "127.0.0.1:7 and [::1]:7"),
        (Address("LocalHost.", 7), "127.0.0.1:7 and [::1]:7"),
        (Address("::1", 7), "[::1]:7"),
        (Address("2001:db8::7", 70), "[2001:db8::7]:70"),
        (Address("127.0.0.1", 7), "127.0.0.1:7"),
        (Address("example.org", 70), "example.org:70"),
    ],
)
def test_address_shows_localhost_as_its_loopback_addresses_and_ipv6_in_brackets(
    address: Address, shown: str
) -> None:
    assert str(address) == shown


def test_address_is_shown_as_typed_after_parsing() -> None:
    assert str(options.address("[::1]:80")) == "[::1]:80"
    assert str(options.address("80")) == "127.0.0.1:80 and [::1]:80"


# -- configurations ------------------------------------------------------------------------


def test_socket_name_is_a_named_poems_name_and_none_otherwise() -> None:
    assert options.socket_name(PoemSpec("x.txt", "ballad")) == "ballad"
    assert options.socket_name(PoemSpec("x.txt")) is None
    assert options.socket_name(UpstreamSpec("example.org", 70)) is None


def test_socket_names_follow_the_order_of_the_poems() -> None:
    config = ServeConfig(
        poems=[PoemSpec("a.txt", "ballad"), PoemSpec("b.txt"), PoemSpec("c.txt", "ode")]
    )
    assert config.socket_names == ["ballad", None, "ode"]


def test_the_proxys_upstream_is_served_on_every_socket() -> None:
    assert ServeConfig(poems=[UpstreamSpec("example.org", 70)]).socket_names == [None]


def test_expects_header_is_off_by_default_and_for_all_or_named_poems() -> None:
    named, unnamed = PoemSpec("a.txt", "behind"), PoemSpec("b.txt")
    assert not ServeConfig().expects_header(named)
    assert ServeConfig(proxy_protocol=True).expects_header(unnamed)
    only = ServeConfig(poems=[named, unnamed], proxy_protocol=frozenset({"behind"}))
    assert only.expects_header(named) and not only.expects_header(unnamed)


def test_header_socket_names_are_those_of_the_poems_behind_a_balancer() -> None:
    named, other, unnamed = PoemSpec("a.txt", "behind"), PoemSpec("c.txt", "direct"), PoemSpec("b.txt")
    assert ServeConfig(poems=[named, unnamed]).header_socket_names == []
    assert ServeConfig(poems=[named, unnamed], proxy_protocol=True).header_socket_names == ["behind", None]
    only_named = ServeConfig(poems=[named, other, unnamed], proxy_protocol=frozenset({"behind"}))
    assert only_named.header_socket_names == ["behind"]
    # The unnamed sockets serve the only poem, whatever its name.
    assert ServeConfig(poems=[named], proxy_protocol=frozenset({"behind"})).header_socket_names == ["behind", None]


def test_the_default_configuration_serves_the_bundled_poem_on_every_socket() -> None:
    config = ServeConfig()
    assert config.poems == [PoemSpec(DEFAULT_POEM_PATH)]
    assert config.socket_names == [None]


# -- control_path ------------------------------------------------------------------------


@pytest.mark.parametrize("given, path", [(None, None), ("", None), ("x", "x"), ("/tmp/c", "/tmp/c")])
def test_control_path_outside_a_unit(monkeypatch: pytest.MonkeyPatch, given: str | None, path: str | None) -> None:
    """Without RUNTIME_DIRECTORY there is no default: only --control names a socket."""
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    assert options.control_path(given) == path


@pytest.mark.parametrize(
    "given, path",
    [(None, f"/run/fastpoetry/{CONTROL_SOCKET_NAME}"), ("", None), ("x", "x"), ("/tmp/c", "/tmp/c")],
)
def test_control_path_in_a_unit_with_a_runtime_directory(
    monkeypatch: pytest.MonkeyPatch, given: str | None, path: str | None
) -> None:
    """The unit's runtime folder gives the default; --control replaces it, and '' turns it off."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/fastpoetry")
    assert options.control_path(given) == path


def test_control_path_takes_the_first_of_several_runtime_directories(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/fastpoetry:/run/fastpoetry-extra")
    assert options.control_path(None) == "/run/fastpoetry/control"


@pytest.mark.parametrize("value", ["", ":/run/second"])
def test_control_path_has_no_default_when_the_runtime_directory_is_empty(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", value)
    assert options.control_path(None) is None


# -- defaults ------------------------------------------------------------------------------


def test_the_default_poem_is_a_file_with_a_poem_in_it() -> None:
    path = Path(DEFAULT_POEM_PATH)
    assert path.is_file(), path
    assert os.path.isabs(DEFAULT_POEM_PATH)
    assert path.read_text(encoding="utf-8").strip()


def test_the_default_max_poem_size_text_says_the_default_max_poem_size() -> None:
    # argparse parses the text default with the option's type: both must agree.
    assert options.size(DEFAULT_MAX_POEM_SIZE_TEXT) == DEFAULT_MAX_POEM_SIZE
