"""lifecycle.py in-process: requests, how a server takes them, how it stops, and signals.

The requests go through the real channel of ``open_requests()``; reloads
asked on the control socket carry a real ``control.Outcome``, whose
``asker_gone`` the test sets.  The running server is a small fake
``Runtime`` (a Protocol) that records reloads and hurries, and whose
``stop()`` waits on an event the test sets, so the test decides when the
shutdown is over.  Instead of sleeping, a test waits with
``trio.testing.wait_all_tasks_blocked()`` until every task has taken what
it could.

The signal tests send real signals to the test's own thread
(``pthread_kill``: other threads of the test process do not block them);
a fixture saves the signal mask and the handlers of the handled signals
and puts them back afterwards, dropping any signal a test left pending.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from helpers import WAIT, catch_records
from fastpoetry import control, lifecycle
from fastpoetry.lifecycle import SHUTTING_DOWN, Request


class FakeRuntime:
    """A Runtime that records what it is asked, and stops when the test says so."""

    def __init__(self, failure: str | None = None) -> None:
        #: What each reload was for (its request's ``what``), in order.
        self.reloads: list[str] = []
        #: What each hurry was for, in order.
        self.hurried: list[str] = []
        #: What reload() answers: None for success.
        self.failure = failure
        self.stopping = trio.Event()
        #: Set by the test: stop() returns once it is.
        self.may_stop = trio.Event()

    async def reload(self, request: Request) -> str | None:
        self.reloads.append(request.what)
        return self.failure

    async def stop(self) -> None:
        self.stopping.set()
        await self.may_stop.wait()

    def hurry(self, what: str) -> None:
        self.hurried.append(what)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """What lifecycle's logger logs at any level, whatever else configured logging."""
    with catch_records(lifecycle.log, logging.DEBUG) as caught:
        yield caught


def messages(records: list[logging.LogRecord], level: int) -> list[str]:
    return [record.getMessage() for record in records if record.levelno == level]


def reload_request(what: str = "a reload request", gone: bool = False) -> tuple[Request, control.Outcome]:
    """A reload request as the control socket submits it, and its outcome."""
    outcome = control.Outcome(asker_gone=lambda: gone)
    return Request(reload=True, what=what, outcome=outcome), outcome


async def answer_of(outcome: control.Outcome) -> str | None:
    with trio.fail_after(WAIT):
        return await outcome.wait()


def answered(outcome: control.Outcome) -> bool:
    # Outcome keeps no public flag; waiting would hang on an unanswered one.
    return outcome._done.is_set()


# -- Request ---------------------------------------------------------------------------


async def test_answer_gives_the_outcome_success_or_failure() -> None:
    ok, ok_outcome = reload_request()
    failed, failed_outcome = reload_request()
    ok.answer(None)
    failed.answer("no such file")
    assert await answer_of(ok_outcome) is None
    assert await answer_of(failed_outcome) == "no such file"


def test_answer_without_an_outcome_does_nothing() -> None:
    Request(reload=True, what="SIGHUP").answer("whatever")


def test_given_up_is_false_while_the_asker_waits(records: list[logging.LogRecord]) -> None:
    request, outcome = reload_request(gone=False)
    assert request.given_up() is False
    assert not answered(outcome)
    assert messages(records, logging.WARNING) == []


def test_given_up_is_false_without_an_outcome() -> None:
    assert Request(reload=True, what="SIGHUP").given_up() is False


async def test_given_up_answers_gone_and_warns(records: list[logging.LogRecord]) -> None:
    request, outcome = reload_request("a reload request from PID 4242", gone=True)
    assert request.given_up() is True
    assert await answer_of(outcome) == control.GONE
    [warning] = messages(records, logging.WARNING)
    assert warning.startswith("not reloading for a reload request from PID 4242: it has given up")


# -- take_requests -----------------------------------------------------------------------


async def test_take_requests_answers_reloads_and_returns_1_on_a_stop() -> None:
    runtime = FakeRuntime(failure="cannot load a poem")
    send, receive = lifecycle.open_requests()
    first, first_outcome = reload_request("first")
    second, second_outcome = reload_request("second")
    after = Request(reload=True, what="after the stop")
    for request in (first, Request(reload=True, what="SIGHUP"), second, Request(reload=False, what="SIGTERM"), after):
        send.send_nowait(request)
    with trio.fail_after(WAIT):
        assert await lifecycle.take_requests(runtime, receive) == 1
    assert runtime.reloads == ["first", "SIGHUP", "second"]
    assert await answer_of(first_outcome) == "cannot load a poem"
    assert await answer_of(second_outcome) == "cannot load a poem"
    # What came after the stop is left for shut_down.
    assert receive.receive_nowait() is after


async def test_take_requests_returns_0_when_the_channel_closes() -> None:
    runtime = FakeRuntime()
    send, receive = lifecycle.open_requests()
    request, outcome = reload_request()
    send.send_nowait(request)
    send.close()
    with trio.fail_after(WAIT):
        assert await lifecycle.take_requests(runtime, receive) == 0
    assert runtime.reloads == ["a reload request"]
    assert await answer_of(outcome) is None


async def test_take_requests_drops_a_reload_whose_asker_gave_up() -> None:
    runtime = FakeRuntime()
    send, receive = lifecycle.open_requests()
    dropped, dropped_outcome = reload_request("dropped", gone=True)
    kept, kept_outcome = reload_request("kept")
    for request in (dropped, kept, Request(reload=False, what="SIGTERM")):
        send.send_nowait(request)
    with trio.fail_after(WAIT):
        assert await lifecycle.take_requests(runtime, receive) == 1
    assert runtime.reloads == ["kept"]
    assert await answer_of(dropped_outcome) == control.GONE
    assert await answer_of(kept_outcome) is None


# -- shut_down ---------------------------------------------------------------------------


async def test_shut_down_after_a_stop_hurries_once_per_further_stop(nursery: trio.Nursery) -> None:
    runtime = FakeRuntime()
    send, receive = lifecycle.open_requests()
    done = trio.Event()

    async def shut() -> None:
        await lifecycle.shut_down(runtime, receive, stops=1)
        done.set()

    with trio.fail_after(WAIT):
        nursery.start_soon(shut)
        await runtime.stopping.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert runtime.hurried == []
        send.send_nowait(Request(reload=False, what="SIGTERM"))
        await trio.testing.wait_all_tasks_blocked()
        assert runtime.hurried == ["SIGTERM"]
        send.send_nowait(Request(reload=False, what="SIGINT"))
        await trio.testing.wait_all_tasks_blocked()
        assert runtime.hurried == ["SIGTERM", "SIGINT"]
        assert not done.is_set()
        runtime.may_stop.set()
        await done.wait()
    assert runtime.reloads == []


async def test_shut_down_answers_reloads_shutting_down(
    nursery: trio.Nursery, records: list[logging.LogRecord]
) -> None:
    runtime = FakeRuntime()
    send, receive = lifecycle.open_requests()
    request, outcome = reload_request("a reload request from PID 4242")
    with trio.fail_after(WAIT):
        nursery.start_soon(lifecycle.shut_down, runtime, receive, 1)
        await runtime.stopping.wait()
        send.send_nowait(request)
        send.send_nowait(Request(reload=True, what="SIGHUP"))  # nobody waits for this one
        assert await answer_of(outcome) == SHUTTING_DOWN
        await trio.testing.wait_all_tasks_blocked()
        runtime.may_stop.set()
    assert runtime.reloads == [] and runtime.hurried == []
    assert "ignoring SIGHUP while shutting down" in messages(records, logging.INFO)


async def test_shut_down_not_brought_by_a_stop_hurries_from_the_second(
    nursery: trio.Nursery, records: list[logging.LogRecord]
) -> None:
    runtime = FakeRuntime()
    send, receive = lifecycle.open_requests()
    with trio.fail_after(WAIT):
        nursery.start_soon(lifecycle.shut_down, runtime, receive, 0)
        await runtime.stopping.wait()
        send.send_nowait(Request(reload=False, what="SIGTERM"))
        await trio.testing.wait_all_tasks_blocked()
        assert runtime.hurried == []
        assert "received SIGTERM while shutting down already" in messages(records, logging.INFO)
        send.send_nowait(Request(reload=False, what="SIGINT"))
        await trio.testing.wait_all_tasks_blocked()
        assert runtime.hurried == ["SIGINT"]
        send.send_nowait(Request(reload=False, what="SIGTERM"))
        await trio.testing.wait_all_tasks_blocked()
        assert runtime.hurried == ["SIGINT", "SIGTERM"]
        runtime.may_stop.set()


async def test_shut_down_returns_once_stopped_though_requests_stay_open() -> None:
    runtime = FakeRuntime()
    runtime.may_stop.set()
    send, receive = lifecycle.open_requests()
    with trio.fail_after(WAIT):
        await lifecycle.shut_down(runtime, receive, stops=1)
    assert runtime.stopping.is_set()
    send.send_nowait(Request(reload=False, what="SIGTERM"))  # the channel is still open


# -- signals -------------------------------------------------------------------------------


async def numbers(*signums: int) -> AsyncIterator[int]:
    for signum in signums:
        yield signum


async def test_relay_signals_makes_named_requests_in_order() -> None:
    send, receive = lifecycle.open_requests()
    with trio.fail_after(WAIT):
        await lifecycle.relay_signals(numbers(signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGHUP), send)
    send.close()
    assert [request async for request in receive] == [
        Request(reload=True, what="SIGHUP"),
        Request(reload=False, what="SIGTERM"),
        Request(reload=False, what="SIGINT"),
        Request(reload=True, what="SIGHUP"),
    ]


@pytest.fixture
def signal_state() -> Iterator[None]:
    """Put back this process's signal mask and the handled signals' handlers after the test."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    handlers: dict[int, Any] = {signum: signal.getsignal(signum) for signum in lifecycle.SIGNALS}
    yield
    # Ignoring a signal drops it if pending: none may reach the default action.
    for signum in lifecycle.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for signum, handler in handlers.items():
        if handler is not None:
            signal.signal(signum, handler)


def send_to_this_thread(signum: int) -> None:
    """Send ``signum`` to the thread running the test, as the kernel would to a process that blocks it.

    Not os.kill(): in a process that blocked the signals before its first
    thread, as the server does, every thread has them blocked; in this test
    process other threads may already run (trio's thread cache, from an
    earlier test), and SIGHUP sent to the process would go to one of those,
    whose default action ends the test run.
    """
    signal.pthread_kill(threading.get_ident(), signum)


def blocked() -> set[int]:
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_block_signals_blocks_the_handled_signals(signal_state: None) -> None:
    for signum in lifecycle.SIGNALS:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    lifecycle.block_signals()
    assert lifecycle.SIGNALS <= blocked()


async def test_signal_receiver_takes_a_signal_held_since_before_it(signal_state: None) -> None:
    lifecycle.block_signals()
    assert lifecycle.SIGNALS <= blocked()  # else the SIGHUP below would end the test run
    send_to_this_thread(signal.SIGHUP)
    assert signal.SIGHUP in signal.sigpending()
    with trio.fail_after(WAIT):
        with lifecycle.signal_receiver() as signals:
            assert not lifecycle.SIGNALS & blocked()
            assert await signals.__anext__() == signal.SIGHUP
            # Once only: a signal sent now is the next thing that comes.
            send_to_this_thread(signal.SIGTERM)
            assert await signals.__anext__() == signal.SIGTERM
    assert signal.SIGHUP not in signal.sigpending()


def test_signals_held_holds_them_and_ignores_them_after(signal_state: None) -> None:
    for signum in lifecycle.SIGNALS:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    with lifecycle.signals_held():
        assert lifecycle.SIGNALS <= blocked()
        for signum in lifecycle.SIGNALS:
            # A handler, not SIG_IGN: that would drop what is held for the receiver.
            assert signal.getsignal(signum) not in (signal.SIG_IGN, signal.SIG_DFL)
        send_to_this_thread(signal.SIGTERM)
        assert signal.SIGTERM in signal.sigpending()
    for signum in lifecycle.SIGNALS:
        assert signal.getsignal(signum) == signal.SIG_IGN
