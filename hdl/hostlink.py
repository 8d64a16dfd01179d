"""The host link: framed request/response protocol from a byte stream to the register bus.

The frame format, opcodes, status codes and checksum are defined once, in
:mod:`epochlink.hostproto`; this module implements the node's side of it.
"""

from amaranth import Module, Signal
from amaranth.lib import crc, data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from epochlink.hostproto import (CRC16_PARAMETERS, MAX_OUTSTANDING, SOF_REQUEST, SOF_RESPONSE,
                                 Opcode, Status)

from .common import count_events, event_layout, refuse
from .regbank import bus_signature
from .uart import UART_RX_EVENTS, UARTReceiver, UARTTransmitter, uart_divisor

__all__ = ["ResponseEntry", "HostLink", "UARTHostLink", "HOST_LINK_EVENTS", "UART_HOST_LINK_EVENTS"]

#: The host link's counters, as event strobes.
HOST_LINK_EVENTS = event_layout(("frames_ok", "frame_errors", "discarded"))
#: Those of a :class:`UARTHostLink`: the host link's and the UART receiver's.
UART_HOST_LINK_EVENTS = event_layout((*HOST_LINK_EVENTS.members, *UART_RX_EVENTS.members))


def _crc_parameters() -> crc.Parameters:
    return crc.Algorithm(**CRC16_PARAMETERS)(data_width=8)


class ResponseEntry(data.Struct):
    """One queued response: echoed tag, status code, data word."""
    tag: 8
    status: 8
    data: 32


class HostLink(wiring.Component):
    """Node side of the host protocol: request bytes in, response bytes out, register bus.

    Request bytes are parsed one per cycle. A complete frame with a good checksum becomes
    one register bus access; its answer (or a link-layer error answer, see
    :mod:`epochlink.hostproto`) is queued in a ``queue_depth``-entry response queue and
    serialized on ``tx`` back to back. Parsing stalls (``rx.ready`` low) only while the
    response queue is full, i.e. when the host exceeds its window of outstanding requests.

    A frame is abandoned after ``timeout`` consecutive cycles without a byte (answered with
    ``TRUNCATED`` if its tag had arrived). Nothing but a complete frame with a good checksum
    and a known opcode ever reaches the bus, and every path returns to hunting for a SOF.

    Parameters
    ----------
    timeout : int
        Inter-byte timeout in clock cycles (>= 2).
    queue_depth : int
        Responses the queue holds (the host's window).
    counter_width : int
        Width of the statistics counters (they wrap; 0: none, count ``events`` elsewhere).

    Members
    -------
    rx : In(stream.Signature(8))
        Request bytes from the host.
    tx : Out(stream.Signature(8))
        Response bytes to the host.
    bus : Out(bus_signature())
        The register bus.
    frames_ok : Out(counter_width)
        Requests executed on the bus.
    frame_errors : Out(counter_width)
        Requests answered with a link-layer error.
    discarded : Out(counter_width)
        Bytes discarded while hunting for a SOF (and lone SOFs that timed out).
    events : Out(HOST_LINK_EVENTS)
        Strobes in the cycle each counter moves.
    idle : Out(1)
        The parser is hunting for a SOF and no response is pending (for tests/monitors).
    """

    def __init__(self, *, timeout: int, queue_depth: int = MAX_OUTSTANDING,
                 counter_width: int = 32) -> None:
        if timeout < 2:
            refuse(self, "timeout must be at least 2 cycles")
        if queue_depth < 1:
            refuse(self, "queue_depth must be at least 1")
        self.timeout = timeout
        self.queue_depth = queue_depth
        self.counter_width = counter_width
        super().__init__({
            "rx": In(stream.Signature(8)),
            "tx": Out(stream.Signature(8)),
            "bus": Out(bus_signature()),
            "frames_ok": Out(counter_width),
            "frame_errors": Out(counter_width),
            "discarded": Out(counter_width),
            "events": Out(HOST_LINK_EVENTS),
            "idle": Out(1),
        })

    def elaborate(self, platform) -> Module:
        m = Module()
        count_events(m, self.events, self, self.counter_width)
        m.submodules.queue = queue = fifo.SyncFIFOBuffered(
            width=ResponseEntry.as_shape().size, depth=self.queue_depth)
        m.submodules.rx_crc = rx_crc = _crc_parameters().create()
        m.submodules.tx_crc = tx_crc = _crc_parameters().create()

        hunting = self._parser(m, queue, rx_crc)
        tx_active = self._serializer(m, queue, tx_crc)
        m.d.comb += self.idle.eq(hunting & ~queue.r_rdy & ~tx_active)
        return m

    # -- request side --------------------------------------------------------------------

    def _parser(self, m: Module, queue: fifo.SyncFIFOBuffered, rx_crc) -> Signal:
        rx, req, rsp = self.rx, self.bus.req, self.bus.rsp
        byte = rx.payload
        take = Signal()                     # a request byte is consumed this cycle
        m.d.comb += take.eq(rx.valid & rx.ready)

        idx = Signal(range(16))             # position of the byte after the SOF
        tag = Signal(8)
        opcode = Signal(8)
        addr = Signal(16)
        wdata = Signal(32)
        timer = Signal(range(self.timeout))
        error = Signal(8)
        answer_status = Signal(8)
        answer_data = Signal(32)
        is_write = Signal()
        m.d.comb += is_write.eq(opcode == Opcode.WRITE)
        last_idx = Signal(range(16))        # index of the final checksum byte
        m.d.comb += last_idx.eq(is_write.as_unsigned() * 4 + 5)

        entry = ResponseEntry(queue.w_data)
        m.d.comb += [
            rx_crc.data.eq(byte),
            req.payload.addr.eq(addr),
            req.payload.write.eq(is_write),
            req.payload.wdata.eq(wdata),
        ]

        hunting = Signal()
        with m.FSM():
            with m.State("HUNT"):
                m.d.comb += [rx.ready.eq(1), hunting.eq(1)]
                with m.If(take):
                    with m.If(byte == SOF_REQUEST):
                        m.d.comb += rx_crc.start.eq(1)
                        m.d.sync += [idx.eq(0), timer.eq(0)]
                        m.next = "BODY"
                    with m.Else():
                        m.d.comb += self.events.discarded.eq(1)

            with m.State("BODY"):
                m.d.comb += rx.ready.eq(1)
                with m.If(take):
                    m.d.comb += rx_crc.valid.eq(1)
                    m.d.sync += [idx.eq(idx + 1), timer.eq(0)]
                    with m.Switch(idx):
                        with m.Case(0):
                            m.d.sync += tag.eq(byte)
                        with m.Case(1):
                            m.d.sync += opcode.eq(byte)
                            with m.If((byte != Opcode.READ) & (byte != Opcode.WRITE)):
                                m.d.sync += error.eq(Status.BAD_OPCODE)
                                m.next = "ERROR"
                        with m.Case(2):
                            m.d.sync += addr[:8].eq(byte)
                        with m.Case(3):
                            m.d.sync += addr[8:].eq(byte)
                        for i in range(4):
                            with m.Case(4 + i):
                                m.d.sync += wdata[8 * i:8 * i + 8].eq(byte)
                    with m.If((idx >= 5) & (idx == last_idx)):
                        m.next = "CHECK"
                with m.Else():
                    m.d.sync += timer.eq(timer + 1)
                    with m.If(timer == self.timeout - 1):
                        with m.If(idx == 0):        # only the SOF: nothing to answer
                            m.d.comb += self.events.discarded.eq(1)
                            m.next = "HUNT"
                        with m.Else():
                            m.d.sync += error.eq(Status.TRUNCATED)
                            m.next = "ERROR"

            with m.State("CHECK"):
                # The CRC register has absorbed the checksum bytes: residue check.
                with m.If(rx_crc.match_detected):
                    m.next = "EXECUTE"
                with m.Else():
                    m.d.sync += error.eq(Status.BAD_CHECKSUM)
                    m.next = "ERROR"

            with m.State("EXECUTE"):
                # Only issue the access when its answer is sure to fit in the queue.
                m.d.comb += req.valid.eq(queue.w_rdy)
                with m.If(req.valid & req.ready):
                    m.next = "WAIT"

            with m.State("WAIT"):
                # The answer is registered before it is queued: the responders' handshake
                # stays out of the queue's level logic. (It fits: EXECUTE made sure.)
                with m.If(rsp.valid):
                    m.d.sync += [answer_status.eq(rsp.payload.status.as_value()),
                                 answer_data.eq(rsp.payload.rdata)]
                    m.next = "ANSWER"

            with m.State("ANSWER"):
                m.d.comb += [
                    entry.tag.eq(tag),
                    entry.status.eq(answer_status),
                    entry.data.eq(answer_data),
                    queue.w_en.eq(1),
                ]
                m.d.comb += self.events.frames_ok.eq(1)
                m.next = "HUNT"

            with m.State("ERROR"):
                m.d.comb += [
                    entry.tag.eq(tag),
                    entry.status.eq(error),
                    entry.data.eq(0),
                    queue.w_en.eq(queue.w_rdy),
                ]
                with m.If(queue.w_rdy):
                    m.d.comb += self.events.frame_errors.eq(1)
                    m.next = "HUNT"
        return hunting

    # -- response side -------------------------------------------------------------------

    def _serializer(self, m: Module, queue: fifo.SyncFIFOBuffered, tx_crc) -> Signal:
        tx = self.tx
        active = Signal()
        idx = Signal(range(9))
        current = Signal(ResponseEntry)

        m.d.comb += [tx.valid.eq(active), tx_crc.data.eq(tx.payload)]
        with m.Switch(idx):
            with m.Case(0):
                m.d.comb += tx.payload.eq(SOF_RESPONSE)
            with m.Case(1):
                m.d.comb += tx.payload.eq(current.tag)
            with m.Case(2):
                m.d.comb += tx.payload.eq(current.status)
            for i in range(4):
                with m.Case(3 + i):
                    m.d.comb += tx.payload.eq(current.data[8 * i:8 * i + 8])
            with m.Case(7):
                m.d.comb += tx.payload.eq(tx_crc.crc[:8])
            with m.Case(8):
                m.d.comb += tx.payload.eq(tx_crc.crc[8:])

        sent = Signal()
        m.d.comb += sent.eq(tx.valid & tx.ready)
        with m.If(sent):
            m.d.sync += idx.eq(idx + 1)
            m.d.comb += [tx_crc.start.eq(idx == 0),
                         tx_crc.valid.eq((idx >= 1) & (idx <= 6))]
            with m.If(idx == 8):
                m.d.sync += active.eq(0)
        # Load the next response the cycle after the previous one's last byte went out (a
        # cycle in a UART byte time: the transmitter's handshake stays out of the queue).
        with m.If(~active & queue.r_rdy):
            m.d.comb += queue.r_en.eq(1)
            m.d.sync += [current.eq(queue.r_data), idx.eq(0), active.eq(1)]
        return active


class UARTHostLink(wiring.Component):
    """The host link over a UART: :class:`UARTReceiver` + :class:`HostLink` + :class:`UARTTransmitter`.

    Parameters
    ----------
    divisor : int
        Clock cycles per UART bit (see :func:`epochlink.hdl.uart.uart_divisor`).
    timeout : int
        Inter-byte timeout in clock cycles; must exceed one byte time (``10 * divisor``)
        by a margin. Pick it longer than the worst gap the host's serial path can leave
        inside a frame (USB adapters: about a millisecond).
    queue_depth, counter_width :
        As for :class:`HostLink`.

    Members
    -------
    rx : In(1)
        UART input pin.
    tx : Out(1)
        UART output pin.
    bus : Out(bus_signature())
        The register bus.
    frames_ok, frame_errors, discarded : Out(counter_width)
        :class:`HostLink` statistics.
    framing_errors, overruns : Out(counter_width)
        :class:`UARTReceiver` statistics.
    events : Out(UART_HOST_LINK_EVENTS)
        Strobes in the cycle each of these counters moves.
    """

    def __init__(self, *, divisor: int, timeout: int, queue_depth: int = MAX_OUTSTANDING,
                 counter_width: int = 32) -> None:
        if timeout <= 12 * divisor:
            refuse(self, f"timeout of {timeout} cycles is not longer than a byte "
                         f"({10 * divisor} cycles) with margin")
        self.divisor = divisor
        self.timeout = timeout
        self.queue_depth = queue_depth
        self.counter_width = counter_width
        super().__init__({
            "rx": In(1, init=1),
            "tx": Out(1, init=1),
            "bus": Out(bus_signature()),
            "frames_ok": Out(counter_width),
            "frame_errors": Out(counter_width),
            "discarded": Out(counter_width),
            "framing_errors": Out(counter_width),
            "overruns": Out(counter_width),
            "events": Out(UART_HOST_LINK_EVENTS),
        })

    @classmethod
    def for_clock(cls, clk_hz: float, baud: float, *, timeout_s: float = 2e-3,
                  **kwargs) -> "UARTHostLink":
        """A host link for a ``clk_hz`` clock at ``baud`` with an inter-byte timeout of
        ``timeout_s`` seconds (at least 20 byte times). Raises :class:`ValueError` if the
        baud rate cannot be made within 2 %."""
        divisor = uart_divisor(clk_hz, baud)
        timeout = max(round(clk_hz * timeout_s), 20 * 10 * divisor)
        return cls(divisor=divisor, timeout=timeout, **kwargs)

    def elaborate(self, platform) -> Module:
        m = Module()
        m.submodules.receiver = receiver = UARTReceiver(self.divisor, counter_width=self.counter_width)
        m.submodules.transmitter = transmitter = UARTTransmitter(self.divisor)
        m.submodules.link = link = HostLink(timeout=self.timeout, queue_depth=self.queue_depth,
                                            counter_width=self.counter_width)
        wiring.connect(m, receiver.o, link.rx)
        wiring.connect(m, link.tx, transmitter.i)
        wiring.connect(m, link.bus, wiring.flipped(self.bus))
        m.d.comb += [
            receiver.rx.eq(self.rx),
            self.tx.eq(transmitter.tx),
            self.frames_ok.eq(link.frames_ok),
            self.frame_errors.eq(link.frame_errors),
            self.discarded.eq(link.discarded),
            self.framing_errors.eq(receiver.framing_errors),
            self.overruns.eq(receiver.overruns),
            *(self.events[name].eq(link.events[name]) for name in HOST_LINK_EVENTS.members),
            *(self.events[name].eq(receiver.events[name]) for name in UART_RX_EVENTS.members),
        ]
        return m
