"""The ``fastpoetry`` command line.

Usage errors (an unknown option, a bad port) exit with status 2, runtime
errors (a poem that cannot be read, a port in use) with status 1; either way
with one line on standard error that says what is wrong.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence

from . import __version__

#: Exit statuses: the unit restarts the server after a crash (EXIT_CRASH, as
#: sysexits.h's EX_SOFTWARE), not when its configuration is wrong (1 and 2).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CRASH = 0, 1, 2, 70

# systemd.socket(5): a FileDescriptorName= is at most 255 characters, with
# no colon (it separates names in LISTEN_FDNAMES) and no control characters.
_MAX_NAME_LENGTH = 255

_SERVE_EPILOG = """\
Under systemd (socket activation), fastpoetry serves on the sockets the
socket unit passes and ignores --iface and --port. A socket whose
FileDescriptorName= is NAME serves the poem given as --poem NAME=FILE; any
other socket serves the poem given without a name, or the only poem.
Without socket activation it listens on --iface and --port itself.

Signals: SIGHUP re-reads every poem file (all are replaced, or none);
SIGTERM and SIGINT stop accepting and let poems in flight finish within
--shutdown-timeout.

Exit status: 0 after a clean shutdown, 1 when the server cannot start,
2 for a usage error, 70 if it crashed.
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _port(text: str) -> int:
    # int() alone would also take "8_0" and digits of other scripts.
    port = int(text) if text.isascii() and text.isdigit() else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return port


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
    from .logs import LEVELS, TARGETS

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
        type=_port,
        default=10000,
        metavar="N",
        help="port to listen on without socket activation; 0 picks a free one (default: %(default)s)",
    )
    serve.add_argument(
        "--iface",
        default="localhost",
        metavar="ADDR",
        help="interface (host name or address) to listen on without socket "
        "activation; '' for all (default: %(default)s)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM, how long poems in flight may take to finish (default: %(default)g)",
    )
    serve.add_argument(
        "--send-timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="drop a client that takes longer than this to receive its poem, "
        "or to close once it has it (default: %(default)g)",
    )
    serve.add_argument(
        "--max-poem-size",
        type=_size,
        default="16M",
        metavar="SIZE",
        help="refuse a poem file larger than SIZE bytes; K, M and G multiply "
        "by 1024 (default: %(default)s)",
    )
    serve.add_argument(
        "--summary-interval",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="log how many poems were served every SECONDS (default: %(default)g)",
    )
    serve.add_argument(
        "--log-level",
        choices=LEVELS,
        default="info",
        help="least important messages logged; 'debug' logs every client (default: %(default)s)",
    )
    serve.add_argument(
        "--log-target",
        choices=TARGETS,
        default="auto",
        help="'auto' logs to the journal when running under systemd and to "
        "standard error otherwise (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args.command_parser, args)
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks
    return EXIT_USAGE


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
    logs.setup(args.log_level, args.log_target)
    config = app.ServeConfig(
        poems=poems,
        iface=args.iface,
        port=args.port,
        shutdown_timeout=args.shutdown_timeout,
        send_timeout=args.send_timeout,
        max_poem_size=args.max_poem_size,
        summary_interval=args.summary_interval,
    )
    try:
        return app.run(config)
    except Exception:  # a bug: say where, and let systemd restart the server
        logging.getLogger(__package__).critical("crashed", exc_info=True)
        return EXIT_CRASH

