"""Host-link frame format: the one definition shared by the gateware and the host library.

The host talks to a node over a byte stream (a UART). Every exchange is a request frame
from the host answered by exactly one response frame from the node, in order. The host may
pipeline up to :data:`MAX_OUTSTANDING` requests without waiting for their responses.

Request frame (little-endian multi-byte fields)::

    READ   SOF_REQUEST  tag  0x01  addr[7:0]  addr[15:8]                          crc[7:0] crc[15:8]
    WRITE  SOF_REQUEST  tag  0x02  addr[7:0]  addr[15:8]  data[7:0] .. data[31:24] crc[7:0] crc[15:8]

Response frame::

    SOF_RESPONSE  tag  status  data[7:0] .. data[31:24]  crc[7:0] crc[15:8]

* ``tag`` is chosen freely by the host and echoed in the response.
* ``addr`` is a 16-bit register word address (see :mod:`epochlink.registers`).
* The checksum is CRC-16/MODBUS (polynomial 0x8005 reflected, init 0xFFFF, no final XOR)
  computed over every byte after the SOF byte up to the checksum, and sent low byte first;
  running the CRC over the data *and* the checksum gives the residue 0. A 16-bit CRC was
  chosen over CRC-8 because random line noise must not turn into a register write: a CRC-8
  accepts a corrupted frame with probability 1/256, CRC-16 with 1/65536 and detects every
  error of up to 3 bits in frames of this size.
* A read response carries the register value; a write response carries the register value
  after the write (unchanged if the write was refused; 0 for ``BAD_ADDRESS``); an error
  response from the link layer carries 0.

Status codes 0..5 come from the register bus (:class:`Status` ``OK`` .. ``REFUSED_LOWER``);
codes 0x10 and up are link-layer errors, answered when the node knows a tag but cannot
execute the frame:

* ``BAD_CHECKSUM``: the frame was complete but its CRC failed (the echoed tag is the byte
  received in the tag position, which the failed CRC did not protect);
* ``BAD_OPCODE``: the opcode byte is not a known opcode; answered right after the opcode byte
  (the frame length is unknown, so the checksum cannot be checked; the tag is unprotected);
  the node then hunts for the next SOF;
* ``TRUNCATED``: after the tag byte, no byte arrived for the inter-byte timeout.

Bytes received while hunting for a SOF are discarded silently (and counted); a frame
abandoned before its tag arrived is dropped silently. No malformed frame ever reaches the
register bus. Since frames are delimited by SOF + length rather than by byte stuffing, a
corrupted frame can swallow the start of the next one; the host recovers by timing out and
retrying (reads) or reporting (writes).
"""
from __future__ import annotations

import enum

__all__ = [
    "PROTOCOL_VERSION", "SOF_REQUEST", "SOF_RESPONSE", "Opcode", "Status", "BUS_STATUSES",
    "CRC16_PARAMETERS", "crc16", "READ_REQUEST_LENGTH", "WRITE_REQUEST_LENGTH",
    "RESPONSE_LENGTH", "request_length", "MAX_OUTSTANDING",
]

#: Version of this frame format; reported in the node's ``CAPS`` register.
PROTOCOL_VERSION = 1

#: First byte of every request frame.
SOF_REQUEST = 0xA5
#: First byte of every response frame.
SOF_RESPONSE = 0x5A


class Opcode(enum.IntEnum):
    """Request opcodes. 3 (READ_BURST) and up are reserved."""
    READ = 0x01
    WRITE = 0x02


class Status(enum.IntEnum):
    """Status byte of a response."""
    OK = 0x00
    #: no register at this address
    BAD_ADDRESS = 0x01
    #: write to a read-only register
    READ_ONLY = 0x02
    #: write of a value the register's validation rule refuses
    ILLEGAL_VALUE = 0x03
    #: epoch command refused: PERSIST to a disabled persistence domain
    REFUSED_DISABLED = 0x04
    #: epoch command refused: the epoch would go down (epochs only rise)
    REFUSED_LOWER = 0x05
    #: complete frame, wrong CRC
    BAD_CHECKSUM = 0x10
    #: unknown opcode
    BAD_OPCODE = 0x11
    #: inter-byte timeout inside a frame (after its tag)
    TRUNCATED = 0x12

    @property
    def is_link_error(self) -> bool:
        """True for errors of the framing layer (the request was not executed)."""
        return self >= 0x10


#: The statuses a register bus can return (they fit in 3 bits and are carried verbatim).
BUS_STATUSES = (Status.OK, Status.BAD_ADDRESS, Status.READ_ONLY, Status.ILLEGAL_VALUE,
                Status.REFUSED_DISABLED, Status.REFUSED_LOWER)

#: CRC-16/MODBUS, in the keyword form of :class:`amaranth.lib.crc.Algorithm`.
CRC16_PARAMETERS: dict[str, int | bool] = dict(
    crc_width=16, polynomial=0x8005, initial_crc=0xFFFF,
    reflect_input=True, reflect_output=True, xor_output=0x0000)

READ_REQUEST_LENGTH = 7
WRITE_REQUEST_LENGTH = 11
RESPONSE_LENGTH = 9

#: Requests the host may have in flight (sent, response not yet fully received). The
#: gateware's response queue holds this many responses, so within this window no request
#: byte is ever dropped however slowly the responses drain.
MAX_OUTSTANDING = 16


def _reflect(value: int, width: int) -> int:
    return int(f"{value:0{width}b}"[::-1], 2)


def _make_table() -> tuple[int, ...]:
    # Reflected (LSB-first) table for the parameters above.
    assert CRC16_PARAMETERS["reflect_input"] and CRC16_PARAMETERS["reflect_output"]
    poly = _reflect(int(CRC16_PARAMETERS["polynomial"]), 16)
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc16(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/MODBUS of ``data`` (software twin of the gateware's ``lib.crc`` processor)."""
    crc = int(CRC16_PARAMETERS["initial_crc"])
    for byte in data:
        crc = (crc >> 8) ^ _TABLE[(crc ^ byte) & 0xFF]
    return crc ^ int(CRC16_PARAMETERS["xor_output"])


def request_length(opcode: int) -> int | None:
    """Total length in bytes of a request frame with ``opcode``; None if unknown."""
    if opcode == Opcode.READ:
        return READ_REQUEST_LENGTH
    if opcode == Opcode.WRITE:
        return WRITE_REQUEST_LENGTH
    return None


def _with_crc(body: bytes) -> bytes:
    return body + crc16(body).to_bytes(2, "little")


def build_request(tag: int, opcode: int, addr: int, data: int | None = None) -> bytes:
    """A request frame. ``data`` is required for WRITE and forbidden for READ.

    Any opcode byte is accepted (to build malformed frames for tests); frames with an
    unknown opcode carry ``data`` if given.
    """
    if not 0 <= tag <= 0xFF:
        raise ValueError(f"tag {tag} is not a byte")
    if not 0 <= opcode <= 0xFF:
        raise ValueError(f"opcode {opcode} is not a byte")
    if not 0 <= addr <= 0xFFFF:
        raise ValueError(f"address {addr:#x} is not 16 bits")
    body = bytes([tag, opcode]) + addr.to_bytes(2, "little")
    if opcode == Opcode.WRITE and data is None:
        raise ValueError("WRITE needs data")
    if opcode == Opcode.READ and data is not None:
        raise ValueError("READ takes no data")
    if data is not None:
        if not 0 <= data <= 0xFFFF_FFFF:
            raise ValueError(f"data {data:#x} is not 32 bits")
        body += data.to_bytes(4, "little")
    return bytes([SOF_REQUEST]) + _with_crc(body)


def build_response(tag: int, status: int, data: int) -> bytes:
    """A response frame (what the node sends)."""
    return bytes([SOF_RESPONSE]) + _with_crc(bytes([tag, status]) + data.to_bytes(4, "little"))


__all__ += ["build_request", "build_response"]
