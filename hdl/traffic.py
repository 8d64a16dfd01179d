"""Self-checking message traffic: a synthesizable generator, a matching checker, and the
Python reference both are built from.

Message ``seq`` (counting from 0 after reset, wrapping at 2**32) has the length
:func:`message_length` ``(seq, min_length, max_length)`` and the content
:func:`expected_message`:

* bytes 0..3: ``seq`` as 32-bit little endian (only the first ``length`` of them when the
  message is shorter than 4 bytes);
* byte ``i >= 4``: the low byte of xorshift32 (shifts 13, 17, 5) applied ``i - 3`` times
  to ``(2 * seq + 1) mod 2**32``.

The length is ``lo + ((h(seq) * (hi - lo + 1)) >> 8)`` with ``lo = max(min_length, 1)``,
``hi = max(max_length, lo)`` and ``h`` a fixed 8-bit hash of ``seq`` (``_length_hash``:
the XOR of its four bytes, mixed by two odd multiplications): pseudo-random in
``[lo, hi]``, close to uniform, and fixed when ``min_length == max_length``. Because it
depends on ``seq`` only, the checker can verify lengths although they vary.
"""
from amaranth import Cat, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .common import message_signature

__all__ = ["TrafficGenerator", "TrafficChecker", "message_length", "expected_message"]

_U32 = (1 << 32) - 1


def _xorshift32(x: int) -> int:
    x ^= (x << 13) & _U32
    x ^= x >> 17
    return x ^ ((x << 5) & _U32)


def _length_hash(seq: int) -> int:
    x = (seq ^ (seq >> 8) ^ (seq >> 16) ^ (seq >> 24)) & 0xFF
    x = (x * 0x9D + 0x5B) & 0xFF
    x ^= x >> 3
    x = (x * 0x6D) & 0xFF
    return x ^ (x >> 4)


def message_length(seq: int, min_length: int, max_length: int) -> int:
    """Length in bytes of message ``seq`` for the given ``min_length``/``max_length`` knobs."""
    if not (0 <= min_length <= 255 and 0 <= max_length <= 255):
        raise ValueError(f"length knobs are 8-bit, not {min_length!r}, {max_length!r}")
    lo = max(min_length, 1)
    hi = max(max_length, lo)
    return lo + ((_length_hash(seq & _U32) * (hi - lo + 1)) >> 8)


def expected_message(seq: int, min_length: int, max_length: int) -> bytes:
    """The exact bytes of message ``seq``, as :class:`TrafficGenerator` sends them."""
    seq &= _U32
    length = message_length(seq, min_length, max_length)
    body = bytearray(seq.to_bytes(4, "little")[:length])
    state = (2 * seq + 1) & _U32
    while len(body) < length:
        state = _xorshift32(state)
        body.append(state & 0xFF)
    return bytes(body)


def _xorshift32_hw(x):
    x = x ^ (x << 13)[:32]
    x = x ^ (x >> 17)
    return x ^ (x << 5)[:32]


def _content_seed_hw(seq):
    return Cat(1, seq[:31])


def _message_length_hw(m, seq, min_length, max_length):
    """Add the logic of :func:`message_length` to ``m``; returns the 8-bit length signal."""
    x = Signal(8)
    y = Signal(8)
    h = Signal(8)
    lo = Signal(8)
    hi = Signal(8)
    length = Signal(8)
    m.d.comb += [
        x.eq(((seq[0:8] ^ seq[8:16] ^ seq[16:24] ^ seq[24:32]) * 0x9D + 0x5B)[:8]),
        y.eq(((x ^ (x >> 3)) * 0x6D)[:8]),
        h.eq(y ^ (y >> 4)),
        lo.eq(Mux(min_length == 0, 1, min_length)),
        hi.eq(Mux(max_length > lo, max_length, lo)),
        length.eq(lo + ((h * (hi - lo + 1)) >> 8)),
    ]
    return length


class TrafficGenerator(wiring.Component):
    """Sends messages ``0, 1, 2, ...`` following :func:`expected_message`.

    The output is registered and can carry one byte per cycle: ``out.valid`` stays high
    while ``enable`` is 1 and messages remain. ``enable`` pauses between any two bytes
    (a message may be split in time, never altered). ``count`` caps the total number of
    messages since reset (0 = unlimited) and is checked only when a message begins.
    Change ``min_length``/``max_length`` only while no message is in progress.

    Ports
    -----
    out : Out(message_signature())
    enable : In(1)
    min_length, max_length : In(8)
        Message length range; see :func:`message_length`.
    count : In(32)
        Messages to send since reset; 0 = unlimited.
    sent : Out(32)
        Messages completely transferred (wrapping).
    """

    out: Out(message_signature())
    enable: In(1)
    min_length: In(8)
    max_length: In(8)
    count: In(32)
    sent: Out(32)

    def elaborate(self, platform):
        m = Module()
        out = self.out

        seq = Signal(32)    # message being generated
        idx = Signal(8)     # index of the next byte to generate in it
        state = Signal(32)  # content generator for bytes 4 and up
        next_state = Signal(32)
        m.d.comb += next_state.eq(_xorshift32_hw(state))
        length = _message_length_hw(m, seq, self.min_length, self.max_length)

        at_start = idx == 0
        may_send = self.enable & (~at_start | (self.count == 0) | (seq < self.count))
        load = may_send & (~out.valid | out.ready)
        # ">=" rather than "==" so that a length knob lowered mid-message cannot run away.
        last = idx + 1 >= length

        with m.If(load):
            m.d.sync += [
                out.valid.eq(1),
                out.payload.data.eq(Mux(idx < 4, seq.word_select(idx[:2], 8), next_state[:8])),
                out.payload.last.eq(last),
            ]
            with m.If(last):
                m.d.sync += [idx.eq(0), seq.eq(seq + 1)]
            with m.Else():
                m.d.sync += idx.eq(idx + 1)
            with m.If(idx < 4):
                m.d.sync += state.eq(_content_seed_hw(seq))
            with m.Else():
                m.d.sync += state.eq(next_state)
        with m.Elif(out.ready):
            m.d.sync += out.valid.eq(0)

        with m.If(out.valid & out.ready & out.payload.last):
            m.d.sync += self.sent.eq(self.sent + 1)

        return m


class TrafficChecker(wiring.Component):
    """Checks a message stream against :func:`expected_message`; always ready.

    Each message's sequence number is read from its first bytes (for messages shorter
    than 4 bytes, the missing high bytes are taken from the expected number). A message
    whose number is not the expected one counts in ``errors_sequence`` (loss, duplicate
    and reordering all show up this way) and the expectation then resynchronizes to that
    number + 1, so a single loss counts once. Note that a corrupted sequence field
    therefore counts twice: for that message and for the next one.

    Content bytes are checked against the message's own sequence number, so a lost or
    duplicated message is not also a content error. A message with any wrong content
    byte, or whose length differs from :func:`message_length` for its number (given the
    same ``min_length``/``max_length`` as the generator), counts once in ``errors_content``.

    Ports
    -----
    inp : In(message_signature())
    min_length, max_length : In(8)
        Must match the generator's.
    received : Out(32)
        Messages (a byte with ``last`` = 1 ends one).
    bytes : Out(32)
        Bytes of all messages.
    errors_sequence, errors_content : Out(32)
    last_sequence : Out(32)
        Sequence number of the last message received (0 before the first).

    All counters wrap at 2**32.
    """

    inp: In(message_signature())
    min_length: In(8)
    max_length: In(8)
    received: Out(32)
    bytes: Out(32)
    errors_sequence: Out(32)
    errors_content: Out(32)
    last_sequence: Out(32)

    def elaborate(self, platform):
        m = Module()
        inp = self.inp
        m.d.comb += inp.ready.eq(1)
        data = inp.payload.data

        expected = Signal(32)  # sequence number the next message should carry
        seq = Signal(32)       # sequence number of the current message, as far as received
        idx = Signal(8)        # index of the incoming byte; saturates, as 255 is never legal
        bad = Signal()         # a content byte of the current message was wrong
        state = Signal(32)     # expected content generator, as in the generator
        next_state = Signal(32)
        m.d.comb += next_state.eq(_xorshift32_hw(state))

        in_header = idx < 4
        cur_seq = Signal(32)
        m.d.comb += cur_seq.eq(Cat(*(
            Mux(in_header & (idx == i), data, seq[8 * i:8 * i + 8])
            for i in range(4))))
        length = _message_length_hw(m, cur_seq, self.min_length, self.max_length)
        byte_wrong = ~in_header & (data != next_state[:8])
        length_ok = idx + 1 == length

        with m.If(inp.valid):
            m.d.sync += self.bytes.eq(self.bytes + 1)
            with m.If(in_header):
                m.d.sync += state.eq(_content_seed_hw(cur_seq))
            with m.Else():
                m.d.sync += state.eq(next_state)

            with m.If(inp.payload.last):
                m.d.sync += [
                    self.received.eq(self.received + 1),
                    self.last_sequence.eq(cur_seq),
                    expected.eq(cur_seq + 1),
                    seq.eq(cur_seq + 1),
                    idx.eq(0), bad.eq(0),
                ]
                with m.If(cur_seq != expected):
                    m.d.sync += self.errors_sequence.eq(self.errors_sequence + 1)
                with m.If(bad | byte_wrong | ~length_ok):
                    m.d.sync += self.errors_content.eq(self.errors_content + 1)
            with m.Else():
                m.d.sync += [seq.eq(cur_seq), bad.eq(bad | byte_wrong)]
                with m.If(idx != 255):
                    m.d.sync += idx.eq(idx + 1)

        return m
