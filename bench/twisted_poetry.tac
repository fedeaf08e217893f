"""The Twisted peer: a fast poetry server in the shape of Twisted's tutorial.

A protocol that writes the poem and drops the connection, a factory that
holds the poetry service, and a service that reads the poem when it
starts; the poetry service and the listening service are children of one
MultiService, under an Application that twistd runs:

    twistd --nodaemon --pidfile= --logfile=FILE --python=twisted_poetry.tac

Settings come from the environment, since twistd owns the command line:

    POETRY_FILE    the poem (required)
    POETRY_LISTEN  "tcp" (default) to listen on POETRY_IFACE:POETRY_PORT,
                   or "systemd" to serve the first socket passed by socket
                   activation (LISTEN_FDS), as systemd-socket-activate does
    POETRY_PORT    the port (default 10000)
    POETRY_IFACE   the address (default 127.0.0.1)
    POETRY_BACKLOG the listen() backlog for "tcp" (default 4096, as the
                   other servers in the benchmark; Twisted's own is 50)
"""

import os

from twisted.application import internet, service
from twisted.internet import endpoints, protocol, reactor
from twisted.python import log


class PoetryProtocol(protocol.Protocol):
    """Sends the poem as soon as a client connects, then hangs up."""

    def connectionMade(self):
        self.transport.write(self.factory.service.poem)
        # Closes once everything written has been sent.
        self.transport.loseConnection()


class PoetryFactory(protocol.ServerFactory):
    """Makes a PoetryProtocol per client; knows where the poem is kept."""

    protocol = PoetryProtocol

    def __init__(self, service):
        self.service = service


class PoetryService(service.Service):
    """Knows the poem, and nothing about sockets."""

    def __init__(self, poetry_file):
        self.poetry_file = poetry_file
        self.poem = b""

    def startService(self):
        service.Service.startService(self)
        with open(self.poetry_file, "rb") as file:
            self.poem = file.read()
        log.msg(f"loaded a poem from {self.poetry_file} ({len(self.poem)} bytes)")


def listening_service(factory):
    """The service that accepts clients, as POETRY_LISTEN asks."""
    if os.environ.get("POETRY_LISTEN", "tcp") == "systemd":
        endpoint = endpoints.serverFromString(reactor, "systemd:domain=INET:index=0")
        return internet.StreamServerEndpointService(endpoint, factory)
    return internet.TCPServer(
        int(os.environ.get("POETRY_PORT", "10000")),
        factory,
        backlog=int(os.environ.get("POETRY_BACKLOG", "4096")),
        interface=os.environ.get("POETRY_IFACE", "127.0.0.1"),
    )


top_service = service.MultiService()

# Started first (children start in the order they were added): the poem is
# read before the first client can arrive.
poetry_service = PoetryService(os.environ["POETRY_FILE"])
poetry_service.setServiceParent(top_service)

listening_service(PoetryFactory(poetry_service)).setServiceParent(top_service)

application = service.Application("fastpoetry-benchmark")
top_service.setServiceParent(application)
