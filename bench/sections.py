"""The benchmark's sections, each measuring servers and adding to the run's results.

The 3 KB poem at every concurrency, the 1 MiB poem, cold starts under
socket activation, fastpoetry's logging cost and its workers.  A server
that fails gets one line on standard error and a note in the results,
and the others go on.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import load
import measure
import servers
from measure import Cores, Load
from plan import Plan, describe_load
from poem_files import SMALL_POEM
from report import TARGET_CONCURRENCY
from results import Cell, ColdStart, Run
from servers import NGINX, Contender, Launch, Paths, Server, ServerFailed, twistd_log


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label).strip("-")


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

    def _cell(self, server: Server, label: str, concurrency: int, poem_bytes: int, amount: Load, cores: Cores | None = None) -> Cell:
        """Measure a cell; again, if other work shared its cores, keeping the quietest attempt."""
        attempts: list[Cell] = []
        while True:
            cell = measure.cell(
                server, self.loadgen, cores or self.cores,
                label=label, concurrency=concurrency, poem_bytes=poem_bytes, amount=amount,
            )  # fmt: skip
            attempts.append(cell)
            self._report(cell)
            if cell.others_pct <= self.plan.quiet_pct or len(attempts) > self.plan.retries:
                break
            progress(f"[{label}] other work took {cell.others_pct:.0f}% of the cores: measuring again")
        if not server.alive():
            raise ServerFailed(f"{label}: died during the cell with {concurrency} clients")
        return _quietest(attempts)

    def _report(self, cell: Cell) -> None:
        label, concurrency = cell.server, cell.concurrency
        failed = f"{cell.failures} FAILED {cell.failure_reasons}" if cell.failures else "0 failed"
        progress(
            f"[{label}] {concurrency} clients: {cell.poems:,} poems in {cell.seconds:.1f} s = "
            f"{cell.poems_per_s:,.0f}/s ({cell.mb_per_s:,.0f} MB/s), p50 {cell.p50_us / 1000:.3f} ms, "
            f"p99 {cell.p99_us / 1000:.3f} ms, {failed}; server CPU {cell.cpu_us_per_poem:.1f} µs/poem, "
            f"cores busy {cell.server_core_busy_pct:.0f}% (server) {cell.loadgen_core_busy_pct:.0f}% (loadgen), "
            f"others {cell.others_pct:.0f}%, steal {cell.steal_pct:.0f}%, RSS {cell.rss_kib / 1024:.1f} MiB"
        )

    # ---- the 3 KB poem at every concurrency

    def small_poem(self, contender: Contender) -> None:
        poem = SMALL_POEM.read_bytes()
        port = servers.free_port()
        log = self._log_path(contender.label, "small")
        progress(f"[{contender.label}] starting")
        try:
            with self.serving(contender.label, contender.launch(self.paths, SMALL_POEM, port, log), port, log) as server:
                server.check_poem(poem)
                for concurrency in self.plan.concurrencies:
                    amount = self.plan.target if concurrency == TARGET_CONCURRENCY else self.plan.other
                    self.run.cells.append(self._cell(server, contender.label, concurrency, len(poem), amount))
            self.run.servers[contender.label] = "ok"
        except (ServerFailed, load.LoadgenError) as exc:
            self.run.servers[contender.label] = str(exc)
            progress(f"ERROR: {exc} (going on with the others)")

    # ---- the 1 MiB poem

    def big_poem(self, contender: Contender, poem_path: Path) -> None:
        poem = poem_path.read_bytes()
        port = servers.free_port()
        log = self._log_path(contender.label, "big")
        try:
            with self.serving(contender.label, contender.launch(self.paths, poem_path, port, log), port, log) as server:
                server.check_poem(poem)
                cell = self._cell(server, contender.label, self.plan.big_concurrency, len(poem), self.plan.big)
                self.run.big_poem.append(cell)
        except (ServerFailed, load.LoadgenError) as exc:
            progress(f"ERROR: 1 MiB poem: {exc} (going on with the others)")

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

    def logging_cost(self) -> None:
        """fastpoetry at three log levels, three servers side by side, taking turns under load.

        Turns spread whatever else the machine does over the three levels
        alike, instead of letting it fall on one of them.
        """
        poem = SMALL_POEM.read_bytes()
        levels = (("warning", "warning"), ("info", "info (default)"), ("debug", "debug (a line per client)"))
        rounds: dict[str, list[Cell]] = {label: [] for _, label in levels}
        try:
            with ExitStack() as running:
                started: dict[str, Server] = {}
                for level, label in levels:
                    port = servers.free_port()
                    log = self._log_path("fastpoetry", f"log-{level}")
                    options = ("--log-level", level) if level != "info" else ()
                    launch = servers.fastpoetry(self.paths, SMALL_POEM, port, options=options)
                    started[label] = running.enter_context(self.serving(f"fastpoetry {label}", launch, port, log))
                    started[label].check_poem(poem)
                for turn in range(self.plan.logging_rounds):
                    amount = self.plan.logging if turn == 0 else replace(
                        self.plan.logging, warm_up_poems=None, warm_up_seconds=None
                    )  # fmt: skip
                    for label, server in started.items():
                        rounds[label].append(self._cell(server, label, TARGET_CONCURRENCY, len(poem), amount))
        except (ServerFailed, load.LoadgenError) as exc:
            progress(f"ERROR: logging cost: {exc}")
            self.run.logging_note = f"not measured: {exc}"
            return
        self.run.logging = [measure.merge(cells) for cells in rounds.values()]
        turns = self.plan.logging_rounds
        self.run.logging_note = (
            f"fastpoetry in the foreground, logging to a file; {TARGET_CONCURRENCY} clients; each level "
            f"{'once' if turns == 1 else f'{turns} times, in turns'}: {describe_load(self.plan.logging)} "
            "(the warm-up the first time only)."
        )

    # ---- fastpoetry serve --workers N

    def workers(self) -> None:
        help_text = _serve_help(self.paths)
        if "--workers" not in help_text:
            self.run.workers_note = "skipped: 'fastpoetry serve --help' has no --workers option in this tree."
            progress(f"workers: {self.run.workers_note}")
            return
        poem = SMALL_POEM.read_bytes()
        both = ",".join(str(c) for c in sorted({*self.cores.server_list(), *self.cores.loadgen_list()}))
        shared = Cores(server=both, loadgen=self.cores.loadgen)
        for count in (1, 2):
            port = servers.free_port()
            label = f"--workers {count}"
            log = self._log_path("fastpoetry", f"workers-{count}")
            launch = servers.fastpoetry(self.paths, SMALL_POEM, port, options=("--workers", str(count)))
            try:
                with self.serving(f"fastpoetry {label}", launch, port, log, cores=both) as server:
                    server.check_poem(poem)
                    time.sleep(0.5)  # every worker up, not only the first
                    cell = self._cell(server, label, TARGET_CONCURRENCY, len(poem), self.plan.workers, shared)
                    self.run.workers.append(cell)
            except (ServerFailed, load.LoadgenError) as exc:
                progress(f"ERROR: workers {count}: {exc}")
        self.run.workers_note = (
            f"Server processes on cores {both}, the load generator on core {self.cores.loadgen}: it shares a "
            f"core with the server here. {TARGET_CONCURRENCY} clients, {describe_load(self.plan.workers)}."
        )


def _quietest(attempts: list[Cell]) -> Cell:
    """The attempt least disturbed by other work, but with every attempt's failures, and the last RSS."""
    reasons: dict[str, int] = {}
    for attempt in attempts:
        for reason, count in attempt.failure_reasons.items():
            reasons[reason] = reasons.get(reason, 0) + count
    return replace(
        min(attempts, key=lambda c: c.others_pct),
        failures=sum(reasons.values()),
        failure_reasons=reasons,
        rss_kib=attempts[-1].rss_kib,
        attempts=len(attempts),
    )


def _serve_help(paths: Paths) -> str:
    launch = servers.fastpoetry(paths, SMALL_POEM, 0)
    argv = [servers.SYSTEM_PYTHON, "-m", "fastpoetry", "serve", "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, env=launch.env, stdin=subprocess.DEVNULL, check=False)
    return done.stdout
