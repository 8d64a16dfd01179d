"""Sans-I/O core of the host side of the host-link protocol.

No serial port, no clock: :func:`encode_read` / :func:`encode_write` turn requests into
bytes, :class:`ResponseParser` turns received bytes into :class:`Response` objects and
:class:`ProtocolError` events. The frame format itself is defined in
:mod:`epochlink.hostproto`; the exception hierarchy used by the whole host library lives
here too.
"""
from __future__ import annotations

from dataclasses import dataclass

from epochlink.hostproto import (RESPONSE_LENGTH, SOF_RESPONSE, Opcode, Status, build_request,
                                 crc16)

__all__ = [
    "EpochlinkError", "ProtocolError", "GarbageBytes", "BadResponseChecksum",
    "UnexpectedResponse", "ErrorResponse", "EpochRefused", "error_response", "ConnectionLost", "Timeout", "Response", "ParseEvent",
    "encode_read", "encode_write", "ResponseParser", "Status", "Opcode",
]


class EpochlinkError(Exception):
    """Base class of every error the epochlink host library raises."""


class ProtocolError(EpochlinkError):
    """The byte stream from the node did not follow the protocol.

    :class:`ResponseParser` returns instances of the subclasses as events (it does not
    raise them); a driver decides whether they are fatal.
    """


class GarbageBytes(ProtocolError):
    """Bytes that are not part of any response frame were skipped."""

    def __init__(self, data: bytes) -> None:
        super().__init__(f"{len(data)} byte(s) outside a response frame: {data[:16].hex()}")
        self.data = data


class BadResponseChecksum(ProtocolError):
    """A response frame with a wrong checksum (only its SOF byte was consumed)."""

    def __init__(self, frame: bytes) -> None:
        super().__init__(f"bad checksum in response frame {frame.hex()}")
        self.frame = frame


class UnexpectedResponse(ProtocolError):
    """A valid response whose tag matches no request in flight (e.g. a late answer)."""

    def __init__(self, response: "Response") -> None:
        super().__init__(f"response with unexpected tag {response.tag}")
        self.response = response


class ErrorResponse(EpochlinkError):
    """The node answered a request with an error status."""

    def __init__(self, status: Status | int, addr: int | None = None, tag: int | None = None,
                 value: int = 0) -> None:
        name = status.name if isinstance(status, Status) else f"status {status:#x}"
        where = f" at {addr:#06x}" if addr is not None else ""
        super().__init__(f"{name}{where}")
        self.status = status
        self.code = int(status)
        self.addr = addr
        self.tag = tag
        self.value = value


class EpochRefused(ErrorResponse):
    """The epoch engine refused a command: ``REFUSED_LOWER`` (the epoch would go down) or
    ``REFUSED_DISABLED`` (PERSISTED written to a disabled domain). Nothing changed."""


def error_response(status: Status | int, addr: int | None = None, tag: int | None = None,
                   value: int = 0, name: str | None = None) -> ErrorResponse:
    """The exception for an error ``status``: :class:`EpochRefused` for the epoch engine's
    refusals, :class:`ErrorResponse` otherwise. ``name`` (the register) goes into the message."""
    cls = EpochRefused if status in (Status.REFUSED_LOWER, Status.REFUSED_DISABLED) else ErrorResponse
    error = cls(status, addr, tag, value)
    if name:
        error.args = (f"{error.args[0]} ({name})",)
    return error


class ConnectionLost(EpochlinkError):
    """The byte transport failed (device unplugged, socket closed)."""


class Timeout(EpochlinkError):
    """No response arrived in time (after the allowed retries)."""


@dataclass(frozen=True)
class Response:
    """A response frame: echoed ``tag``, ``status`` and 32-bit ``value``.

    ``status`` is a :class:`Status`, or a plain int for a code this library does not know.
    """
    tag: int
    status: Status | int
    value: int

    @property
    def ok(self) -> bool:
        return self.status == Status.OK


ParseEvent = Response | ProtocolError


def encode_read(tag: int, addr: int) -> bytes:
    """A READ request frame."""
    return build_request(tag, Opcode.READ, addr)


def encode_write(tag: int, addr: int, value: int) -> bytes:
    """A WRITE request frame."""
    return build_request(tag, Opcode.WRITE, addr, value)


class ResponseParser:
    """Incremental parser of the node-to-host byte stream.

    :meth:`feed` takes any chunk of bytes and returns the events completed by it, in order:
    :class:`Response` for every frame with a good checksum, :class:`GarbageBytes` for bytes
    skipped while looking for a SOF and :class:`BadResponseChecksum` for a frame that
    failed its check (the parser then resumes the search right after that frame's SOF, so a
    spurious SOF in line noise cannot hide a real frame). Partial frames are kept for the
    next call.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held back as the start of an incomplete frame."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget any partial frame."""
        self._buf.clear()

    def feed(self, data: bytes | bytearray | memoryview) -> list[ParseEvent]:
        buf = self._buf
        buf += data
        events: list[ParseEvent] = []
        garbage = bytearray()
        pos = 0
        while True:
            sof = buf.find(SOF_RESPONSE, pos)
            if sof < 0:
                garbage += buf[pos:]
                pos = len(buf)
                break
            garbage += buf[pos:sof]
            pos = sof
            if len(buf) - pos < RESPONSE_LENGTH:
                break
            frame = bytes(buf[pos:pos + RESPONSE_LENGTH])
            if crc16(frame[1:]) != 0:
                if garbage:
                    events.append(GarbageBytes(bytes(garbage)))
                    garbage.clear()
                events.append(BadResponseChecksum(frame))
                pos += 1
                continue
            if garbage:
                events.append(GarbageBytes(bytes(garbage)))
                garbage.clear()
            code = frame[2]
            status: Status | int = Status(code) if code in Status._value2member_map_ else code
            events.append(Response(frame[1], status, int.from_bytes(frame[3:7], "little")))
            pos += RESPONSE_LENGTH
        if garbage:
            events.append(GarbageBytes(bytes(garbage)))
        del buf[:pos]
        return events
