"""A synthesizable noise model for one serial wire (the line of :mod:`epochlink.hdl.serdes`).

:class:`~epochlink.hdl.channel.ChannelModel` corrupts *bytes* between two link engines;
:class:`LineNoise` corrupts the *line* between one :class:`~epochlink.hdl.serdes.SerialPHY`'s
``tx_line`` and another's ``rx_line``, so everything a real wire does to the PHY happens in
gateware too: flipped data bits, false start bits on an idle line, misframing, bad stop bits,
truncated frames.

Bit errors
----------
An error is the line inverted for one whole **bit time** (``divisor`` cycles). Shorter
flips would be pointless: the receiver's three-sample majority vote removes any flip
shorter than two samples (:class:`~epochlink.hdl.serdes.SerialReceiver`), so a per-cycle
flip model would hardly ever change a bit. Flips are *not* aligned to the transmitter's bit
cells: an error event may start in any cycle, with probability
``error_threshold / (2**32 * divisor)`` per cycle, so the expected number of events per bit
time is ``error_threshold / 2**32`` (:func:`ber_to_line_threshold`). A flip of one bit time
at an arbitrary phase overlaps two bit cells but covers the majority samples of exactly one
of them for ``divisor = 5`` (and at least one for any ``divisor >= 5``), so each event flips
one received bit: the rate of events is the bit error rate on the wire. It applies to every
bit time, busy or idle: on an idle line a flip is a low pulse of one bit time, which the
receiver takes as a start bit followed by ``0xFF`` (an extra byte between frames), as a real
UART would.

Events cannot overlap: an event that falls inside a flip in progress is dropped (at
``error_threshold / 2**32 = p`` this loses a fraction of about ``p`` of the events).

Random numbers: a 64-bit xorshift generator (a linear-feedback generator, Marsaglia 2003)
advanced every cycle, as in :class:`~epochlink.hdl.channel.ChannelModel`; its low 32 bits,
times ``divisor``, are compared with ``error_threshold``. (A plain one-bit-per-cycle
Fibonacci LFSR would be cheaper, but successive states are shifted copies of each other,
which makes threshold comparisons in nearby cycles strongly correlated: errors would come
in clusters.)

Cut
---
While ``cut`` is 1 the line is held **high**, i.e. idle: a cut wire on a board reads high
because the receive pins have pull-ups (``docs/boards.md``), and an idle line is what the
receiver sees when the peer is gone. The receiver then gets no bytes at all (at most one
truncated frame, whose remaining bits read as 1s), and the link engine notices the
silence through its dead-link timer. (Held low, the receiver would see one long start bit,
count one framing error and then wait for the line to go high: the same silence, plus an
error.) ``cut_level`` changes this.

Counters: ``flips`` counts error events (wrapping, 32 bits).
"""
from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .channel import _splitmix64, _xorshift
from .common import refuse

__all__ = ["LineNoise", "ber_to_line_threshold", "line_threshold_to_ber"]

_U32 = (1 << 32) - 1


def ber_to_line_threshold(ber: float) -> int:
    """The :class:`LineNoise` ``error_threshold`` for a bit error rate of ``ber`` on the wire:
    ``round(ber * 2**32)``, clipped to ``2**32 - 1``.

    The rate is per bit *time* of the line (busy or idle). Compare
    :func:`~epochlink.hdl.channel.ber_to_threshold`, whose threshold is a probability per
    *byte* of a one-bit error (``8 * ber * 2**32``); for the same ``ber`` this threshold is
    8 times smaller.
    """
    if not ber >= 0:
        raise ValueError(f"bit error rate must be >= 0, not {ber!r}")
    return min(round(min(ber, 1.0) * 2**32), _U32)


def line_threshold_to_ber(threshold: int) -> float:
    """Error events per bit time for a :class:`LineNoise` ``error_threshold``."""
    if not 0 <= threshold <= _U32:
        raise ValueError(f"threshold must fit in 32 bits, not {threshold!r}")
    return threshold / 2**32


class LineNoise(wiring.Component):
    """One direction of a serial wire: bit-time flips at a programmable rate, and a cut.

    Parameters
    ----------
    divisor : int
        Cycles per bit time of the line (the PHYs' ``divisor``, >= 3): the length of a flip.
    seed : int
        Positive seed of the generator (expanded with splitmix64). Same seed, same error
        times from reset on (whatever the traffic).
    cut_level : int
        Level of the line while ``cut`` is 1 (default 1: idle, like an open wire into a
        pulled-up input).

    Ports
    -----
    line_in : In(1)
        From the transmitter's ``tx_line``. Idles high.
    line_out : Out(1)
        To the receiver's ``rx_line``; registered (one cycle of wire delay).
    error_threshold : In(32)
        Expected flips per bit time times ``2**32`` (:func:`ber_to_line_threshold`).
    cut : In(1)
        Holds ``line_out`` at ``cut_level``.
    flips : Out(32)
        Error events so far (wrapping), counted whether or not the line is cut.
    """

    line_in: In(1, init=1)
    line_out: Out(1, init=1)
    error_threshold: In(32)
    cut: In(1)
    flips: Out(32)

    def __init__(self, divisor: int, *, seed: int = 1, cut_level: int = 1):
        if not isinstance(divisor, int) or divisor < 3:
            refuse(self, f"divisor must be an integer >= 3, not {divisor!r}")
        if not isinstance(seed, int) or seed < 1:
            refuse(self, f"seed must be a positive integer, not {seed!r}")
        if cut_level not in (0, 1):
            refuse(self, f"cut_level must be 0 or 1, not {cut_level!r}")
        self.divisor = divisor
        self.seed = seed
        self.cut_level = cut_level
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        n = self.divisor

        state = Signal(64, init=_splitmix64(self.seed) or 0x9E3779B97F4A7C15)
        m.d.sync += state.eq(_xorshift(state, 64, 13, 7, 17))

        # P(event in a cycle) = threshold / (2**32 n): compare rand * n (a constant multiply,
        # a couple of adders) with the threshold.
        scaled = Signal(32 + n.bit_length())
        m.d.comb += scaled.eq(state[:32] * n)
        event = scaled < self.error_threshold

        left = Signal(range(n + 1))            # cycles of the current flip still to come
        with m.If(left != 0):
            m.d.sync += left.eq(left - 1)
        with m.Elif(event):
            m.d.sync += [left.eq(n - 1), self.flips.eq(self.flips + 1)]

        flipping = (left != 0) | event
        with m.If(self.cut):
            m.d.sync += self.line_out.eq(self.cut_level)
        with m.Else():
            m.d.sync += self.line_out.eq(self.line_in ^ flipping)
        return m
