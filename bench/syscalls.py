"""System calls a server makes, counted by the kernel's tracepoints with ``perf stat``.

A poem costs a server a handful of system calls (accept, send, close,
and the event loop's waits); how many is the one figure of a server's
design that does not drift with the machine.  ``perf stat`` counts the
tracepoint ``raw_syscalls:sys_enter`` (every call) or
``syscalls:sys_enter_NAME`` (one call), for the processes named with
``-p``: all the threads of each, in the kernel, with nothing sampled.

perf starts with its counters off (``-D -1``) and takes ``enable`` and
``disable`` on a pipe (``--control``), answering each with ``ack`` once
done: a count covers exactly the time between the two answers, however
long perf took to start and attach.  SIGINT then makes it write the counts.

Counting is not free: while any task is traced, every task's system
calls take the kernel's slower path, and each traced call adds a
counter update to the server's own CPU time.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

#: Every system call.
ALL = "all"
_RAW = "raw_syscalls:sys_enter"

#: Not a system call: the times a thread of the tree was switched out, a
#: wake-up each (perf's software event).  Idle workers woken for nothing
#: show here, not in their system calls: a level-triggered epoll_wait that
#: finds the connection taken goes back to sleep inside the kernel.
SWITCHES = "context-switches"

#: The calls the per-call breakdown names, in its columns' order.
BREAKDOWN = (
    "accept4", "recvfrom", "sendto", "writev", "shutdown", "close",
    "getsockname", "getsockopt", "setsockopt", "epoll_wait", "epoll_ctl",
)  # fmt: skip

#: What the Workers section counts: an idle worker woken for a connection
#: another took is switched in and out for nothing, and may call accept4
#: for nothing.
WORKERS = ("accept4", "epoll_wait", SWITCHES)

#: How long perf may take to start, to answer on its pipe, or to exit.
PERF_TIMEOUT = 15.0

#: How many times perf is started when a thread ends while perf attaches
#: to it: perf 6.1 then exits with ESRCH, and it is only bad timing (trio's
#: idle worker threads end 10 s after their last job, whenever that falls).
START_ATTEMPTS = 8

#: perf's words for a thread or process that ended while it attached.
_VANISHED = "No such process"


class PerfFailed(Exception):
    """perf could not count: one line of why."""


def tracepoint(name: str) -> str:
    """perf's event for ``name``: ALL, SWITCHES, or a system call's name."""
    if name == ALL:
        return _RAW
    return name if name == SWITCHES else f"syscalls:sys_enter_{name}"


def _why(said: str, returncode: int) -> str:
    """The line of perf's complaint that says what is wrong (it adds usage text after it)."""
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    for at, line in enumerate(lines):
        if line.startswith("Error:"):
            # perf 6.1 writes "Error:" alone, and the reason on the next line.
            return line.removeprefix("Error:").strip() or " ".join(lines[at + 1 : at + 2])
    for line in lines:
        if "error" in line.lower() or "permission" in line.lower():
            return line
    return lines[0] if lines else f"perf exited {returncode}"


def probe(names: Iterable[str]) -> str:
    """Why perf cannot count these calls here, or "" if it can (tried on ``true``)."""
    perf = shutil.which("perf")
    if perf is None:
        return "perf is not installed (Debian's linux-perf; bench/run installs it when run as root)"
    argv = [perf, "stat", "-x,", *_events(names), "--", "true"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PERF_TIMEOUT, stdin=subprocess.DEVNULL,
                              check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"perf stat did not run: {exc}"
    if done.returncode:
        return f"perf stat cannot count system calls: {_why(done.stderr, done.returncode)}"
    try:
        _parse(done.stderr, names)
    except PerfFailed as exc:
        return str(exc)
    return ""


def _events(names: Iterable[str]) -> list[str]:
    return [option for name in names for option in ("-e", tracepoint(name))]


def _parse(csv: str, names: Iterable[str]) -> dict[str, int]:
    """The counts of ``perf stat -x,``'s output, by name; PerfFailed if one is missing or unsupported."""
    by_event: dict[str, str] = {}
    for line in csv.splitlines():
        fields = line.split(",")
        if line.startswith("#") or len(fields) < 3:
            continue
        by_event[fields[2]] = fields[0]
    counts = {}
    for name in names:
        value = by_event.get(tracepoint(name))
        if value is None:
            raise PerfFailed(f"perf stat gave no count for {tracepoint(name)}")
        if value == "<not counted>":  # no traced thread ran while counting
            counts[name] = 0
        elif value.isdigit():
            counts[name] = int(value)
        else:
            raise PerfFailed(f"perf stat could not count {tracepoint(name)}: {value}")
    return counts


class Count:
    """One perf stat over ``pids`` (every thread of each), its counters on only between start() and stop()."""

    def __init__(self, names: Iterable[str], pids: list[int]) -> None:
        self.names = tuple(names)
        self.pids = pids
        self._process: subprocess.Popen[bytes] | None = None
        self._control = self._acks = -1
        self._output = Path()

    def start(self) -> None:
        """Start perf, and return once its counters are on.

        A thread of ``pids`` that ends while perf attaches to it makes perf
        exit; perf is then started again, up to START_ATTEMPTS times.
        """
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start()
                return
            except PerfFailed as exc:
                self.close()
                if _VANISHED not in str(exc) or attempt == START_ATTEMPTS:
                    raise

    def _start(self) -> None:
        perf = shutil.which("perf")
        if perf is None:
            raise PerfFailed("perf is not installed")
        handle, name = tempfile.mkstemp(prefix="perf-stat-", suffix=".csv")
        os.close(handle)
        self._output = Path(name)
        control_read, self._control = os.pipe()
        self._acks, acks_write = os.pipe()
        argv = [
            perf, "stat", "-x,", "-o", name, "-D", "-1", f"--control=fd:{control_read},{acks_write}",
            *_events(self.names), "-p", ",".join(map(str, self.pids)),
        ]  # fmt: skip
        try:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=(control_read, acks_write),
            )  # fmt: skip
        finally:
            os.close(control_read)
            os.close(acks_write)  # perf's end: a perf that exits leaves the pipe at end of file
        self._command("enable")

    def stop(self) -> dict[str, int]:
        """Turn the counters off, end perf, and return its counts by name."""
        try:
            self._command("disable")
            assert self._process is not None
            self._process.send_signal(signal.SIGINT)
            try:
                _, said = self._process.communicate(timeout=PERF_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise PerfFailed(f"perf stat did not exit within {PERF_TIMEOUT:g} s of SIGINT") from None
            try:
                return _parse(self._output.read_text(), self.names)
            except PerfFailed as exc:
                raise PerfFailed(f"{exc} ({_why(said.decode(errors='replace'), self._process.returncode)})") from None
        finally:
            self.close()

    def close(self) -> None:
        """Kill perf if it still runs (a failed slice), and drop the pipes and the output file."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        for fd in (self._control, self._acks):
            if fd >= 0:
                os.close(fd)
        self._control = self._acks = -1
        if self._output.name:
            self._output.unlink(missing_ok=True)

    def _command(self, command: str) -> None:
        """Send ``command`` on perf's control pipe and wait for its ack: done, in the kernel."""
        try:
            os.write(self._control, f"{command}\n".encode())
        except BrokenPipeError:
            raise PerfFailed(f"perf stat exited before '{command}'{self._said()}") from None
        answer = b""
        while b"\n" not in answer:
            ready, _, _ = select.select([self._acks], [], [], PERF_TIMEOUT)
            if not ready:
                raise PerfFailed(f"perf stat did not answer '{command}' within {PERF_TIMEOUT:g} s")
            chunk = os.read(self._acks, 64)
            if not chunk:
                raise PerfFailed(f"perf stat exited before it answered '{command}'{self._said()}")
            answer += chunk.replace(b"\0", b"")  # perf writes "ack\n" with its C string's NUL
        if answer.strip() != b"ack":
            raise PerfFailed(f"perf stat answered '{command}' with {answer!r}")

    def _said(self) -> str:
        """What a perf that has exited said, as ": why"."""
        if self._process is None or self._process.stderr is None:
            return ""
        try:
            self._process.wait(PERF_TIMEOUT)  # its end of the pipe closes as it exits
        except subprocess.TimeoutExpired:
            return ""
        return f": {_why(self._process.stderr.read().decode(errors='replace'), self._process.returncode)}"
