"""The exit statuses of every ``fastpoetry`` command, in one place.

The unit restarts the server after a crash (:data:`CRASH`), not when its
configuration is wrong (:data:`FAILURE` and :data:`USAGE`): a restart would
fail the same way.
"""

import signal

#: Success: a clean shutdown, every poem fetched, a reload done.
OK = 0

#: The server cannot start, a fetch or a reload failed.
FAILURE = 1

#: The command line is wrong, as argparse reports it.
USAGE = 2

#: A bug, or a broken installation: sysexits.h's EX_SOFTWARE.
CRASH = 70

#: Interrupted (Ctrl-C), as a shell reports a command killed by SIGINT.
INTERRUPTED = 128 + signal.SIGINT

#: Standard output closed early (``| head``), as a shell reports SIGPIPE.
BROKEN_PIPE = 128 + signal.SIGPIPE
