"""The Debian package under a real systemd: socket activation, the user, the
journal, reload, restarts, the watchdog, upgrade and purge.

All tests share one booted container (see conftest.py) and run in file
order: the first needs a socket nobody has connected to yet, and the last
purges the package.  The others leave the container as they found it.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .helpers import (
    HOST_ENV,
    INSTALLED_POEM,
    MODULES,
    PACKAGED_POEM,
    POEMS,
    PORT,
    PYTHON_DEFAULTS,
    REPO,
    SCRATCH,
    UNIT_DIRECTORY,
    UNITS,
    WAIT,
    ClientLoop,
    Container,
    Package,
    compiled_modules,
    journal_cursor,
    new_main_pid,
    repack,
    served_by_fastpoetry,
    sha256,
    started_service,
    uid_of,
    upstream_version,
    wait_until,
)

pytestmark = pytest.mark.system

ADMIN_POEM = "/etc/fastpoetry/poem.txt"


def unit_files(container: Container, *units: str) -> list[str]:
    """The file each unit was loaded from, as systemd says."""
    return [container.show(unit, "FragmentPath") for unit in units]


@contextmanager
def serving_admin_poem(container: Container, poem: bytes, settings: str = "", options: str = "") -> Iterator[None]:
    """Serve ``poem`` from /etc/fastpoetry, as the unit's comment says to.

    ExecStart= is replaced by a drop-in (with more command line ``options``
    and unit ``settings``, if given) and the service restarted; on the way
    out the drop-in and the poem go again and the service is restarted.
    """
    container.write(ADMIN_POEM, poem)
    try:
        exec_start = (f"[Service]\nExecStart=\nExecStart=/usr/bin/fastpoetry serve --poem {ADMIN_POEM} {options}\n"
                      f"{settings}")
        with container.drop_in("50-poem.conf", exec_start):
            container.reset_failed()
            container.run("systemctl", "restart", "fastpoetry.service")
            yield
    finally:
        container.run("rm", "-rf", "/etc/fastpoetry")


def reload_under_load(container: Container) -> None:
    """Change the admin's poem, ``systemctl reload`` while clients fetch.

    Every client gets the old or the new poem whole, none fails, and the new
    poem is served from the moment ``systemctl reload`` returns.
    """
    old = (POEMS / "lantern.txt").read_bytes()
    new = (POEMS / "long-winter.txt").read_bytes()
    with serving_admin_poem(container, old):
        assert container.fetch() == old
        pid = container.main_pid()
        with ClientLoop(container, [old, new], threads=4) as loop:
            loop.more(100)
            container.write(ADMIN_POEM, new)
            reload = container.run("systemctl", "reload", "fastpoetry.service", check=False)
            assert reload.returncode == 0, (
                f"systemctl reload failed ({reload.returncode}): {reload.stderr.decode(errors='replace')}\n"
                + "\n".join(container.journal().splitlines()[-8:])
            )
            assert container.fetch() == new, "systemctl reload returned before the new poem was served"
            loop.more(100)
            summary = loop.stop()
        assert summary["failed"] == 0, f"{summary['failed']} of {summary['ok'] + summary['failed']} fetches failed: {summary['errors']}"
        assert summary["digests"].get(sha256(new)), f"no client got the new poem: {summary}"
        assert container.main_pid() == pid, "the server was restarted, not reloaded"
        journal = container.wait_for_journal("reloading 1 poem", f"_PID={pid}")
        assert "received a reload request from PID " in journal, journal
        assert f"loaded a poem from: {ADMIN_POEM} ({len(new)} bytes)" in journal, journal


# ----------------------------------------------------------------------------


def test_socket_listens_and_service_waits_for_first_client(container: Container) -> None:
    """After boot fastpoetry.socket is enabled and listening, and no server runs yet."""
    failed = container.text("systemctl", "list-units", "--failed", "--plain", "--no-legend")
    assert "fastpoetry" not in failed, f"boot: {container.boot_state}; failed units:\n{failed}"
    assert container.text("systemctl", "is-enabled", "fastpoetry.socket") == "enabled"
    assert container.is_active("fastpoetry.socket") == "active"
    assert container.show("fastpoetry.socket", "SubState") == "listening"
    assert container.show("fastpoetry.socket", "Listen") == f"[::]:{PORT} (Stream)"
    assert container.is_active("fastpoetry.service") != "active"
    assert served_by_fastpoetry(container) == []


def test_client_gets_packaged_poem_from_unprivileged_service(container: Container) -> None:
    """A client gets the packaged poem exactly, from a server with no privileges."""
    poem = PACKAGED_POEM.read_bytes()
    assert container.fetch("127.0.0.1") == poem
    assert container.fetch("::1") == poem
    assert container.is_active("fastpoetry.service") == "active"
    pid = container.main_pid()
    status = container.status_of(pid)
    uid = uid_of(container, "fastpoetry")
    gid = container.text("getent", "group", "fastpoetry").split(":")[2]
    assert status["Uid"].split() == [uid] * 4
    assert status["Gid"].split() == [gid] * 4
    assert uid != "0" and gid != "0"
    for capabilities in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
        assert int(status[capabilities], 16) == 0, f"{capabilities}: {status[capabilities]}"
    assert status["NoNewPrivs"] == "1"
    assert [p["pid"] for p in served_by_fastpoetry(container)] == [str(pid)]
    # The poem is root's, and the whole file system is read-only to the
    # server (ProtectSystem=strict): to serve another poem, root changes it.
    assert container.text("stat", "-c", "%u %a", INSTALLED_POEM) == "0 644"
    mounts = [line.split() for line in container.read(f"/proc/{pid}/mountinfo").decode().splitlines()]
    root_options = [fields[5].split(",") for fields in mounts if fields[4] == "/"]
    assert root_options and "ro" in root_options[-1], "/ is not read-only to the server"


def test_package_installs_docs_and_an_account_without_home_or_shell(container: Container) -> None:
    """README, changelog, examples, man page and poems are installed; the account cannot log in."""
    listing = container.text("dpkg", "-L", "fastpoetry").splitlines()
    for path in (
        "/usr/share/doc/fastpoetry/README.md.gz",
        "/usr/share/doc/fastpoetry/changelog.gz",
        "/usr/share/doc/fastpoetry/copyright",
        # For several hosts behind HAProxy (README, "Several hosts").
        "/usr/share/doc/fastpoetry/examples/haproxy.cfg",
        "/usr/share/doc/fastpoetry/examples/fastpoetry-leave.service",
        "/usr/share/man/man8/fastpoetry.8.gz",
        INSTALLED_POEM,
        "/usr/lib/sysusers.d/fastpoetry.conf",
    ):
        assert path in listing, path
    name, _, uid, gid, _, home, shell = container.text("getent", "passwd", "fastpoetry").strip().split(":")
    assert (name, home, shell) == ("fastpoetry", "/nonexistent", "/usr/sbin/nologin")
    assert int(uid) < 1000 and container.text("getent", "group", "fastpoetry").split(":")[2] == gid


def test_journal_and_status_tell_the_startup_story(container: Container) -> None:
    """The journal and systemctl status tell what started and what is served; the unit scores safe."""
    size = PACKAGED_POEM.stat().st_size
    started_service(container)
    journal = container.wait_for_journal("ready: serving ")
    for line in (
        f"fastpoetry {upstream_version()} starting",
        "took 1 socket from systemd",
        f"loaded a poem from: {INSTALLED_POEM} ({size} bytes)",
        f"serving harbour-ledger.txt on [::]:{PORT}",
        "taking reload requests on /run/fastpoetry/control",
        f"ready: serving harbour-ledger.txt ({size} bytes) on 1 socket;",
    ):
        assert line in journal, f"no {line!r} in the journal:\n{journal}"
    status = container.text("systemctl", "status", "--no-pager", "--full", "fastpoetry.service")
    assert re.search(rf'Status: "Serving harbour-ledger\.txt \({size} bytes\) on 1 socket; \d+ poems? served"', status), status
    security = container.text("systemd-analyze", "security", "--no-pager", "fastpoetry.service")
    match = re.search(r"Overall exposure level for fastpoetry\.service: (\d+(?:\.\d+)?)", security)
    assert match, security
    assert float(match.group(1)) <= 1.0, security


#: The lines each suite's build leaves out of the services: systemd 252
#: (Debian 12) does not know the first two, and the third does their work
#: there (packaging/libexec/restart-delay).
LEFT_OUT = {
    "bookworm": ("RestartSteps=", "RestartMaxDelaySec="),
    "trixie": ("ExecStartPre=-/usr/libexec/fastpoetry/restart-delay ",),
}


def packaged_unit(unit: str, suite: str) -> bytes:
    """packaging/systemd/UNIT as the package built in ``suite`` installs it."""
    lines = (REPO / "packaging/systemd" / unit).read_bytes().splitlines(keepends=True)
    return b"".join(line for line in lines if not line.decode().startswith(LEFT_OUT[suite]))


def test_units_are_installed_where_the_suite_keeps_them(container: Container, suite: str) -> None:
    """Each unit is the package's file in the suite's unit directory; on 13 nothing is under /lib, /bin, /sbin."""
    files = container.text("dpkg-query", "-L", "fastpoetry").splitlines()
    for unit in UNITS:
        path = f"{UNIT_DIRECTORY[suite]}/{unit}"
        assert path in files, f"{path} is not in the package: {files}"
        assert container.text("dpkg-query", "-S", path) == f"fastpoetry: {path}"
        assert container.show(unit, "FragmentPath") == path
        assert container.read(path) == packaged_unit(unit, suite), f"{path} is not packaging/systemd/{unit} for {suite}"
    if suite != "bookworm":
        aliased = [f for f in files if f.split("/")[1] in ("lib", "bin", "sbin")]
        assert aliased == [], f"files under the aliased /lib, /bin or /sbin (DEP 17): {aliased}"


def test_modules_are_compiled_again_when_the_default_python_changes(container: Container) -> None:
    """The unit cannot write bytecode; a dpkg trigger compiles the modules when python3's defaults change.

    A 12 -> 13 upgrade may keep this package as it is while Python 3.13
    arrives: python3-minimal's debian_defaults then changes, and the
    trigger recompiles (test_dist_upgrade.py shows the real upgrade).
    """
    modules, compiled = compiled_modules(container)
    assert modules > 0 and compiled == modules, (modules, compiled)
    container.run("sh", "-c", 'rm -f "$1"/__pycache__/*.pyc', "sh", MODULES)
    assert compiled_modules(container) == (modules, 0)
    container.run("dpkg-trigger", "--no-await", PYTHON_DEFAULTS)
    container.run("dpkg", "--triggers-only", "--pending")
    assert container.text("dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "fastpoetry") == "ii"
    assert compiled_modules(container) == (modules, modules)


def test_installed_units_verify_clean(container: Container) -> None:
    """systemd-analyze verify finds nothing to say about the installed units."""
    done = container.run("systemd-analyze", "verify", *unit_files(container, "fastpoetry.socket", "fastpoetry.service"),
                         check=False)
    said = (done.stdout + done.stderr).decode(errors="replace")
    assert (done.returncode, said) == (0, ""), said


def test_reload_serves_new_poem_without_failed_clients(container: Container) -> None:
    """systemctl reload serves the changed poem; no client fails meanwhile."""
    reload_under_load(container)


#: How long a reload is watched while the server is stopped (SIGSTOP).  Not a
#: speed limit: a reload that waits for the server cannot end at all while
#: it is stopped (kill -HUP, the unit's ExecReload= of 0.2.0, ended at once).
STOPPED_SECONDS = 5.0


def test_reload_returns_once_new_poem_is_served(container: Container) -> None:
    """systemctl reload does not return before the server has re-read the poem."""
    old = (POEMS / "lantern.txt").read_bytes()
    new = (POEMS / "long-winter.txt").read_bytes()
    # No watchdog: it would kill the stopped server.
    with serving_admin_poem(container, old, settings="WatchdogSec=0\n"):
        pid = container.main_pid()
        container.write(ADMIN_POEM, new)
        # A stopped server stands for one that is slow to get to the signal.
        container.run("sh", "-c", 'kill -STOP "$1"', "sh", str(pid))
        reload = subprocess.Popen(
            container.command("systemctl", "reload", "fastpoetry.service"),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=HOST_ENV,
        )
        try:
            try:
                reload.wait(timeout=STOPPED_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            returned_while_stopped = reload.returncode is not None
        finally:
            container.run("sh", "-c", 'kill -CONT "$1"', "sh", str(pid))
            output = reload.communicate(timeout=WAIT)[0].decode(errors="replace")
        assert reload.returncode == 0, output
        assert not returned_while_stopped, (
            "systemctl reload returned while the server was stopped, before it could re-read the poem"
        )
        assert container.fetch() == new
        assert container.main_pid() == pid


def big_poem(seed: str, size: int = 15 << 20) -> bytes:
    """A UTF-8 poem of ``size`` bytes (15 MiB: under the 16 MiB --max-poem-size) whose lines say ``seed``."""
    line = f"{seed}: the tide goes out past the harbour wall and takes the ledger's ink\n".encode()
    return (line * (size // len(line) + 1))[: size - 1] + b"\n"


def reload_said(done: subprocess.CompletedProcess[bytes], container: Container, unit: str = "fastpoetry.service") -> str:
    """What a failed ``systemctl reload`` said, with the unit's last journal lines."""
    journal = container.journal(unit=unit).splitlines()[-6:]
    return f"exit {done.returncode}: {(done.stdout + done.stderr).decode(errors='replace')}\n" + "\n".join(journal)


#: Every reload test runs with the server on its own and with two workers.
WITH_AND_WITHOUT_WORKERS = pytest.mark.parametrize("options", ["", "--workers 2"], ids=["1-process", "2-workers"])


@WITH_AND_WITHOUT_WORKERS
def test_ten_reloads_of_a_changed_15_mib_poem_each_serve_it_at_once(container: Container, options: str) -> None:
    """10 reloads in a row, each of a changed 15 MiB poem: each systemctl reload exits 0 and the
    very next fetch (no retry, no wait) is the new poem, whichever worker serves it."""
    poems = [big_poem(f"version {n}") for n in range(11)]
    with serving_admin_poem(container, poems[0], options=options):
        assert sha256(container.fetch()) == sha256(poems[0])
        pid = container.main_pid()
        for n, poem in enumerate(poems[1:], 1):
            container.write(ADMIN_POEM, poem)
            reload = container.run("systemctl", "reload", "fastpoetry.service", check=False)
            assert reload.returncode == 0, f"reload {n}: {reload_said(reload, container)}"
            assert sha256(container.fetch()) == sha256(poem), f"reload {n}: the old poem right after systemctl reload"
        assert container.main_pid() == pid
        assert container.show("fastpoetry.service", "ReloadResult") == "success"


@WITH_AND_WITHOUT_WORKERS
def test_a_poem_that_cannot_be_loaded_fails_the_reload_and_the_service_goes_on(
    container: Container, options: str
) -> None:
    """An empty poem: systemctl reload fails, and systemctl status names the file; the service
    stays active with the same main PID and no restart, serving the last good poem. Putting a
    good poem back, the next reload succeeds and the next fetch is that poem."""
    good = (POEMS / "lantern.txt").read_bytes()
    fixed = (POEMS / "long-winter.txt").read_bytes()
    with serving_admin_poem(container, good, options=options):
        assert container.fetch() == good
        pid = container.main_pid()
        restarts = container.show("fastpoetry.service", "NRestarts")
        container.write(ADMIN_POEM, b"")
        # 30 s: a hang guard; the failure comes in moments.
        reload = container.run("systemctl", "reload", "fastpoetry.service", check=False, timeout=30)
        assert reload.returncode != 0, reload_said(reload, container)
        assert container.show("fastpoetry.service", "ReloadResult") == "exit-code"
        assert container.is_active("fastpoetry.service") == "active"
        assert (container.main_pid(), container.show("fastpoetry.service", "NRestarts")) == (pid, restarts)
        assert container.fetch() == good
        status = container.text("systemctl", "status", "--no-pager", "--full", "fastpoetry.service", check=False)
        reason = f"cannot load a poem from {ADMIN_POEM}: the file is empty"
        assert f"last reload failed: {reason}" in status, status  # the Status: line
        # Below it, the log: the command's own line (the journal may take a moment).
        container.wait_for_journal(f"fastpoetry reload: reload failed, still serving the poems loaded before: {reason}")
        container.write(ADMIN_POEM, fixed)
        reload = container.run("systemctl", "reload", "fastpoetry.service", check=False, timeout=30)
        assert reload.returncode == 0, reload_said(reload, container)
        assert container.fetch() == fixed
        assert container.main_pid() == pid
        assert "last reload failed" not in container.show("fastpoetry.service", "StatusText")


def test_two_reloads_at_once_both_tell_the_truth(container: Container) -> None:
    """Two systemctl reload at the same moment: with a good poem both succeed and the new poem
    is served; with a broken one both fail. Neither is answered by a reload that began before
    the file changed."""
    first = (POEMS / "lantern.txt").read_bytes()
    second = (POEMS / "long-winter.txt").read_bytes()
    with serving_admin_poem(container, first):
        for poem, ok in ((second, True), (b"", False)):
            container.write(ADMIN_POEM, poem)
            racers = [subprocess.Popen(container.command("systemctl", "reload", "fastpoetry.service"),
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       env=HOST_ENV) for _ in range(2)]
            outputs = [racer.communicate(timeout=WAIT)[0].decode(errors="replace") for racer in racers]
            codes = [racer.returncode for racer in racers]
            if ok:
                assert codes == [0, 0], outputs
            else:
                assert 0 not in codes, outputs
            assert container.fetch() == second
            assert container.is_active("fastpoetry.service") == "active"


def test_a_reload_that_hangs_is_ended_by_the_units_timeout(container: Container) -> None:
    """A server that cannot answer (stopped, SIGSTOP) stands for a reload that hangs: systemctl
    reload fails once TimeoutStartSec= has passed, and the journal says why. The service goes
    on, and the request that systemd gave up on is not carried out later: the failure was true."""
    old = (POEMS / "lantern.txt").read_bytes()
    new = (POEMS / "long-winter.txt").read_bytes()
    # No watchdog: it would kill the stopped server.
    with serving_admin_poem(container, old, settings="WatchdogSec=0\nTimeoutStartSec=10s\n"):
        pid = container.main_pid()
        container.write(ADMIN_POEM, new)
        container.run("sh", "-c", 'kill -STOP "$1"', "sh", str(pid))
        try:
            reload = container.run("systemctl", "reload", "fastpoetry.service", check=False)
        finally:
            container.run("sh", "-c", 'kill -CONT "$1"', "sh", str(pid))
        assert reload.returncode != 0, reload_said(reload, container)
        assert container.show("fastpoetry.service", "ReloadResult") == "timeout"
        container.wait_for_journal("fastpoetry.service: Reload operation timed out. Killing reload process.")
        container.wait_for_journal("it has given up waiting (under systemd: the reload took longer "
                                   "than the unit's TimeoutStartSec=, and systemd said it failed)")
        assert container.is_active("fastpoetry.service") == "active" and container.main_pid() == pid
        assert container.fetch() == old
        reload = container.run("systemctl", "reload", "fastpoetry.service", check=False)
        assert reload.returncode == 0, reload_said(reload, container)
        assert container.fetch() == new


#: Clients of the kill -9 test, each fetching one poem after another.
KILL_CLIENTS = 2


def test_kill_9_refuses_no_client_and_cuts_no_poem(container: Container) -> None:
    """kill -9 of the server while clients fetch: none is refused, none gets part of a poem.

    Connections waiting in the socket's queue belong to the socket, which
    systemd holds: the restarted server serves them.  Those the killed
    process had accepted die with it, and the kernel closes them.  Each
    client holds one connection at a time, so at most KILL_CLIENTS fetches
    end with nothing at all (never a part: a poem this size goes to the
    kernel in one send, before which the client has no byte, after which it
    gets all of it).  Every other fetch gets the whole poem.
    """
    container.reset_failed()
    old = started_service(container)
    restarts = int(container.show("fastpoetry.service", "NRestarts"))
    with ClientLoop(container, [PACKAGED_POEM.read_bytes()], threads=KILL_CLIENTS) as loop:
        loop.wait_for(200)
        container.run("sh", "-c", 'kill -9 "$1"', "sh", str(old))
        new = new_main_pid(container, old)
        loop.more(300)
        summary = loop.stop()
    total = summary["ok"] + summary["failed"]
    cut = summary["failed"] - summary["empty"]
    assert cut == 0, f"{cut} of {total} fetches were refused, reset or got part of a poem: {summary['errors']}"
    assert summary["empty"] <= KILL_CLIENTS, f"more fetches ended empty than connections were held: {summary}"
    assert total >= 500, summary
    assert new != old
    assert int(container.show("fastpoetry.service", "NRestarts")) == restarts + 1


def test_restart_under_load_loses_no_client(container: Container) -> None:
    """systemctl restart, three times, while clients fetch: no fetch fails."""
    container.reset_failed()
    pids = [started_service(container)]
    with ClientLoop(container, [PACKAGED_POEM.read_bytes()], threads=4) as loop:
        for _ in range(3):
            loop.more(150)
            container.run("systemctl", "restart", "fastpoetry.service")
            pids.append(new_main_pid(container, pids[-1]))
        loop.more(150)
        summary = loop.stop()
    total = summary["ok"] + summary["failed"]
    assert summary["failed"] == 0, f"{summary['failed']} of {total} fetches failed across 3 restarts: {summary['errors']}"
    assert len(set(pids)) == 4, pids


#: The idle clients of issue 5, case 2.
IDLE_CLIENTS = 10_000

#: Each phase of HOLD_IDLE (opening the idle clients, the fresh fetches) gives
#: up after this many seconds: a hang guard, not a speed limit.  Longer would
#: not help: the server drops an idle client 30 s (--send-timeout) after it
#: has its poem.
HOLD_WAIT = 60.0

#: argv: PORT COUNT SERVER_PID TIMEOUT POEM_SHA256.  Opens COUNT clients that
#: never read, waits until each has its poem, fetches the poem with 3 fresh
#: clients one after another and 5 at once while holding them, closes them
#: all and prints a JSON report.  It reports instead of failing, so that the
#: test says what went wrong.
HOLD_IDLE = r"""
import base64, errno, hashlib, json, os, resource, select, socket, sys, threading, time
port, count, pid, timeout, digest = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
# Well under the listen backlog (SOMAXCONN): a full accept queue drops SYNs,
# which are retried only a second or more later.
BATCH = 500
# A descriptor per client: root here, so the hard limit may be raised too.
need = count + 1024
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < need:
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))

def server_fds():
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return -1  # the server is gone

def fetch(deadline):
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=max(deadline - started, 0.001)) as sock:
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - started}
    return {"poem": base64.b64encode(b"".join(chunks)).decode(), "seconds": time.monotonic() - started}

report = {"server_fds_before": server_fds(), "errors": []}
clients = []
poller = select.epoll()
started = time.monotonic()
deadline = started + timeout
# A client turns readable once the server has accepted it and sent the poem.
while len(clients) < count and time.monotonic() < deadline:
    waiting = {}
    for _ in range(min(BATCH, count - len(clients))):
        sock = socket.socket()
        sock.setblocking(False)
        clients.append(sock)
        status = sock.connect_ex(("127.0.0.1", port))
        if status not in (0, errno.EINPROGRESS):
            report["errors"].append(f"connect: {os.strerror(status)}")
            continue
        poller.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        waiting[sock.fileno()] = sock
    while waiting and (left := deadline - time.monotonic()) > 0:
        for fd, events in poller.poll(min(left, 1.0)):
            sock = waiting.pop(fd)
            poller.unregister(fd)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if events & select.EPOLLERR or error:
                report["errors"].append(f"an idle client failed: {os.strerror(error)}")
    if waiting:
        report["errors"].append(f"{len(waiting)} of {count} idle clients had no poem after {timeout:g} s")
        break
report["setup_seconds"] = time.monotonic() - started
# Looked at, not read (MSG_PEEK): the whole poem waits in each idle client.
with_poem = 0
for sock in clients:
    try:
        data = sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        continue
    with_poem += hashlib.sha256(data).hexdigest() == digest
report["idle_with_poem"] = with_poem
report["server_fds_held"] = server_fds()

fetches_end = time.monotonic() + timeout
report["sequential"] = [fetch(fetches_end) for _ in range(3)]
concurrent = [None] * 5
def fetch_into(index):
    concurrent[index] = fetch(fetches_end)
threads = [threading.Thread(target=fetch_into, args=(index,)) for index in range(len(concurrent))]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
report["concurrent"] = concurrent
report["server_fds_after_fetches"] = server_fds()
for sock in clients:
    sock.close()
print(json.dumps(report))
"""


#: The packaged ExecStart=, keeping every client until it closes: a quiet
#: client that has its poem is otherwise closed at once (--linger auto), and
#: idle clients would cost the service no descriptor to hold.
ALWAYS_LINGER = (
    "[Service]\nExecStart=\n"
    "ExecStart=/usr/bin/fastpoetry serve --poem /usr/share/fastpoetry/poems/harbour-ledger.txt --linger always\n"
)


def test_fresh_client_gets_poem_while_10000_idle_clients_are_held(container: Container) -> None:
    """With 10,000 idle clients held by the socket-activated service (its unit
    raises LimitNOFILE=; --linger always makes it hold each one), fresh
    clients still get the whole poem; nothing is logged about accepting, the
    service is neither restarted nor replaced, and it gives every descriptor
    back once the idle clients close.
    """
    container.reset_failed()
    with container.drop_in("50-linger.conf", ALWAYS_LINGER):
        container.run("systemctl", "restart", "fastpoetry.service")
        _hold_10000_idle_clients(container)


def _hold_10000_idle_clients(container: Container) -> None:
    poem = PACKAGED_POEM.read_bytes()
    pid = started_service(container)
    restarts = container.show("fastpoetry.service", "NRestarts")
    baseline = container.open_fds(pid)
    cursor = journal_cursor(container)

    done = container.python(
        HOLD_IDLE, str(PORT), str(IDLE_CLIENTS), str(pid), str(HOLD_WAIT), sha256(poem), timeout=3 * HOLD_WAIT,
    )
    report = json.loads(done.stdout)
    fresh = report["sequential"] + report["concurrent"]
    limits = container.run("cat", f"/proc/{pid}/limits", check=False).stdout.decode()
    print(
        f"\n{report['idle_with_poem']} idle clients served in {report['setup_seconds']:.2f} s; server descriptors: "
        f"{report['server_fds_before']} before, {report['server_fds_held']} held, "
        f"{report['server_fds_after_fetches']} after the fresh fetches; fresh fetches (ms): "
        + ", ".join(f"{f['seconds'] * 1000:.1f}" for f in fresh)
        + "\n" + next((line for line in limits.splitlines() if line.startswith("Max open files")), "(no limits: gone)")
    )
    container.run("journalctl", "--sync")
    journal = container.text("journalctl", "--no-pager", "-o", "cat", "--after-cursor", cursor, "-u", "fastpoetry.service")
    assert report["errors"] == [], f"{report['errors']}\njournal:\n{journal}"
    assert report["idle_with_poem"] == IDLE_CLIENTS, journal
    # Every idle client was held, by a descriptor of the server, before and
    # after the fresh clients were served: they were served alongside.
    assert report["server_fds_held"] >= baseline + IDLE_CLIENTS, f"{report}\njournal:\n{journal}"
    assert report["server_fds_after_fetches"] >= baseline + IDLE_CLIENTS, f"{report}\njournal:\n{journal}"
    for fetched in fresh:
        assert "error" not in fetched, f"{fetched}\njournal:\n{journal}"
        # Read to the end of the stream without a reset: whole poem, clean EOF.
        assert base64.b64decode(fetched["poem"]) == poem, f"{len(base64.b64decode(fetched['poem']))} bytes"
    assert "cannot accept" not in journal, journal
    warnings = container.text("journalctl", "--no-pager", "-o", "cat", "--after-cursor", cursor, "-p", "warning", f"_PID={pid}")
    assert warnings == "", warnings

    # The idle clients have closed: the server lets go of their descriptors.
    wait_until(lambda: container.open_fds(pid) <= baseline, f"the server back to {baseline} descriptors")
    assert container.is_active("fastpoetry.service") == "active"
    assert container.main_pid() == pid
    assert container.show("fastpoetry.service", "NRestarts") == restarts
    assert container.fetch() == poem


def test_watchdog_restarts_stuck_service(container: Container) -> None:
    """A server whose event loop stops is killed by the watchdog and restarted; a waiting client gets its poem."""
    container.reset_failed()
    watchdog = "[Service]\nWatchdogSec=2s\nTimeoutAbortSec=2s\n"
    with container.drop_in("60-watchdog.conf", watchdog):
        container.run("systemctl", "restart", "fastpoetry.service")
        old = started_service(container)
        container.wait_for_journal("pinging the systemd watchdog every 1 s")
        container.run("sh", "-c", 'kill -STOP "$1"', "sh", str(old))
        waiting = container.fetch_later()
        try:
            new = new_main_pid(container, old)
            poem, error = waiting.communicate(timeout=60)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.communicate()
        assert poem == PACKAGED_POEM.read_bytes(), error.decode(errors="replace")
        assert container.fetch() == PACKAGED_POEM.read_bytes()
        journal = container.wait_for_journal("Watchdog timeout")
        assert "Failed with result 'watchdog'" in journal, journal
        assert container.main_pid() == new


def test_stop_leaves_socket_listening(container: Container) -> None:
    """systemctl stop fastpoetry.service keeps the socket; the next client starts the server again."""
    container.reset_failed()
    old = started_service(container)
    container.run("systemctl", "stop", "fastpoetry.service")
    assert container.is_active("fastpoetry.service") == "inactive"
    assert container.is_active("fastpoetry.socket") == "active"
    assert container.show("fastpoetry.socket", "SubState") == "listening"
    assert served_by_fastpoetry(container) == []
    assert container.fetch() == PACKAGED_POEM.read_bytes()
    assert container.is_active("fastpoetry.service") == "active"
    assert container.main_pid() not in (0, old)


def test_upgrade_keeps_serving(container: Container, package: Package, tmp_path: Path) -> None:
    """Upgrading the package while clients fetch: none fails, the socket stays, the new code serves."""
    container.reset_failed()
    upgrade = repack(package, tmp_path, f"{package.version}+test1")
    container.write(f"{SCRATCH}/{upgrade.path.name}", upgrade.path.read_bytes())
    started_service(container)
    socket_before = {p: container.show("fastpoetry.socket", p) for p in ("ActiveEnterTimestamp", "InvocationID")}
    with ClientLoop(container, [PACKAGED_POEM.read_bytes()], threads=2) as loop:
        loop.more(200)
        container.run("apt-get", "install", "-y", f"{SCRATCH}/{upgrade.path.name}", timeout=600)
        loop.more(200)
        summary = loop.stop()
    total = summary["ok"] + summary["failed"]
    assert summary["failed"] == 0, f"{summary['failed']} of {total} fetches failed during the upgrade: {summary['errors']}"
    assert container.text("dpkg-query", "-W", "-f", "${Version}", "fastpoetry") == upgrade.version
    socket_after = {p: container.show("fastpoetry.socket", p) for p in socket_before}
    assert socket_after == socket_before, "fastpoetry.socket was restarted by the upgrade"
    assert container.is_active("fastpoetry.socket") == "active"
    pid = started_service(container)
    assert f"fastpoetry {upgrade.version} starting" in container.journal(f"_PID={pid}"), (
        "the server running after the upgrade is not the new code:\n" + container.journal(f"_PID={pid}")
    )


def test_bad_poem_fails_once_and_status_says_why(container: Container) -> None:
    """A poem the service cannot read: it fails, is not restarted, and systemctl status says why."""
    missing = "/etc/fastpoetry/missing.txt"
    exec_start = f"[Service]\nExecStart=\nExecStart=/usr/bin/fastpoetry serve --poem {missing}\n"
    with container.drop_in("50-bad-poem.conf", exec_start):
        container.reset_failed()
        container.run("systemctl", "stop", "fastpoetry.service")
        started = container.run("systemctl", "start", "fastpoetry.service", check=False)
        assert started.returncode != 0
        wait_until(lambda: container.is_active("fastpoetry.service") == "failed", "the service to fail")
        assert container.show("fastpoetry.service", "ExecMainStatus") == "1"
        assert container.show("fastpoetry.service", "NRestarts") == "0"
        status = container.text("systemctl", "status", "--no-pager", "fastpoetry.service", check=False)
        reason = f"cannot load a poem from {missing}: no such file or directory"
        assert f"Failed to start: {reason}" in status, status
        assert reason in container.journal()
        assert container.is_active("fastpoetry.socket") == "active"
    container.reset_failed()
    assert container.fetch() == PACKAGED_POEM.read_bytes()


def test_bad_poem_started_by_a_client_fails_once_and_the_socket_keeps_listening(
    container: Container,
) -> None:
    """Socket-triggered start with a bad poem: one attempt, not five, and no dead socket.

    The server closes the client that triggered it; otherwise that queued
    connection makes systemd start the service again at once until the start
    limit fails the socket unit as well, and nothing listens until an
    administrator resets it.  Once the poem file exists, the next client is
    served without any systemctl command.
    """
    poem = "/etc/fastpoetry/later.txt"
    exec_start = f"[Service]\nExecStart=\nExecStart=/usr/bin/fastpoetry serve --poem {poem}\n"
    with container.drop_in("50-later-poem.conf", exec_start):
        container.run("systemctl", "stop", "fastpoetry.service")
        container.reset_failed()
        # Any version: the upgrade test installed another one before.
        starting = re.compile(r"^fastpoetry \S+ starting$", re.MULTILINE)
        started_before = len(starting.findall(container.journal("--identifier=fastpoetry")))
        client = container.fetch_later()
        reply, errors = client.communicate(timeout=WAIT)
        # Closed without a poem, not reset by a socket unit that failed.
        assert (client.returncode, reply) == (0, b""), errors.decode(errors="replace")
        wait_until(lambda: container.is_active("fastpoetry.service") == "failed", "the service to fail")
        journal = container.journal("--identifier=fastpoetry")
        assert len(starting.findall(journal)) == started_before + 1, journal
        assert "closed 1 connection waiting on [::]:10000 without a poem: cannot start" in journal
        assert f"cannot load a poem from {poem}: no such file or directory" in journal
        assert container.is_active("fastpoetry.socket") == "active"
        assert container.show("fastpoetry.socket", "Result") == "success"

        container.write(poem, PACKAGED_POEM.read_bytes())
        try:
            assert container.fetch() == PACKAGED_POEM.read_bytes()
            assert container.is_active("fastpoetry.service") == "active"
        finally:
            container.run("rm", "-f", poem)


#: The second socket unit of test_two_poems_on_two_ports_from_one_process.
SECOND_SOCKET = "fastpoetry-second.socket"
SECOND_PORT = 10002


def listening_ports(container: Container) -> set[int]:
    """The TCP ports something listens on inside."""
    return {int(port) for port in container.python(LISTENERS).stdout.decode().split()}


@contextmanager
def second_socket(container: Container, port: int, name: str) -> Iterator[None]:
    """A second socket unit for fastpoetry.service, started; stopped and removed afterwards."""
    path = f"/etc/systemd/system/{SECOND_SOCKET}"
    unit = (
        "[Unit]\nDescription=a second socket of the fast poetry server (tests)\n\n"
        f"[Socket]\nListenStream={port}\nFileDescriptorName={name}\nService=fastpoetry.service\n"
    )
    container.write(path, unit.encode())
    container.run("systemctl", "daemon-reload")
    try:
        # systemd refuses to start a socket whose Service= is running
        # ("Socket service ... already active, refusing"), and a running
        # server would not get the new socket anyway.
        container.run("systemctl", "stop", "fastpoetry.service")
        started = container.run("systemctl", "start", SECOND_SOCKET, check=False)
        assert started.returncode == 0, container.text("journalctl", "--no-pager", "-o", "cat", "-u", SECOND_SOCKET)
        yield
    finally:
        container.run("systemctl", "stop", SECOND_SOCKET, check=False)
        container.run("rm", "-f", path)
        container.run("systemctl", "daemon-reload")
        container.run("systemctl", "reset-failed", SECOND_SOCKET, check=False)


def test_two_poems_on_two_ports_from_one_process(container: Container) -> None:
    """Two socket units, one service: a socket named "second" serves --poem second=FILE,
    fastpoetry.socket the unnamed --poem, both from one process that took 2 sockets;
    a client on either starts it; systemctl reload re-reads both poems.
    """
    ledger, lantern, winter = ((POEMS / name).read_bytes() for name in ("harbour-ledger.txt", "lantern.txt", "long-winter.txt"))
    first, second = "/etc/fastpoetry/first.txt", "/etc/fastpoetry/second.txt"
    container.write(first, ledger)
    container.write(second, lantern)
    exec_start = f"[Service]\nExecStart=\nExecStart=/usr/bin/fastpoetry serve --poem {first} --poem second={second}\n"
    try:
        with container.drop_in("50-two-poems.conf", exec_start), second_socket(container, SECOND_PORT, "second"):
            container.reset_failed()
            assert container.is_active("fastpoetry.service") == "inactive"
            assert {PORT, SECOND_PORT} <= listening_ports(container)
            # A client of the second socket starts the service, with both sockets.
            assert container.fetch(port=SECOND_PORT) == lantern
            pid = container.main_pid()
            assert pid and container.is_active("fastpoetry.service") == "active"
            assert container.fetch(port=PORT) == ledger
            assert container.fetch("::1", port=SECOND_PORT) == lantern
            assert container.main_pid() == pid
            assert [p["pid"] for p in served_by_fastpoetry(container)] == [str(pid)]
            journal = container.wait_for_journal("ready: ", f"_PID={pid}")
            for line in (
                "took 2 sockets from systemd",
                f"loaded a poem from: {first} ({len(ledger)} bytes)",
                f"loaded a poem from: {second} ({len(lantern)} bytes)",
                f"on [::]:{PORT}",
                f"on [::]:{SECOND_PORT}",
            ):
                assert line in journal, f"no {line!r} in the journal:\n{journal}"

            container.write(first, lantern)
            container.write(second, winter)
            container.run("systemctl", "reload", "fastpoetry.service")
            # It returns once both new poems are served.
            assert (container.fetch(port=PORT), container.fetch(port=SECOND_PORT)) == (lantern, winter)
            assert container.main_pid() == pid, "the server was restarted, not reloaded"
            journal = container.wait_for_journal(f"loaded a poem from: {second} ({len(winter)} bytes)", f"_PID={pid}")
            assert "reloading 2 poems" in journal, journal
            assert f"loaded a poem from: {first} ({len(lantern)} bytes)" in journal, journal
    finally:
        container.run("rm", "-rf", "/etc/fastpoetry")
    # As before: one socket, the packaged poem.
    assert container.run("test", "-e", f"/etc/systemd/system/{SECOND_SOCKET}", check=False).returncode != 0
    assert SECOND_PORT not in listening_ports(container)
    assert container.fetch() == PACKAGED_POEM.read_bytes()
    pid = container.main_pid()
    assert "took 1 socket from systemd" in container.journal(f"_PID={pid}")


# ----------------------------------------------------------------------------
# The proxy: fastpoetry-proxy.socket and fastpoetry-proxy.service

PROXY = "fastpoetry-proxy.service"
PROXY_SOCKET = "fastpoetry-proxy.socket"
PROXY_PORT = 10001
#: The packaged unit's upstream: the local fastpoetry server, by its address.
#: The Debian 12 box has no /etc/hosts (debootstrap writes none there), so
#: "localhost" would not resolve: the unit names no host to look up.
UPSTREAM = "127.0.0.1:10000"


@contextmanager
def proxy_enabled(container: Container) -> Iterator[None]:
    """``systemctl enable --now fastpoetry-proxy.socket``, as the README says;
    afterwards the proxy is disabled and stopped, and the server's socket runs.
    """
    container.run("systemctl", "reset-failed", PROXY, PROXY_SOCKET, check=False)
    container.run("systemctl", "enable", "--now", PROXY_SOCKET)
    try:
        yield
    finally:
        container.run("systemctl", "disable", "--now", PROXY_SOCKET)
        container.run("systemctl", "stop", PROXY)
        container.run("systemctl", "reset-failed", PROXY, PROXY_SOCKET, check=False)
        container.run("systemctl", "start", "fastpoetry.socket")
        container.reset_failed()


def new_proxy_pid(container: Container, old: int) -> int:
    """Wait until the proxy is active again with a main process other than ``old``."""

    def changed() -> int:
        pid = container.main_pid(PROXY)
        return pid if pid not in (0, old) and container.is_active(PROXY) == "active" else 0

    return wait_until(changed, f"a new main process of {PROXY} (old: {old})")


def test_proxy_is_installed_but_not_enabled_and_verifies_clean(container: Container) -> None:
    """The package installs the proxy's units without enabling or starting them; they
    verify clean, and systemd-analyze security rates the proxy 1.1 (the server: 0.2).
    """
    for unit in (PROXY_SOCKET, PROXY):
        assert container.show(unit, "LoadState") == "loaded", unit
        assert container.is_active(unit) == "inactive", unit
    assert container.text("systemctl", "is-enabled", PROXY_SOCKET, check=False) == "disabled"
    assert container.text("systemctl", "is-enabled", PROXY, check=False) == "static"
    assert PROXY_PORT not in listening_ports(container)
    done = container.run("systemd-analyze", "verify", *unit_files(container, PROXY_SOCKET, PROXY), check=False)
    said = (done.stdout + done.stderr).decode(errors="replace")
    assert (done.returncode, said) == (0, ""), said
    security = container.text("systemd-analyze", "security", "--no-pager", PROXY)
    match = re.search(rf"Overall exposure level for {re.escape(PROXY)}: (\d+(?:\.\d+)?)", security)
    assert match, security
    assert float(match.group(1)) <= 1.1, security


def test_proxy_serves_the_local_poem_and_its_cache_while_the_server_is_down(container: Container) -> None:
    """Enabled, the proxy on port 10001 serves the local server's poem, as user
    fastpoetry; with the server stopped it serves its cached poem and warns; started
    with the server stopped it closes clients at once and says why; once the server
    is back, a reload fetches the poem again.
    """
    poem = PACKAGED_POEM.read_bytes()
    container.reset_failed()
    with proxy_enabled(container):
        assert container.text("systemctl", "is-enabled", PROXY_SOCKET) == "enabled"
        assert container.show(PROXY_SOCKET, "Listen") == f"[::]:{PROXY_PORT} (Stream)"
        # Socket-activated: nothing runs before the first client.
        assert container.is_active(PROXY) == "inactive"
        assert container.fetch(port=PROXY_PORT) == poem
        assert container.fetch("::1", port=PROXY_PORT) == poem
        assert container.is_active(PROXY) == "active"
        pid = container.main_pid(PROXY)
        status = container.status_of(pid)
        uid = uid_of(container, "fastpoetry")
        assert status["Uid"].split() == [uid] * 4 and uid != "0"
        assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"] == "1"
        journal = container.wait_for_journal(f"fetched a poem from upstream {UPSTREAM} ({len(poem)} bytes)", unit=PROXY)
        assert "took 1 socket from systemd" in journal, journal

        # The upstream goes away: socket and service.  A reload fetches at
        # once, and fails (see the proxy's own reload test).
        container.run("systemctl", "stop", "fastpoetry.socket", "fastpoetry.service")
        assert PORT not in listening_ports(container)
        assert container.run("systemctl", "reload", PROXY, check=False).returncode != 0
        journal = container.wait_for_journal(f"upstream {UPSTREAM} is unreachable", f"_PID={pid}")
        assert f"still serving the cached poem ({len(poem)} bytes" in journal, journal
        warnings = container.text("journalctl", "--no-pager", "-o", "cat", "-p", "warning", f"_PID={pid}")
        assert f"upstream {UPSTREAM} is unreachable" in warnings, warnings
        assert container.fetch(port=PROXY_PORT) == poem
        assert container.main_pid(PROXY) == pid and container.is_active(PROXY) == "active"
        wait_until(lambda: "; upstream failing: " in container.show(PROXY, "StatusText"), "systemctl status to say why")

        # A proxy that starts while the upstream is down has nothing to serve:
        # each client is closed at once, without a byte, and the journal says why.
        container.run("systemctl", "restart", PROXY)
        new = new_proxy_pid(container, pid)
        container.wait_for_journal(f"no poem from upstream {UPSTREAM} yet", f"_PID={new}")
        client = container.fetch_later(port=PROXY_PORT)
        reply, errors = client.communicate(timeout=WAIT)
        assert (client.returncode, reply) == (0, b""), errors.decode(errors="replace")
        journal = container.wait_for_journal("no poem to serve yet: closed", f"_PID={new}")
        assert f"on [::]:{PROXY_PORT} without one" in journal, journal
        assert container.main_pid(PROXY) == new and container.is_active(PROXY) == "active"
        assert container.show(PROXY, "StatusText").startswith(f"Waiting for a poem from upstream {UPSTREAM}: ")

        # The upstream is back: the next fetch (now, on reload) serves its poem.
        container.run("systemctl", "start", "fastpoetry.socket")
        container.run("systemctl", "reload", PROXY)
        assert container.fetch(port=PROXY_PORT) == poem
        container.wait_for_journal(f"fetched a poem from upstream {UPSTREAM} ({len(poem)} bytes)", f"_PID={new}")
        assert container.main_pid(PROXY) == new
    assert container.is_active(PROXY_SOCKET) == "inactive" and container.is_active(PROXY) == "inactive"
    assert container.text("systemctl", "is-enabled", PROXY_SOCKET, check=False) == "disabled"
    assert PROXY_PORT not in listening_ports(container)
    assert container.fetch() == poem


def test_proxy_reload_fails_while_the_upstream_is_down_and_serves_its_new_poem_once_back(
    container: Container,
) -> None:
    """For the proxy a reload is a fetch: with the upstream down it fails, systemctl status says
    why, and the cached poem is served on; with the upstream back it succeeds, and the very next
    client gets the upstream's new poem."""
    first = (POEMS / "lantern.txt").read_bytes()
    second = (POEMS / "long-winter.txt").read_bytes()
    with serving_admin_poem(container, first), proxy_enabled(container):
        assert container.fetch(port=PROXY_PORT) == first
        pid = container.main_pid(PROXY)
        restarts = container.show(PROXY, "NRestarts")
        container.run("systemctl", "stop", "fastpoetry.socket", "fastpoetry.service")
        reload = container.run("systemctl", "reload", PROXY, check=False, timeout=30)
        assert reload.returncode != 0, reload_said(reload, container, PROXY)
        assert "upstream failing: " in container.show(PROXY, "StatusText")
        container.wait_for_journal(f"fastpoetry reload: reload failed, still serving the poems loaded before: "
                                   f"upstream {UPSTREAM}", unit=PROXY)
        assert container.fetch(port=PROXY_PORT) == first
        assert container.is_active(PROXY) == "active"
        assert (container.main_pid(PROXY), container.show(PROXY, "NRestarts")) == (pid, restarts)
        container.write(ADMIN_POEM, second)
        container.run("systemctl", "start", "fastpoetry.socket")
        reload = container.run("systemctl", "reload", PROXY, check=False, timeout=30)
        assert reload.returncode == 0, reload_said(reload, container, PROXY)
        assert container.fetch(port=PROXY_PORT) == second


def test_upgrade_keeps_an_enabled_proxy_listening_and_moves_it_to_the_new_code(
    container: Container, package: Package, tmp_path: Path
) -> None:
    """Upgrading the package with the proxy enabled and running: its socket is not
    restarted and stays enabled, and the proxy runs the new code afterwards.
    """
    poem = PACKAGED_POEM.read_bytes()
    # Newer than the upgrade test's +test1, and than the package.
    upgrade = repack(package, tmp_path, f"{package.version}+test2")
    container.write(f"{SCRATCH}/{upgrade.path.name}", upgrade.path.read_bytes())
    with proxy_enabled(container):
        assert container.fetch(port=PROXY_PORT) == poem
        old = container.main_pid(PROXY)
        socket_before = {p: container.show(PROXY_SOCKET, p) for p in ("ActiveEnterTimestamp", "InvocationID")}
        container.run("apt-get", "install", "-y", f"{SCRATCH}/{upgrade.path.name}", timeout=600)
        assert container.text("dpkg-query", "-W", "-f", "${Version}", "fastpoetry") == upgrade.version
        socket_after = {p: container.show(PROXY_SOCKET, p) for p in socket_before}
        assert socket_after == socket_before, f"{PROXY_SOCKET} was restarted by the upgrade"
        assert container.text("systemctl", "is-enabled", PROXY_SOCKET) == "enabled"
        assert container.fetch(port=PROXY_PORT) == poem
        pid = new_proxy_pid(container, old)
        assert f"fastpoetry {upgrade.version} starting" in container.journal(f"_PID={pid}"), (
            "the proxy running after the upgrade is not the new code:\n" + container.journal(f"_PID={pid}")
        )


def test_remove_stops_an_enabled_proxy_and_reinstalling_keeps_it_enabled(container: Container) -> None:
    """apt-get remove stops the proxy the administrator enabled (socket and service)
    like the server; installing the package again brings it back, enabled and listening.
    """
    poem = PACKAGED_POEM.read_bytes()
    version = container.text("dpkg-query", "-W", "-f", "${Version}", "fastpoetry")
    deb = f"{SCRATCH}/fastpoetry_{version}_all.deb"
    assert container.run("test", "-f", deb, check=False).returncode == 0, f"no {deb} to reinstall"
    with proxy_enabled(container):
        assert container.fetch(port=PROXY_PORT) == poem
        assert container.is_active(PROXY) == "active" and container.is_active("fastpoetry.service") == "active"
        try:
            container.run("apt-get", "remove", "-y", "fastpoetry", timeout=600)
            for unit in ("fastpoetry.socket", "fastpoetry.service", PROXY_SOCKET, PROXY):
                assert container.is_active(unit) != "active", unit
            assert served_by_fastpoetry(container) == []
            assert not {PORT, PROXY_PORT} & listening_ports(container)
        finally:
            container.run("apt-get", "install", "-y", deb, timeout=600)
        assert container.text("systemctl", "is-enabled", PROXY_SOCKET) == "enabled"
        assert container.is_active(PROXY_SOCKET) == "active"
        assert container.fetch(port=PROXY_PORT) == poem
    assert container.fetch() == poem


def test_get_from_the_package_fetches_from_several_servers(container: Container) -> None:
    """The installed ``fastpoetry get``: two servers at once, in order; a refused one named."""
    container.reset_failed()
    poem = PACKAGED_POEM.read_bytes()
    done = container.run("fastpoetry", "get", "127.0.0.1:10000", "[::1]:10000")
    # The packaged poem ends in a newline, so nothing is added between the two.
    assert done.stdout == poem + poem
    assert done.stderr == b""
    failed = container.run("fastpoetry", "get", "127.0.0.1:10000", "127.0.0.1:9", check=False)
    assert failed.returncode == 1
    assert failed.stdout == poem
    assert failed.stderr.decode() == "fastpoetry get: 127.0.0.1:9: connection refused\n"


def test_purge_leaves_nothing_behind(container: Container) -> None:
    """apt-get purge removes the units, the sockets, the user and the files; also
    those of the proxy, which the package does not enable but an administrator did.
    """
    container.run("systemctl", "enable", "--now", PROXY_SOCKET)
    container.run("systemctl", "start", PROXY)
    assert container.is_active(PROXY) == "active"
    container.run("apt-get", "purge", "-y", "fastpoetry", timeout=600)
    assert container.run("dpkg", "-s", "fastpoetry", check=False).returncode != 0
    assert container.text("systemctl", "list-unit-files", "--no-legend", "fastpoetry*", check=False) == ""
    assert container.is_active("fastpoetry.socket") != "active"
    assert container.is_active("fastpoetry.service") != "active"
    assert container.is_active(PROXY_SOCKET) != "active"
    assert container.is_active(PROXY) != "active"
    # Not counted: the tests' own files, and man-db's cache of formatted
    # pages (systemd-analyze verify ran man), which man-db expires itself.
    left = container.text(
        "find", "/etc", "/usr", "/var", "-xdev", "-name", "*fastpoetry*",
        "-not", "-path", f"{SCRATCH}*", "-not", "-path", "/var/cache/man/*",
    )
    assert left == "", f"left behind:\n{left}"
    assert container.run("test", "-e", "/usr/share/fastpoetry", check=False).returncode != 0
    for database in ("passwd", "group", "shadow", "gshadow"):
        assert container.run("getent", database, "fastpoetry", check=False).returncode == 2, database
    listening = container.python(LISTENERS).stdout.decode().split()
    assert str(PORT) not in listening, f"something still listens on {PORT}: {listening}"
    assert str(PROXY_PORT) not in listening, f"something still listens on {PROXY_PORT}: {listening}"
    refused = container.python(REFUSED, check=False)
    assert refused.returncode == 0, refused.stderr.decode(errors="replace")


#: Prints the TCP ports anything listens on, from /proc/net/tcp and tcp6.
LISTENERS = r"""
ports = set()
for name in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(name) as table:
        for line in list(table)[1:]:
            fields = line.split()
            if fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
print(*sorted(ports))
"""

#: Exits 0 if connections to port 10000 are refused, on IPv4 and IPv6.
REFUSED = r"""
import socket
for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    with socket.socket(family) as sock:
        sock.settimeout(10)
        try:
            sock.connect((address, 10000))
        except ConnectionRefusedError:
            continue
        raise SystemExit(f"{address}:10000 accepted a connection")
"""
