"""Epoch engine constants and message format: one source for the gateware, the model and tests.

This module does not depend on Amaranth, so the pure-Python reference model
(:mod:`epochlink.sim.epoch_model`) and the host library can use it.

Messages
--------
The epoch engines of two neighbouring nodes talk over the control class of their link
(``ctrl_in``/``ctrl_out`` of :class:`~epochlink.hdl.link.LinkEngine`). A message has
2 to :data:`MSG_LEN` (10) bytes: each epoch field takes only the bytes its value needs
(0, 1, 2 or 4, little-endian), because every byte costs three times per hop (into the link,
on the wire, out of the link) and small epochs are the common case::

    byte:  0      1 .. e              e+1 .. e+c              e+c+1
         +------+-------------------+-----------------------+---------+
         | TYPE | EPOCH (LE, e B)   | COMMITTED (LE, c B)   | VERSION |
         +------+-------------------+-----------------------+---------+
    TYPE = SOLICIT (bit 7) | 0 (bit 6) | c code (bits 5:4) | e code (bits 3:2) | type (bits 1:0)
    length codes 0, 1, 2, 3 = 0, 1, 2, 4 bytes (a field of 0 bytes is 0)

=========  ==================================  ========================================
TYPE       sent                                fields
=========  ==================================  ========================================
REPORT 1   child -> parent (on its PARENT      EPOCH: sender's REPORT (min of its LOCAL
           port)                               and its children's reports); COMMITTED:
                                               sender's COMMITTED; VERSION: min ACTIVE of
                                               its subtree
COMMIT 2   parent -> child (on each CHILD      EPOCH: 0 (ignored); COMMITTED: sender's
           port)                               COMMITTED; VERSION: the converged version
=========  ==================================  ========================================

SOLICIT is set while the sender has not heard from the neighbour on that port (no REPORT from
a child, no COMMIT from the parent) since its own reset or the port's last role change. A
receiver whose port role matches answers it by sending its current state on that port. So a
role set after the link came up (the neighbour's link-up message arrived on an OFF port and
was dropped) still converges, without waiting for a link event.

Senders use the shortest code for each value; receivers accept any code. Receivers drop (and
count as *malformed*) messages whose length is not 2 + e + c, with another type or bit 6 set,
or with an epoch that does not fit the receiver's ``epoch_width``. Messages of the wrong type for the
port's role (a REPORT on a PARENT port, anything on an OFF port) are dropped and counted as
*misrouted*. Every field is monotone or idempotent: a lost message is made good by the next
one or by the resend when the link comes up, a repeated or stale one changes nothing
(except VERSION, which follows the latest message; versions may go down on a rollback).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "MSG_LEN", "MSG_MIN_LEN", "FIELD_BYTES", "field_code", "FLAG_SOLICIT", "VERSION_BITS", "CMD_VALUE_BITS", "MsgType", "Role", "Op",
    "CmdStatus", "FenceMode", "Message", "MessageError", "encode", "decode",
]

#: Bytes of the longest message (both epoch fields 4 bytes wide) and of the shortest.
MSG_LEN = 10
MSG_MIN_LEN = 2
#: Bytes of an epoch field by its 2-bit length code.
FIELD_BYTES = (0, 1, 2, 4)
#: TYPE bits: the type, and where the two length codes sit.
TYPE_MASK = 0x03
EPOCH_CODE_SHIFT = 2
COMMITTED_CODE_SHIFT = 4
RESERVED_BIT = 0x40
#: TYPE bit 7: the sender asks the receiver to send its current state on this link.
FLAG_SOLICIT = 0x80
#: Width of protocol versions (ACTIVE, converged); 0 means "unknown".
VERSION_BITS = 8
#: Width of the value field of a host command.
CMD_VALUE_BITS = 32


class MsgType(enum.IntEnum):
    """Message TYPE byte."""
    REPORT = 1   #: child -> parent: subtree meet, the child's COMMITTED, subtree min version
    COMMIT = 2   #: parent -> child: COMMITTED and the converged version


class Role(enum.IntEnum):
    """Role of a link port, set by the host (``Op.ROLE``)."""
    OFF = 0      #: the port takes no part; messages arriving on it are misrouted
    PARENT = 1   #: the neighbour is this node's parent (at most one port per node)
    CHILD = 2    #: the neighbour is a child: it must report before this subtree reports


class Op(enum.IntEnum):
    """Host command operation (``cmd.op``)."""
    PERSIST = 0  #: index = domain, value = epoch made durable: PERSISTED := value (only rises)
    ENABLE = 1   #: index = domain, value = its durable epoch: PERSISTED := value, enabled
    DISABLE = 2  #: index = domain: the domain no longer takes part in LOCAL
    READ = 3     #: index = domain: value = PERSISTED (0 while disabled), enabled flag
    ROLE = 4     #: index = port, value = :class:`Role`
    ACTIVE = 5   #: value = ACTIVE protocol version, 1..255
    ONLINE = 6   #: value = 1: take part (report, commit as root); 0: stop reporting


class CmdStatus(enum.IntEnum):
    """Outcome of a host command; anything but OK changed nothing and counts as refused."""
    OK = 0
    BAD_INDEX = 1   #: no such domain or port
    DISABLED = 2    #: PERSIST to a disabled domain
    LOWER = 3       #: would lower PERSISTED, or ENABLE below the node's floor (see docs)
    ILLEGAL = 4     #: unknown op, value out of range, a second PARENT port


class FenceMode(enum.IntEnum):
    """What a node's epoch fence does with payload from another epoch (see :mod:`~epochlink.hdl.fence`)."""
    PASS = 0     #: deliver it
    MARK = 1     #: deliver it with the mark bit set in its tag
    DROP = 2     #: discard it (counted)


class MessageError(ValueError):
    """A byte string is not a well-formed epoch message."""


@dataclass(frozen=True)
class Message:
    """One epoch message (see the module docstring for the fields)."""
    type: MsgType
    epoch: int
    committed: int
    version: int
    solicit: bool = False

    @classmethod
    def report(cls, epoch: int, committed: int, version: int, solicit=False) -> "Message":
        return cls(MsgType.REPORT, epoch, committed, version, solicit)

    @classmethod
    def commit(cls, committed: int, version: int, solicit=False) -> "Message":
        return cls(MsgType.COMMIT, 0, committed, version, solicit)


def field_code(value: int) -> int:
    """The shortest length code for an epoch field holding ``value``."""
    return 0 if value == 0 else 1 if value < 1 << 8 else 2 if value < 1 << 16 else 3


def encode(msg: Message) -> bytes:
    """The bytes of ``msg`` (shortest encoding)."""
    if not (0 <= msg.epoch < 1 << 32 and 0 <= msg.committed < 1 << 32
            and 0 <= msg.version < 1 << VERSION_BITS):
        raise ValueError(f"field out of range: {msg}")
    ecode, ccode = field_code(msg.epoch), field_code(msg.committed)
    kind = (int(msg.type) | ecode << EPOCH_CODE_SHIFT | ccode << COMMITTED_CODE_SHIFT
            | (FLAG_SOLICIT if msg.solicit else 0))
    return (bytes([kind]) + msg.epoch.to_bytes(FIELD_BYTES[ecode], "little")
            + msg.committed.to_bytes(FIELD_BYTES[ccode], "little") + bytes([msg.version]))


def decode(data: bytes, epoch_width: int = 32) -> Message:
    """Parse one message; raise :class:`MessageError` where a receiver counts it malformed."""
    if not data:
        raise MessageError("empty message")
    kind = data[0]
    if kind & RESERVED_BIT:
        raise MessageError(f"reserved TYPE bit set in {kind:#04x}")
    try:
        mtype = MsgType(kind & TYPE_MASK)
    except ValueError:
        raise MessageError(f"unknown type {kind:#04x}") from None
    elen = FIELD_BYTES[kind >> EPOCH_CODE_SHIFT & 3]
    clen = FIELD_BYTES[kind >> COMMITTED_CODE_SHIFT & 3]
    if len(data) != 2 + elen + clen:
        raise MessageError(f"length {len(data)}, expected {2 + elen + clen}")
    epoch = int.from_bytes(data[1:1 + elen], "little")
    committed = int.from_bytes(data[1 + elen:1 + elen + clen], "little")
    if epoch >> epoch_width or committed >> epoch_width:
        raise MessageError(f"epoch wider than {epoch_width} bits")
    return Message(mtype, epoch, committed, data[-1], bool(kind & FLAG_SOLICIT))
