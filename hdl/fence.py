"""Epoch-tagged payload datapath: the sender's epoch and version on every payload message,
counted and fenced at the receiver.

On the wire, a payload message becomes ``TAG + body``, where ``TAG`` is
:data:`TAG_BYTES` bytes: the sender's epoch (32-bit little endian) and its protocol
version (one byte). :class:`EpochTagger` prepends it on the way into the link engine;
:class:`EpochFence` reads it on the way out and compares the epoch with the receiver's own:

* every message is counted as from an ``older``, the ``same`` or a ``newer`` epoch;
* ``mode`` decides what happens to cross-epoch (older or newer) messages: ``PASS`` delivers
  them, ``MARK`` delivers them with :data:`MARK_BIT` set in the version byte of the tag, and
  ``DROP`` discards them whole (counted in ``dropped``).

The tag is delivered with the message, so the consumer sees which epoch its data came from.
A message with no body after its tag cannot be classified: it is dropped and counted in
``malformed``.
"""
from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .common import message_signature, event_layout, count_events, refuse
from .epoch_format import FenceMode

__all__ = ["TAG_BYTES", "MARK_BIT", "FenceMode", "EpochTagger", "EpochFence", "FENCE_EVENTS",
           "encode_tag", "decode_tag"]

#: The fence's counters, as event strobes.
FENCE_EVENTS = event_layout(("older", "same", "newer", "dropped", "malformed"))

TAG_BYTES = 5
MARK_BIT = 0x80




def encode_tag(epoch: int, version: int) -> bytes:
    return epoch.to_bytes(4, "little") + bytes([version])


def decode_tag(message: bytes) -> tuple[int, int, bool]:
    """(epoch, version, marked) of a delivered message."""
    if len(message) < TAG_BYTES:
        raise ValueError("message shorter than its epoch tag")
    return int.from_bytes(message[:4], "little"), message[4] & ~MARK_BIT & 0xFF, bool(message[4] & MARK_BIT)


class EpochTagger(wiring.Component):
    """Prepends the sender's epoch and version to each message from ``i``.

    ``epoch`` and ``version`` are sampled when a message's first byte is offered, so one
    message carries one consistent tag.
    """
    i: In(message_signature())
    o: Out(message_signature())
    epoch: In(32)
    version: In(8)

    def elaborate(self, platform):
        m = Module()
        tag = Signal(8 * TAG_BYTES)
        index = Signal(range(TAG_BYTES))
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.i.valid):
                    m.d.sync += [tag.eq(Cat(self.epoch, self.version)), index.eq(0)]
                    m.next = "TAG"
            with m.State("TAG"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.data.eq(tag.word_select(index, 8))]
                with m.If(self.o.ready):
                    m.d.sync += index.eq(index + 1)
                    with m.If(index == TAG_BYTES - 1):
                        m.next = "BODY"
            with m.State("BODY"):
                wiring.connect(m, wiring.flipped(self.i), wiring.flipped(self.o))
                with m.If(self.i.valid & self.i.ready & self.i.payload.last):
                    m.next = "IDLE"
        return m


class EpochFence(wiring.Component):
    """Classifies tagged messages from ``i`` against ``epoch`` and applies ``mode``.

    Counters (``counter_width`` bits, default 32, wrapping): ``older``, ``same``, ``newer``,
    ``dropped``, ``malformed``; ``events`` (:data:`FENCE_EVENTS`) strobes in the cycle each
    one moves (with ``counter_width`` 0 only the strobes are built). Messages are buffered
    only by their tag (5 bytes), so the fence adds a few cycles of latency and no
    message-sized memory.
    """

    def __init__(self, counter_width: int = 32):
        if not 0 <= counter_width <= 32:
            refuse(self, f"counter_width must be 0..32, not {counter_width}")
        self.counter_width = counter_width
        super().__init__({
            "i": In(message_signature()),
            "o": Out(message_signature()),
            "epoch": In(32),
            "mode": In(2),
            **{name: Out(counter_width) for name in FENCE_EVENTS.members},
            "events": Out(FENCE_EVENTS),
        })

    def elaborate(self, platform):
        m = Module()
        count_events(m, self.events, self, self.counter_width)
        events = self.events
        tag = Signal(8 * TAG_BYTES)
        index = Signal(range(TAG_BYTES + 1))
        cross = Signal()
        drop = Signal()
        out_index = Signal(range(TAG_BYTES))
        sender_epoch = tag[:32]
        with m.FSM():
            with m.State("TAG"):
                m.d.comb += self.i.ready.eq(1)
                with m.If(self.i.valid):
                    m.d.sync += [tag.word_select(index, 8).eq(self.i.payload.data), index.eq(index + 1)]
                    with m.If(self.i.payload.last):
                        m.d.sync += index.eq(0)
                        m.d.comb += events.malformed.eq(1)
                    with m.Elif(index == TAG_BYTES - 1):
                        m.next = "CLASSIFY"
            with m.State("CLASSIFY"):
                older, newer = sender_epoch < self.epoch, sender_epoch > self.epoch
                with m.If(older):
                    m.d.comb += events.older.eq(1)
                with m.Elif(newer):
                    m.d.comb += events.newer.eq(1)
                with m.Else():
                    m.d.comb += events.same.eq(1)
                is_cross = older | newer
                m.d.sync += [cross.eq(is_cross), drop.eq(is_cross & (self.mode == FenceMode.DROP)),
                             out_index.eq(0), index.eq(0)]
                with m.If(is_cross & (self.mode == FenceMode.DROP)):
                    m.d.comb += events.dropped.eq(1)
                    m.next = "BODY"
                with m.Else():
                    m.next = "EMIT_TAG"
            with m.State("EMIT_TAG"):
                byte = tag.word_select(out_index, 8)
                marked = Mux((out_index == TAG_BYTES - 1) & cross & (self.mode == FenceMode.MARK),
                             byte | MARK_BIT, byte)
                m.d.comb += [self.o.valid.eq(1), self.o.payload.data.eq(marked)]
                with m.If(self.o.ready):
                    m.d.sync += out_index.eq(out_index + 1)
                    with m.If(out_index == TAG_BYTES - 1):
                        m.next = "BODY"
            with m.State("BODY"):
                with m.If(drop):
                    m.d.comb += self.i.ready.eq(1)
                with m.Else():
                    wiring.connect(m, wiring.flipped(self.i), wiring.flipped(self.o))
                with m.If(self.i.valid & self.i.ready & self.i.payload.last):
                    m.next = "TAG"
        return m
