"""Byte transports for the host library.

:class:`SerialTransport` wraps pyserial's ``serial_for_url``, so the same code drives a
board (``/dev/ttyUSB1``) and a simulation or a software model behind a TCP socket
(``socket://127.0.0.1:PORT``). Anything with the :class:`Transport` methods can be used
instead (tests use in-memory fakes).
"""
from __future__ import annotations

import time
from typing import Protocol

import serial

__all__ = ["Transport", "SerialTransport", "DEFAULT_BAUDRATE"]

#: Default UART speed of the board tops.
DEFAULT_BAUDRATE = 1_000_000


class Transport(Protocol):
    """A bidirectional byte stream."""

    def write(self, data: bytes) -> None:
        """Send all of ``data``."""

    def read(self, timeout: float) -> bytes:
        """Bytes received so far; waits up to ``timeout`` seconds for at least one.

        Returns ``b""`` if nothing arrived in time.
        """

    def close(self) -> None:
        """Release the underlying port."""


def _refuse_self_connection(port, url: str) -> None:
    """Close ``port`` and raise :class:`ConnectionRefusedError` if it is a TCP socket connected
    to itself.

    Nothing listens on a local port in the ephemeral range, but connecting to it can still
    succeed: the kernel may choose that very port as the connection's own end, and the
    socket then reads back what it writes (a driver retrying while a simulation starts up
    would wait for answers that never come).
    """
    sock = getattr(port, "_socket", None)      # (pyserial's socket:// handler)
    if sock is not None and sock.getsockname() == sock.getpeername():
        port.close()
        raise ConnectionRefusedError(f"{url}: nothing listens there (the socket connected to itself)")


class SerialTransport:
    """A :class:`Transport` on a pyserial port opened with ``serial.serial_for_url``."""

    def __init__(self, url: str, baudrate: int = DEFAULT_BAUDRATE, *,
                 write_timeout: float = 2.0, **kwargs) -> None:
        self.url = url
        self.port = serial.serial_for_url(url, baudrate=baudrate, timeout=0,
                                          write_timeout=write_timeout, **kwargs)
        _refuse_self_connection(self.port, url)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self.port.write(view)
            except serial.SerialTimeoutException as exc:
                from .protocol import Timeout
                raise Timeout(f"{self.url}: write timed out") from exc
            except (serial.SerialException, OSError) as exc:
                raise self._lost(exc) from exc
            view = view[n or 0:]
        # (no flush(): on a tty it waits until the bytes are on the wire, which would
        # stall the pipeline; the kernel sends them anyway)

    def read(self, timeout: float) -> bytes:
        try:
            return self._read(timeout)
        except (serial.SerialException, OSError) as exc:
            raise self._lost(exc) from exc

    def _lost(self, exc: Exception):
        from .protocol import ConnectionLost
        return ConnectionLost(f"{self.url}: {exc} (unplugged, or another client took the "
                              "simulated node's port?)")

    def _read(self, timeout: float) -> bytes:
        port = self.port
        waiting = port.in_waiting
        if waiting:
            return port.read(waiting)
        timeout = round(max(timeout, 0.0), 4)
        if port.timeout != timeout:        # (reconfigures a real port: only when it changes)
            port.timeout = timeout
        deadline = time.monotonic() + timeout
        first = port.read(1)
        if not first:
            return b""
        if time.monotonic() > deadline:
            return first
        more = port.in_waiting
        return first + (port.read(more) if more else b"")

    def close(self) -> None:
        self.port.close()

    def __repr__(self) -> str:
        return f"SerialTransport({self.url!r})"
