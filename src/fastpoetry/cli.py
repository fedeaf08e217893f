"""The ``fastpoetry`` command line: ``serve``, ``proxy``, ``reload`` and ``get``.

Usage errors (an unknown option, a bad port) exit with status 2, runtime
errors (a poem that cannot be read, a port in use) with status 1; either way
with one line on standard error that says what is wrong.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from collections.abc import Sequence

from . import __version__

#: Exit statuses: the unit restarts the server after a crash (EXIT_CRASH, as
#: sysexits.h's EX_SOFTWARE), not when its configuration is wrong (1 and 2).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CRASH = 0, 1, 2, 70

#: Interrupted (Ctrl-C), as a shell reports a command killed by SIGINT.
EXIT_INTERRUPTED = 128 + signal.SIGINT

#: The port of the poem without a name, without socket activation.
DEFAULT_PORT = 10000

#: The proxy's port without socket activation: beside the server's.
DEFAULT_PROXY_PORT = 10001

#: The most processes ``serve --workers`` starts: far more than the cores
#: of most machines, which is where more workers stop helping.
MAX_WORKERS = 64

# systemd.socket(5): a FileDescriptorName= is at most 255 characters, with
# no colon (it separates names in LISTEN_FDNAMES) and no control characters.
_MAX_NAME_LENGTH = 255

_SERVE_EPILOG = """\
Under systemd (socket activation), fastpoetry serves on the sockets the
socket unit passes and ignores --iface and --port. A socket whose
FileDescriptorName= is NAME serves the poem given as --poem NAME=FILE; any
other socket serves the poem given without a name, or the only poem.
Without socket activation it listens on --iface itself: on --port N for
the poem without a name, and on --port NAME=N for the poem named NAME. The
default --iface, localhost, is 127.0.0.1 and ::1, never looked up.

Reload: 'fastpoetry reload' (the unit's ExecReload=, so 'systemctl reload')
re-reads every poem file, all are replaced or none, and returns once they
are served, or fails with the reason. SIGHUP does the same without telling
anyone the outcome. SIGTERM and SIGINT stop accepting and let poems in
flight finish within --shutdown-timeout.

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


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self._print_message(f"{self.prog}: error: {message} (see '{self.prog} --help')\n", sys.stderr)
        # Started by a socket with a command line that cannot work: the
        # clients that started it are turned away, or they would start it
        # again at once, and again.  Imported here: only this path needs it.
        from . import refusing

        refusing.hold(refusing.take_waiting())
        self.exit(EXIT_USAGE)


def _port(text: str) -> int:
    # int() alone would also take "8_0" and digits of other scripts.
    port = int(text) if text.isascii() and text.isdigit() else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return port


def _workers(text: str) -> int:
    number = int(text) if text.isascii() and text.isdigit() else 0
    if not 1 <= number <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers (1 to {MAX_WORKERS})")
    return number


def _named_port(text: str) -> tuple[str | None, int]:
    name, sep, port = text.rpartition("=")
    if sep and not name:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty NAME before '='")
    return (name or None), _port(port)


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


# Binary multiples, as systemd.exec(5) reads sizes such as LimitFSIZE=.
_SIZE_SUFFIXES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _size(text: str) -> int:
    digits, suffix = text, ""
    if text[-1:].upper() in _SIZE_SUFFIXES:
        digits, suffix = text[:-1], text[-1:].upper()
    if not (digits.isascii() and digits.isdigit() and int(digits) > 0):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: a positive number of bytes, optionally followed by K, M or G"
        )
    return int(digits) * _SIZE_SUFFIXES[suffix]


def _poem(text: str):  # -> PoemSpec, imported late to keep --help fast
    from .app import PoemSpec

    name, sep, path = text.partition("=")
    if not sep or "/" in name:  # a plain path, which may itself contain '='
        name, path = "", text
    elif not name:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty NAME before '='")
    if not path:
        raise argparse.ArgumentTypeError(f"{text!r} names no FILE")
    if name and (
        len(name) > _MAX_NAME_LENGTH or ":" in name or not name.isprintable()
    ):
        raise argparse.ArgumentTypeError(
            f"{name!r} cannot be a socket name (FileDescriptorName=: "
            f"up to {_MAX_NAME_LENGTH} printable characters, no ':')"
        )
    return PoemSpec(path=path, name=name or None)


def build_parser() -> argparse.ArgumentParser:
    from . import client

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
        type=_poem,
        action="append",
        help="serve the poem in FILE, on the sockets named NAME if given; "
        "repeat for several poems (default: a poem that comes with fastpoetry)",
    )
    serve.add_argument(
        "--port",
        dest="ports",
        type=_named_port,
        action="append",
        metavar="[NAME=]N",
        help="port to listen on without socket activation, for the poem named NAME "
        "if given; 0 picks a free one (default: 10000 for the poem without a name)",
    )
    serve.add_argument(
        "--workers",
        type=_workers,
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
        type=client.parse_address,
        metavar="HOST:PORT",
        help="the poetry server to fetch the poem from",
    )
    proxy.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PROXY_PORT,
        metavar="N",
        help="port to listen on without socket activation; 0 picks a free one (default: %(default)s)",
    )
    proxy.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="give up a fetch from the upstream after SECONDS (default: %(default)g)",
    )
    proxy.add_argument(
        "--refresh",
        type=_seconds,
        default=60.0,
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
        type=_seconds,
        metavar="SECONDS",
        help="give up after SECONDS (default: wait for the answer; under systemd "
        "the unit's TimeoutStartSec= ends a reload that takes too long)",
    )

    get = commands.add_parser(
        "get",
        help="fetch poems from poetry servers and print them",
        description="Fetch the poems of poetry servers, all at once, and print them\n"
        "in the order given.",
        epilog=client.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    get.set_defaults(command_parser=get)
    client.add_arguments(get)
    return parser


def _add_server_options(command: argparse.ArgumentParser) -> None:
    """The options ``serve`` and ``proxy`` share: where to listen, timeouts, logging."""
    from .logs import LEVELS, TARGETS

    # localhost is the loopback addresses themselves, never looked up (see
    # listeners.LOOPBACK_ADDRESSES): the default works also where nothing
    # resolves the name, as in a root without /etc/hosts.
    command.add_argument(
        "--iface",
        default="localhost",
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
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM, how long poems in flight may take to finish (default: %(default)g)",
    )
    command.add_argument(
        "--send-timeout",
        type=_seconds,
        default=30.0,
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
        type=_size,
        default="16M",
        metavar="SIZE",
        help="refuse a poem larger than SIZE bytes; K, M and G multiply "
        "by 1024 (default: %(default)s)",
    )
    command.add_argument(
        "--summary-interval",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="log how many poems were served every SECONDS (default: %(default)g)",
    )
    command.add_argument(
        "--log-level",
        choices=LEVELS,
        default="info",
        help="least important messages logged; 'debug' logs every client (default: %(default)s)",
    )
    command.add_argument(
        "--log-target",
        choices=TARGETS,
        default="auto",
        help="'auto' logs to the journal when running under systemd and to "
        "standard error otherwise (default: %(default)s)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before a command took over SIGINT
        return EXIT_INTERRUPTED
    except Exception:
        # A bug, or a broken installation (a module that fails to import):
        # say where, and let systemd restart the server, with its back-off.
        # Python's own exit status for it, 1, would be taken for a bad
        # configuration, which is not restarted, and under socket activation
        # each client would start the server again at once.
        logging.getLogger(__package__).critical("crashed", exc_info=True)
        return EXIT_CRASH


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args.command_parser, args)
    if args.command == "proxy":
        return _proxy(args.command_parser, args)
    if args.command == "reload":
        from . import control

        return control.main(args.control, args.timeout)
    if args.command == "get":
        from . import client

        return client.main(args.command_parser, args)
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks
    return EXIT_USAGE


def _ports(
    parser: argparse.ArgumentParser, ports: list[tuple[str | None, int]], names: list[str | None]
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
    return (unnamed[0] if unnamed else DEFAULT_PORT), named


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from . import app, logs

    # Before anything slow: a signal from now on waits for the event loop.
    app.block_signals()
    poems = args.poems or [app.PoemSpec(app.DEFAULT_POEM_PATH)]
    names = [spec.name for spec in poems if spec.name is not None]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        parser.error(f"--poem: the name {duplicates[0]!r} is given more than once")
    if len(poems) - len(names) > 1:
        parser.error("--poem: only one poem can be given without a NAME=")
    port, named_ports = _ports(parser, args.ports or [], names)
    logs.setup(args.log_level, args.log_target)
    config = app.ServeConfig(
        poems=poems,
        iface=args.iface,
        port=port,
        named_ports=named_ports,
        shutdown_timeout=args.shutdown_timeout,
        send_timeout=args.send_timeout,
        always_linger=args.linger == "always",
        max_poem_size=args.max_poem_size,
        summary_interval=args.summary_interval,
        workers=args.workers,
        control=_control(args.control),
    )
    return _run(config)


def _proxy(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from . import app, logs

    app.block_signals()
    logs.setup(args.log_level, args.log_target)
    host, port = args.upstream
    upstream = app.UpstreamSpec(host, port, timeout=args.timeout, refresh=args.refresh)
    config = app.ServeConfig(
        poems=[upstream],
        iface=args.iface,
        port=args.port,
        shutdown_timeout=args.shutdown_timeout,
        send_timeout=args.send_timeout,
        always_linger=args.linger == "always",
        max_poem_size=args.max_poem_size,
        summary_interval=args.summary_interval,
        control=_control(args.control),
    )
    return _run(config)


def _control(path: str | None) -> str | None:
    """The control socket to listen on: --control, or the unit's default; '' is none."""
    from . import control

    if path is None:
        return control.default_path()
    return path or None


def _run(config) -> int:  # config: app.ServeConfig, imported late
    from . import app

    if config.workers > 1:
        from . import workers

        return workers.run(config)
    return app.run(config)

