"""Board-independent part of the FPGA tops: the NIC core interface, the cores, the board shell.

A board top (:class:`BoardTop`, subclassed per board in ``boards/<board>.py``) owns everything
that depends on the board: the PLL and the ``sync`` clock domain, the pins, one
:class:`~epochlink.hdl.serdes.SerialPHY` per link port and the LEDs. Everything else is one
*NIC core* component with the :class:`NICCoreSignature` interface, built by a core factory
``core(ports=..., clk_hz=...)``:

=============== ======================================= =====================================
member          direction (core's view)                  meaning
=============== ======================================= =====================================
``phy_tx[i]``   Out(:func:`phy_tx_signature`)           bytes for link port ``i``
``phy_rx[i]``   In(:func:`phy_rx_signature`)            bytes from link port ``i``
``phy_error``   In(ports)                               PHY receiver error pulses, per port
``uart_rx``     In(1)                                   host serial line (asynchronous)
``uart_tx``     Out(1)                                  host serial line
``link_up``     Out(ports)                              per-port link state, for LEDs
``activity``    Out(ports)                              per-port traffic pulses, for LEDs
``fault``       Out(1)                                  error pulses, for an LED
``commit``      Out(1)                                  a pulse when COMMITTED changes, for an
                                                        LED (0 in cores without epoch engine)
=============== ======================================= =====================================

Cores available here (:data:`CORES`; :func:`default_core` picks the default):

* ``"nic"``, :class:`~epochlink.hdl.nic.NICCore`: the epochlink NIC, the epoch engine and a
  :class:`~epochlink.hdl.link.LinkEngine` per port behind the host link and register map.
* ``"selftest"``, :class:`SelfTestCore`: a link bit-error-rate tester. Every port sends a
  PRBS-15 byte stream and checks the stream it receives with a self-synchronising checker;
  the host UART (115200 8N1) prints per-port counters on request. Needs nothing but the PHY,
  so it proves the board flow, the wiring between boards and the PHY at the chosen rate.

Integration point: :func:`default_core`.
"""
import math

from amaranth import Array, Cat, Elaboratable, Module, Mux, Signal
from amaranth.lib import io, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..hdl.channel import LiteChannel
from ..hdl.nic import NICCore, NICCoreSignature
from ..hdl.common import phy_rx_signature, phy_tx_signature, refuse
from ..hdl.frame import LINK_COUNTERS
from ..hdl.serdes import SerialPHY, SerialReceiver, SerialTransmitter, divisor_for

__all__ = ["NICCoreSignature", "LiteChannel", "PRBSGenerator", "PRBSChecker", "StatusReporter",
           "SelfTestCore", "BoardTop", "CORES", "default_core", "HOST_BAUD", "LINK_BIT_RATE",
           "REPORT_LINE"]

#: Host UART baud rate of the self-test core.
HOST_BAUD = 115200

#: Default line rate of the link ports: 48 MHz / 5 on the iCEBreaker, 125 MHz / 13 on the
#: ULX3S (+0.16 %), so that any two boards can be wired together.
LINK_BIT_RATE = 9.6e6

#: One line of the self-test report per port (``#`` port, ``S`` state, ``R``/``B``/``E``
#: hex digits of received bytes, bad bytes and PHY errors, most significant first).
REPORT_LINE = "P# SSSS rx RRRRRRRR bad BBBBBBBB err EEEEEEEE\r\n"


def _prbs15_next_byte(history):
    # `history` holds the previous 16 bits of the PRBS-15 sequence (x^15 + x^14 + 1), oldest
    # in bit 0. Bit n of the sequence is b[n-15] ^ b[n-14]; the next eight bits only need
    # bits that are already in the history.
    return history[1:9] ^ history[2:10]


class PRBSGenerator(wiring.Component):
    """PRBS-15 byte stream (x^15 + x^14 + 1, eight sequence bits per byte, first bit in
    bit 0). The sequence never has 15 zero bits in a row, so no two consecutive bytes are 0.

    Attributes
    ----------
    o : Out(phy_tx_signature())
        Always valid; advances on every transfer.
    """

    def __init__(self, seed=0xACE1):
        if not (seed >> 1) & 0x7FFF:
            refuse(self, "seed must have a non-zero PRBS state in bits 1..15")
        self.seed = seed
        super().__init__({"o": Out(phy_tx_signature())})

    def elaborate(self, platform):
        m = Module()
        history = Signal(16, init=self.seed)
        byte = _prbs15_next_byte(history)
        m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(byte)]
        with m.If(self.o.ready):
            m.d.sync += history.eq(Cat(history[8:], byte))
        return m


class PRBSChecker(wiring.Component):
    """Self-synchronising checker for :class:`PRBSGenerator` streams.

    Each byte is predicted from the previous two *received* bytes, so the checker locks after
    two good bytes whatever the phase of the sender, and one corrupted, lost or inserted byte
    costs at most three mismatches. A history of 16 zero bits is impossible in PRBS-15, so a
    stuck-at-zero input never counts as good.

    Attributes
    ----------
    i : In(phy_rx_signature())
        Received bytes.
    good, bad : Out(1)
        One-cycle pulses: the byte matched / did not match the prediction.
    """

    def __init__(self):
        super().__init__({"i": In(phy_rx_signature()), "good": Out(1), "bad": Out(1)})

    def elaborate(self, platform):
        m = Module()
        history = Signal(16)
        match = (self.i.payload == _prbs15_next_byte(history)) & (history != 0)
        m.d.sync += [self.good.eq(0), self.bad.eq(0)]
        with m.If(self.i.valid):
            m.d.sync += [
                history.eq(Cat(history[8:], self.i.payload)),
                self.good.eq(match),
                self.bad.eq(~match),
            ]
        return m


def _hex_digit(nibble):
    return Mux(nibble < 10, ord("0") + nibble, ord("a") - 10 + nibble)


class StatusReporter(wiring.Component):
    """Formats one :data:`REPORT_LINE` per port into a byte stream when ``start`` pulses.

    The values of all ports are taken when ``start`` is seen (while idle) and printed from that
    snapshot. At the start of each line the port's three counters are loaded into a 96-bit
    shift register that gives up one hex digit per character, and the line template is a
    small ROM with a registered read, so the character path is short; the output is
    registered too.

    Attributes
    ----------
    start : In(1)
        Begin a report (ignored while one is being sent).
    up : In(ports)
        Link state per port.
    rx_bytes, bad_bytes, phy_errors : In(32).array(ports)
        Counters per port.
    o : Out(stream.Signature(8))
        Report text.
    busy : Out(1)
        A report is being sent (the values were sampled at its start).
    """

    _CONST, _PORT, _STATE, _HEX = range(4)

    def __init__(self, ports):
        self.ports = ports
        super().__init__({
            "start": In(1),
            "up": In(ports),
            "rx_bytes": In(32).array(ports),
            "bad_bytes": In(32).array(ports),
            "phy_errors": In(32).array(ports),
            "o": Out(stream.Signature(8)),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        ports = self.ports
        snap_up = Signal(ports)
        snap = {key: Array(Signal(32, name=f"snap_{key}{p}") for p in range(ports))
                for key in ("rx", "bad", "err")}
        sources = {"rx": self.rx_bytes, "bad": self.bad_bytes, "err": self.phy_errors}

        generating = Signal()              # characters left to produce
        load_line = Signal()               # load the next port's counters before its line
        line = Signal(range(max(ports, 2)))
        column = Signal(range(len(REPORT_LINE)))
        digits = Signal(96)                # rx, bad, err; next hex digit in the top nibble
        line_up = Signal()

        with m.If(~self.busy & self.start):
            m.d.sync += [generating.eq(1), load_line.eq(1), line.eq(0), column.eq(0),
                         snap_up.eq(self.up)]
            for key, array in snap.items():
                for p in range(ports):
                    m.d.sync += array[p].eq(sources[key][p])

        with m.If(load_line):
            m.d.sync += [
                load_line.eq(0),
                digits.eq(Cat(snap["err"][line], snap["bad"][line], snap["rx"][line])),
                line_up.eq(snap_up.bit_select(line, 1)),
            ]

        # The line template as a ROM addressed by (column, link state): what kind of
        # character each column is, and its letter. The read is registered, so its data is
        # valid one cycle after `column` or `line_up` changes (`settled`). One character per
        # two cycles is plenty for a UART.
        template = []
        for up in (0, 1):
            for col in range(1 << len(column)):
                ch = REPORT_LINE[col] if col < len(REPORT_LINE) else "\0"
                if ch == "#":
                    template.append((self._PORT, 0))
                elif ch == "S":
                    k = REPORT_LINE[:col].count("S")
                    template.append((self._STATE, ord(("UP  " if up else "DOWN")[k])))
                elif ch in "RBE":
                    template.append((self._HEX, 0))
                else:
                    template.append((self._CONST, ord(ch)))
        m.submodules.template = rom = Memory(shape=10, depth=len(template),
                                             init=[kind | (const << 2)
                                                   for kind, const in template])
        rom_port = rom.read_port()
        m.d.comb += rom_port.addr.eq(Cat(column, line_up))
        kind = rom_port.data[:2]
        const = rom_port.data[2:]
        settled = Signal()
        m.d.sync += settled.eq(1)
        char = Signal(8)
        with m.Switch(kind):
            with m.Case(self._PORT):
                m.d.comb += char.eq(ord("0") + line)
            with m.Case(self._HEX):
                m.d.comb += char.eq(_hex_digit(digits[92:96]))
            with m.Default():
                m.d.comb += char.eq(const)

        # A character is loaded only into an empty output register: `o.ready` never reaches
        # the counters and the shift register (a UART takes one character per thousands of
        # cycles, so the idle cycle in between costs nothing).
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(~self.o.valid):
            with m.If(generating & ~load_line & settled):
                m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(char), settled.eq(0)]
                with m.If(kind == self._HEX):
                    m.d.sync += digits.eq(digits << 4)
                with m.If(column == len(REPORT_LINE) - 1):
                    m.d.sync += column.eq(0)
                    with m.If(line == ports - 1):
                        m.d.sync += generating.eq(0)
                    with m.Else():
                        m.d.sync += [line.eq(line + 1), load_line.eq(1)]
                with m.Else():
                    m.d.sync += column.eq(column + 1)
        with m.If(load_line):
            m.d.sync += settled.eq(0)          # `line_up` changes: the STATE letters too

        m.d.comb += self.busy.eq(generating | self.o.valid)
        return m


class SelfTestCore(wiring.Component):
    """NIC core that tests the links: PRBS-15 on every port, counters on the host UART.

    Every port sends :class:`PRBSGenerator` bytes back to back and checks what it receives
    with a :class:`PRBSChecker`. A port is *up* after 32 consecutive good bytes and goes down
    on a bad byte or when nothing arrives for ``2**20`` cycles. Any byte received on the host
    UART (``baud``, 8N1) prints one :data:`REPORT_LINE` per port; the byte ``c`` also clears
    the counters (read-and-clear). A single corrupted byte on the wire counts as up to three
    bad bytes (the checker predicts from the two previous bytes).

    Parameters
    ----------
    ports : int
        Number of link ports.
    clk_hz : float
        Frequency of the ``sync`` domain (for the UART divisor).
    baud : int
        Host UART baud rate.
    """

    LOCK_RUN = 32
    TIMEOUT_BITS = 20

    def __init__(self, *, ports, clk_hz, baud=HOST_BAUD):
        self.ports = ports
        self.clk_hz = clk_hz
        self.uart_divisor = divisor_for(clk_hz, baud, max_error=0.01)
        super().__init__(NICCoreSignature(ports))

    def elaborate(self, platform):
        m = Module()
        ports = self.ports

        m.submodules.uart_rx = uart_rx = SerialReceiver(self.uart_divisor)
        m.submodules.uart_tx = uart_tx = SerialTransmitter(self.uart_divisor, resync_interval=0)
        m.submodules.reporter = reporter = StatusReporter(ports)
        m.d.comb += [uart_rx.line.eq(self.uart_rx), self.uart_tx.eq(uart_tx.line)]
        wiring.connect(m, reporter.o, uart_tx.tx)
        clear = Signal()
        m.d.comb += [
            reporter.start.eq(uart_rx.rx.valid),
            clear.eq(uart_rx.rx.valid & (uart_rx.rx.payload == ord("c")) & ~reporter.busy),
        ]

        fault = Signal(ports)
        for p in range(ports):
            m.submodules[f"gen{p}"] = gen = PRBSGenerator(seed=0xACE1 + 0x1F2 * p)
            m.submodules[f"chk{p}"] = chk = PRBSChecker()
            wiring.connect(m, gen.o, wiring.flipped(self.phy_tx[p]))
            wiring.connect(m, wiring.flipped(self.phy_rx[p]), chk.i)

            rx_bytes = Signal(32, name=f"rx_bytes{p}")
            bad_bytes = Signal(32, name=f"bad_bytes{p}")
            phy_errors = Signal(32, name=f"phy_errors{p}")
            run = Signal(range(self.LOCK_RUN + 1), name=f"run{p}")
            silent = Signal(self.TIMEOUT_BITS + 1, name=f"silent{p}")
            up = self.link_up[p]

            with m.If(clear):
                m.d.sync += [rx_bytes.eq(0), bad_bytes.eq(0), phy_errors.eq(0)]
            with m.Else():
                with m.If(self.phy_rx[p].valid):
                    m.d.sync += rx_bytes.eq(rx_bytes + 1)
                with m.If(chk.bad):
                    m.d.sync += bad_bytes.eq(bad_bytes + 1)
                with m.If(self.phy_error[p]):
                    m.d.sync += phy_errors.eq(phy_errors + 1)

            with m.If(chk.bad):
                m.d.sync += [run.eq(0), up.eq(0)]
            with m.Elif(chk.good):
                with m.If(run == self.LOCK_RUN):
                    m.d.sync += up.eq(1)
                with m.Else():
                    m.d.sync += run.eq(run + 1)

            with m.If(self.phy_rx[p].valid):
                m.d.sync += silent.eq(0)
            with m.Elif(silent[-1]):
                m.d.sync += [run.eq(0), up.eq(0)]
            with m.Else():
                m.d.sync += silent.eq(silent + 1)

            m.d.comb += [
                self.activity[p].eq(self.phy_rx[p].valid),
                fault[p].eq(chk.bad | self.phy_error[p]),
                reporter.up[p].eq(up),
                reporter.rx_bytes[p].eq(rx_bytes),
                reporter.bad_bytes[p].eq(bad_bytes),
                reporter.phy_errors[p].eq(phy_errors),
            ]

        m.d.comb += self.fault.eq(fault.any())
        return m


#: Core factories by name: ``factory(ports=..., clk_hz=...)`` -> NIC core component.
CORES = {
    "nic": NICCore,
    "selftest": SelfTestCore,
}


def default_core():
    """Name of the core that board builds use when none is chosen.

    Integration point: ``"nic"`` (:class:`~epochlink.hdl.nic.NICCore`) is the real NIC. It becomes the
    default once it fits and meets timing on both boards (``python -m epochlink.boards build
    <board> --core nic`` reports both); until then the default is the PHY self-test.
    """
    return "selftest"


class BoardTop(Elaboratable):
    """The shell common to all boards: clock, one PHY per port, core, host UART, LEDs.

    Subclasses set ``platform_class``, ``clk_hz`` and ``max_ports``, add the link port
    resources (``link`` 0..ports-1, subsignals ``tx``/``rx``) in :meth:`add_resources`, and
    implement :meth:`make_sync_domain` (define the ``sync`` domain, usually from a PLL) and
    :meth:`elaborate_leds`.

    Parameters
    ----------
    ports : int
        Link ports (1..``max_ports``).
    core : str or callable
        A name in :data:`CORES` or a factory ``core(ports=..., clk_hz=...)``.
    bit_rate : float
        Link line rate; the PHY divisor is ``clk_hz / bit_rate`` (within 0.5 %).
    core_args : dict
        More keyword arguments for the core factory (e.g. ``node_id`` for ``"nic"``).
    clk_hz : float
        ``sync`` clock instead of the board's default (the PLL must be able to make it): e.g.
        a design that misses timing at the default runs at a lower clock.
    """

    platform_class = None
    clk_hz = None
    max_ports = None
    #: Default arguments of the ``"nic"`` core on this board (``core_args`` override them).
    nic_args = {}

    def __init__(self, *, ports=2, core=None, bit_rate=LINK_BIT_RATE, core_args=None,
                 clk_hz=None):
        try:
            if clk_hz is not None:
                if not 10e6 <= clk_hz <= 400e6:
                    raise ValueError(f"clk_hz must be 10..400 MHz, not {clk_hz / 1e6:g} MHz")
                self.clk_hz = clk_hz          # instead of the board's default
            if not isinstance(ports, int) or not 1 <= ports <= self.max_ports:
                raise ValueError(f"{type(self).__name__} supports 1..{self.max_ports} ports, "
                                 f"not {ports!r}")
            if callable(core):
                self.core_name, factory = getattr(core, "__name__", repr(core)), core
            else:
                self.core_name = core or default_core()
                if self.core_name not in CORES:
                    raise ValueError(f"unknown core {self.core_name!r}; "
                                     f"known: {', '.join(CORES)}")
                factory = CORES[self.core_name]
            self.divisor = divisor_for(self.clk_hz, bit_rate)
        except ValueError as error:
            refuse(self, str(error))
        self.ports = ports
        self.bit_rate = self.clk_hz / self.divisor
        core_args = self.core_arguments(self.core_name, self.divisor, core_args)
        self.core = factory(ports=ports, clk_hz=self.clk_hz, **core_args)
        self.phys = [SerialPHY(self.divisor) for _ in range(ports)]

    @classmethod
    def core_arguments(cls, core_name, divisor, core_args=None):
        """Keyword arguments of core ``core_name``'s factory on this board besides ``ports``
        and ``clk_hz``, with a PHY bit divisor of ``divisor``; ``core_args`` override them."""
        if core_name != "nic":
            return dict(core_args or {})
        # A byte on the serial PHY: 10 bit times plus the resync gaps (< 1 bit per byte).
        # At that byte time the epoch engine's cut-through saves nothing worth its longer
        # critical path (a few cycles a hop against hundreds a message).
        return {"cut_through": False, **cls.nic_args, "phy_cycles_per_byte": 11 * divisor,
                **(core_args or {})}

    def led(self, m, platform, name, number, value):
        """Drive LED resource ``name``/``number`` with ``value`` (through an output buffer)."""
        port = platform.request(name, number, dir="-")
        m.submodules[f"{name}{number}"] = buffer = io.Buffer("o", port)
        m.d.comb += buffer.o.eq(value)

    @classmethod
    def make_platform(cls):
        """The board's platform, with the link port resources added."""
        platform = cls.platform_class()
        cls.add_resources(platform)
        return platform

    @classmethod
    def add_resources(cls, platform):
        """Add ``link`` resources 0..``max_ports``-1 (subsignals ``tx``/``rx``)."""
        raise NotImplementedError

    @classmethod
    def make_sync_domain(cls, m, platform, clk_hz):
        """Define the ``sync`` domain at ``clk_hz`` (from the board's oscillator through its
        PLL), held in reset until the clock is stable. Also used by the block builds
        (:mod:`epochlink.boards.blocks`)."""
        raise NotImplementedError

    def elaborate_leds(self, m, platform, *, link_up, link_led, fault_led, commit_led,
                       heartbeat):
        """Drive the board's LEDs. ``link_up``/``link_led`` have one bit per port (``link_led``
        already blinks with traffic); ``fault_led``, ``commit_led`` (lit ~0.2 s after
        COMMITTED changes) and ``heartbeat`` (about 1 Hz) are single bits."""
        raise NotImplementedError

    def elaborate(self, platform):
        m = Module()
        self.make_sync_domain(m, platform, self.clk_hz)
        m.submodules.core = core = self.core

        for p, phy in enumerate(self.phys):
            m.submodules[f"phy{p}"] = phy
            pins = platform.request("link", p, dir="-")
            m.submodules[f"link{p}_tx"] = tx_pin = io.Buffer("o", pins.tx)
            m.submodules[f"link{p}_rx"] = rx_pin = io.Buffer("i", pins.rx)
            wiring.connect(m, core.phy_tx[p], phy.tx)
            wiring.connect(m, phy.rx, core.phy_rx[p])
            m.d.comb += [
                tx_pin.o.eq(phy.tx_line),
                phy.rx_line.eq(rx_pin.i),
                core.phy_error[p].eq(phy.rx_error),
            ]

        uart = platform.request("uart", 0, dir="-")
        m.submodules.uart_rx = uart_rx = io.Buffer("i", uart.rx)
        m.submodules.uart_tx = uart_tx = io.Buffer("o", uart.tx)
        m.d.comb += [core.uart_rx.eq(uart_rx.i), uart_tx.o.eq(core.uart_tx)]

        # LED presentation: a link LED is on while the link is up and blinks (~11 Hz) while
        # bytes flow; the fault and commit LEDs light for ~0.2 s after each error / commit.
        phase_bit = round(math.log2(self.clk_hz * 0.045))
        blink = Signal(phase_bit + 1)
        m.d.sync += blink.eq(blink + 1)
        phase = blink[-1]
        hold = 1 << round(math.log2(self.clk_hz * 0.2))

        def recently(event, name):
            """1 for ``hold`` cycles after each pulse of ``event`` (registered first: events
            come from all over the chip)."""
            since = Signal(range(hold + 1), init=hold, name=name)
            pulse = Signal(name=f"{name}_event")
            m.d.sync += pulse.eq(event)
            with m.If(pulse):
                m.d.sync += since.eq(0)
            with m.Elif(since != hold):
                m.d.sync += since.eq(since + 1)
            return since != hold

        link_led = Signal(self.ports)
        for p in range(self.ports):
            busy = recently(core.activity[p], f"since_activity{p}")
            m.d.comb += link_led[p].eq(core.link_up[p] & ~(busy & phase))

        heartbeat = Signal(round(math.log2(self.clk_hz * 0.5)) + 1)     # ~1 Hz
        m.d.sync += heartbeat.eq(heartbeat + 1)

        self.elaborate_leds(m, platform, link_up=core.link_up, link_led=link_led,
                            fault_led=recently(core.fault, "since_fault"),
                            commit_led=recently(core.commit, "since_commit"),
                            heartbeat=heartbeat[-1])
        return m
