"""Services, collections of services, and the application at the top.

The shape is the one of Twisted's ``twisted.application.service``: a
:class:`Service` has a name and a ``running`` flag and can be started and
stopped; a :class:`MultiService` is a service that holds other services,
starts them in the order they were added and stops them in reverse; an
:class:`Application` is the collection at the root of the tree.

What changes under trio is that starting and stopping are ``async`` and that
a service which keeps working after :meth:`Service.start` returns runs its
work as a task in a nursery handed down from the application, so that every
task belongs to the tree and is gone when the tree has stopped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import trio


class Service:
    """Something that starts and stops, with a name and a parent.

    Subclasses extend :meth:`start` and :meth:`stop` and call the base
    implementation, which keeps :attr:`running` true between the two.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.parent: MultiService | None = None
        self.running = False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.name!r} {state}>"

    async def attach(self, parent: MultiService) -> None:
        """Make this service a child of ``parent`` (leaving any old parent).

        If ``parent`` is running, this service is started.
        """
        if self.parent is not None:
            await self.detach()
        await parent.add(self)

    async def detach(self) -> None:
        """Leave the parent; if it is running, this service is stopped."""
        if self.parent is None:
            raise RuntimeError(f"{self!r} has no parent to leave")
        await self.parent.remove(self)

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the service; work that goes on runs as tasks in ``nursery``."""
        self.running = True

    async def stop(self) -> None:
        """Stop the service and wait until its work is done.

        A stop cut short by the caller's cancel scope must still leave the
        service stopped: subclasses do what must happen in ``finally``.
        """
        self.running = False


class MultiService(Service):
    """A service made of services: the collection is a service itself.

    Children are kept in the order they were added; names, where given, are
    unique within one collection.
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self._children: list[Service] = []
        self._named: dict[str, Service] = {}
        self._nursery: trio.Nursery | None = None

    def __iter__(self) -> Iterator[Service]:
        return iter(list(self._children))

    def __len__(self) -> int:
        return len(self._children)

    def walk(self) -> Iterator[Service]:
        """Every service below this one, depth first, in the order added."""
        for child in self:
            yield child
            if isinstance(child, MultiService):
                yield from child.walk()

    def get(self, name: str) -> Service:
        """The child called ``name``; :exc:`KeyError` if there is none."""
        return self._named[name]

    async def add(self, child: Service) -> None:
        """Add ``child`` last; start it now if this collection is running."""
        if isinstance(child, Application):
            raise RuntimeError("an application is the root of its tree")
        if child.parent is not None:
            raise RuntimeError(f"{child!r} already belongs to {child.parent!r}")
        if child.name is not None and child.name in self._named:
            raise RuntimeError(f"{self!r} already has a service named {child.name!r}")
        self._children.append(child)
        if child.name is not None:
            self._named[child.name] = child
        child.parent = self
        if self.running and self._nursery is not None:
            await child.start(self._nursery)

    async def remove(self, child: Service) -> None:
        """Take ``child`` out; stop it first if it is running."""
        if child.parent is not self:
            raise RuntimeError(f"{child!r} is not a child of {self!r}")
        self._children.remove(child)
        if child.name is not None:
            del self._named[child.name]
        child.parent = None
        if child.running:
            await child.stop()

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the children one after the other, in the order added."""
        await super().start(nursery)
        self._nursery = nursery
        for child in self:
            if not child.running:
                await child.start(nursery)

    async def stop(self) -> None:
        """Stop the children in reverse order, awaiting each.

        Every child is asked to stop even when an earlier one fails or the
        caller's deadline cancels the stop; the first error is re-raised.
        """
        await super().stop()
        failure: BaseException | None = None
        for child in reversed(list(self)):
            if not child.running:
                continue
            try:
                await child.stop()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                failure = failure or exc
        self._nursery = None
        if failure is not None:
            raise failure


class Application(MultiService):
    """The root of a service tree: a collection that no collection can hold."""


class TimerService(Service):
    """Calls a function every ``step`` seconds while running.

    The first call is made at start, or one step later if ``now`` is false.
    The function runs on the event loop, so a call that stops coming means
    the loop itself is stuck.
    """

    def __init__(
        self,
        step: float,
        function: Callable[[], object],
        name: str | None = None,
        *,
        now: bool = True,
    ) -> None:
        super().__init__(name)
        self.step = step
        self.function = function
        self.now = now
        self._task = BackgroundTask()

    async def start(self, nursery: trio.Nursery) -> None:
        await super().start(nursery)
        await self._task.start(nursery, self._run)

    async def stop(self) -> None:
        await super().stop()
        await self._task.cancel()

    async def _run(self) -> None:
        if not self.now:
            await trio.sleep(self.step)
        while True:
            self.function()
            await trio.sleep(self.step)


class BackgroundTask:
    """One task that a service runs from its start to its stop.

    :meth:`start` runs ``function`` in the service's nursery; :meth:`cancel`
    (from the service's ``stop``) cancels it and waits until it has ended.
    """

    def __init__(self) -> None:
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._done.set()  # nothing to wait for until started

    async def start(
        self, nursery: trio.Nursery, function: Callable[[], Awaitable[object]]
    ) -> None:
        """Start ``function`` in ``nursery``; returns once it is running."""
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        await nursery.start(self._supervise, function)

    async def _supervise(
        self,
        function: Callable[[], Awaitable[object]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with self._scope:
                task_status.started()
                await function()
        finally:
            self._done.set()

    async def cancel(self) -> None:
        """Cancel the task and wait until it has finished."""
        self._scope.cancel()
        with trio.CancelScope(shield=True):
            await self._done.wait()
