"""Running the load generator (loadgen.c) and reading its one line of results."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


class LoadgenError(Exception):
    """The load generator could not run (not a failed connection: those are counted)."""


@dataclass
class LoadRun:
    """The numbers of one run, by the load generator's names, and what it said besides."""

    values: dict[str, float]
    messages: list[str]  # the first failures, described

    def __getitem__(self, key: str) -> float:
        return self.values[key]

    def failure_reasons(self) -> dict[str, int]:
        """The failures by reason, leaving out reasons that did not happen."""
        names = ("short", "long", "reset", "refused", "ports", "timeout", "error")
        return {name: int(self.values[name]) for name in names if self.values.get(name)}


def _parse(output: str) -> dict[str, float]:
    line = output.strip().splitlines()[-1] if output.strip() else ""
    try:
        return {key: float(value) for key, value in (pair.split("=", 1) for pair in line.split())}
    except ValueError:
        raise LoadgenError(f"unexpected output from the load generator: {line!r}") from None


def _run(binary: Path, core: str, options: list[str], timeout: float) -> LoadRun:
    argv = ["taskset", "--cpu-list", core, str(binary), *options]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired:
        raise LoadgenError(f"the load generator did not finish within {timeout:g} s: {' '.join(argv)}") from None
    # 0: all went well; 1: some connections failed, which the results count.
    if done.returncode not in (0, 1):
        said = done.stderr.strip().splitlines()
        raise LoadgenError(f"the load generator exited {done.returncode}: {said[-1] if said else ''}")
    return LoadRun(_parse(done.stdout), done.stderr.strip().splitlines())


def steady(
    binary: Path,
    core: str,
    port: int,
    size: int,
    concurrency: int,
    *,
    poems: int | None = None,
    seconds: float | None = None,
    timeout: float = 30.0,
) -> LoadRun:
    """A closed-loop run: ``poems`` connections, or as many as fit in ``seconds``."""
    assert (poems is None) != (seconds is None)
    limit = ["-n", str(poems)] if poems is not None else ["-d", f"{seconds:g}"]
    options = ["-p", str(port), "-b", str(size), "-c", str(concurrency), "-t", f"{timeout:g}", *limit]
    # A hang guard, not a speed limit: a run that is ten times slower than
    # a slow server would manage still finishes.
    expected = seconds if seconds is not None else (poems or 0) / 1000.0
    return _run(binary, core, options, timeout=60.0 + 10.0 * expected + timeout)


def first_byte(binary: Path, core: str, port: int, size: int, timeout: float = 30.0) -> LoadRun:
    """One timed connection: connect, first byte, end of stream (µs from the start)."""
    options = ["-1", "-p", str(port), "-b", str(size), "-t", f"{timeout:g}"]
    return _run(binary, core, options, timeout=timeout + 30.0)

