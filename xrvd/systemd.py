"""sd_notify without libsystemd: one datagram per message to $NOTIFY_SOCKET. A no-op outside
systemd, so the daemon runs the same from a shell."""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self._address = address or None
        self._socket: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_seconds = int(usec) / 1e6 if watched else None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: object) -> None:
        """notify(READY=1, STATUS="...") sends 'READY=1\\nSTATUS=...'."""
        if self._address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._socket.sendto(message, self._address)
        except OSError:
            pass  # systemd going away must never take the daemon down with it

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
