"""logs.setup() in-process: where records go, in what form, from what level.

setup() configures the package's logger (``fastpoetry``), not the root
one; the fixture puts both back as they were after every test, so that
other test modules see logging as they left it.  Standard error is
pytest's capture of it (capsys), so the format can be read back.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from collections.abc import Iterator

import pytest
import systemd.journal

from fastpoetry import logs

# asctime, then the program and its PID, the level name and the message.
_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} fastpoetry\[(?P<pid>\d+)\] (?P<level>[A-Z]+): (?P<message>.*)"
)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put the root and the package's loggers back as they were."""
    saved = {}
    for name in (None, "fastpoetry"):
        logger = logging.getLogger(name)
        saved[name] = (list(logger.handlers), logger.level, logger.propagate, logger.disabled)
    yield
    for name, (handlers, level, propagate, disabled) in saved.items():
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if handler not in handlers:
                handler.close()
            logger.removeHandler(handler)
        for handler in handlers:
            logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


class Stderr:
    """sys.stderr as setup() finds it during the test: pytest's capture, read back."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys

    def getvalue(self) -> str:
        return self._capsys.readouterr().err


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Stderr:
    return Stderr(capsys)


@pytest.fixture
def no_journal_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)


def package_handlers() -> list[logging.Handler]:
    return logging.getLogger("fastpoetry").handlers


def lines(stream: io.StringIO | Stderr) -> list[str]:
    return stream.getvalue().splitlines()


def own_stderr_stream() -> str:
    """What systemd would put in JOURNAL_STREAM for this process's standard error."""
    info = os.fstat(2)
    return f"{info.st_dev}:{info.st_ino}"


# -- standard error ----------------------------------------------------------------


def test_stderr_lines_have_time_program_pid_level_and_message(stderr: Stderr) -> None:
    logs.setup("info", "stderr")
    logging.getLogger("fastpoetry.poetry").info("loaded a poem from: %s (%d bytes)", "lantern.txt", 812)
    [line] = lines(stderr)
    match = _LINE.fullmatch(line)
    assert match, line
    assert match["pid"] == str(os.getpid())
    assert match["level"] == "INFO"
    assert match["message"] == "loaded a poem from: lantern.txt (812 bytes)"


def test_stderr_lines_name_each_level(stderr: Stderr) -> None:
    logs.setup("debug", "stderr")
    log = logging.getLogger("fastpoetry.app")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [(m["level"], m["message"]) for m in map(_LINE.fullmatch, lines(stderr))] == [  # type: ignore[index]
        ("DEBUG", "d"), ("INFO", "i"), ("WARNING", "w"), ("ERROR", "e"),
    ]


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("debug", ["debug", "info", "warning", "error"]),
        ("info", ["info", "warning", "error"]),
        ("warning", ["warning", "error"]),
        ("error", ["error"]),
    ],
)
def test_level_drops_what_is_below_it(stderr: Stderr, level: str, shown: list[str]) -> None:
    assert level in logs.LEVELS
    logs.setup(level, "stderr")
    log = logging.getLogger("fastpoetry.stream")
    for name in ("debug", "info", "warning", "error"):
        log.log(logging.getLevelName(name.upper()), "a %s message", name)
    assert [_LINE.fullmatch(line)["message"] for line in lines(stderr)] == [  # type: ignore[index]
        f"a {name} message" for name in shown
    ]


def test_level_is_the_package_loggers_own(stderr: Stderr) -> None:
    logging.getLogger().setLevel(logging.ERROR)  # the root's level does not matter
    logs.setup("info", "stderr")
    logging.getLogger("fastpoetry.report").info("served 2 poems")
    assert len(lines(stderr)) == 1


def test_records_do_not_also_reach_the_root_logger(stderr: Stderr) -> None:
    caught: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record)

    logging.getLogger().addHandler(Catch())
    logs.setup("info", "stderr")
    logging.getLogger("fastpoetry.app").warning("once")
    assert len(lines(stderr)) == 1
    assert caught == []


def test_other_packages_records_are_not_handled(stderr: Stderr) -> None:
    logs.setup("debug", "stderr")
    logging.getLogger("trio").warning("not ours")
    logging.getLogger("fastpoetryx").warning("not ours either")
    assert lines(stderr) == []


def test_stderr_is_the_one_at_the_time_of_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logs.setup("info", "stderr")
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("fastpoetry").info("where")
    assert len(lines(first)) == 1
    assert lines(second) == []


# -- the journal, and 'auto' -------------------------------------------------------


def journal_handler() -> systemd.journal.JournalHandler:
    [handler] = package_handlers()
    assert isinstance(handler, systemd.journal.JournalHandler), handler
    return handler


def test_journal_target_uses_the_journal_with_the_identifier(stderr: Stderr) -> None:
    logs.setup("warning", "journal")
    handler = journal_handler()
    assert handler._extra["SYSLOG_IDENTIFIER"] == "fastpoetry"  # type: ignore[attr-defined]
    assert logging.getLogger("fastpoetry").level == logging.WARNING
    sent: list[object] = []
    handler.send = lambda *args, **fields: sent.append(args[0])  # type: ignore[method-assign]
    logging.getLogger("fastpoetry.app").warning("to the journal, not standard error")
    assert sent == ["to the journal, not standard error"]
    assert lines(stderr) == []


def test_journal_records_keep_their_fields(stderr: Stderr) -> None:
    """Fields passed as extra= reach the journal as fields (the sender is the test's)."""
    logs.setup("info", "journal")
    handler = journal_handler()
    sent: list[tuple[tuple[object, ...], dict[str, object]]] = []
    handler.send = lambda *args, **fields: sent.append((args, fields))  # type: ignore[method-assign]
    logging.getLogger("fastpoetry.report").info(
        "served %d poems", 2, extra={"POEMS": 2, "BYTES": 1624}
    )
    [(args, fields)] = sent
    assert args == ("served 2 poems",)
    assert fields["POEMS"] == 2
    assert fields["BYTES"] == 1624
    assert fields["PRIORITY"] == "6"  # info
    assert fields["SYSLOG_IDENTIFIER"] == "fastpoetry"


def test_auto_uses_stderr_outside_systemd(stderr: Stderr, no_journal_stream: None) -> None:
    logs.setup("info", "auto")
    [handler] = package_handlers()
    assert not isinstance(handler, systemd.journal.JournalHandler)
    logging.getLogger("fastpoetry").info("hello")
    assert len(lines(stderr)) == 1


def test_auto_uses_the_journal_when_stderr_is_the_journal_stream(
    stderr: Stderr, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As systemd sets it: the device and inode of the stream on descriptor 2.
    monkeypatch.setenv("JOURNAL_STREAM", own_stderr_stream())
    logs.setup("info", "auto")
    journal_handler()


@pytest.mark.parametrize("stale", ["0:0", "", "garbage"])
def test_auto_ignores_a_journal_stream_that_is_not_stderr(
    stderr: Stderr, monkeypatch: pytest.MonkeyPatch, stale: str
) -> None:
    """JOURNAL_STREAM is inherited: it counts only if descriptor 2 is still that stream."""
    assert stale != own_stderr_stream()
    monkeypatch.setenv("JOURNAL_STREAM", stale)
    logs.setup("info", "auto")
    [handler] = package_handlers()
    assert not isinstance(handler, systemd.journal.JournalHandler)


def test_auto_ignores_the_journal_stream_once_stderr_is_elsewhere(
    stderr: Stderr, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same device, other inode: a child whose stderr was redirected to a file."""
    info = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino + 1}")
    logs.setup("info", "auto")
    [handler] = package_handlers()
    assert not isinstance(handler, systemd.journal.JournalHandler)


def test_stderr_target_ignores_the_journal_stream(
    stderr: Stderr, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", own_stderr_stream())
    logs.setup("info", "stderr")
    [handler] = package_handlers()
    assert not isinstance(handler, systemd.journal.JournalHandler)


def test_targets_are_the_three_choices() -> None:
    assert set(logs.TARGETS) == {"auto", "journal", "stderr"}


# -- a second call -----------------------------------------------------------------


def test_a_second_setup_replaces_the_handler(stderr: Stderr) -> None:
    logs.setup("info", "stderr")
    logs.setup("info", "stderr")
    assert len(package_handlers()) == 1
    logging.getLogger("fastpoetry").warning("said once")
    assert len(lines(stderr)) == 1


def test_a_second_setup_changes_target_and_level(stderr: Stderr) -> None:
    logs.setup("debug", "stderr")
    logs.setup("error", "journal")
    journal_handler()
    assert logging.getLogger("fastpoetry").level == logging.ERROR
    logs.setup("warning", "stderr")
    [handler] = package_handlers()
    assert not isinstance(handler, systemd.journal.JournalHandler)
    log = logging.getLogger("fastpoetry.app")
    log.info("dropped")
    log.warning("kept")
    assert [_LINE.fullmatch(line)["message"] for line in lines(stderr)] == ["kept"]  # type: ignore[index]


def test_handlers_added_by_others_are_replaced_too(stderr: Stderr) -> None:
    other = logging.StreamHandler(io.StringIO())
    logging.getLogger("fastpoetry").addHandler(other)
    logs.setup("info", "stderr")
    assert other not in package_handlers()
    assert len(package_handlers()) == 1
