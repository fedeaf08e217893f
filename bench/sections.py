"""The benchmark's sections, each measuring servers and adding to the run's results.

The 3 KB poem at every concurrency, the 1 MiB poem, the 3 KB poem over
TLS, cold starts under socket activation, fastpoetry's logging cost and
its workers.  A server that fails gets one line on standard error and a
note in the results, and the others go on.

The machine is a virtual one on a shared host, whose speed drifts over
minutes with what its neighbours do, mostly in ways /proc does not show.
So the servers of a section are not measured one after the other: they
are all started at once (pinned to the same core; an idle server costs
nothing), and at each concurrency they take turns in rounds, each getting
a slice of its load per round, in an order rotated by one every round.
A slow minute then falls on every server alike, and each server is first,
in the middle and last of a round equally often.  A server's cell is the
sum of its slices (measure.merge).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import load
import measure
import servers
import syscalls
from measure import Cores, Load, Slice
from plan import Plan, describe_rounds, split
from poem_files import SMALL_POEM
from report import TARGET_CONCURRENCY
from results import Cell, ColdStart, Run, SyscallCount
from servers import NGINX, Contender, Launch, Paths, Server, ServerFailed, twistd_log


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label).strip("-")


def rotated(labels: list[str], turn: int) -> list[str]:
    """``labels`` in the order of round ``turn`` (0, 1, ...): each round starts one further on."""
    if not labels:
        return []
    shift = turn % len(labels)
    return labels[shift:] + labels[:shift]


@dataclass(frozen=True)
class Entry:
    """A server of a section: the label its cells get, how to start it on a port, its log."""

    label: str
    launch: Callable[[int], Launch]  # the port -> how to start it there
    log: Path
    #: Its name in messages, if not the label ("fastpoetry --workers 2").
    title: str = ""

    @property
    def name(self) -> str:
        return self.title or self.label


@dataclass
class Outcome:
    """What a section measured: cells in the order of its loads and entries, who failed and why, how many rounds."""

    cells: list[Cell] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rounds: dict[int, int] = field(default_factory=dict)  # by concurrency


class Sections:
    """One run's sections: the paths, the plan, the cores, and the results so far."""

    def __init__(self, paths: Paths, plan: Plan, cores: Cores, loadgen: Path, run: Run) -> None:
        self.paths = paths
        self.plan = plan
        self.cores = cores
        self.loadgen = loadgen
        self.run = run

    @contextmanager
    def serving(self, label: str, launch: Launch, port: int, log: Path, cores: str | None = None) -> Iterator[Server]:
        """A started server, listening; stopped on the way out, whatever happens."""
        server = Server(label, launch, port, log, cores or self.cores.server)
        try:
            server.start()
            server.wait_listening()
            yield server
        finally:
            server.stop()

    def _log_path(self, label: str, what: str) -> Path:
        return self.paths.logs / f"{_slug(label)}-{what}.log"

    # ---- servers taking turns

    def _section(
        self, entries: list[Entry], poem: bytes, loads: list[tuple[int, Load]], cores: Cores | None = None,
        settle: float = 0.0, count: tuple[str, ...] = (),
        after: Callable[[dict[str, Server], int], None] | None = None,
    ) -> Outcome:  # fmt: skip
        """Start every server at once, then measure each (concurrency, load) in rounds.

        ``settle``: seconds to wait once all have started (every worker up,
        not only the first).  ``count``: the system calls to count after
        each slice, in a counting slice of its own (see _count).
        ``after``: called with the servers still running and the
        concurrency, once that concurrency's rounds are done.  A server
        that fails to start or fails on the way is stopped and left out
        from then on; the others go on.
        """
        cores = cores or self.cores
        outcome = Outcome()
        with ExitStack() as running:
            started: dict[str, Server] = {}
            for entry in entries:
                try:
                    started[entry.label] = self._start(running, entry, poem, cores.server)
                except ServerFailed as exc:
                    outcome.failed[entry.label] = str(exc)
                    progress(f"ERROR: {exc} (going on with the others)")
            time.sleep(settle)
            for concurrency, amount in loads:
                if not started:
                    break
                cells, failed = self._take_turns(started, concurrency, len(poem), amount, cores, count)
                outcome.cells += cells
                outcome.rounds[concurrency] = self.plan.rounds(len(started))
                outcome.failed.update(failed)
                for label in failed:
                    del started[label]
                if after is not None and started:
                    after(started, concurrency)
        return outcome

    def _start(self, running: ExitStack, entry: Entry, poem: bytes, cores: str) -> Server:
        """Start ``entry``'s server (stopped when ``running`` closes) and check that it serves ``poem``."""
        progress(f"[{entry.name}] starting")
        # A port found free now, with the section's other servers already
        # listening on theirs: two servers cannot be given the same one.
        port = servers.free_port()
        server = running.enter_context(self.serving(entry.name, entry.launch(port), port, entry.log, cores))
        try:
            server.check_poem(poem)
        except ServerFailed:
            server.stop()
            raise
        return server

    def _take_turns(
        self, started: dict[str, Server], concurrency: int, poem_bytes: int, amount: Load, cores: Cores,
        count: tuple[str, ...] = (),
    ) -> tuple[list[Cell], dict[str, str]]:  # fmt: skip
        """Each server's cell at ``concurrency``: ``amount`` each, in rounds, the order rotated every round.

        A server's warm-up comes once, just before its first slice; its
        system calls, if ``count`` names some, in a counting slice right
        after each of its slices.
        """
        labels = list(started)
        rounds = self.plan.rounds(len(labels))
        slices = split(amount, rounds)
        taken: dict[str, list[Slice]] = {label: [] for label in labels}
        warm_failures: dict[str, dict[str, int]] = {}
        failed: dict[str, str] = {}
        for turn in range(rounds):
            for position, label in enumerate(rotated(labels, turn), 1):
                if label in failed:
                    continue
                server = started[label]
                try:
                    if label not in warm_failures:
                        warm_failures[label] = measure.warm_up(
                            server, self.loadgen, cores, concurrency=concurrency, poem_bytes=poem_bytes, amount=amount
                        )  # fmt: skip
                    piece = self._slice(server, label, concurrency, poem_bytes, slices[turn], cores)
                    if count and not self.run.perf_unavailable:
                        piece = measure.with_count(piece, self._count(server, label, concurrency, poem_bytes,
                                                                      self.plan.count, cores, count))  # fmt: skip
                except (ServerFailed, load.LoadgenError) as exc:
                    failed[label] = str(exc)
                    progress(f"ERROR: {exc} (going on with the others)")
                    server.stop()
                    continue
                piece.round, piece.position = turn + 1, position
                taken[label].append(piece)
                self._report(piece.cell, f"round {turn + 1} of {rounds} ({_ordinal(position)})")
        cells = [measure.merge(taken[label], warm_failures[label]) for label in labels if label not in failed]
        for cell in cells:
            self._report(cell, f"all {rounds} rounds" if rounds > 1 else "")
        return cells, failed

    def _slice(self, server: Server, label: str, concurrency: int, poem_bytes: int, amount: Load, cores: Cores) -> Slice:
        """Measure one slice; again, if other work shared its cores, keeping the quietest attempt."""
        attempts: list[Slice] = []
        while True:
            piece = measure.measured(
                server, self.loadgen, cores,
                label=label, concurrency=concurrency, poem_bytes=poem_bytes, amount=amount,
            )  # fmt: skip
            attempts.append(piece)
            others = piece.cell.others_pct
            if others <= self.plan.quiet_pct or len(attempts) > self.plan.retries:
                break
            progress(f"[{label}] other work took {others:.0f}% of the cores: measuring this slice again")
        if not server.alive():
            raise ServerFailed(f"{server.label}: died during a slice with {concurrency} clients")
        return measure.quietest(attempts)

    def _count(
        self, server: Server, label: str, concurrency: int, poem_bytes: int, amount: Load, cores: Cores,
        names: tuple[str, ...],
    ) -> SyscallCount:  # fmt: skip
        """``names``' system calls in a counting slice of ``amount``; a perf that fails says so on standard error."""
        count = measure.counted(
            server, self.loadgen, cores,
            label=label, concurrency=concurrency, poem_bytes=poem_bytes, amount=amount, names=names,
        )  # fmt: skip
        if count.error:
            progress(f"[{label}] {concurrency} clients: system calls not counted: {count.error}")
        if not server.alive():
            raise ServerFailed(f"{server.label}: died while its system calls were counted with {concurrency} clients")
        return count

    def _report(self, cell: Cell, when: str) -> None:
        label, concurrency = cell.server, cell.concurrency
        failed = f"{cell.failures} FAILED {cell.failure_reasons}" if cell.failures else "0 failed"
        progress(
            f"[{label}] {concurrency} clients: {f'{when}, ' if when else ''}{cell.poems:,} poems in "
            f"{cell.seconds:.1f} s = {cell.poems_per_s:,.0f}/s ({cell.mb_per_s:,.0f} MB/s), "
            f"p50 {cell.p50_us / 1000:.3f} ms, p99 {cell.p99_us / 1000:.3f} ms, {failed}; server CPU "
            f"{cell.cpu_us_per_poem:.1f} µs/poem, cores busy {cell.server_core_busy_pct:.0f}% (server) "
            f"{cell.loadgen_core_busy_pct:.0f}% (loadgen), others {cell.others_pct:.0f}%, "
            f"steal {cell.steal_pct:.1f}%, RSS {cell.rss_kib / 1024:.1f} MiB{_calls(cell)}"
        )

    def _entries(self, contenders: list[Contender], poem: Path, what: str) -> list[Entry]:
        entries = []
        for contender in contenders:
            log = self._log_path(contender.label, what)

            def launch(port: int, contender: Contender = contender, log: Path = log) -> Launch:
                return contender.launch(self.paths, poem, port, log)

            entries.append(Entry(contender.label, launch, log))
        return entries

    # ---- the 3 KB poem at every concurrency

    def small_poem(self, contenders: list[Contender]) -> None:
        loads = [
            (c, self.plan.target if c == TARGET_CONCURRENCY else self.plan.other) for c in self.plan.concurrencies
        ]  # fmt: skip
        outcome = self._section(
            self._entries(contenders, SMALL_POEM, "small"), SMALL_POEM.read_bytes(), loads,
            count=(syscalls.ALL,), after=self._breakdown,
        )  # fmt: skip
        self.run.cells += outcome.cells
        for contender in contenders:
            self.run.servers[contender.label] = outcome.failed.get(contender.label, "ok")

    def _breakdown(self, started: dict[str, Server], concurrency: int) -> None:
        """After the rounds at TARGET_CONCURRENCY: each server's system calls call by call, in one slice each.

        Once, not in every round: the rounds' counting slices give the
        total, round by round; this shows which calls make it up.
        """
        if concurrency != TARGET_CONCURRENCY or self.run.perf_unavailable:
            return
        names = (syscalls.ALL, *syscalls.BREAKDOWN)
        for label, server in started.items():
            try:
                count = self._count(server, label, concurrency, len(SMALL_POEM.read_bytes()), self.plan.breakdown,
                                    self.cores, names)  # fmt: skip
            except (ServerFailed, load.LoadgenError) as exc:
                progress(f"ERROR: system calls by call: {exc}")
                count = SyscallCount(label, concurrency, 0, 0, {}, error=str(exc))
            self.run.breakdown.append(count)
            per_poem = count.per_poem(syscalls.ALL)
            if per_poem is not None:
                progress(f"[{label}] {concurrency} clients: system calls by call over {count.poems:,} poems: "
                         + ", ".join(f"{name} {count.per_poem(name):.2f}" for name in names) + " a poem")  # fmt: skip

    # ---- the 1 MiB poem

    def big_poem(self, contenders: list[Contender], poem_path: Path) -> None:
        loads = [(self.plan.big_concurrency, self.plan.big)]
        outcome = self._section(self._entries(contenders, poem_path, "big"), poem_path.read_bytes(), loads)
        self.run.big_poem += outcome.cells
        for label, why in outcome.failed.items():
            progress(f"ERROR: 1 MiB poem: {label}: {why}")

    # ---- the 3 KB poem over TLS

    def tls(self, contenders: list[Contender]) -> None:
        """fastpoetry over TLS and nginx's stream ssl, taking turns, a full handshake every poem.

        A section of its own: the handshake makes a poem cost more than
        ten times what a plain poem costs, on both sides, and the rows it
        is fair to compare are these two.
        """
        loads = [
            (c, self.plan.tls_target if c == TARGET_CONCURRENCY else self.plan.tls_other)
            for c in self.plan.concurrencies
        ]  # fmt: skip

        def negotiated(started: dict[str, Server], concurrency: int) -> None:
            for label, server in started.items():
                self.run.tls_negotiated.setdefault(label, server.negotiated)

        outcome = self._section(
            self._entries(contenders, SMALL_POEM, "tls"), SMALL_POEM.read_bytes(), loads,
            count=(syscalls.ALL,), after=negotiated,
        )  # fmt: skip
        self.run.tls += outcome.cells
        for contender in contenders:
            self.run.tls_servers[contender.label] = outcome.failed.get(contender.label, "ok")
        for label, why in outcome.failed.items():
            progress(f"ERROR: over TLS: {label}: {why}")

    # ---- cold start under socket activation

    def cold_start(self, label: str, launch: Callable[[int, Path], Launch]) -> ColdStart:
        cold = ColdStart(label)
        poem = SMALL_POEM.read_bytes()
        log = self._log_path(label, "cold")
        for _ in range(self.plan.cold_repeats):
            port = servers.free_port()
            try:
                with self.serving(label, launch(port, log), port, log) as server:
                    timed = load.first_byte(self.loadgen, self.cores.loadgen, server.port, len(poem))
            except (ServerFailed, load.LoadgenError) as exc:
                progress(f"ERROR: cold start: {exc}")
                cold.failures += 1
                continue
            if timed["ok"]:
                cold.first_byte_ms.append(timed["first_byte_us"] / 1000)
                cold.eof_ms.append(timed["eof_us"] / 1000)
            else:
                cold.failures += 1
                progress(f"ERROR: cold start of {label}: {' '.join(timed.messages)}")
        median = f"{cold.median_ms:.1f} ms" if cold.median_ms is not None else "-"
        progress(f"[{label}] cold start: median {median} to the first byte over "
                 f"{len(cold.first_byte_ms)} starts, {cold.failures} failed")  # fmt: skip
        return cold

    def cold_starts(self, keys: list[str]) -> None:
        small = SMALL_POEM
        if "activated" in keys or "fastpoetry" in keys:
            self.run.cold_start.append(self.cold_start(
                "fastpoetry (activated)",
                lambda port, log: servers.fastpoetry(self.paths, small, port, activated=True),
            ))  # fmt: skip
        if "twisted" in keys:
            self.run.cold_start.append(self.cold_start(
                "twisted (activated)",
                lambda port, log: servers.twisted(self.paths, small, port, activated=True, log_file=twistd_log(log)),
            ))  # fmt: skip
        if NGINX in keys:
            self.run.cold_start.append(ColdStart(
                NGINX,
                note="not measured: nginx cannot be socket-activated (it binds its own sockets at start and "
                "does not take sockets passed with LISTEN_FDS).",
            ))  # fmt: skip

    # ---- fastpoetry's logging cost

    def _fastpoetry_on(self, options: tuple[str, ...]) -> Callable[[int], Launch]:
        """fastpoetry in the foreground with ``options``, serving the 3 KB poem, on the port given."""
        return lambda port: servers.fastpoetry(self.paths, SMALL_POEM, port, options=options)

    def logging_cost(self) -> None:
        """fastpoetry at three log levels, three servers side by side, taking turns under load."""
        levels = (("warning", "warning"), ("info", "info (default)"), ("debug", "debug (a line per client)"))
        entries = []
        for level, label in levels:
            options = ("--log-level", level) if level != "info" else ()
            log = self._log_path("fastpoetry", f"log-{level}")
            entries.append(Entry(label, self._fastpoetry_on(options), log, title=f"fastpoetry {label}"))
        outcome = self._section(entries, SMALL_POEM.read_bytes(), [(TARGET_CONCURRENCY, self.plan.logging)])
        self.run.logging = outcome.cells
        rounds = outcome.rounds.get(TARGET_CONCURRENCY, 0)
        self.run.logging_note = (
            f"fastpoetry in the foreground, logging to a file; {TARGET_CONCURRENCY} clients; each level "
            f"{describe_rounds(self.plan.logging, rounds)}, the three taking turns."
        )
        if outcome.failed:
            self.run.logging_note += " Not measured: " + "; ".join(outcome.failed.values())

    # ---- fastpoetry serve --workers N

    def workers(self) -> None:
        help_text = _serve_help(self.paths)
        if "--workers" not in help_text:
            self.run.workers_note = "skipped: 'fastpoetry serve --help' has no --workers option in this tree."
            progress(f"workers: {self.run.workers_note}")
            return
        both = ",".join(str(c) for c in sorted({*self.cores.server_list(), *self.cores.loadgen_list()}))
        shared = Cores(server=both, loadgen=self.cores.loadgen)
        entries = []
        for count in (1, 2):
            log = self._log_path("fastpoetry", f"workers-{count}")
            label = f"--workers {count}"
            entries.append(Entry(label, self._fastpoetry_on(("--workers", str(count))), log, title=f"fastpoetry {label}"))
        loads = [(TARGET_CONCURRENCY, self.plan.workers)]
        # settle: every worker up, not only the first.
        outcome = self._section(
            entries, SMALL_POEM.read_bytes(), loads, cores=shared, settle=0.5, count=(syscalls.ALL, *syscalls.WORKERS)
        )  # fmt: skip
        self.run.workers = outcome.cells
        rounds = outcome.rounds.get(TARGET_CONCURRENCY, 0)
        self.run.workers_note = (
            f"Server processes on cores {both}, the load generator on core {self.cores.loadgen}: it shares a "
            f"core with the server here. {TARGET_CONCURRENCY} clients, "
            f"{describe_rounds(self.plan.workers, rounds)}, the two taking turns."
        )
        for label, why in outcome.failed.items():
            progress(f"ERROR: workers: {label}: {why}")


def _calls(cell: Cell) -> str:
    """", 6.02 system calls/poem" for a progress line, if they were counted."""
    if cell.syscalls_per_poem is None:
        return ""
    return f", {cell.syscalls_per_poem:.2f} system calls/poem"


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _serve_help(paths: Paths) -> str:
    launch = servers.fastpoetry(paths, SMALL_POEM, 0)
    argv = [servers.SYSTEM_PYTHON, "-m", "fastpoetry", "serve", "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, env=launch.env, stdin=subprocess.DEVNULL, check=False)
    return done.stdout
