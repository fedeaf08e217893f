"""The benchmark works: ``bench/run --smoke`` starts every peer, loads it, and reports.

No figure is judged here: how fast a shared test machine is says nothing
about the code.  The smoke run has to work, though: every server starts,
serves the exact poem to every client, and shows up in the table, the
JSON and the plot.  nginx's configuration, which carries the poem in
nginx's own string syntax, is checked separately with the characters
that syntax treats specially.

``bench/run`` installs Debian packages with apt-get and Twisted and
matplotlib with pip, so these tests need root (and, the first time, the
network).  Without root they skip, except under ``CI=true``, where they
must run.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO, WAIT, fetch

BENCH = REPO / "bench"

#: The rows the issues ask for; each must have served poems without failure.
SERVERS = ("fastpoetry", "fastpoetry (activated)", "fastpoetry behind PROXY v2", "twisted", "nginx")

#: A hang guard for the whole smoke run, set-up included (apt, pip, gcc).
SMOKE_TIMEOUT = 900

pytestmark = pytest.mark.slow

#: The concurrency of the cells most of the issue's targets judge.
TARGET_CLIENTS = 64

#: The issue's targets that compare two rows' figures in the same run:
#: the cell field, the clients, the row whose figure is judged ("ours": the
#: fastpoetry row), the row it is compared with, the factor, and whether
#: the first must be at most (True) or at least (False) factor x the second.
PEER_TARGETS = {
    "CPU/poem <= 1.25x nginx (64 clients)": ("cpu_us_per_poem", 64, "ours", "nginx", 1.25, True),
    "CPU/poem <= 1.6x nginx (1 client)": ("cpu_us_per_poem", 1, "ours", "nginx", 1.6, True),
    "Twisted's CPU/poem >= 1.25x (64 clients)": ("cpu_us_per_poem", 64, "twisted", "ours", 1.25, False),
    "p99 latency <= nginx (64 clients)": ("p99_us", 64, "ours", "nginx", 1.0, True),
}
#: The system calls target: at most this many a poem at TARGET_CLIENTS.
SYSCALLS_TARGET = "syscalls/poem <= 6.0 (64 clients)"
TARGET_SYSCALLS_PER_POEM = 6.0
#: The limit of the memory target, in MiB.
TARGET_RSS_MIB = 30.0
#: fastpoetry behind PROXY v2 (issue 16): its one target, its CPU per poem
#: at most this factor times plain fastpoetry's at TARGET_CLIENTS.
PROXY_ROW = SERVERS[2]
PROXY_TARGET = "CPU/poem behind PROXY v2 <= 1.15x fastpoetry (64 clients)"
TARGET_PROXY_CPU = 1.15
#: The TLS section (issue 17): fastpoetry over TLS against nginx's stream
#: ssl, a full handshake every poem; its one target, fastpoetry's CPU per
#: poem at most this factor times nginx's at TARGET_CLIENTS.
TLS_ROW, NGINX_TLS_ROW = "fastpoetry over TLS", "nginx stream ssl"
TLS_TARGET = "CPU/poem over TLS <= 1.3x nginx stream ssl (64 clients)"
TARGET_TLS_CPU = 1.3
#: Targets retired by issue 15: none may come back by mistake.
RETIRED_TARGETS = ("poems/s >= 1.5x Twisted", "poems/s >= nginx", "CPU/poem <= 1.3x nginx")

#: The calls of the by-call table, each a row (with "all" and "other").
BREAKDOWN_CALLS = (
    "accept4", "recvfrom", "sendto", "writev", "shutdown", "close",
    "getsockname", "getsockopt", "setsockopt", "epoll_wait", "epoll_ctl",
)  # fmt: skip


def _require_root() -> None:
    if os.geteuid() == 0 and shutil.which("dpkg-query"):
        return
    reason = "bench/run installs Debian packages with apt-get: it needs root on Debian"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}, and under CI=true the benchmark's smoke test must run")
    pytest.skip(reason)


@dataclass
class Smoke:
    out: Path
    returncode: int
    stdout: str
    stderr: str

    def results(self) -> dict:  # type: ignore[type-arg]
        return json.loads((self.out / "results.json").read_text())

    def markdown(self) -> str:
        return (self.out / "results.md").read_text(encoding="utf-8")

    def said(self) -> str:
        return f"exit status {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr[-5000:]}"


def _smoke_run(out: Path, *options: str, env: dict[str, str] | None = None) -> Smoke:
    done = subprocess.run(
        [str(BENCH / "run"), "--smoke", "--out", str(out), *options],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
        env=env,
    )
    return Smoke(out, done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Smoke:
    """One ``bench/run --smoke`` for the whole module."""
    _require_root()
    return _smoke_run(tmp_path_factory.mktemp("bench-out"))


def _require_perf(results: dict[str, Any]) -> None:
    """perf counted system calls in the run (bench/run installs linux-perf as root); skip if not, but not under CI."""
    why = results["perf_unavailable"]
    if not why:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"perf could not count system calls, and under CI=true it must: {why}")
    pytest.skip(f"perf cannot count system calls here: {why}")


def _table(markdown: str, title: str) -> list[dict[str, str]]:
    """The rows of the table whose title starts with ``title`` in results.md, by column name."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"**{title}"))
    # The title, a blank line, the header, the line under it, then rows up to a blank line.
    header = [name.strip() for name in lines[start + 2].strip("|").split("|")]
    rows = []
    for line in lines[start + 4:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (value.strip() for value in line.strip("|").split("|")))))
    return rows


def test_smoke_run_exits_0_and_prints_every_table(smoke: Smoke) -> None:
    assert smoke.returncode == 0, smoke.said()
    for title in ("3 KB poem", "System calls per poem, by call (64 clients)", "1 MiB poem", "Cold start",
                  "Logging cost", "Workers", "TARGETS"):  # fmt: skip
        assert title in smoke.stdout, f"no {title!r} table:\n{smoke.said()}"
    # One progress line per cell, on standard error.
    assert smoke.stderr.count(" clients: ") >= 2 * len(SERVERS), smoke.said()


def test_every_server_serves_poems_with_no_failure(smoke: Smoke) -> None:
    results = smoke.results()
    for server in SERVERS:
        assert results["servers"].get(server) == "ok", f"{server}: {results['servers'].get(server)}\n{smoke.said()}"
        cells = [cell for cell in results["cells"] if cell["server"] == server]
        assert {cell["concurrency"] for cell in cells} == {1, 64}, cells
        for cell in cells:
            assert cell["poems"] > 0 and cell["failures"] == 0, cell
            assert cell["cpu_us_per_poem"] > 0 and cell["rss_kib"] > 0, cell
        big = [cell for cell in results["big_poem"] if cell["server"] == server]
        assert len(big) == 1 and big[0]["poems"] > 0 and big[0]["failures"] == 0, big
        assert big[0]["poem_bytes"] == 1024 * 1024
        rows = [line for line in smoke.stdout.splitlines() if line.startswith(f"{server} ")]
        assert len(rows) >= 3, f"{server} has no rows in the tables:\n{smoke.stdout}"


def test_results_json_records_the_machine_versions_and_every_section(smoke: Smoke) -> None:
    results = smoke.results()
    assert results["smoke"] is True
    for key in ("cpu", "cores", "kernel", "os"):
        assert results["machine"][key], results["machine"]
    for name in ("fastpoetry", "trio", "systemd-python", "twisted", "nginx", "gcc"):
        version = results["versions"][name]
        assert version and version != "not found", results["versions"]
    cell = results["cells"][0]
    for field in ("poems_per_s", "p50_us", "p99_us", "failures", "server_cpu_s", "cpu_us_per_poem",
                  "server_core_busy_pct", "loadgen_core_busy_pct", "others_pct", "rss_kib"):  # fmt: skip
        assert field in cell, cell

    cold = {record["server"]: record for record in results["cold_start"]}
    for server in ("fastpoetry (activated)", "twisted (activated)"):
        assert cold[server]["failures"] == 0 and cold[server]["first_byte_ms"], cold[server]
        assert cold[server]["median_ms"] > 0
    assert cold["nginx"]["note"], "nginx's cold start should say why it is not measured"

    levels = [cell["server"].split()[0] for cell in results["logging"]]
    assert levels == ["warning", "info", "debug"], results["logging"]
    assert all(cell["poems"] > 0 and cell["failures"] == 0 for cell in results["logging"])
    # Either measured or skipped with the reason, depending on the tree.
    assert results["workers"] or "skipped" in results["workers_note"], results["workers_note"]

    goals = {(target["server"], target["goal"]) for target in results["targets"]}
    assert ("fastpoetry", SYSCALLS_TARGET) in goals, goals
    assert not {goal for _, goal in goals} & set(RETIRED_TARGETS), goals
    # Each verdict is what the figures in the same file make it: a target
    # reported as met although its figure misses (or the other way round)
    # fails here, whichever way this machine's figures fall.
    for target in results["targets"]:
        assert target["passed"] is _verdict(results, target), target
    # ...and none is left out: the four comparisons, system calls, memory, failures.
    for server in ("fastpoetry", "fastpoetry (activated)"):
        judged = [target["goal"] for target in results["targets"] if target["server"] == server]
        assert len(judged) == len(PEER_TARGETS) + 3, (server, judged)
        assert set(PEER_TARGETS) | {SYSCALLS_TARGET} <= set(judged), (server, judged)
    # The PROXY v2 row was asked for (a smoke run has every row): its one target, for it alone.
    judged = [(target["server"], target["goal"]) for target in results["targets"] if target["server"] == PROXY_ROW]
    assert judged == [(PROXY_ROW, PROXY_TARGET)], judged
    # So was the TLS section: one target, for fastpoetry over TLS.
    judged = [(target["server"], target["goal"]) for target in results["targets"] if "TLS" in target["goal"]]
    assert judged == [(TLS_ROW, TLS_TARGET)], judged


def test_targets_name_the_machine_and_every_target(smoke: Smoke) -> None:
    rows = _table(smoke.markdown(), "TARGETS")
    assert {row["target"] for row in rows} >= {*PEER_TARGETS, SYSCALLS_TARGET, PROXY_TARGET, TLS_TARGET}, rows
    assert all(row["result"] in ("PASS", "MISS", "not measured") for row in rows), rows
    machine = smoke.results()["machine"]
    notes = smoke.stdout.split("\nTARGETS", 1)[1]
    assert f"Measured on {machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}" in notes, notes
    assert "move between machines" in notes, notes


def _cell(results: dict[str, Any], server: str, clients: int = TARGET_CLIENTS) -> dict[str, Any]:
    """``server``'s cell at ``clients`` in ``results``."""
    found = [c for c in results["cells"] if c["server"] == server and c["concurrency"] == clients]
    assert len(found) == 1, f"{len(found)} cells of {server} at {clients} clients"
    return found[0]


def _proxy_verdict(results: dict[str, Any], target: dict[str, Any]) -> bool | None:
    """The PROXY v2 target, worked out again: None if either row has no poems at TARGET_CLIENTS."""
    assert target["server"] == PROXY_ROW, target
    cells = []
    for server in (PROXY_ROW, "fastpoetry"):
        found = [c for c in results["cells"] if c["server"] == server and c["concurrency"] == TARGET_CLIENTS]
        if not found or not found[0]["poems"]:
            return None  # not measured: the row could not run, or was not asked for
        cells.append(found[0])
    behind, plain = cells
    return behind["cpu_us_per_poem"] <= TARGET_PROXY_CPU * plain["cpu_us_per_poem"]


def _tls_verdict(results: dict[str, Any], target: dict[str, Any]) -> bool | None:
    """The TLS target, worked out again from the TLS section's cells: None if either row has no poems there."""
    assert target["server"] == TLS_ROW, target
    cells = []
    for server in (TLS_ROW, NGINX_TLS_ROW):
        found = [c for c in results["tls"] if c["server"] == server and c["concurrency"] == TARGET_CLIENTS]
        if not found or not found[0]["poems"]:
            return None
        cells.append(found[0])
    ours, nginx = cells
    return ours["cpu_us_per_poem"] <= TARGET_TLS_CPU * nginx["cpu_us_per_poem"]


def _verdict(results: dict[str, Any], target: dict[str, Any]) -> bool | None:
    """Whether ``target`` is met, worked out again from the cells in ``results`` (None: not measured)."""
    # Computed here on its own, not with bench/report.py: a slip there
    # (a flipped comparison, a wrong peer or factor) shows up as a mismatch.
    goal = target["goal"]
    if goal == PROXY_TARGET:
        return _proxy_verdict(results, target)
    if goal == TLS_TARGET:
        return _tls_verdict(results, target)
    ours = _cell(results, target["server"])
    if goal in PEER_TARGETS:
        field, clients, first, second, factor, at_most = PEER_TARGETS[goal]
        a, b = (_cell(results, target["server"] if row == "ours" else row, clients)[field] for row in (first, second))
        return a <= factor * b if at_most else a >= factor * b
    if goal == SYSCALLS_TARGET:
        calls = ours["syscalls_per_poem"]
        # Judged at the target's own precision, one decimal.
        return None if calls is None else round(calls, 1) <= TARGET_SYSCALLS_PER_POEM
    if goal.startswith(f"RSS <= {TARGET_RSS_MIB:g} MiB "):
        return ours["rss_kib"] / 1024 <= TARGET_RSS_MIB
    if goal == "no failed or short fetches (all its cells)":
        return sum(c["failures"] for c in results["cells"] if c["server"] == target["server"]) == 0
    raise AssertionError(f"a target this test does not know: {goal!r}")


# --------------------------------------------------------------------------
# Over TLS: fastpoetry and nginx's stream ssl, a section of their own.


def test_both_tls_rows_serve_whole_poems_over_full_handshakes(smoke: Smoke) -> None:
    """Every poem over TLS whole, to its close_notify (loadgen -T counts a ragged end as failed), in the table."""
    results = smoke.results()
    for server in (TLS_ROW, NGINX_TLS_ROW):
        status = results["tls_servers"].get(server)
        assert status == "ok", f"{server}: {status}\n{smoke.said()}"
        cells = [cell for cell in results["tls"] if cell["server"] == server]
        assert {cell["concurrency"] for cell in cells} == {1, TARGET_CLIENTS}, cells
        for cell in cells:
            assert cell["poems"] > 0 and cell["failures"] == 0, cell
            assert cell["poem_bytes"] == results["cells"][0]["poem_bytes"], cell  # the 3 KB poem
            assert cell["cpu_us_per_poem"] > 0 and cell["rss_kib"] > 0, cell
        # The check's fetch: TLS 1.3 (what loadgen -T offers), and no ticket from either server.
        negotiated = results["tls_negotiated"][server]
        assert negotiated.startswith("TLSv1.3 ") and negotiated.endswith(", no ticket"), negotiated
    # Not in the plain tables: their ratios are to plain nginx and Twisted.
    assert not {TLS_ROW, NGINX_TLS_ROW} & {cell["server"] for cell in results["cells"] + results["big_poem"]}
    rows = _table(smoke.markdown(), "3 KB poem over TLS")
    assert {(row["server"], row["clients"]) for row in rows} == {
        (server, str(clients)) for server in (TLS_ROW, NGINX_TLS_ROW) for clients in (1, TARGET_CLIENTS)
    }, rows
    for row in rows:
        assert row["failed"] == "0" and float(row["CPU µs/poem"]) > 0, row
        assert row["vs nginx ssl"] == "1.00x" if row["server"] == NGINX_TLS_ROW else row["vs nginx ssl"] != "-", row
    certificate = results["settings"]["tls_certificate"]
    assert "P-256" in certificate and certificate in smoke.stdout, certificate


# --------------------------------------------------------------------------
# System calls, counted with perf.


def test_every_measured_server_has_its_system_calls_per_poem(smoke: Smoke) -> None:
    results = smoke.results()
    _require_perf(results)
    measured = [server for server, status in results["servers"].items() if status == "ok"]
    assert set(SERVERS) <= set(measured), results["servers"]
    # The plain rows in the 3 KB table, the TLS rows in their own.
    over_tls = [server for server, status in results["tls_servers"].items() if status == "ok"]
    for cells, servers, title in ((results["cells"], measured, "3 KB poem,"),
                                  (results["tls"], over_tls, "3 KB poem over TLS")):  # fmt: skip
        for cell in cells:
            if cell["server"] not in servers:
                continue
            assert cell["syscalls_per_poem"] is not None and cell["syscalls_per_poem"] > 0, cell
            assert cell["syscall_poems"] > 0 and cell["syscalls"]["all"] > 0 and not cell["syscalls_error"], cell
            assert all(r["syscalls_per_poem"] is not None for r in cell["rounds"]), cell["rounds"]
        rows = _table(smoke.markdown(), title)
        assert {row["server"] for row in rows} >= set(servers), rows
        for row in (row for row in rows if row["server"] in servers):
            assert float(row["syscalls/poem"]) > 0, row  # a number, not "-"
    assert " syscalls/poem " in smoke.stdout, smoke.stdout


def test_the_by_call_table_counts_each_call_for_every_server(smoke: Smoke) -> None:
    results = smoke.results()
    _require_perf(results)
    counted = {count["server"]: count for count in results["breakdown"]}
    assert set(SERVERS) <= set(counted), counted
    for server, count in counted.items():
        assert not count["error"], f"{server}: {count['error']}"
        assert count["concurrency"] == TARGET_CLIENTS and count["poems"] > 0, count
        assert set(count["counts"]) == {"all", *BREAKDOWN_CALLS}, count
        # Every poem is one connection accepted and closed, whatever the server.
        assert count["counts"]["accept4"] >= count["poems"] and count["counts"]["close"] >= count["poems"], count
        assert count["counts"]["all"] >= sum(count["counts"][name] for name in BREAKDOWN_CALLS), count
    rows = {row["call"]: row for row in _table(smoke.markdown(), "System calls per poem, by call")}
    assert set(rows) >= {"all", *BREAKDOWN_CALLS, "other"}, rows
    for server in SERVERS:
        assert float(rows["all"][server]) > 0, rows["all"]


#: A process whose threads come and go while its main thread makes calls,
#: as a server's do when trio's idle worker thread ends.
_THREAD_CHURN = """
import os, threading, time
while True:
    thread = threading.Thread(target=time.sleep, args=(0.003,))
    thread.start()
    for _ in range(50):
        os.stat("/")
    thread.join()
"""


def test_a_thread_ending_while_perf_attaches_costs_a_new_start_not_the_count(smoke: Smoke) -> None:
    """perf 6.1 exits with ESRCH when a thread it attaches to ends first: the count starts perf again."""
    _require_perf(smoke.results())
    syscalls = _bench_module("syscalls")
    names = (syscalls.ALL, *syscalls.BREAKDOWN)
    churn = subprocess.Popen([sys.executable, "-c", _THREAD_CHURN])
    try:
        # About one start in ten meets a thread that ends (seen here with
        # perf 6.1); each of these would fail the count without the retry.
        for _ in range(20):
            count = syscalls.Count(names, [churn.pid])
            count.start()
            counts = count.stop()
            assert set(counts) == set(names) and all(value >= 0 for value in counts.values()), counts
    finally:
        churn.kill()
        churn.wait()


def test_the_workers_table_counts_accept4_epoll_wait_and_switches(smoke: Smoke) -> None:
    results = smoke.results()
    if not results["workers"]:
        pytest.skip(results["workers_note"])
    _require_perf(results)
    for cell in results["workers"]:
        assert cell["syscalls"]["accept4"] >= cell["syscall_poems"] > 0, cell
        assert "epoll_wait" in cell["syscalls"] and "context-switches" in cell["syscalls"], cell
    rows = _table(smoke.markdown(), "Workers")
    assert len(rows) == len(results["workers"]), rows
    for row in rows:
        assert float(row["accept4/poem"]) >= 1 and float(row["epoll_wait/poem"]) >= 0, row
        assert float(row["switches/poem"]) >= 0, row


def test_without_perf_the_run_goes_on_and_says_why(tmp_path: Path) -> None:
    """A perf that cannot count: '-' and one line why; the target is not measured, which --check counts as missed."""
    _require_root()
    fake = tmp_path / "bin"
    fake.mkdir()
    # A perf that runs (so bench/run does not install linux-perf) but cannot count, as without permission.
    (fake / "perf").write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "perf version 0 (a stand-in)"; exit 0; fi\n'
        "echo 'Error:\tNo permissions to read /sys/kernel/tracing/events/raw_syscalls/sys_enter' >&2\n"
        "exit 129\n"
    )
    (fake / "perf").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = _smoke_run(tmp_path / "out", "--only", "fastpoetry,nginx", "--check", env=env)
    assert done.returncode == 1, done.said()  # the system calls target is missed: not measured
    results = done.results()
    assert "No permissions" in results["perf_unavailable"], results["perf_unavailable"]
    for cell in results["cells"]:
        assert cell["syscalls_per_poem"] is None and cell["poems"] > 0 and cell["failures"] == 0, cell
    for row in _table(done.markdown(), "3 KB poem"):
        assert row["syscalls/poem"] == "-", row
    said = [line for line in done.stdout.splitlines() if "syscalls/poem: not counted:" in line]
    assert len(said) == 1 and "No permissions" in said[0], done.stdout
    target = next(t for t in results["targets"] if t["server"] == "fastpoetry" and t["goal"] == SYSCALLS_TARGET)
    assert target["passed"] is None and "not counted" in target["figure"], target
    rows = [row for row in _table(done.markdown(), "TARGETS") if row["target"] == SYSCALLS_TARGET]
    assert rows and all(row["result"] == "not measured" for row in rows), rows


def test_results_are_written_as_markdown_text_and_a_png(smoke: Smoke) -> None:
    png = (smoke.out / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    markdown = (smoke.out / "results.md").read_text()
    assert "| fastpoetry | 64 |" in markdown, markdown
    assert (smoke.out / "results.txt").read_text().strip() in smoke.stdout


# --------------------------------------------------------------------------
# nginx's configuration carries the poem exactly.


def _bench_module(name: str):  # type: ignore[no-untyped-def]
    """A module of bench/, imported as bench.py imports it (bench/ first on the path)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def _nginx_conf():  # type: ignore[no-untyped-def]
    return _bench_module("nginx_conf")


#: Poems that exercise each way the poem goes into nginx.conf: one plain
#: token, a token with variables for the dollars, and chunks of a poem
#: longer than one token, some cut inside an escape sequence's reach.
TRICKY_POEMS = {
    "plain": b"A plain short poem; with {braces} and # hashes\n",
    "specials": 'He wrote "$5", then \\n, \\" and ${x} and $1 and $$ — done. $\n'.encode(),
    "long": "".join(f'{n:05d} "quoted" \\ back $dollar ${{brace}} $ {"é" * (n % 7)}\n' for n in range(400)).encode(),
}


def _fetch_tls(port: int) -> tuple[bytes, str | None, bool]:
    """One poem over TLS, unverified, read to the close_notify (a ragged end raises); the version, and if a ticket came."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    # Python sets it with OpenSSL 3, and it would read an end without a close_notify as a clean one.
    context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        with context.wrap_socket(raw, suppress_ragged_eofs=False) as tls:
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
            session = tls.session
            return b"".join(chunks), tls.version(), session is not None and session.has_ticket


@pytest.fixture
def serve_with_nginx(smoke: Smoke, tmp_path: Path) -> Iterator[Callable[..., bytes]]:
    """Serve a poem with nginx and the benchmark's configuration; what one client receives.

    With ``tls`` (a certificate and its key) nginx serves it over TLS, and
    ``received`` gets the TLS version the client got and whether a session
    ticket came with it.
    """
    del smoke  # it installed nginx and its stream module
    nginx_conf = _nginx_conf()
    processes: list[subprocess.Popen[bytes]] = []

    def serve(
        poem: bytes, tls: tuple[Path, Path] | None = None, received: list[tuple[str | None, bool]] | None = None
    ) -> bytes:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        conf = tmp_path / "nginx.conf"
        conf.write_bytes(nginx_conf.render(poem, port, tmp_path, backlog=64, tls=tls))
        errors = tmp_path / "startup-errors.log"
        process = subprocess.Popen(
            ["nginx", "-p", str(tmp_path), "-c", str(conf), "-e", str(errors)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        processes.append(process)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                if tls is None:
                    return fetch(("127.0.0.1", port))
                got, version, ticket = _fetch_tls(port)
                if received is not None:
                    received.append((version, ticket))
                return got
            except ConnectionRefusedError:
                said = errors.read_text() if errors.exists() else ""
                assert process.poll() is None, f"nginx exited ({process.returncode}): {said}"
                assert time.monotonic() < deadline, f"nginx did not listen within {WAIT} s: {said}"
                time.sleep(0.05)

    yield serve
    for process in processes:
        if process.poll() is None:
            process.terminate()
            process.wait(WAIT)


@pytest.mark.parametrize("name", sorted(TRICKY_POEMS))
def test_nginx_serves_the_poem_byte_for_byte_whatever_its_characters(
    serve_with_nginx: Callable[..., bytes], name: str
) -> None:
    poem = TRICKY_POEMS[name]
    assert serve_with_nginx(poem) == poem


@pytest.mark.parametrize("name", sorted(TRICKY_POEMS))
def test_nginx_over_tls_serves_the_poem_to_a_close_notify_and_issues_no_ticket(
    serve_with_nginx: Callable[..., bytes], tmp_path: Path, name: str
) -> None:
    """The TLS row's configuration: the exact poem, a clean TLS end, and no session a client could resume.

    Without ``NumTickets 0``, nginx 1.22 sends two TLS 1.3 tickets after
    every handshake even with its session cache and tickets off.
    """
    servers = _bench_module("servers")
    paths = servers.Paths(repo=REPO, bench=BENCH, venv=BENCH / ".venv", logs=tmp_path, run=tmp_path / "run",
                          fastpoetry_src=REPO / "src")  # fmt: skip
    pair = servers.tls_pair(paths)
    assert servers.tls_pair(paths) == pair  # made once a run: every server gets the same pair
    poem, received = TRICKY_POEMS[name], []
    assert serve_with_nginx(poem, tls=(pair.cert, pair.key), received=received) == poem
    assert received == [("TLSv1.3", False)], received  # TLS 1.3, and no ticket


# --------------------------------------------------------------------------
# --baseline REV: a REV that names no commit stops the run before it measures.


def test_a_bad_baseline_revision_is_one_line_and_measures_nothing(tmp_path: Path) -> None:
    _require_root()
    done = subprocess.run(
        [str(BENCH / "run"), "--smoke", "--baseline", "no-such-revision", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=SMOKE_TIMEOUT, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    said = [line for line in done.stderr.splitlines() if line.startswith("bench:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(said) == 1 and "no-such-revision" in said[0], done.stderr[-2000:]
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "logs").exists()


# --------------------------------------------------------------------------
# The PROXY v2 row's target, judged on made-up figures.


def test_the_proxy_target_is_judged_against_plain_fastpoetry_and_not_measured_without_a_figure() -> None:
    """report.targets on cells made up for the purpose: either side of 1.15x, and a row that could not run.

    The smoke run can show only the verdict its machine gives; this shows
    both, and that a fastpoetry without --proxy-protocol is "not measured"
    (which --check counts as missed), not left out.
    """
    report, results = _bench_module("report"), _bench_module("results")

    def cell(server: str, cpu_us_per_poem: float) -> Any:
        return _made_up_cell(results, server, cpu_us_per_poem)

    def judged(servers: dict[str, str], cells: list[Any]) -> list[Any]:
        run = results.Run(started="", command="", smoke=True, machine={}, versions={}, settings={}, servers=servers,
                          cells=cells)  # fmt: skip
        return [target for target in report.targets(run) if target.goal == PROXY_TARGET]

    both = {"fastpoetry": "ok", PROXY_ROW: "ok"}
    for behind, passed in ((22.9, True), (23.1, False)):  # plain: 20.0 µs, the line: 23.0
        [target] = judged(both, [cell("fastpoetry", 20.0), cell(PROXY_ROW, behind)])
        assert (target.server, target.passed) == (PROXY_ROW, passed), target
        assert target.figure.startswith(f"{behind:.1f} µs vs 20.0 µs: "), target
    could_not_run = {"fastpoetry": "ok", PROXY_ROW: "exited (2) before it would accept connections"}
    [target] = judged(could_not_run, [cell("fastpoetry", 20.0)])
    assert target.passed is None and "no figure" in target.figure, target
    assert judged({"fastpoetry": "ok"}, [cell("fastpoetry", 20.0)]) == []  # not asked for (--only fastpoetry)


def _made_up_cell(results: Any, server: str, cpu_us_per_poem: float) -> Any:
    """A cell at TARGET_CLIENTS with every figure made up but its CPU per poem."""
    poems = 1000
    return results.Cell(
        server=server, concurrency=TARGET_CLIENTS, poem_bytes=3117, server_cores="0", poems=poems, failures=0,
        failure_reasons={}, seconds=1.0, poems_per_s=poems, mb_per_s=3.1, mean_us=1.0, p50_us=1.0, p90_us=1.0,
        p99_us=1.0, max_us=1.0, server_cpu_s=cpu_us_per_poem * poems / 1e6, cpu_us_per_poem=cpu_us_per_poem,
        server_core_busy_pct=50.0, loadgen_core_busy_pct=50.0, steal_pct=0.0, others_pct=0.0, loadgen_cpu_s=0.1,
        rss_kib=1024, processes=1,
    )  # fmt: skip


# --------------------------------------------------------------------------
# The TLS target, judged on made-up figures.


def test_the_tls_target_is_judged_against_nginx_stream_ssl_and_not_measured_without_a_figure() -> None:
    """report.targets on TLS cells made up for the purpose: either side of 1.3x, and a row that could not run."""
    report, results = _bench_module("report"), _bench_module("results")

    def cell(server: str, cpu_us_per_poem: float) -> Any:
        return _made_up_cell(results, server, cpu_us_per_poem)

    def judged(tls_servers: dict[str, str], tls: list[Any], plain: tuple[Any, ...] = ()) -> list[Any]:
        run = results.Run(started="", command="", smoke=True, machine={}, versions={}, settings={},
                          servers={"nginx": "ok"} if plain else {}, cells=list(plain), tls_servers=tls_servers,
                          tls=tls)  # fmt: skip
        return [target for target in report.targets(run) if target.goal == TLS_TARGET]

    both = {TLS_ROW: "ok", NGINX_TLS_ROW: "ok"}
    for ours, passed in ((519.9, True), (520.1, False)):  # nginx: 400.0 µs, the line: 520.0
        [target] = judged(both, [cell(TLS_ROW, ours), cell(NGINX_TLS_ROW, 400.0)])
        assert (target.server, target.passed) == (TLS_ROW, passed), target
        assert target.figure.startswith(f"{ours:.1f} µs vs 400.0 µs: "), target
    # Judged on the TLS section's cells, never the plain table's, whatever plain nginx's figure.
    [target] = judged(both, [cell(TLS_ROW, 500.0), cell(NGINX_TLS_ROW, 400.0)], [cell("nginx", 20.0)])
    assert target.passed is True, target
    could_not_run = {TLS_ROW: "exited (2) before it would accept connections", NGINX_TLS_ROW: "ok"}
    [target] = judged(could_not_run, [cell(NGINX_TLS_ROW, 400.0)])
    assert target.passed is None and "no figure" in target.figure, target
    assert judged({}, []) == []  # not asked for (--only without tls)
