"""The epochlink link frame format: the one source of truth for gateware, tests and docs.

Every frame on the wire::

    SYNC0 SYNC1 | TYPE SEQ LEN PAYLOAD[LEN] | CCUR DCUR | FCS[4]
                  \\_______ digest _______/
                  \\______________ CRC-32 (FCS) ______________/

* ``SYNC0 SYNC1`` — start delimiter; a receiver that lost its place hunts for it.
* ``TYPE`` — frame type in bits 3:0, flags in bits 7:4 (see :class:`FrameType`, ``FLAG_*``).
* ``SEQ`` — transfer sequence number (DATA), or the sequence number being reflected (REFLECT).
* ``LEN`` — payload length in bytes; its legal value depends on the type.
* ``CCUR`` — the sender's *commit cursor* for the transfers it sends: every sequence number
  before it has been reflected back intact, so the receiver may deliver it.
* ``DCUR`` — the sender's *delivery cursor* for the transfers it receives: every sequence
  number before it has been delivered, so the far side may free its copy.
* ``FCS`` — CRC-32 (Ethernet polynomial, ``amaranth.lib.crc.catalog.CRC32_ETHERNET``) over
  TYPE..DCUR, least significant byte first.

The *digest* of a transfer is the same CRC-32 taken over TYPE, SEQ, LEN and PAYLOAD only.
The cursors sit after the payload so that the digest of a DATA frame does not change when
it is retransmitted with newer cursors; a REFLECT frame echoes the digest of what the
receiver holds, and the sender compares it with the digest of what it sent.
"""
from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass

__all__ = [
    "SYNC", "FrameType", "FLAG_CTRL", "FLAG_PROBE", "HELLO_FRESH", "HELLO_PEER_SEEN",
    "HEADER_BYTES", "TRAILER_BYTES", "OVERHEAD_BYTES", "HELLO_LEN", "REFLECT_LEN",
    "LinkState", "LINK_COUNTERS", "Frame", "Hello", "crc32", "encode", "decode", "FrameError",
]

SYNC = (0xD5, 0x6B)


class FrameType(enum.IntEnum):
    """Frame types (TYPE bits 3:0)."""
    DATA = 1     #: a transfer: payload bytes of one message; LEN 1..max_payload
    REFLECT = 2  #: reflective acknowledgement: SEQ and the 4-byte digest of what arrived
    SIGNAL = 3   #: cursors only (commit/deliver signals, heartbeats); LEN 0
    HELLO = 4    #: link initialisation: node id, version range, cursors; LEN 8


FLAG_CTRL = 0x10   #: DATA: the message belongs to the control class (delivered on ctrl_out)
FLAG_PROBE = 0x20  #: SIGNAL: the receiver must answer with a SIGNAL carrying its cursors

HELLO_FRESH = 0x01      #: the sender has come out of reset and has no transfer state yet
HELLO_PEER_SEEN = 0x02  #: the sender has reconciled with a HELLO from the receiver

HEADER_BYTES = 2 + 3          # SYNC0 SYNC1 TYPE SEQ LEN
TRAILER_BYTES = 2 + 4         # CCUR DCUR FCS
OVERHEAD_BYTES = HEADER_BYTES + TRAILER_BYTES
REFLECT_LEN = 4
HELLO_LEN = 8


#: Event counters of a link engine's ``status`` (name -> meaning), in register order: the
#: one source for the gateware, the register map (``PORTp.<NAME>``) and the docs.
LINK_COUNTERS = {
    "frames_tx": "frames transmitted (all types)",
    "frames_rx": "frames received with a good FCS",
    "crc_errors": "frames dropped because their FCS did not match",
    "framing_errors": "frames abandoned because their LEN exceeded the maximum",
    "malformed": "frames with a good FCS but impossible fields (type, length, sequence): dropped",
    "duplicates": "DATA frames for transfers already delivered: dropped",
    "retransmits": "DATA frames sent again",
    "aborts": "transfers rolled back by a link re-initialisation",
    "link_downs": "transitions from UP to DOWN",
    "reflect_mismatches": "REFLECTs whose digest differed from what was sent",
    "delivered": "messages delivered on payload_out/ctrl_out",
    "oversize": "input messages longer than max_payload: dropped whole",
}


class LinkState(enum.IntEnum):
    """Link state as reported by the engine's ``status.state``."""
    DOWN = 0          #: no peer: sending HELLOs
    INIT = 1          #: a HELLO was exchanged, waiting for the peer's confirmation
    UP = 2            #: transfers flow
    INCOMPATIBLE = 3  #: the peer shares no protocol version: the link stays down


class FrameError(ValueError):
    """A byte string is not a well-formed frame."""


def crc32(data: bytes) -> int:
    """CRC-32/Ethernet (IEEE 802.3): the FCS and digest function."""
    return zlib.crc32(bytes(data)) & 0xFFFFFFFF


@dataclass(frozen=True)
class Hello:
    """Contents of a HELLO payload."""
    node_id: int
    ver_min: int
    ver_max: int
    flags: int
    tx_base: int    #: oldest transfer the sender still holds (its free cursor)
    rx_commit: int  #: the sender's commit cursor for transfers it receives
    rx_next: int = 0  #: the sender's delivery cursor (its receive window starts here)

    def encode(self) -> bytes:
        return bytes([self.node_id & 0xFF, self.node_id >> 8 & 0xFF, self.ver_min, self.ver_max,
                      self.flags, self.tx_base, self.rx_commit, self.rx_next])

    @classmethod
    def decode(cls, payload: bytes) -> "Hello":
        if len(payload) != HELLO_LEN:
            raise FrameError(f"HELLO payload must be {HELLO_LEN} bytes, not {len(payload)}")
        p = payload
        return cls(p[0] | p[1] << 8, p[2], p[3], p[4], p[5], p[6], p[7])


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""
    type: int
    seq: int = 0
    payload: bytes = b""
    ccur: int = 0
    dcur: int = 0
    flags: int = 0

    @property
    def type_byte(self) -> int:
        return (self.type & 0x0F) | (self.flags & 0xF0)

    @property
    def digest(self) -> int:
        """CRC-32 over TYPE, SEQ, LEN and PAYLOAD: what a REFLECT echoes."""
        return crc32(bytes([self.type_byte, self.seq, len(self.payload)]) + self.payload)


def encode(frame: Frame) -> bytes:
    """Frame -> wire bytes (with SYNC and FCS)."""
    if not 0 <= len(frame.payload) <= 255:
        raise FrameError("payload longer than 255 bytes")
    body = bytes([frame.type_byte, frame.seq & 0xFF, len(frame.payload)]) + bytes(frame.payload)
    body += bytes([frame.ccur & 0xFF, frame.dcur & 0xFF])
    return bytes(SYNC) + body + crc32(body).to_bytes(4, "little")


def decode(wire: bytes) -> Frame:
    """Wire bytes of exactly one frame -> :class:`Frame`; raises :class:`FrameError`."""
    if len(wire) < OVERHEAD_BYTES:
        raise FrameError(f"truncated frame ({len(wire)} bytes)")
    if tuple(wire[:2]) != SYNC:
        raise FrameError("missing start delimiter")
    length = wire[4]
    if len(wire) != OVERHEAD_BYTES + length:
        raise FrameError(f"length field says {length} payload bytes, frame has {len(wire) - OVERHEAD_BYTES}")
    body, fcs = wire[2:-4], int.from_bytes(wire[-4:], "little")
    if crc32(body) != fcs:
        raise FrameError("bad FCS")
    return Frame(type=body[0] & 0x0F, flags=body[0] & 0xF0, seq=body[1],
                 payload=bytes(body[3:3 + length]), ccur=body[-2], dcur=body[-1])
