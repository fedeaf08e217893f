"""fastpoetry: a systemd-native fast poetry server.

A client connects, receives one whole poem, and the server closes the
connection.  systemd provides the sockets, the user, the logging and the
supervision; this package provides the poems.
"""

__version__ = "0.2.0"
