"""8N1 UART: a receiver and a transmitter with ``lib.stream`` byte ports.

Both take ``divisor``, the number of clock cycles per bit, as an elaboration parameter;
compute it with :func:`uart_divisor`. The smallest supported divisor is 4 (12 Mbaud from a
48 MHz clock).
"""
from __future__ import annotations

from amaranth import Module, Signal, Cat
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

from .common import count_events, event_layout, refuse

__all__ = ["MIN_DIVISOR", "uart_divisor", "UARTReceiver", "UARTTransmitter", "UART_RX_EVENTS"]

#: The receiver's counters, as event strobes.
UART_RX_EVENTS = event_layout(("framing_errors", "overruns"))

#: Smallest divisor (cycles per bit) the receiver supports: it samples each bit once, in
#: its middle, and needs a start-bit half period of at least 2 cycles.
MIN_DIVISOR = 4


def uart_divisor(clk_hz: float, baud: float, *, tolerance: float = 0.02) -> int:
    """Clock cycles per bit for ``baud`` with a ``clk_hz`` clock.

    Raises :class:`ValueError` if the resulting baud rate is off by more than ``tolerance``
    (2 %) or the divisor is below :data:`MIN_DIVISOR`.
    """
    if clk_hz <= 0 or baud <= 0:
        raise ValueError("clock frequency and baud rate must be positive")
    divisor = round(clk_hz / baud)
    if divisor < MIN_DIVISOR:
        raise ValueError(f"{baud} baud needs a divisor of {clk_hz / baud:.2f} at {clk_hz} Hz; "
                         f"the minimum is {MIN_DIVISOR}")
    error = abs(clk_hz / divisor - baud) / baud
    if error > tolerance:
        raise ValueError(f"{baud} baud at {clk_hz} Hz: divisor {divisor} gives "
                         f"{clk_hz / divisor:.0f} baud, {error:.1%} off (limit {tolerance:.0%})")
    return divisor


class UARTReceiver(wiring.Component):
    """8N1 UART receiver.

    The ``rx`` pin goes through a two-flop synchronizer. A falling edge starts a frame; the
    start bit is checked again in its middle (a shorter low pulse is ignored) and every
    data bit and the stop bit are sampled in their middle. A byte whose stop bit is 0 is
    dropped and counted in ``framing_errors``; the receiver then waits for the line to go
    high again, so a line held low (break) costs one framing error and never wedges it. The
    receiver is ready for the next start bit from the middle of the stop bit on.

    A byte is held on ``o`` until taken. A byte completed while the previous one is still
    waiting is dropped and counted in ``overruns``.

    Parameters
    ----------
    divisor : int
        Clock cycles per bit (>= 4).
    counter_width : int
        Width of the error counters (they wrap; 0: none, count ``events`` elsewhere).

    Members
    -------
    rx : In(1)
        The serial input pin (idle high).
    o : Out(stream.Signature(8))
        Received bytes.
    framing_errors : Out(counter_width)
        Bytes dropped for a 0 stop bit.
    overruns : Out(counter_width)
        Bytes dropped because ``o`` was not taken in time.
    """

    def __init__(self, divisor: int, *, counter_width: int = 32) -> None:
        if divisor < MIN_DIVISOR:
            refuse(self, f"divisor must be at least {MIN_DIVISOR}, not {divisor}")
        self.divisor = divisor
        self.counter_width = counter_width
        super().__init__({
            "rx": In(1, init=1),
            "o": Out(stream.Signature(8)),
            "framing_errors": Out(counter_width),
            "overruns": Out(counter_width),
            "events": Out(UART_RX_EVENTS),
        })

    def elaborate(self, platform) -> Module:
        m = Module()
        d = self.divisor
        count_events(m, self.events, self, self.counter_width)

        rx = Signal(init=1)
        m.submodules.sync = FFSynchronizer(self.rx, rx, init=1)

        timer = Signal(range(d))
        bits = Signal(range(8))
        shreg = Signal(8)

        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~rx):
                    # The edge happened during the previous cycle: the middle of the start
                    # bit is about d/2 cycles away.
                    m.d.sync += timer.eq(d // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    with m.If(~rx):
                        m.d.sync += [timer.eq(d - 1), bits.eq(0)]
                        m.next = "DATA"
                    with m.Else():
                        m.next = "IDLE"          # a glitch, not a start bit
            with m.State("DATA"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    m.d.sync += [timer.eq(d - 1), shreg.eq(Cat(shreg[1:], rx)), bits.eq(bits + 1)]
                    with m.If(bits == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    with m.If(rx):
                        with m.If(self.o.valid & ~self.o.ready):
                            m.d.comb += self.events.overruns.eq(1)
                        with m.Else():
                            m.d.sync += [self.o.payload.eq(shreg), self.o.valid.eq(1)]
                        m.next = "IDLE"
                    with m.Else():
                        m.d.comb += self.events.framing_errors.eq(1)
                        m.next = "WAIT_HIGH"
            with m.State("WAIT_HIGH"):
                # After a bad stop bit (or during a break) wait for the idle level.
                with m.If(rx):
                    m.next = "IDLE"
        return m


class UARTTransmitter(wiring.Component):
    """8N1 UART transmitter.

    Takes a byte from ``i`` whenever idle, and also in the last cycle of a stop bit, so
    that a stream of bytes goes out back to back at exactly 10 bit times per byte.

    Members
    -------
    i : In(stream.Signature(8))
        Bytes to send.
    tx : Out(1)
        The serial output pin (idle high), driven straight from a flip-flop.
    busy : Out(1)
        A frame is being sent.
    """

    def __init__(self, divisor: int) -> None:
        if divisor < 2:
            refuse(self, f"divisor must be at least 2, not {divisor}")
        self.divisor = divisor
        super().__init__({
            "i": In(stream.Signature(8)),
            "tx": Out(1, init=1),
            "busy": Out(1),
        })

    def elaborate(self, platform) -> Module:
        m = Module()
        d = self.divisor

        shreg = Signal(10, init=0x3FF)     # LSB goes out first; idles at all ones
        timer = Signal(range(d))
        left = Signal(range(11))           # bits still to send, including the current one

        m.d.comb += [
            self.tx.eq(shreg[0]),
            self.busy.eq(left != 0),
            self.i.ready.eq((left == 0) | ((left == 1) & (timer == 0))),
        ]
        with m.If(left != 0):
            m.d.sync += timer.eq(timer - 1)
            with m.If(timer == 0):
                m.d.sync += [timer.eq(d - 1), shreg.eq(Cat(shreg[1:], 1)), left.eq(left - 1)]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [shreg.eq(Cat(0, self.i.payload, 1)), left.eq(10), timer.eq(d - 1)]
        return m
