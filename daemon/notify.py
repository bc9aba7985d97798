"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET (READY=1, STOPPING=1, STATUS=...)."""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send `message` to systemd when running under Type=notify; returns whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True
