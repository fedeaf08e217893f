"""The ``fastpoetry`` command line: ``serve``, ``proxy``, ``reload`` and ``get``.

It only parses: the values by :mod:`.options`, into the configuration of
the command, which it hands to the module that runs it.  Nothing imports
this module.

Usage errors (an unknown option, a bad port) exit with status 2, runtime
errors (a poem that cannot be read, a port in use) with status 1; either way
with one line on standard error that says what is wrong (:mod:`.exits`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__, exits, logs, options, refusing
from .options import ServeConfig

_SERVE_EPILOG = """\
Under systemd (socket activation), fastpoetry serves on the sockets the
socket unit passes and ignores --iface and --port. A socket whose
FileDescriptorName= is NAME serves the poem given as --poem NAME=FILE; any
other socket serves the poem given without a name, or the only poem.
Without socket activation it listens on --iface itself: on --port N for
the poem without a name, and on --port NAME=N for the poem named NAME. The
default --iface, localhost, is 127.0.0.1 and ::1, never looked up.

Reload: 'fastpoetry reload' (the unit's ExecReload=, so 'systemctl reload')
re-reads every poem file and TLS certificate and key, all are replaced or
none, and returns once they are served, or fails with the reason. SIGHUP
does the same without telling anyone the outcome. SIGTERM and SIGINT stop
accepting and let poems in flight finish within --shutdown-timeout.

Over TLS: with --tls-cert FILE and --tls-key FILE every socket (with
--tls-cert NAME=FILE and --tls-key NAME=FILE, those of the poem named NAME)
speaks TLS 1.2 or 1.3; the poem ends with a TLS close_notify. Under systemd
the key can be a credential (LoadCredential=, then --tls-key %d/tls.key):
it stays readable by root alone on disk. A reload re-reads the
certificates and keys with the poems, all or none. A client whose handshake
fails or takes longer than --tls-handshake-timeout gets no byte of the
poem, and is counted in a warning at most every 10 seconds.

Behind a load balancer that sends the PROXY protocol (HAProxy's
send-proxy or send-proxy-v2), --proxy-protocol makes every socket (or, with
--proxy-protocol NAME, those of the poem named NAME) expect the header,
version 1 or 2, before the poem; the client's address it names is the one
logged (PEER=), the balancer's goes in BALANCER=. A v2 LOCAL header (a
health check) is served. A connection whose header is malformed, too long,
or not whole within --proxy-protocol-timeout is reset without a byte of
the poem, and counted in a warning at most every 10 seconds. With TLS as
well, the header comes first, in plain text, as HAProxy sends it.

With --workers N, the process started takes the sockets and reads the
poems, then starts N worker processes that serve on the same sockets. It
passes reloads and stops on to them (signal it, the unit's main process);
each worker re-reads the poem files itself, and a reload succeeds only if
it did in every worker. If a worker dies, it stops the others and exits
with status 70.

Exit status: 0 after a clean shutdown, 1 when the server cannot start,
2 for a usage error, 70 if it crashed. Started by a socket that clients
were waiting on, a server that cannot start (1 or 2) closes them unserved,
and every client that arrives in the next 5 seconds, before it exits:
otherwise each would make systemd start it again at once.
"""


_PROXY_EPILOG = """\
The proxy fetches the upstream's poem when it starts, every --refresh
seconds, and at once on 'fastpoetry reload' (which fails if the fetch does)
or SIGHUP, and serves the poem it fetched last. When
the upstream cannot be reached it keeps serving that poem and logs a
warning; with no poem fetched yet it closes each client at once and logs
why. A fetch that times out, is cut off, or brings something that is not a
poem (empty, not UTF-8, over --max-poem-size) never replaces the cache.

Under systemd (socket activation) it serves on the sockets the socket unit
passes and ignores --iface and --port; without, it listens on them itself.
SIGTERM and SIGINT stop it as they stop 'fastpoetry serve'.

The host name localhost, as the default --iface or in --upstream, is
127.0.0.1 and ::1, never looked up.

Exit status: 0 after a clean shutdown, 1 when the proxy cannot start,
2 for a usage error, 70 if it crashed. Started by a socket that clients
were waiting on, a proxy that cannot start (1 or 2) closes them unserved,
and every client that arrives in the next 5 seconds, before it exits:
otherwise each would make systemd start it again at once.
"""


_RELOAD_EPILOG = """\
The server takes reload requests on its control socket: 'control' in the
folder systemd made for its unit (RuntimeDirectory=, passed on as
RUNTIME_DIRECTORY to ExecStart= and ExecReload= alike), or the --control it
was started with. The packaged units run 'fastpoetry reload' as their
ExecReload=, so 'systemctl reload fastpoetry' waits for the outcome and
fails, with the reason in the journal and 'systemctl status', when a poem
cannot be loaded (or, for the proxy, the upstream cannot be fetched from).
The old poems are served meanwhile and stay when the reload fails.

Exit status: 0 once the new poems are served, 1 if the reload failed or no
server answered (the reason on standard error), 2 for a usage error, 130 if
interrupted.
"""


_GET_EPILOG = """\
ADDRESS is HOST:PORT, [IPV6-ADDRESS]:PORT, or a PORT alone for this host's
loopback addresses, 127.0.0.1 and ::1. The host name localhost means the
same: both addresses are tried (the second if the first fails or is slow
to answer), and the name is never looked up.

Every server is contacted at once, and each has --timeout seconds to send
its whole poem. Poems are written to standard output exactly as received,
in the order the addresses are given, each as soon as it and every poem
before it have arrived. Between two poems a newline is added only when the
first does not end with one, so with one address the output is the poem,
byte for byte.

With --tls, every poem comes over TLS: the server's certificate must be
signed by a CA the system trusts (or one in --ca FILE) and name the host
of ADDRESS (localhost for a PORT alone), and the poem must end with a TLS
close_notify, or it is taken for cut off. --insecure checks nothing.

A server that fails (refused, not found, TLS handshake failed, reset or
cut off part-way, closed without a poem, or too slow) gets one line on
standard error, and none of its bytes are written. When standard error is
a terminal, it shows how many bytes each server has sent so far.

Exit status: 0 if every poem arrived, 1 if any did not, 2 for a usage
error, 130 if interrupted, 141 if standard output was closed early (as by
'| head'), 70 if it crashed.
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self._print_message(f"{self.prog}: error: {message} (see '{self.prog} --help')\n", sys.stderr)
        # Started by a socket with a command line that cannot work: the
        # clients that started it are turned away, or they would start it
        # again at once, and again.
        refusing.hold(refusing.take_waiting())
        self.exit(exits.USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, with its help."""
    parser = _Parser(
        prog="fastpoetry",
        description="A systemd-native fast poetry server: every client that "
        "connects receives one whole poem, then the connection is closed.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve poems (under systemd or in the foreground)",
        description="Serve poems: a client connects, receives the poem, and is disconnected.",
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.set_defaults(command_parser=serve)
    serve.add_argument(
        "--poem",
        dest="poems",
        metavar="[NAME=]FILE",
        type=options.poem,
        action="append",
        help="serve the poem in FILE, on the sockets named NAME if given; "
        "repeat for several poems (default: a poem that comes with fastpoetry)",
    )
    serve.add_argument(
        "--port",
        dest="ports",
        type=options.named_port,
        action="append",
        metavar="[NAME=]N",
        help="port to listen on without socket activation, for the poem named NAME "
        "if given; 0 picks a free one (default: 10000 for the poem without a name)",
    )
    serve.add_argument(
        "--proxy-protocol",
        dest="proxy_protocol",
        metavar="NAME",
        nargs="?",
        const="",
        action="append",
        help="expect a PROXY protocol header (v1 or v2) from each client before its poem, "
        "on every socket, or on those of the poem named NAME if given; repeat for several "
        "(default: off)",
    )
    serve.add_argument(
        "--proxy-protocol-timeout",
        dest="header_timeout",
        type=options.seconds,
        default=options.DEFAULT_HEADER_TIMEOUT,
        metavar="SECONDS",
        help="reset a client whose PROXY protocol header has not all arrived "
        "within SECONDS (default: %(default)g)",
    )
    serve.add_argument(
        "--tls-cert",
        dest="tls_certs",
        metavar="[NAME=]FILE",
        type=options.named_file,
        action="append",
        help="serve over TLS with the PEM certificate (and chain) in FILE: every socket, "
        "or those of the poem named NAME if given; needs --tls-key (default: plain TCP)",
    )
    serve.add_argument(
        "--tls-key",
        dest="tls_keys",
        metavar="[NAME=]FILE",
        type=options.named_file,
        action="append",
        help="the unencrypted PEM private key of --tls-cert with the same NAME, or without one",
    )
    serve.add_argument(
        "--tls-handshake-timeout",
        dest="handshake_timeout",
        type=options.seconds,
        default=options.DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="drop a client whose TLS handshake has not completed within SECONDS (default: %(default)g)",
    )
    serve.add_argument(
        "--workers",
        type=options.workers,
        default=1,
        metavar="N",
        help="serve from N processes that share the sockets, to use N cores; "
        "N should not exceed the cores (default: 1, this process alone)",
    )
    _add_server_options(serve)

    proxy = commands.add_parser(
        "proxy",
        help="serve the poem of another poetry server, cached",
        description="Fetch the poem of an upstream poetry server, cache it, and serve\n"
        "the cached poem: a client connects, receives the poem, and is disconnected.",
        epilog=_PROXY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    proxy.set_defaults(command_parser=proxy)
    proxy.add_argument(
        "--upstream",
        required=True,
        type=options.address,
        metavar="HOST:PORT",
        help="the poetry server to fetch the poem from",
    )
    proxy.add_argument(
        "--port",
        type=options.port,
        default=options.DEFAULT_PROXY_PORT,
        metavar="N",
        help="port to listen on without socket activation; 0 picks a free one (default: %(default)s)",
    )
    proxy.add_argument(
        "--timeout",
        type=options.seconds,
        default=options.DEFAULT_UPSTREAM_TIMEOUT,
        metavar="SECONDS",
        help="give up a fetch from the upstream after SECONDS (default: %(default)g)",
    )
    proxy.add_argument(
        "--refresh",
        type=options.seconds,
        default=options.DEFAULT_REFRESH,
        metavar="SECONDS",
        help="fetch the poem again every SECONDS; SIGHUP fetches it at once (default: %(default)g)",
    )
    _add_server_options(proxy)

    reload = commands.add_parser(
        "reload",
        help="have a running server re-read its poems, and wait for the outcome",
        description="Ask a running fastpoetry server (or proxy) to reload its poems, and\n"
        "wait until the new poems are served or the reload has failed.",
        epilog=_RELOAD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reload.set_defaults(command_parser=reload)
    reload.add_argument(
        "--control",
        metavar="PATH",
        help="the server's control socket (default: control in $RUNTIME_DIRECTORY, "
        "as under the server's unit)",
    )
    reload.add_argument(
        "--timeout",
        type=options.seconds,
        metavar="SECONDS",
        help="give up after SECONDS (default: wait for the answer; under systemd "
        "the unit's TimeoutStartSec= ends a reload that takes too long)",
    )

    get = commands.add_parser(
        "get",
        help="fetch poems from poetry servers and print them",
        description="Fetch the poems of poetry servers, all at once, and print them\n"
        "in the order given.",
        epilog=_GET_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    get.set_defaults(command_parser=get)
    get.add_argument(
        "--timeout",
        type=options.seconds,
        default=options.DEFAULT_GET_TIMEOUT,
        metavar="SECONDS",
        help="give each server at most SECONDS to send its whole poem, "
        "from connecting to the end (default: %(default)g)",
    )
    get.add_argument(
        "--max-poem-size",
        type=options.size,
        default=options.DEFAULT_MAX_POEM_SIZE_TEXT,
        metavar="SIZE",
        help="give up on a server that sends more than SIZE bytes; K, M and G "
        "multiply by 1024 (default: %(default)s)",
    )
    get.add_argument(
        "--tls",
        action="store_true",
        help="fetch over TLS, checking the server's certificate against the system's "
        "CA certificates (or --ca) and its name against the ADDRESS's host",
    )
    get.add_argument(
        "--ca",
        metavar="FILE",
        help="check server certificates against the PEM CA certificates in FILE "
        "instead of the system's; implies --tls",
    )
    get.add_argument(
        "--insecure",
        action="store_true",
        help="check no certificate and no name: anyone in between can read and change "
        "the poem; implies --tls",
    )
    get.add_argument(
        "addresses",
        type=options.address,
        nargs="+",
        metavar="ADDRESS",
        help="a poetry server: HOST:PORT, [IPV6-ADDRESS]:PORT, or PORT on 127.0.0.1 and ::1",
    )
    return parser


def _add_server_options(command: argparse.ArgumentParser) -> None:
    """The options ``serve`` and ``proxy`` share: where to listen, timeouts, logging."""
    command.add_argument(
        "--iface",
        default=options.DEFAULT_IFACE,
        metavar="ADDR",
        help="interface (address or host name) to listen on without socket "
        "activation; '' for all, localhost for 127.0.0.1 and ::1 without a "
        "name lookup (default: %(default)s)",
    )
    command.add_argument(
        "--control",
        metavar="PATH",
        help="take reload requests ('fastpoetry reload') on the AF_UNIX socket PATH, "
        "'' for none (default: control in $RUNTIME_DIRECTORY, the folder the unit's "
        "RuntimeDirectory= makes; none outside such a unit)",
    )
    command.add_argument(
        "--shutdown-timeout",
        type=options.seconds,
        default=options.DEFAULT_SHUTDOWN_TIMEOUT,
        metavar="SECONDS",
        help="on SIGTERM, how long poems in flight may take to finish (default: %(default)g)",
    )
    command.add_argument(
        "--send-timeout",
        type=options.seconds,
        default=options.DEFAULT_SEND_TIMEOUT,
        metavar="SECONDS",
        help="drop a client that takes longer than this to receive its poem, "
        "or to close once it has it (default: %(default)g)",
    )
    command.add_argument(
        "--linger",
        choices=("auto", "always"),
        default="auto",
        help="when to close a client that has its poem: 'auto' as soon as it "
        "has acknowledged every byte, if it has sent nothing, else when it closes; "
        "'always' when it closes (default: %(default)s)",
    )
    command.add_argument(
        "--max-poem-size",
        type=options.size,
        default=options.DEFAULT_MAX_POEM_SIZE_TEXT,
        metavar="SIZE",
        help="refuse a poem larger than SIZE bytes; K, M and G multiply "
        "by 1024 (default: %(default)s)",
    )
    command.add_argument(
        "--summary-interval",
        type=options.seconds,
        default=options.DEFAULT_SUMMARY_INTERVAL,
        metavar="SECONDS",
        help="log how many poems were served every SECONDS (default: %(default)g)",
    )
    command.add_argument(
        "--log-level",
        choices=logs.LEVELS,
        default="info",
        help="least important messages logged; 'debug' logs every client (default: %(default)s)",
    )
    command.add_argument(
        "--log-target",
        choices=logs.TARGETS,
        default="auto",
        help="'auto' logs to the journal when running under systemd and to "
        "standard error otherwise (default: %(default)s)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before a command took over SIGINT
        return exits.INTERRUPTED
    except Exception:
        # A bug, or a broken installation (a module that fails to import):
        # say where, and let systemd restart the server, with its back-off.
        # Python's own exit status for it, 1, would be taken for a bad
        # configuration, which is not restarted, and under socket activation
        # each client would start the server again at once.
        logging.getLogger(__package__).critical("crashed", exc_info=True)
        return exits.CRASH


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    parser: argparse.ArgumentParser = args.command_parser
    if args.command == "reload":
        return _reload(args.control, args.timeout)
    if args.command == "get":
        if args.ca is not None and args.insecure:
            parser.error("--ca and --insecure: a certificate is either checked or not")
        return _get(parser.prog, args)
    # argparse allows no other command
    config = _serve_config(parser, args) if args.command == "serve" else _proxy_config(args)
    logs.setup(args.log_level, args.log_target)
    return _run_server(config)


def _serve_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServeConfig:
    """``serve``'s configuration; a usage error for poem names and ports that do not fit together."""
    poems = args.poems or [options.PoemSpec(options.DEFAULT_POEM_PATH)]
    names = [spec.name for spec in poems if spec.name is not None]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        parser.error(f"--poem: the name {duplicates[0]!r} is given more than once")
    if len(poems) - len(names) > 1:
        parser.error("--poem: only one poem can be given without a NAME=")
    port, named_ports = _ports(parser, args.ports or [], names)
    return ServeConfig(
        poems=poems,
        port=port,
        named_ports=named_ports,
        workers=args.workers,
        proxy_protocol=_proxied(parser, args.proxy_protocol or [], names),
        header_timeout=args.header_timeout,
        tls=_tls(parser, args.tls_certs or [], args.tls_keys or [], names),
        handshake_timeout=args.handshake_timeout,
        **_server_options(args),
    )


def _tls(
    parser: argparse.ArgumentParser,
    certs: list[tuple[str | None, str]],
    keys: list[tuple[str | None, str]],
    names: list[str],
) -> dict[str | None, options.TlsPair]:
    """The --tls-cert and --tls-key pairs, by poem name; a usage error for one without the other."""
    found: dict[str, dict[str | None, str]] = {"--tls-cert": {}, "--tls-key": {}}
    for option, given in (("--tls-cert", certs), ("--tls-key", keys)):
        for name, path in given:
            if name in found[option]:
                parser.error(f"{option}: {_which(name)} is given more than once")
            if name is not None and name not in names:
                parser.error(f"{option} {name}={path}: no --poem is named {name!r}")
            found[option][name] = path
    certs_by_name, keys_by_name = found["--tls-cert"], found["--tls-key"]
    for name in certs_by_name.keys() ^ keys_by_name.keys():
        missing = "--tls-key" if name in certs_by_name else "--tls-cert"
        parser.error(f"{missing}: none is given for {_which(name)}")
    return {name: options.TlsPair(cert, keys_by_name[name]) for name, cert in certs_by_name.items()}


def _which(name: str | None) -> str:
    return "the one without a NAME=" if name is None else f"the name {name!r}"


def _proxied(parser: argparse.ArgumentParser, given: list[str], names: list[str]) -> bool | frozenset[str]:
    """Which poems' sockets expect a PROXY protocol header: all (True), none (False), or these."""
    if "" in given:
        return True
    for name in given:
        if name not in names:
            parser.error(f"--proxy-protocol {name}: no --poem is named {name!r}")
    return frozenset(given) or False


def _proxy_config(args: argparse.Namespace) -> ServeConfig:
    """``proxy``'s configuration: one poem, the upstream's."""
    host, port = args.upstream
    upstream = options.UpstreamSpec(host, port, timeout=args.timeout, refresh=args.refresh)
    return ServeConfig(poems=[upstream], port=args.port, **_server_options(args))


def _server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration of the options ``serve`` and ``proxy`` share (:func:`_add_server_options`)."""
    return {
        "iface": args.iface,
        "shutdown_timeout": args.shutdown_timeout,
        "send_timeout": args.send_timeout,
        "always_linger": args.linger == "always",
        "max_poem_size": args.max_poem_size,
        "summary_interval": args.summary_interval,
        "control": options.control_path(args.control),
    }


def _ports(
    parser: argparse.ArgumentParser, ports: list[tuple[str | None, int]], names: list[str]
) -> tuple[int, dict[str, int]]:
    """The unnamed --port (10000 if not given) and the named ones, checked."""
    unnamed = [port for name, port in ports if name is None]
    if len(unnamed) > 1:
        parser.error("--port: only one port can be given without a NAME=")
    named: dict[str, int] = {}
    for name, port in ports:
        if name is None:
            continue
        if name in named:
            parser.error(f"--port: the name {name!r} is given more than once")
        if name not in names:
            parser.error(f"--port {name}={port}: no --poem is named {name!r}")
        named[name] = port
    return (unnamed[0] if unnamed else options.DEFAULT_PORT), named


# The three imports below are made here, not at the top, for start-up time
# only: the commands need trio, and 'fastpoetry --help', a usage error and
# 'fastpoetry reload --help' do not.  Measured on 2026-12-07 (2-vCPU EPYC
# VM, Debian 12's python3 and python3-trio 0.22, median of 15): --help in
# 0.06 s, 0.14 s with the serving modules imported as well.


def _run_server(config: ServeConfig) -> int:
    """Serve (``serve`` or ``proxy``), in this process or with workers."""
    from . import app, supervisor  # start-up time: see above

    if config.workers > 1:
        return supervisor.run(config)
    return app.run(config)


def _reload(path: str | None, timeout: float | None) -> int:
    from . import control  # start-up time: see above

    return control.main(path, timeout)


def _get(prog: str, args: argparse.Namespace) -> int:
    from . import client  # start-up time: see above

    return client.main(
        prog,
        args.addresses,
        args.timeout,
        args.max_poem_size,
        tls=args.tls or args.ca is not None or args.insecure,
        ca=args.ca,
        verify=not args.insecure,
    )
