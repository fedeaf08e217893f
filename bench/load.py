"""Running the load generator (loadgen.c) and reading its one line of results."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


class LoadgenError(Exception):
    """The load generator could not run (not a failed connection: those are counted)."""


@dataclass
class Histogram:
    """The load generator's latency histogram: poems by bucket, each bucket named by its middle (ns).

    Every run uses the same buckets, so the histograms of several runs add
    up bucket by bucket, and a percentile of the sum is what one run of all
    their poems would have reported.
    """

    counts: Counter[float] = field(default_factory=Counter)

    @classmethod
    def read(cls, path: Path) -> Histogram:
        counts: Counter[float] = Counter()
        for line in path.read_text().splitlines():
            value, count = line.split()
            counts[float(value)] += int(count)
        return cls(counts)

    @classmethod
    def total(cls, histograms: Iterable[Histogram]) -> Histogram:
        summed: Counter[float] = Counter()
        for histogram in histograms:
            summed.update(histogram.counts)
        return cls(summed)

    def poems(self) -> int:
        return sum(self.counts.values())

    def percentile_us(self, fraction: float) -> float:
        """The bucket holding the poem of that rank, by loadgen.c's own rule (percentile_us)."""
        count = self.poems()
        if not count:
            return 0.0
        rank = max(1, int(fraction * count + 0.999999))
        seen = 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            if seen >= rank:
                return value / 1000.0
        return max(self.counts) / 1000.0


@dataclass
class LoadRun:
    """The numbers of one run, by the load generator's names, and what it said besides."""

    values: dict[str, float]
    messages: list[str]  # the first failures, described
    histogram: Histogram = field(default_factory=Histogram)  # steady runs only

    def __getitem__(self, key: str) -> float:
        return self.values[key]

    def failure_reasons(self) -> dict[str, int]:
        """The failures by reason, leaving out reasons that did not happen."""
        names = ("short", "long", "reset", "refused", "ports", "timeout", "error", "handshake", "ragged")
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
    proxy_header: bool = False,
    tls: bool = False,
) -> LoadRun:
    """A closed-loop run: ``poems`` connections, or as many as fit in ``seconds``.

    ``proxy_header``: each connection sends a PROXY protocol v2 header
    before it reads (-P), as a load balancer's does.  ``tls``: each makes
    a full TLS 1.3 handshake and reads to the close_notify (-T).
    """
    assert (poems is None) != (seconds is None)
    limit = ["-n", str(poems)] if poems is not None else ["-d", f"{seconds:g}"]
    options = ["-p", str(port), "-b", str(size), "-c", str(concurrency), "-t", f"{timeout:g}", *limit]
    if proxy_header:
        options.append("-P")
    if tls:
        options.append("-T")
    # A hang guard, not a speed limit: a run that is ten times slower than
    # a slow server would manage still finishes.
    expected = seconds if seconds is not None else (poems or 0) / 1000.0
    # The histogram goes to a file of its own (-H): the standard output
    # stays the one line every run prints.
    handle, name = tempfile.mkstemp(prefix="loadgen-histogram-")
    os.close(handle)
    histogram = Path(name)
    try:
        run = _run(binary, core, [*options, "-H", str(histogram)], timeout=60.0 + 10.0 * expected + timeout)
        run.histogram = Histogram.read(histogram)
    finally:
        histogram.unlink(missing_ok=True)
    if run.histogram.poems() != int(run["poems"]):
        raise LoadgenError(f"the histogram holds {run.histogram.poems()} poems, the run {int(run['poems'])}")
    return run


def first_byte(binary: Path, core: str, port: int, size: int, timeout: float = 30.0) -> LoadRun:
    """One timed connection: connect, first byte, end of stream (µs from the start)."""
    options = ["-1", "-p", str(port), "-b", str(size), "-t", f"{timeout:g}"]
    return _run(binary, core, options, timeout=timeout + 30.0)

