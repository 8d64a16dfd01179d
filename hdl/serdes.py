"""Board-to-board serial link PHY: one single-ended wire per direction, no shared clock.

Line code
=========

Each byte travels as an asynchronous frame of ten bit-times, least significant bit first::

    idle(1) ... | start(0) | d0 d1 d2 d3 d4 d5 d6 d7 | stop(1) | idle(1) ... | start(0) ...

Every bit lasts ``divisor`` (``N``) cycles of the local clock, so the *line rate* is
``f_clk / N`` bit/s and the *payload rate* of a saturated link is
``f_clk / (10 N) * R / (R + 1)`` byte/s, where ``R`` is ``resync_interval`` (see below):

================  ======  ==========  ===============  ==================
board clock       N       line rate   payload (R=64)   peer compatibility
================  ======  ==========  ===============  ==================
48 MHz iCE40      5       9.6 Mbit/s  945 kbyte/s      default build
125 MHz ECP5      13      9.615 Mbit  947 kbyte/s      default build (+0.16 %)
48 MHz iCE40      3       16 Mbit/s   1.58 Mbyte/s     fastest (N >= 3)
125 MHz ECP5      4       31.25 Mbit  3.08 Mbyte/s     ECP5 peers only
================  ======  ==========  ===============  ==================

Why this design
---------------

* **No clock recovery is needed.** The receiver re-times itself on the falling edge of every
  start bit, so clock error only accumulates over one 10-bit frame. With the sample point
  placed ``s = (N - 1) // 2`` cycles after the detected edge (which is itself uncertain by one
  cycle), the tolerated frequency difference is ``min(s / 9N, (N - s - 1) / 10N)``
  (:func:`clock_tolerance`): ±3.3 % at ``N = 3``, ±2.7 % at ``N = 4``, ±4.0 % at ``N = 5``,
  ±4.6 % at ``N = 13``, ±4.9 % at ``N = 16``, before wire skew and duty-cycle distortion.
  Crystal oscillators (±50 ppm) and even ±2000 ppm RC oscillators are far inside this budget,
  which is also what lets boards with different clock frequencies talk to each other (a
  48 MHz iCE40 at ``N = 5`` and a 125 MHz ECP5 at ``N = 13`` differ by 0.16 %).
  8b/10b or Manchester would need a digital PLL and a comma/alignment machine to achieve
  the same at 2x (Manchester) or 1.25x (8b/10b, with similar efficiency) the symbol rate, on
  wires that are the bandwidth bottleneck anyway.
* **An idle line is just a high line.** Bytes may be sent back to back (the next start bit
  directly follows a stop bit) or with any gap in between; the link engine never has to fill.
* **Glitch filter.** For ``N >= 5`` the start and data bits are the majority of three
  consecutive samples around the bit centre, and the stop bit passes if either of its two
  centre samples is high, so a glitch shorter than one clock cycle cannot flip a bit. A low glitch on
  an idle line is rejected when the start bit is no longer low at its centre (``error`` pulses).
* **Framing recovery is guaranteed.** A classic UART receiver that mistakes a data-bit edge
  for a start bit can stay misframed indefinitely on back-to-back traffic with periodic data.
  The transmitter therefore inserts one idle frame (ten high bit-times) after every
  ``resync_interval`` back-to-back frames, unless the line has already been idle that long.
  After any line error the receiver is therefore back in frame within ``resync_interval + 2``
  frames, at a cost of ``1 / (R + 1)`` of the throughput (1.5 % for the default ``R = 64``).
  Errors never wedge the receiver: a bad stop bit drops the byte, pulses ``error`` and waits
  for the line to return high.

Bytes with flipped data bits are delivered as they are received: detecting them is the job of
the link layer's CRC. The PHY only guarantees that it resynchronises.

Wire discipline: the transmit line is driven from a flip-flop (no glitches), the receive line
goes through a two-flip-flop synchronizer (:class:`amaranth.lib.cdc.FFSynchronizer`) before
anything looks at it. Give the receive pin a pull-up so a disconnected cable reads as idle.
"""
from amaranth import Cat, Const, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

from .common import phy_rx_signature, phy_tx_signature, refuse

__all__ = ["FRAME_BITS", "SerialTransmitter", "SerialReceiver", "SerialPHY",
           "divisor_for", "line_rate", "payload_rate", "clock_tolerance"]

#: Bit-times per byte on the wire: start + 8 data + stop.
FRAME_BITS = 10

#: Default number of back-to-back frames between forced idle frames.
DEFAULT_RESYNC_INTERVAL = 64


def _check_divisor(divisor, component=None):
    if not isinstance(divisor, int) or divisor < 3:
        message = f"divisor must be an integer >= 3, not {divisor!r}"
        if component is not None:
            refuse(component, message)
        raise ValueError(message)


def divisor_for(clk_hz, bit_rate, *, max_error=0.005):
    """Integer divisor ``N`` giving ``bit_rate`` from ``clk_hz``, within ``max_error`` (relative).

    Raises :exc:`ValueError` if the nearest divisor is below 3 or misses by more than
    ``max_error``.
    """
    divisor = round(clk_hz / bit_rate)
    if divisor < 3:
        raise ValueError(f"{bit_rate / 1e6:g} Mbit/s needs a divisor below 3 at "
                         f"{clk_hz / 1e6:g} MHz; the PHY needs at least 3 samples per bit")
    error = abs(clk_hz / divisor - bit_rate) / bit_rate
    if error > max_error:
        raise ValueError(f"{clk_hz / 1e6:g} MHz / {divisor} = {clk_hz / divisor / 1e6:.4f} Mbit/s "
                         f"misses {bit_rate / 1e6:g} Mbit/s by {error:.2%} (> {max_error:.2%})")
    return divisor


def line_rate(clk_hz, divisor):
    """Line rate in bit/s."""
    return clk_hz / divisor


def payload_rate(clk_hz, divisor, resync_interval=DEFAULT_RESYNC_INTERVAL):
    """Payload bytes per second of a saturated link (forced idle frames included)."""
    rate = clk_hz / (divisor * FRAME_BITS)
    if resync_interval:
        rate *= resync_interval / (resync_interval + 1)
    return rate


def _sample_offset(divisor):
    # Cycles from the detected start edge to the sample point of each bit.
    return (divisor - 1) // 2


def clock_tolerance(divisor):
    """Largest relative clock-frequency difference between the two ends that still samples
    every bit of a frame inside its bit cell (ignoring wire skew and duty-cycle distortion).

    The detected start edge is up to one cycle late, so bit ``k`` is sampled ``k N + s`` to
    ``k N + s + 1`` cycles after the true edge (``s = (N - 1) // 2``). A slower transmitter must
    not push the start of bit 9 (the stop bit) past ``9 N + s``; a faster one must not pull its
    end (the earliest next start edge) before ``9 N + s + 1``.
    The majority vote does not change this: for data bits its middle sample and one neighbour
    stay inside, and the stop bit is decided at the nominal sample point.
    """
    _check_divisor(divisor)
    s = _sample_offset(divisor)
    return min(s / (9 * divisor), (divisor - s - 1) / (10 * divisor))


class SerialTransmitter(wiring.Component):
    """Byte stream to a 1-bit asynchronous line: start bit, eight data bits LSB first, stop bit.

    Parameters
    ----------
    divisor : int
        Clock cycles per bit (>= 3).
    resync_interval : int
        After this many back-to-back frames one idle frame is inserted so that a misframed
        receiver is guaranteed to resynchronise. ``0`` disables this (plain UART behaviour,
        e.g. towards a host serial port).

    Attributes
    ----------
    tx : In(phy_tx_signature())
        Bytes to send; ``ready`` is high when a frame can start in this cycle.
    line : Out(1)
        The serial line, registered, high when idle.
    """

    def __init__(self, divisor, *, resync_interval=DEFAULT_RESYNC_INTERVAL):
        _check_divisor(divisor, self)
        if not isinstance(resync_interval, int) or resync_interval < 0:
            refuse(self, f"resync_interval must be a non-negative integer, "
                         f"not {resync_interval!r}")
        self.divisor = divisor
        self.resync_interval = resync_interval
        super().__init__({
            "tx": In(phy_tx_signature()),
            "line": Out(1, init=1),
        })

    def elaborate(self, platform):
        m = Module()
        n = self.divisor

        # Everything `ready` depends on is a flip-flop or one LUT away from one, so that the
        # stage feeding the transmitter sees `ready` early in the cycle.
        busy = Signal()
        baud = Signal(range(n))
        bit_end = Signal()                      # registered: last cycle of a bit-time
        bits_left = Signal(range(FRAME_BITS))
        shreg = Signal(FRAME_BITS - 1)          # the bits after the one on the line
        slot_end = ~busy | (bit_end & (bits_left == 0))

        with m.If(bit_end):
            m.d.sync += baud.eq(0)
        with m.Else():
            m.d.sync += baud.eq(baud + 1)
        m.d.sync += bit_end.eq(~bit_end & (baud == n - 2))

        with m.If(busy & bit_end & (bits_left != 0)):
            m.d.sync += [
                self.line.eq(shreg[0]),
                shreg.eq(shreg >> 1),
                bits_left.eq(bits_left - 1),
            ]

        def start_frame(first_bit, rest):
            m.d.sync += [
                busy.eq(1),
                baud.eq(0),
                bit_end.eq(0),
                self.line.eq(first_bit),
                shreg.eq(rest),
                bits_left.eq(FRAME_BITS - 1),
            ]

        if self.resync_interval:
            # Data frames sent since the line was last idle for a whole frame.
            frames = Signal(range(self.resync_interval + 1))
            gap_due = Signal()                  # registered: frames == resync_interval
            idle_bits = Signal(range(FRAME_BITS + 1))

            with m.If(~busy & bit_end):
                with m.If(idle_bits == FRAME_BITS - 1):
                    m.d.sync += [frames.eq(0), gap_due.eq(0)]
                with m.If(idle_bits != FRAME_BITS):
                    m.d.sync += idle_bits.eq(idle_bits + 1)

            m.d.comb += self.tx.ready.eq(slot_end & ~gap_due)
            with m.If(slot_end):
                with m.If(self.tx.valid & gap_due):
                    start_frame(1, Const(-1, FRAME_BITS - 1))  # an all-idle frame
                    m.d.sync += [frames.eq(0), gap_due.eq(0)]
                with m.Elif(self.tx.valid):
                    start_frame(0, Cat(self.tx.payload, Const(1, 1)))
                    m.d.sync += [frames.eq(frames + 1),
                                 gap_due.eq(frames == self.resync_interval - 1)]
                with m.Elif(busy):
                    m.d.sync += [busy.eq(0), baud.eq(0), bit_end.eq(0), idle_bits.eq(0)]
        else:
            m.d.comb += self.tx.ready.eq(slot_end)
            with m.If(slot_end):
                with m.If(self.tx.valid):
                    start_frame(0, Cat(self.tx.payload, Const(1, 1)))
                with m.Elif(busy):
                    m.d.sync += busy.eq(0)

        return m


class SerialReceiver(wiring.Component):
    """1-bit asynchronous line to a byte stream; counterpart of :class:`SerialTransmitter`.

    The line passes through a two-stage :class:`~amaranth.lib.cdc.FFSynchronizer`. A falling
    edge on an idle line starts a frame; each bit is sampled ``(N - 1) // 2`` cycles after the
    start of its cell (as seen by the receiver), as the majority of three samples centred there
    when ``majority`` is on (the stop bit: the OR of that sample and the one before). A start
    bit that is high at its centre is a glitch and is ignored; a low stop bit drops the byte.
    Both pulse ``error`` for one cycle. Right after a good stop bit the receiver hunts for the
    next start edge, half a bit before the transmitter may send it.

    Parameters
    ----------
    divisor : int
        Clock cycles per bit (>= 3), same nominal bit time as the transmitter.
    majority : bool or None
        Three-sample majority vote per bit; ``None`` (default) enables it for ``divisor >= 5``,
        the smallest divisor where the three samples fit in the bit cell with margin.

    Attributes
    ----------
    line : In(1)
        The serial line (asynchronous to this domain). Idles high.
    rx : Out(phy_rx_signature())
        Received bytes, one-cycle ``valid`` pulses; cannot be stalled.
    error : Out(1)
        One-cycle pulse per false start or framing error.
    """

    def __init__(self, divisor, *, majority=None):
        _check_divisor(divisor, self)
        if majority is None:
            majority = divisor >= 5
        if majority and divisor < 5:
            refuse(self, f"majority sampling needs divisor >= 5, not {divisor}")
        self.divisor = divisor
        self.majority = bool(majority)
        super().__init__({
            "line": In(1, init=1),
            "rx": Out(phy_rx_signature()),
            "error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        n = self.divisor

        line = Signal(init=1)
        m.submodules.sync = FFSynchronizer(self.line, line, init=1, stages=2)

        # Start and data bits are sampled at `sample_at`. The stop bit is decided at the
        # nominal sample point `stop_at` even with majority voting: deciding it later would
        # return to HUNT later, and a faster transmitter's next start edge must not arrive
        # before that (the detection would be late, and the lateness would accumulate over
        # back-to-back frames). With majority voting the stop bit is the OR of the last two
        # samples, so a one-sample low glitch cannot fail it.
        stop_at = _sample_offset(n)
        if self.majority:
            older = Signal(2, init=0b11)
            m.d.sync += older.eq(Cat(line, older[0]))
            sample = (line & older[0]) | (line & older[1]) | (older[0] & older[1])
            sample_at = stop_at + 1             # the three samples are centred one cycle back
            stop = line | older[0]
        else:
            sample = line
            sample_at = stop_at
            stop = line

        # One-hot state and registered decodes of every position that matters (computed one
        # cycle ahead), so the next-state logic is a few LUTs deep whatever the divisor.
        waiting = Signal(init=1)                # WAIT_IDLE: need a high line first
        hunting = Signal()                      # HUNT: a low line starts a frame
        framing = Signal()                      # FRAME: in a frame
        baud = Signal(range(n))
        at_end = Signal()                       # baud == n - 1
        at_sample = Signal()                    # baud == sample_at
        at_stop = Signal()                      # baud == stop_at
        bit = Signal(range(FRAME_BITS))
        first_bit = Signal()                    # bit == 0 (start bit)
        last_bit = Signal()                     # bit == 9 (stop bit)
        shreg = Signal(8)

        def goto(position):                     # baud (and its decodes) for the next cycle
            return [baud.eq(position), at_end.eq(position == n - 1),
                    at_sample.eq(position == sample_at), at_stop.eq(position == stop_at)]

        m.d.sync += [self.rx.valid.eq(0), self.error.eq(0)]

        with m.If(waiting & line):
            m.d.sync += [waiting.eq(0), hunting.eq(1)]
        with m.If(hunting & ~line):
            m.d.sync += [hunting.eq(0), framing.eq(1), *goto(1),
                         bit.eq(0), first_bit.eq(1), last_bit.eq(0)]

        with m.If(framing):
            with m.If(at_end):
                m.d.sync += [*goto(0), bit.eq(bit + 1), first_bit.eq(0),
                             last_bit.eq(bit == FRAME_BITS - 2)]
            with m.Else():
                m.d.sync += [baud.eq(baud + 1), at_end.eq(baud == n - 2),
                             at_sample.eq(baud == sample_at - 1),
                             at_stop.eq(baud == stop_at - 1)]
            with m.If(last_bit & at_stop):
                m.d.sync += framing.eq(0)
                with m.If(stop):
                    m.d.sync += [self.rx.valid.eq(1), self.rx.payload.eq(shreg), hunting.eq(1)]
                with m.Else():                  # framing error: drop, wait for idle
                    m.d.sync += [self.error.eq(1), waiting.eq(1)]
            with m.If(first_bit & at_sample & sample):   # start bit gone: a glitch
                m.d.sync += [framing.eq(0), hunting.eq(1), self.error.eq(1)]
            with m.If(~first_bit & ~last_bit & at_sample):
                m.d.sync += shreg.eq(Cat(shreg[1:], sample))

        return m


class SerialPHY(wiring.Component):
    """A full-duplex serial port: :class:`SerialTransmitter` plus :class:`SerialReceiver`,
    with the byte streams of :func:`~epochlink.hdl.common.phy_tx_signature` /
    :func:`~epochlink.hdl.common.phy_rx_signature` that a link engine connects to.

    Parameters
    ----------
    divisor : int
        Clock cycles per bit (>= 3); see the module documentation for rates.
    resync_interval : int
        Passed to :class:`SerialTransmitter`.
    majority : bool or None
        Passed to :class:`SerialReceiver`.

    Attributes
    ----------
    tx : In(phy_tx_signature())
        Bytes to the wire (connect the link engine's ``phy_tx`` here).
    rx : Out(phy_rx_signature())
        Bytes from the wire (connect to the link engine's ``phy_rx``).
    tx_line : Out(1)
        To the output pin.
    rx_line : In(1)
        From the input pin (asynchronous; synchronized inside).
    rx_error : Out(1)
        One-cycle pulse per false start or framing error seen by the receiver.
    """

    def __init__(self, divisor, *, resync_interval=DEFAULT_RESYNC_INTERVAL, majority=None):
        _check_divisor(divisor, self)
        self.transmitter = SerialTransmitter(divisor, resync_interval=resync_interval)
        self.receiver = SerialReceiver(divisor, majority=majority)
        self.divisor = divisor
        self.resync_interval = resync_interval
        super().__init__({
            "tx": In(phy_tx_signature()),
            "rx": Out(phy_rx_signature()),
            "tx_line": Out(1, init=1),
            "rx_line": In(1, init=1),
            "rx_error": Out(1),
        })

    def line_rate(self, clk_hz):
        """Line rate in bit/s at a clock of ``clk_hz``."""
        return line_rate(clk_hz, self.divisor)

    def payload_rate(self, clk_hz):
        """Saturated payload rate in byte/s at a clock of ``clk_hz``."""
        return payload_rate(clk_hz, self.divisor, self.resync_interval)

    def elaborate(self, platform):
        m = Module()
        m.submodules.transmitter = tx = self.transmitter
        m.submodules.receiver = rx = self.receiver
        wiring.connect(m, wiring.flipped(self.tx), tx.tx)
        wiring.connect(m, rx.rx, wiring.flipped(self.rx))
        m.d.comb += [
            self.tx_line.eq(tx.line),
            rx.line.eq(self.rx_line),
            self.rx_error.eq(rx.error),
        ]
        return m
