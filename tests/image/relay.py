"""Relay stdin/stdout to a TCP address: qemu's ``guestfwd=...-cmd:`` runs this once per guest connection.

(``guestfwd=...-tcp:HOST:PORT`` opens a single host connection when qemu starts and pushes every
guest connection through it, so a second HTTP request hangs; ``cmd:`` is per connection.)

    python3 relay.py HOST PORT
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    sock = socket.create_connection((host, port), timeout=30)
    sock.settimeout(None)
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ)
    sel.register(sock, selectors.EVENT_READ)
    open_sides = 2
    while open_sides:
        for key, _ in sel.select():
            if key.fileobj == 0:
                data = os.read(0, 65536)
                if data:
                    sock.sendall(data)
                else:  # the guest closed its side
                    sock.shutdown(socket.SHUT_WR)
                    sel.unregister(0)
                    open_sides -= 1
            else:
                data = sock.recv(65536)
                if data:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(1, view) :]
                else:  # the host server closed: end the guest's connection
                    return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
