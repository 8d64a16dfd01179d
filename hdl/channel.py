"""A synthesizable model of a noisy serial link: fixed latency, bit errors, bursts, cuts.

The model sits between one link engine's ``phy_tx`` and the other's ``phy_rx``. Every
impairment is set through input ports (from cocotb or a register bank) and evaluated in
gateware, so long simulations and board self-tests need no per-cycle Python.

Where the impairments act:

* Bit errors and bursts are applied on the **input side**, when a byte enters the wire
  (before the delay line); ``bytes_corrupted`` and ``bits_flipped`` count them there, so
  they include corrupted bytes that a later ``cut`` drops.
* ``cut`` acts on the **output side**: while it is 1, nothing leaves the wire and every
  byte that would have left is counted in ``bytes_dropped``. Bytes still in flight when
  the cut ends are delivered normally.

Bookkeeping: ``bytes_in == bytes_out + bytes_dropped + (valid bytes in flight)``, and no
more than ``delay`` bytes are in flight.
"""
from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

from .common import phy_rx_signature, phy_tx_signature, refuse

__all__ = ["ChannelModel", "LiteChannel", "ber_to_threshold", "threshold_to_byte_error_probability"]

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


def ber_to_threshold(ber: float) -> int:
    """The ``error_threshold`` that gives a bit error rate of ``ber``.

    An error event flips exactly one bit of the byte, so the bit error rate is
    P(event per byte) / 8; rates above 1/8 are clipped to an event on (almost) every byte.
    Returns ``round(min(8 * ber, 1) * 2**32)`` clipped to ``2**32 - 1``.
    """
    if not ber >= 0:
        raise ValueError(f"bit error rate must be >= 0, not {ber!r}")
    return min(round(min(8 * ber, 1.0) * 2**32), _U32)


def threshold_to_byte_error_probability(threshold: int) -> float:
    """P(error event per byte) for an ``error_threshold``; the bit error rate is this / 8."""
    if not 0 <= threshold <= _U32:
        raise ValueError(f"threshold must fit in 32 bits, not {threshold!r}")
    return threshold / 2**32


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def _xorshift(x, width, a, b, c):
    """One xorshift step (left a, right b, left c) on an Amaranth value of ``width`` bits."""
    x = x ^ (x << a)[:width]
    x = x ^ (x >> b)
    return x ^ (x << c)[:width]


class ChannelModel(wiring.Component):
    """A one-direction wire with fixed latency and programmable impairments.

    Parameters
    ----------
    delay : int
        Latency in cycles, >= 1: a byte accepted on ``tx`` in cycle ``t`` is presented on
        ``rx`` in cycle ``t + delay``. Up to :attr:`REGISTER_DELAY_MAX` cycles the delay
        line is a register chain, beyond that a ring buffer of 9-bit words in a
        :class:`~amaranth.lib.memory.Memory` (block RAM; one iCE40 block up to 256 cycles).
    seed : int
        Positive seed for the pseudo-random generators (expanded with splitmix64). The
        same seed gives the same error pattern for the same traffic, from reset on.

    Pseudo-random numbers come from an xorshift64 generator and an 8-bit maximal-length
    LFSR, both advanced every cycle. The low word of the xorshift64 state decides error
    events, the high word burst starts, and the three lowest bits of the high word choose
    the bit to flip (they hardly influence the burst decision, so the two are practically
    independent); the LFSR state, never zero, is the burst pattern.

    Ports
    -----
    tx : In(stream.Signature(8))
        Bytes entering the wire. ``tx.ready`` is always 1: a wire never stalls.
    rx : Out(phy_rx_signature())
        Bytes leaving the wire, ``delay`` cycles later.
    error_threshold : In(32)
        An error event hits a byte when a fresh 32-bit random number is below this, so
        P(event per byte) = ``error_threshold / 2**32``. An event flips exactly one bit,
        chosen uniformly; the bit error rate is therefore P(event) / 8
        (see :func:`ber_to_threshold`). The random number is compared with the threshold
        a cycle ahead, so a new threshold applies from the cycle after it is set (the same
        for ``burst_threshold``).
    burst_threshold : In(32)
        Each byte outside a burst starts one with probability ``burst_threshold / 2**32``.
    burst_length : In(16)
        Bytes per burst, counting the byte that starts it; every byte of a burst is XORed
        with a pseudo-random nonzero byte. 0 disables bursts. A new burst can start on the
        byte after one ends; error events still happen during a burst.
    cut : In(1)
        While 1, ``rx.valid`` is 0: every byte reaching the end of the wire is dropped.
    bytes_in, bytes_out, bytes_corrupted, bits_flipped, bytes_dropped : Out(32)
        Wrapping counters (modulo 2**32; take differences modulo 2**32). A byte counts as
        corrupted when its value actually changed: a burst pattern can cancel a same-byte
        single-bit event. ``bits_flipped`` counts the bits that changed.
    """

    tx: In(phy_tx_signature())
    rx: Out(phy_rx_signature())
    error_threshold: In(32)
    burst_threshold: In(32)
    burst_length: In(16)
    cut: In(1)
    bytes_in: Out(32)
    bytes_out: Out(32)
    bytes_corrupted: Out(32)
    bits_flipped: Out(32)
    bytes_dropped: Out(32)

    #: Delays up to this many cycles use a register chain instead of a memory.
    REGISTER_DELAY_MAX = 4

    def __init__(self, *, delay: int = 1, seed: int = 1):
        if not isinstance(delay, int) or delay < 1:
            refuse(self, f"delay must be an integer >= 1, not {delay!r}")
        if not isinstance(seed, int) or seed < 1:
            refuse(self, f"seed must be a positive integer, not {seed!r}")
        self.delay = delay
        self.seed = seed
        super().__init__()

    def _prng_inits(self):
        s64 = _splitmix64(self.seed) or 0x9E3779B97F4A7C15
        s8 = 1 + self.seed % 255
        return s64, s8

    def elaborate(self, platform):
        m = Module()
        tx, rx = self.tx, self.rx
        m.d.comb += tx.ready.eq(1)

        s64_init, s8_init = self._prng_inits()
        s64 = Signal(64, init=s64_init)
        s64_next = _xorshift(s64, 64, 13, 7, 17)
        s8 = Signal(8, init=s8_init)
        m.d.sync += [
            s64.eq(s64_next),
            # Galois LFSR, x^8 + x^6 + x^5 + x^4 + 1: period 255, all nonzero bytes.
            s8.eq((s8 >> 1) ^ Mux(s8[0], 0xB8, 0)),
        ]

        # The comparisons of the random words with the thresholds are made a cycle ahead,
        # from the generator's next state, so that only registered decisions reach the byte
        # on the wire. (A threshold written in cycle t therefore applies from cycle t + 1, and
        # the cycle that leaves reset draws no event and starts no burst.)
        event, burst_draw = Signal(), Signal()
        m.d.sync += [event.eq(s64_next[:32] < self.error_threshold),
                     burst_draw.eq(s64_next[32:] < self.burst_threshold)]
        flip_bit = s64[32:35]
        flip = Signal(8)
        m.d.comb += flip.eq(Cat(*(event & (flip_bit == i) for i in range(8))))

        # Bursts. burst_left counts the burst bytes still to come after the current one;
        # `burst_on` is burst_left != 0, kept as a flag beside it.
        burst_left = Signal(16)
        burst_on = Signal()
        burst_start = ~burst_on & (self.burst_length != 0) & burst_draw
        in_burst = burst_on | burst_start
        with m.If(tx.valid):
            with m.If(burst_on):
                m.d.sync += [burst_left.eq(burst_left - 1), burst_on.eq(burst_left != 1)]
            with m.Elif(burst_start):
                m.d.sync += [burst_left.eq(self.burst_length - 1), burst_on.eq(self.burst_length != 1)]

        mask = Signal(8)
        m.d.comb += mask.eq(flip ^ Mux(in_burst, s8, 0))
        with m.If(tx.valid):
            m.d.sync += [
                self.bytes_in.eq(self.bytes_in + 1),
                self.bits_flipped.eq(self.bits_flipped + sum(mask[i] for i in range(8))),
            ]
            with m.If(mask != 0):
                m.d.sync += self.bytes_corrupted.eq(self.bytes_corrupted + 1)

        # Delay line of {valid, byte} words.
        word = Cat(tx.payload ^ mask, tx.valid)
        if self.delay <= self.REGISTER_DELAY_MAX:
            stages = [Signal(9, name=f"line{i}") for i in range(self.delay)]
            m.d.sync += stages[0].eq(word)
            m.d.sync += [later.eq(earlier) for earlier, later in zip(stages, stages[1:])]
            line_out, primed = stages[-1], Const(1)
        else:
            depth = 1 << (self.delay - 1).bit_length()
            m.submodules.line = line = memory.Memory(shape=9, depth=depth, init=[])
            wr = line.write_port()
            rd = line.read_port(transparent_for=())
            ptr = Signal(range(depth))
            m.d.sync += ptr.eq(ptr + 1)
            # The synchronous read adds the last cycle of latency.
            m.d.comb += [
                wr.addr.eq(ptr), wr.data.eq(word), wr.en.eq(1),
                rd.addr.eq(ptr - (self.delay - 1)),
            ]
            # Memory contents survive a reset; hide them until the line has refilled.
            age = Signal(range(self.delay + 1))
            with m.If(age != self.delay):
                m.d.sync += age.eq(age + 1)
            line_out, primed = rd.data, age == self.delay

        arriving = line_out[8] & primed
        m.d.comb += [
            rx.payload.eq(line_out[:8]),
            rx.valid.eq(arriving & ~self.cut),
        ]
        with m.If(arriving):
            with m.If(self.cut):
                m.d.sync += self.bytes_dropped.eq(self.bytes_dropped + 1)
            with m.Else():
                m.d.sync += self.bytes_out.eq(self.bytes_out + 1)

        return m


class LiteChannel(wiring.Component):
    """A slim :class:`~epochlink.hdl.channel.ChannelModel` for small FPGAs (delay 1, the
    same ``tx``/``rx``/``error_threshold``/``cut`` ports, no bursts, no statistics).

    Error events come from a 16-bit maximal-length LFSR compared with the top 16 bits of
    ``error_threshold``: P(event per byte) is ``error_threshold[16:32] / 2**16`` (the low
    16 bits are ignored, so the smallest nonzero rate is 2**-16 per byte), and an event flips
    one bit chosen by three other LFSR bits. 0 injects nothing, as in the full model.
    """

    tx: In(phy_tx_signature())
    rx: Out(phy_rx_signature())
    error_threshold: In(32)
    cut: In(1)

    def __init__(self, *, seed=1):
        self.seed = 1 + (seed * 0x9E37) % 0xFFFF
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        lfsr = Signal(16, init=self.seed)
        # Galois LFSR x^16 + x^14 + x^13 + x^11 + 1 (period 2**16 - 1, never 0)
        m.d.sync += lfsr.eq((lfsr >> 1) ^ Mux(lfsr[0], 0xB400, 0))
        event = Signal()
        flip_bit = Signal(3)
        m.d.sync += [event.eq(lfsr < self.error_threshold[16:]), flip_bit.eq(lfsr[5:8])]
        # The random decision is registered: it applies to the next byte (same statistics).
        flip = Cat(*(event & (flip_bit == i) for i in range(8)))
        m.d.comb += self.tx.ready.eq(1)
        m.d.sync += [self.rx.valid.eq(self.tx.valid & ~self.cut),
                     self.rx.payload.eq(self.tx.payload ^ flip)]
        return m
