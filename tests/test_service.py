"""The service tree: services, collections of them, the application, timers."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from fastpoetry.service import Application, MultiService, Service, TimerService


class Recorder(Service):
    """A service that appends ``(event, name)`` to a shared log."""

    def __init__(self, name: str | None, log: list[tuple[str, str | None]]) -> None:
        super().__init__(name)
        self.log = log

    async def start(self, nursery: trio.Nursery) -> None:
        await super().start(nursery)
        self.log.append(("start", self.name))

    async def stop(self) -> None:
        await super().stop()
        self.log.append(("stop", self.name))


class SlowStop(Recorder):
    """A service whose stop yields to the scheduler before it is done."""

    async def stop(self) -> None:
        await super().stop()
        for _ in range(5):
            await trio.sleep(0)
        self.log.append(("stopped", self.name))


class FailingStop(Recorder):
    """A service whose stop raises after it has stopped."""

    async def stop(self) -> None:
        await super().stop()
        raise ValueError(f"{self.name} failed to stop")


class HangingStop(Recorder):
    """A service whose stop waits forever (until cancelled)."""

    async def stop(self) -> None:
        await super().stop()
        await trio.sleep_forever()


async def collection_of(
    names: list[str], log: list[tuple[str, str | None]], kind: type[Recorder] = Recorder
) -> MultiService:
    """A stopped collection of recording children called ``names``."""
    collection = MultiService("collection")
    for name in names:
        await collection.add(kind(name, log))
    return collection


# Service


def test_service_has_its_name_and_starts_stopped() -> None:
    """A new service has the given name, no parent, and is not running."""
    service = Service("lamp")
    assert service.name == "lamp"
    assert service.parent is None
    assert service.running is False


async def test_service_start_and_stop_set_running(nursery: trio.Nursery) -> None:
    """start() makes a service running and stop() makes it stopped again."""
    service = Service("lamp")
    await service.start(nursery)
    assert service.running is True
    await service.stop()
    assert service.running is False


async def test_attach_adds_the_service_to_the_parent() -> None:
    """attach() makes the service a child of the parent, findable by name."""
    parent = MultiService()
    service = Service("lamp")
    await service.attach(parent)
    assert service.parent is parent
    assert parent.get("lamp") is service
    assert list(parent) == [service]


async def test_attach_to_another_parent_leaves_the_old_one() -> None:
    """Re-attaching moves the service: the old parent no longer has it."""
    old, new = MultiService("old"), MultiService("new")
    service = Service("lamp")
    await service.attach(old)
    await service.attach(new)
    assert service.parent is new
    assert list(old) == [] and len(old) == 0
    with pytest.raises(KeyError):
        old.get("lamp")
    assert new.get("lamp") is service


async def test_reattaching_a_running_service_to_a_stopped_parent_stops_it(
    nursery: trio.Nursery,
) -> None:
    """Leaving a running parent stops the service; a stopped new parent does not restart it."""
    log: list[tuple[str, str | None]] = []
    old, new = MultiService("old"), MultiService("new")
    service = Recorder("lamp", log)
    await service.attach(old)
    await old.start(nursery)
    await service.attach(new)
    assert service.running is False
    assert log == [("start", "lamp"), ("stop", "lamp")]
    await old.stop()


async def test_detach_removes_the_service_from_its_parent() -> None:
    """detach() takes the service out of its parent and clears its parent."""
    parent = MultiService()
    service = Service("lamp")
    await service.attach(parent)
    await service.detach()
    assert service.parent is None
    assert len(parent) == 0


async def test_detach_without_a_parent_raises() -> None:
    """detach() on a service that has no parent raises RuntimeError."""
    with pytest.raises(RuntimeError, match="no parent"):
        await Service("lamp").detach()


# MultiService


async def test_collection_gets_children_by_name() -> None:
    """get() returns the child of that name and raises KeyError for others."""
    log: list[tuple[str, str | None]] = []
    collection = await collection_of(["a", "b"], log)
    assert collection.get("b").name == "b"
    assert collection.get("a").name == "a"
    with pytest.raises(KeyError):
        collection.get("c")


async def test_collection_iterates_in_the_order_added_and_counts_children() -> None:
    """Iteration yields the children in the order they were added; len counts them."""
    children = [Service(name) for name in ("c", "a", None, "b")]
    collection = MultiService()
    for child in children:
        await collection.add(child)
    assert list(collection) == children
    assert len(collection) == 4


async def test_collection_refuses_a_duplicate_name() -> None:
    """Adding a second child of an existing name raises RuntimeError and adds nothing."""
    collection = MultiService()
    first = Service("lamp")
    await collection.add(first)
    second = Service("lamp")
    with pytest.raises(RuntimeError, match="lamp"):
        await collection.add(second)
    assert list(collection) == [first]
    assert collection.get("lamp") is first
    assert second.parent is None


async def test_collection_accepts_many_unnamed_children() -> None:
    """Unnamed children never collide with each other."""
    collection = MultiService()
    children = [Service(), Service()]
    for child in children:
        await collection.add(child)
    assert list(collection) == children


async def test_collection_refuses_a_child_that_has_a_parent() -> None:
    """add() of a child that belongs to another collection raises RuntimeError."""
    owner, other = MultiService("owner"), MultiService("other")
    child = Service("lamp")
    await owner.add(child)
    with pytest.raises(RuntimeError, match="already belongs"):
        await other.add(child)
    assert child.parent is owner
    assert len(other) == 0


async def test_collection_refuses_to_remove_a_stranger() -> None:
    """remove() of a service that is not a child raises RuntimeError."""
    with pytest.raises(RuntimeError, match="not a child"):
        await MultiService().remove(Service("lamp"))


async def test_collection_starts_children_in_order_and_stops_them_in_reverse(
    nursery: trio.Nursery,
) -> None:
    """Children start in the order added and stop in the reverse order."""
    log: list[tuple[str, str | None]] = []
    collection = await collection_of(["a", "b", "c"], log)
    await collection.start(nursery)
    assert collection.running and all(child.running for child in collection)
    await collection.stop()
    assert not collection.running and not any(child.running for child in collection)
    assert log == [
        ("start", "a"),
        ("start", "b"),
        ("start", "c"),
        ("stop", "c"),
        ("stop", "b"),
        ("stop", "a"),
    ]


async def test_collection_awaits_each_stop_before_the_next(nursery: trio.Nursery) -> None:
    """A child's stop that yields finishes before the previous child's stop begins."""
    log: list[tuple[str, str | None]] = []
    collection = await collection_of(["a", "b", "c"], log, kind=SlowStop)
    await collection.start(nursery)
    log.clear()
    await collection.stop()
    assert log == [
        ("stop", "c"),
        ("stopped", "c"),
        ("stop", "b"),
        ("stopped", "b"),
        ("stop", "a"),
        ("stopped", "a"),
    ]


async def test_adding_to_a_running_collection_starts_the_child(nursery: trio.Nursery) -> None:
    """A child added to a running collection is started at once."""
    log: list[tuple[str, str | None]] = []
    collection = MultiService()
    await collection.start(nursery)
    child = Recorder("late", log)
    await collection.add(child)
    assert child.running is True
    assert log == [("start", "late")]
    await collection.stop()
    assert child.running is False


async def test_adding_to_a_stopped_collection_does_not_start_the_child() -> None:
    """A child added to a collection that is not running stays stopped."""
    log: list[tuple[str, str | None]] = []
    collection = await collection_of(["a"], log)
    assert collection.get("a").running is False
    assert log == []


async def test_removing_a_running_child_stops_it(nursery: trio.Nursery) -> None:
    """remove() stops a running child; the collection keeps running."""
    log: list[tuple[str, str | None]] = []
    collection = await collection_of(["a", "b"], log)
    await collection.start(nursery)
    child = collection.get("a")
    await collection.remove(child)
    assert child.running is False and child.parent is None
    assert collection.running is True and list(collection) == [collection.get("b")]
    assert log[-1] == ("stop", "a")
    await collection.stop()


async def test_a_failing_stop_does_not_keep_the_others_running(nursery: trio.Nursery) -> None:
    """Every child is stopped even when one stop fails, and that error is re-raised."""
    log: list[tuple[str, str | None]] = []
    collection = MultiService()
    await collection.add(Recorder("a", log))
    await collection.add(FailingStop("b", log))
    await collection.add(Recorder("c", log))
    await collection.start(nursery)
    log.clear()
    with pytest.raises(ValueError, match="b failed to stop"):
        await collection.stop()
    assert log == [("stop", "c"), ("stop", "b"), ("stop", "a")]
    assert not any(child.running for child in collection)


async def test_the_first_failing_stop_is_the_one_re_raised(nursery: trio.Nursery) -> None:
    """With several failing stops, the error of the first one to stop is re-raised."""
    log: list[tuple[str, str | None]] = []
    collection = await collection_of(["a", "b"], log, kind=FailingStop)
    await collection.start(nursery)
    with pytest.raises(ValueError, match="b failed to stop"):
        await collection.stop()
    assert [entry for entry in log if entry[0] == "stop"] == [("stop", "b"), ("stop", "a")]


async def test_a_stop_cut_short_by_a_deadline_still_stops_every_child(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A stop cancelled by the caller's deadline still calls every child's stop."""
    log: list[tuple[str, str | None]] = []
    collection = await collection_of(["a", "b", "c"], log, kind=HangingStop)
    await collection.start(nursery)
    log.clear()
    with trio.move_on_after(1) as deadline:
        await collection.stop()
    assert deadline.cancelled_caught
    assert log == [("stop", "c"), ("stop", "b"), ("stop", "a")]
    assert not collection.running
    assert not any(child.running for child in collection)


async def test_collections_nest(nursery: trio.Nursery) -> None:
    """A collection is a service: nested ones start depth-first in order and stop in reverse."""
    log: list[tuple[str, str | None]] = []
    outer = MultiService("outer")
    inner = await collection_of(["b", "c"], log)
    await outer.add(Recorder("a", log))
    await inner.attach(outer)
    await outer.add(Recorder("d", log))
    await outer.start(nursery)
    assert inner.running and inner.get("c").running
    await outer.stop()
    assert not inner.running and not inner.get("b").running
    assert log == [
        ("start", "a"),
        ("start", "b"),
        ("start", "c"),
        ("start", "d"),
        ("stop", "d"),
        ("stop", "c"),
        ("stop", "b"),
        ("stop", "a"),
    ]


# Application


async def test_application_cannot_be_attached() -> None:
    """An application is a root: attach() raises RuntimeError and it keeps no parent."""
    application = Application("app")
    parent = MultiService()
    with pytest.raises(RuntimeError, match="root"):
        await application.attach(parent)
    assert application.parent is None
    assert len(parent) == 0


# TimerService


async def test_timer_calls_at_start_and_every_step_until_stopped(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """The function is called once at start, then every step, and never after stop."""
    calls: list[float] = []
    timer = TimerService(2.0, lambda: calls.append(trio.current_time()), name="tick")
    started = trio.current_time()
    await timer.start(nursery)
    assert timer.running
    assert calls == [started]
    await trio.sleep(7.0)
    assert calls == pytest.approx([started, started + 2, started + 4, started + 6])
    await timer.stop()
    assert not timer.running
    await trio.sleep(10.0)
    assert len(calls) == 4


async def test_timer_can_be_started_again_after_stop(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A stopped timer started again calls its function again."""
    calls: list[float] = []
    timer = TimerService(1.0, lambda: calls.append(trio.current_time()))
    await timer.start(nursery)
    await timer.stop()
    await trio.sleep(5.0)
    restarted = trio.current_time()
    await timer.start(nursery)
    await trio.sleep(1.5)
    await timer.stop()
    assert calls[1:] == pytest.approx([restarted, restarted + 1])


async def test_timer_in_a_collection_stops_with_it(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A timer started by its collection stops calling when the collection stops."""
    calls: list[float] = []
    collection = MultiService()
    await collection.add(TimerService(1.0, lambda: calls.append(trio.current_time())))
    await collection.start(nursery)
    await trio.sleep(2.5)
    await collection.stop()
    count = len(calls)
    await trio.sleep(10.0)
    assert count == 3
    assert len(calls) == count
