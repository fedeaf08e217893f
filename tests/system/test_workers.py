"""``serve --workers 2`` from the Debian package, under a real systemd.

The packaged units with the drop-in the README gives administrators
("Several cores"): the main process and its two workers in the unit's
cgroup, clients served by both, ``systemctl reload`` and ``systemctl stop``
clean, and a worker killed with SIGKILL restarting the service.

The tests share the session's container (see conftest.py).  test_system.py
ends by purging the package; this module installs it again if it finds it
gone, and purges it again afterwards.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from .helpers import (
    INSTALLED_POEM,
    PACKAGED_POEM,
    POEMS,
    ClientLoop,
    Container,
    journal_cursor,
    new_main_pid,
    served_by_fastpoetry,
    uid_of,
    wait_until,
)

pytestmark = pytest.mark.system

ADMIN_POEM = "/etc/fastpoetry/workers-poem.txt"

#: argv: CGROUP.  Prints the PIDs of the processes in the cgroup CGROUP (as
#: systemctl show -p ControlGroup says it), whatever the cgroup hierarchy.
CGROUP_PROCESSES = r"""
import json, os, sys
wanted = sys.argv[1]
found = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cgroup") as cgroup:
            paths = {line.rstrip("\n").split(":", 2)[2] for line in cgroup}
    except OSError:
        continue
    if wanted in paths:
        found.append(int(pid))
print(json.dumps(sorted(found)))
"""


def journal_since(container: Container, cursor: str) -> str:
    """The messages about fastpoetry.service since ``cursor``, one per line."""
    container.run("journalctl", "--sync")
    return container.text(
        "journalctl", "--no-pager", "-o", "cat", "--after-cursor", cursor, "-u", "fastpoetry.service"
    )


def signal_processes(container: Container, signame: str, pids: list[int]) -> None:
    container.run("sh", "-c", f'kill -{signame} "$@"', "sh", *map(str, pids))


def unit_processes(container: Container) -> list[int]:
    """The PIDs in fastpoetry.service's cgroup (none once it is gone: systemd removes it empty)."""
    cgroup = container.show("fastpoetry.service", "ControlGroup")
    if not cgroup:
        return []
    return json.loads(container.python(CGROUP_PROCESSES, cgroup).stdout)


def workers_of(container: Container, main: int) -> list[int]:
    """The main process's workers: every other process in the unit's cgroup, each its child."""
    others = [pid for pid in unit_processes(container) if pid != main]
    for pid in others:
        assert container.status_of(pid)["PPid"] == str(main), f"{pid} is not a child of {main}"
    return others


@contextmanager
def with_workers(container: Container, poem: str) -> Iterator[None]:
    """``--workers 2`` added to the command as the README says, in a drop-in; the service stopped.

    On the way out the drop-in goes and the service is stopped, so that the
    next client starts it as packaged.
    """
    exec_start = f"[Service]\nExecStart=\nExecStart=/usr/bin/fastpoetry serve --poem {poem} --workers 2\n"
    with container.drop_in("50-workers.conf", exec_start):
        container.run("systemctl", "stop", "fastpoetry.service")
        container.reset_failed()
        try:
            yield
        finally:
            container.run("systemctl", "stop", "fastpoetry.service")
    container.reset_failed()


@contextmanager
def only_serving(container: Container, workers: list[int], pid: int) -> Iterator[None]:
    """Stop (SIGSTOP) every worker but ``pid`` for a moment: only ``pid`` accepts."""
    others = [other for other in workers if other != pid]
    signal_processes(container, "STOP", others)
    try:
        yield
    finally:
        signal_processes(container, "CONT", others)


def fetch_from_each(container: Container, workers: list[int]) -> dict[int, bytes]:
    """``{pid: poem}``: a poem fetched while only that worker could accept it."""
    poems = {}
    for pid in workers:
        with only_serving(container, workers, pid):
            poems[pid] = container.fetch()
    return poems


def test_packaged_unit_with_two_workers(installed: Container) -> None:
    """MainPID and two workers in the unit's cgroup, unprivileged; both serve; systemctl reload
    swaps the poem in both while clients fetch, none failing; systemctl stop is clean.
    """
    container = installed
    old, new = (POEMS / "lantern.txt").read_bytes(), (POEMS / "long-winter.txt").read_bytes()
    cursor = journal_cursor(container)
    container.write(ADMIN_POEM, old)
    try:
        with with_workers(container, ADMIN_POEM):
            # A client starts the service through the socket, as always.
            assert container.fetch() == old
            assert container.is_active("fastpoetry.service") == "active"
            main = container.main_pid()
            workers = workers_of(container, main)
            assert len(workers) == 2, unit_processes(container)
            uid = uid_of(container, "fastpoetry")
            for pid in (main, *workers):
                status = container.status_of(pid)
                assert status["Uid"].split() == [uid] * 4 and uid != "0"
                assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"] == "1"
            journal = container.wait_for_journal("ready: serving ", f"_PID={main}")
            assert "took 1 socket from systemd" in journal, journal
            assert f"ready: serving workers-poem.txt ({len(old)} bytes) on 1 socket with 2 workers;" in journal, journal
            for pid in workers:
                assert "serving workers-poem.txt on [::]:10000" in container.journal(f"_PID={pid}")
            status_text = container.show("fastpoetry.service", "StatusText")
            assert status_text.startswith(f"Serving workers-poem.txt ({len(old)} bytes) on 1 socket with 2 workers; "), status_text
            assert fetch_from_each(container, workers) == {pid: old for pid in workers}

            with ClientLoop(container, [old, new], threads=4) as loop:
                loop.more(100)
                container.write(ADMIN_POEM, new)
                container.run("systemctl", "reload", "fastpoetry.service")
                # It returned once every worker serves the new poem (checked
                # below, and at once in test_system.py's reload tests); the
                # journal may take a moment to show the main process's line.
                wait_until(
                    lambda: container.journal(f"_PID={main}").count("ready: serving ") >= 2,
                    "the main process's ready line after the reload",
                )
                loop.more(100)
                summary = loop.stop()
            total = summary["ok"] + summary["failed"]
            assert summary["failed"] == 0, f"{summary['failed']} of {total} fetches failed: {summary['errors']}"
            assert fetch_from_each(container, workers) == {pid: new for pid in workers}
            assert container.main_pid() == main, "the server was restarted, not reloaded"
            assert sorted(workers_of(container, main)) == sorted(workers)
            assert re.search(r"received a reload request from PID \d+ \(uid \d+\): reloading 1 poem in 2 workers",
                             container.journal(f"_PID={main}")), container.journal(f"_PID={main}")
            for pid in workers:
                assert f"loaded a poem from: {ADMIN_POEM} ({len(new)} bytes)" in container.journal(f"_PID={pid}")
            wait_until(
                lambda: f"({len(new)} bytes) on 1 socket with 2 workers; " in container.show("fastpoetry.service", "StatusText"),
                "systemctl status to show the new poem",
            )

            container.run("systemctl", "stop", "fastpoetry.service")
            assert container.is_active("fastpoetry.service") == "inactive"
            assert container.show("fastpoetry.service", "Result") == "success"
            assert container.show("fastpoetry.service", "ExecMainStatus") == "0"
            assert unit_processes(container) == []
            assert served_by_fastpoetry(container) == []
            assert container.is_active("fastpoetry.socket") == "active"
            journal = journal_since(container, cursor)
            served = [int(n) for pid in workers for n in re.findall(r"^shut down after serving (\d+) poems? ", container.journal(f"_PID={pid}"), re.M)]
            assert len(served) == 2 and all(served), journal  # each worker served, at least the fetches aimed at it
            assert re.search(r"^shut down after serving \d+ poems \(\d+ bytes\) with 2 workers$", container.journal(f"_PID={main}"), re.M), journal
            for trouble in ("not waiting any longer", "shutdown timeout", "Killing process", "timed out"):
                assert trouble not in journal, journal
    finally:
        container.run("rm", "-rf", "/etc/fastpoetry")
    assert container.fetch() == PACKAGED_POEM.read_bytes()  # as packaged again
    assert len(unit_processes(container)) == 1


def test_a_worker_killed_under_systemd_restarts_the_service(installed: Container) -> None:
    """kill -9 of a worker: the main process stops the other and exits 70; systemd restarts it all."""
    container = installed
    poem = PACKAGED_POEM.read_bytes()
    cursor = journal_cursor(container)
    with with_workers(container, INSTALLED_POEM):
        assert container.fetch() == poem
        main = container.main_pid()
        first, second = sorted(workers_of(container, main))
        restarts = int(container.show("fastpoetry.service", "NRestarts"))
        signal_processes(container, "KILL", [first])
        new = new_main_pid(container, main)
        assert int(container.show("fastpoetry.service", "NRestarts")) == restarts + 1
        assert container.fetch() == poem
        assert len(workers_of(container, new)) == 2
        journal = container.journal(f"_PID={main}")
        assert re.search(rf"^worker \d \(PID {first}\) was killed by SIGKILL: stopping the other workers$", journal, re.M), journal
        assert "received a stop request from the main process: shutting down" in container.journal(f"_PID={second}")
        journal = journal_since(container, cursor)
        assert re.search(r"Main process exited, code=exited, status=70", journal), journal
