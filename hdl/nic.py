"""The complete epochlink NIC behind its host UART: what a board or a simulated node runs.

::

    uart_rx ─► UARTHostLink ─bus─► router ─┬─► RegisterBank ── status, control
    uart_tx ◄─                             ├─► CounterBank ◄── events of every block
                                           └─► EpochRegisters ─cmd/rsp─┐
                                                                       ▼
    phy_rx[p] ─► channel model[p] ─────────────────────────────► NICNode (EpochEngine,
    phy_tx[p] ◄──────────────────────────────────────────────────  LinkEngine per port,
                                                                    epoch tag and fence)

The register map (:func:`epochlink.registers.register_map`) is the one source: the router
sends the epoch engine's command registers to
:class:`~epochlink.hdl.epoch_regs.EpochRegisters`, the counters to the
:class:`~epochlink.hdl.counters.CounterBank` (block RAM: the host link, epoch engine, link
engines and fences are built without counters of their own and report events), and every
other register to the :class:`~epochlink.hdl.regbank.RegisterBank`.
"""
from amaranth import Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from epochlink.registers import register_map

from .channel import ChannelModel, LiteChannel
from .common import phy_rx_signature, phy_tx_signature, refuse
from .counters import CounterBank, counter_field
from .epoch_regs import EpochRegisters, command_addresses
from .frame import LINK_COUNTERS, OVERHEAD_BYTES, LinkState
from .hostlink import UARTHostLink
from .link import link_parameters
from .node import NICNode
from .pipeline import PipelineRegister
from .regbank import BusRequest, RegisterBank

__all__ = ["NICCoreSignature", "NICCore", "link_timers"]


class NICCoreSignature(wiring.Signature):
    """Interface between a board top and the NIC core it instantiates (core's view).

    Parameters
    ----------
    ports : int
        Number of link ports.
    """

    def __init__(self, ports):
        if not isinstance(ports, int) or ports < 1:
            raise ValueError(f"ports must be a positive integer, not {ports!r}")
        self.ports = ports
        super().__init__({
            "phy_tx": Out(phy_tx_signature()).array(ports),
            "phy_rx": In(phy_rx_signature()).array(ports),
            "phy_error": In(ports),
            "uart_rx": In(1, init=1),
            "uart_tx": Out(1, init=1),
            "link_up": Out(ports),
            "activity": Out(ports),
            "fault": Out(1),
            "commit": Out(1),
        })

    def __repr__(self):
        return f"NICCoreSignature({self.ports})"


def link_timers(max_payload: int, phy_cycles_per_byte: int) -> dict:
    """The link engine's timers for a PHY that takes ``phy_cycles_per_byte`` cycles a byte.

    HELLO period, heartbeat period and retransmission timer are the engine's defaults for a
    byte-wide PHY, stretched by the byte time. The dead-link timer is sized from what a bit
    error can do to an idle link that is up: a flipped LEN byte makes the receiver take the
    next ``max_payload + OVERHEAD_BYTES`` bytes as one (bad) frame, and on an idle link those
    bytes are the heartbeats of the next ``swallowed`` periods; the heartbeat after them is
    heard ``swallowed + 1`` periods after the last good one. The timer allows four more lost
    heartbeats on top, so a single flipped bit never takes an idle link down.
    """
    frame_cycles = (max_payload + 16) * phy_cycles_per_byte
    idle_cycles = 2 * frame_cycles
    swallowed = -(-(max_payload + OVERHEAD_BYTES) // OVERHEAD_BYTES)
    return dict(hello_cycles=4 * frame_cycles, idle_cycles=idle_cycles,
                dead_cycles=(swallowed + 6) * idle_cycles, retx_cycles=4 * frame_cycles + 64)


class NICCore(wiring.Component):
    """The epochlink NIC: a :class:`~epochlink.hdl.node.NICNode` (epoch engine, one link engine
    per port, epoch-tagged datapath) behind the host link and the register map, with the
    :class:`NICCoreSignature` interface that board tops and simulated
    clusters instantiate.

    Per port ``p``: ``PORTp.CONTROL.enable`` drives the link engine's enable;
    ``PORTp.CONTROL.loopback`` disconnects the PHY and feeds the port's transmit stream back
    into its own receiver. In both modes received bytes pass through a channel model driven by
    ``CHAN_ERROR_THRESHOLD`` and ``CHAN_CUT`` (fault injection; 0 = transparent). ``EVENTS`` bits
    are set when ``LINK_DOWNS``, ``CRC_ERRORS``, ``MALFORMED`` or ``ABORTS`` move. Epoch
    registers (``EPOCH.*``, ``EPOCH_PORTp.*``, ``DOMAINd.*``) come from the epoch engine.
    Payload: nothing is offered on the ports' payload inputs yet and arriving payload is
    taken and counted by the fence (the host payload path is not part of this core).

    Parameters
    ----------
    ports : int
        Link ports.
    clk_hz : float
        Frequency of the ``sync`` domain.
    baud : int
        Host UART baud rate (default: the host library's ``DEFAULT_BAUDRATE``).
    node_id : int
        ``NODE_ID`` (16 bits), sent to peers during link bring-up.
    domains : int
        Persistence domains of the epoch engine.
    ver_min, ver_max : int
        Link protocol versions this build supports (``EPOCH.SUPPORTED``).
    window, max_payload : int
        :class:`~epochlink.hdl.link.LinkEngine` parameters.
    counter_width : int
        Width of the counters in the :class:`~epochlink.hdl.counters.CounterBank` (1..32):
        below 32 the counter registers wrap at ``2**counter_width``.
    channel : str
        ``"full"``: a :class:`~epochlink.hdl.channel.ChannelModel` per port; ``"lite"``: a
        :class:`~epochlink.hdl.channel.LiteChannel` (for small FPGAs).
    phy_cycles_per_byte : int
        Clock cycles one byte takes on the link PHY (1 for a byte-wide PHY; about 10 x the
        bit divisor for the boards' serial PHY). The link engine's timers (HELLO, heartbeat,
        dead link, retransmission) are derived from the frame time, so they scale with it:
        timers sized for a byte per cycle would declare a 9.6 Mbit/s link dead mid-frame.
        See :func:`link_timers`.
    cut_through : bool
        The epoch engine's ``cut_through`` (:class:`~epochlink.hdl.epoch.EpochEngine`): apply
        an epoch message in the cycle its frame is accepted. Worth its longer critical path
        on byte-wide links; the boards' serial PHYs build without it.
    link_args :
        More :class:`~epochlink.hdl.link.LinkEngine` parameters (explicit timers win).
    """

    def __init__(self, *, ports, clk_hz, baud=None, node_id=1, domains=8, ver_min=1, ver_max=1,
                 window=8, max_payload=64, counter_width=32, channel="full",
                 phy_cycles_per_byte=1, cut_through=True, **link_args):
        from epochlink.host.transport import DEFAULT_BAUDRATE
        from epochlink.registers import MAX_PORTS

        if not 1 <= ports <= MAX_PORTS:
            refuse(self, f"ports must be 1..{MAX_PORTS}, not {ports}")
        if not 0 <= node_id < 1 << 16:
            refuse(self, f"node_id must fit in 16 bits, not {node_id}")
        if not 1 <= ver_min <= ver_max <= 255:
            refuse(self, f"need 1 <= ver_min <= ver_max <= 255, not {ver_min}..{ver_max}")
        if not 1 <= counter_width <= 32:
            refuse(self, f"counter_width must be 1..32, not {counter_width}")
        if channel not in ("full", "lite"):
            refuse(self, f"channel must be 'full' or 'lite', not {channel!r}")
        self.ports = ports
        self.clk_hz = clk_hz
        self.baud = baud or DEFAULT_BAUDRATE
        self.node_id = node_id
        self.domains = domains
        self.ver_min, self.ver_max = ver_min, ver_max
        self.channel = channel
        self.counter_width = counter_width
        if not isinstance(phy_cycles_per_byte, int) or phy_cycles_per_byte < 1:
            refuse(self, f"phy_cycles_per_byte must be a positive integer, not {phy_cycles_per_byte!r}")
        timers = link_timers(max_payload, phy_cycles_per_byte)
        try:
            link_parameters(window=window, max_payload=max_payload, **{**timers, **link_args})
        except (TypeError, ValueError) as error:
            refuse(self, str(error), type(error))
        self.phy_cycles_per_byte = phy_cycles_per_byte
        self.node_args = dict(ports=ports, domains=domains, window=window,
                              max_payload=max_payload, counter_width=0,
                              cut_through=cut_through,
                              **{**timers, **link_args})
        self.regmap = register_map(ports, domains)
        super().__init__(NICCoreSignature(ports))

    def elaborate(self, platform):
        m = Module()
        m.submodules.host = host = UARTHostLink.for_clock(self.clk_hz, self.baud, counter_width=0)
        m.submodules.bank = bank = RegisterBank(self.regmap, serve_counters=False)
        m.submodules.epoch_regs = eregs = EpochRegisters(self.regmap)
        m.submodules.node = node = NICNode(**self.node_args)
        m.submodules.counters = counters = self._counter_bank(m, host, node)
        reg = bank.hw_port

        self._route(m, host.bus, bank.bus, counters.bus, eregs.bus)
        wiring.connect(m, eregs.cmd, node.cmd)
        wiring.connect(m, node.rsp, eregs.rsp)
        epoch = node.epoch
        m.d.comb += [
            eregs.online.eq(epoch.online),
            eregs.active.eq(epoch.active),
            *(eregs.role[p].eq(epoch.port[p].role) for p in range(self.ports)),
        ]

        m.d.comb += [
            host.rx.eq(self.uart_rx),
            self.uart_tx.eq(host.tx),
            node.node_id.eq(self.node_id),
            node.ver_min.eq(self.ver_min),
            node.ver_max.eq(self.ver_max),
            node.fence_mode.eq(reg("FENCE_MODE")),
            reg("NODE_ID").eq(self.node_id),
            reg("STATUS").online.eq(epoch.online),
            reg("STATUS").local_valid.eq(epoch.local_valid),
            reg("STATUS").report_valid.eq(epoch.report_valid),
            reg("LOCAL").eq(epoch.local),
            reg("REPORT").eq(epoch.report),
            reg("REPORT_SENT").eq(epoch.report_sent),
            reg("COMMITTED").eq(epoch.committed),
            reg("VERSIONS").active.eq(epoch.active),
            reg("VERSIONS").subtree.eq(epoch.version_report),
            reg("VERSIONS").converged.eq(epoch.version_converged),
            reg("SUPPORTED").min.eq(self.ver_min),
            reg("SUPPORTED").max.eq(self.ver_max),
        ]

        # EPOCH_RESET leaves from a flip-flop (the node then copies it per port): the write
        # strobe's decode would otherwise stretch across all the link engines.
        m.d.sync += node.epoch_reset.eq(bank.hw_strobe("RESET") & reg("RESET"))

        # (a pulse a cycle after COMMITTED changed: the 32-bit comparison ends in a flip-flop)
        last_committed = Signal.like(epoch.committed)
        m.d.sync += [last_committed.eq(epoch.committed), self.commit.eq(epoch.committed != last_committed)]

        fault = Signal(self.ports)
        for p in range(self.ports):
            self._port(m, p, node, bank, fault)
        m.d.comb += self.fault.eq(fault.any())
        return m

    def _route(self, m, host_bus, bank_bus, counter_bus, epoch_bus):
        """Send command-register accesses to the epoch engine, counter reads to the counter
        bank, the rest to the register bank. The address is decoded as the request enters a
        register stage, so the responders see a registered request and its destination."""
        routed = data.StructLayout({"req": BusRequest, "to_epoch": 1, "to_counters": 1})
        m.submodules.route_reg = stage = PipelineRegister(routed)
        req = host_bus.req
        with m.Switch(req.payload.addr):
            with m.Case(*command_addresses(self.regmap)):
                m.d.comb += stage.i.payload.to_epoch.eq(1)
            with m.Case(*(inst.address for inst in self.regmap if inst.register.counter)):
                m.d.comb += stage.i.payload.to_counters.eq(1)
        m.d.comb += [stage.i.payload.req.eq(req.payload), stage.i.valid.eq(req.valid),
                     req.ready.eq(stage.i.ready)]

        out = stage.o.payload
        targets = ((bank_bus, ~out.to_epoch & ~out.to_counters), (counter_bus, out.to_counters),
                   (epoch_bus, out.to_epoch))
        for target, selected in targets:
            m.d.comb += [target.req.payload.eq(out.req),
                         target.req.valid.eq(stage.o.valid & selected)]
        m.d.comb += [
            stage.o.ready.eq(Mux(out.to_epoch, epoch_bus.req.ready,
                                 Mux(out.to_counters, counter_bus.req.ready, bank_bus.req.ready))),
            # The host link waits for each answer, so at most one responder answers at a time.
            host_bus.rsp.valid.eq(bank_bus.rsp.valid | counter_bus.rsp.valid | epoch_bus.rsp.valid),
            host_bus.rsp.payload.eq(Mux(epoch_bus.rsp.valid, epoch_bus.rsp.payload,
                                        Mux(counter_bus.rsp.valid, counter_bus.rsp.payload,
                                            bank_bus.rsp.payload))),
        ]

    def _counter_bank(self, m, host, node):
        """The counter bank, each counter of the map driven by the event strobes of the block
        it counts (an event's width is the most it can move by in a cycle)."""
        sources = {
            "HOST_FRAMES": host.events.frames_ok,
            "HOST_ERRORS": host.events.frame_errors,
            "HOST_DISCARDED": host.events.discarded,
            "UART_FRAMING_ERRORS": host.events.framing_errors,
            "UART_OVERRUNS": host.events.overruns,
            "REFUSED": node.epoch.events.refused,
            "MALFORMED": node.epoch.events.malformed,
            "MISROUTED": node.epoch.events.misrouted,
        }
        for p in range(self.ports):
            for name in LINK_COUNTERS:
                sources[f"PORT{p}.{name.upper()}"] = node.link[p].events[name]
            for name in ("older", "newer", "dropped"):
                sources[f"EPOCH_PORT{p}.FENCE_{name.upper()}"] = node.fence_events[p][name]
        counters = CounterBank.for_map(
            self.regmap, width=self.counter_width,
            increments={name: len(source) for name, source in sources.items() if len(source) > 1})
        fields = {counter_field(name): source for name, source in sources.items()}
        expected = {name for name, _, _ in counters.counters}
        if set(fields) != expected:   # the register map and this wiring must agree
            raise AssertionError(f"counters without an event: {sorted(expected - set(fields))}, "
                                 f"events without a counter: {sorted(set(fields) - expected)}")
        for name, source in fields.items():
            m.d.comb += counters.events[name].eq(source)
        return counters

    def _port(self, m, p, node, bank, fault):
        reg = lambda name: bank.hw_port(f"PORT{p}.{name}")             # noqa: E731
        ereg = lambda name: bank.hw_port(f"EPOCH_PORT{p}.{name}")      # noqa: E731
        if self.channel == "full":
            channel = ChannelModel(delay=1, seed=p + 1)
        else:
            channel = LiteChannel(seed=p + 1)
        m.submodules[f"channel{p}"] = channel
        phy_tx, phy_rx, status = self.phy_tx[p], self.phy_rx[p], node.link[p]
        engine_tx, engine_rx = node.phy_tx[p], node.phy_rx[p]
        # CONTROL is copied into flip-flops next to the port (a cycle later): its bits fan
        # out into the link engine's receive path, far from the register bank.
        control = Signal.like(reg("CONTROL"), name=f"control{p}")
        m.d.sync += control.eq(reg("CONTROL"))
        loopback = control.loopback
        m.d.comb += [
            node.link_enable[p].eq(control.enable),
            node.payload_in[p].valid.eq(0),
            node.payload_out[p].ready.eq(1),
            # Transmit: to the PHY, or straight back into this port's receive path.
            phy_tx.valid.eq(engine_tx.valid & ~loopback),
            phy_tx.payload.eq(engine_tx.payload),
            engine_tx.ready.eq(loopback | phy_tx.ready),
            # Receive: from the PHY (or the loopback) through the channel model.
            channel.tx.valid.eq(Mux(loopback, engine_tx.valid, phy_rx.valid)),
            channel.tx.payload.eq(Mux(loopback, engine_tx.payload, phy_rx.payload)),
            channel.error_threshold.eq(reg("CHAN_ERROR_THRESHOLD")),
            channel.cut.eq(reg("CHAN_CUT")),
            engine_rx.valid.eq(channel.rx.valid),
            engine_rx.payload.eq(channel.rx.payload),
            # Status registers.
            reg("LINK_STATE").state.eq(status.state),
            reg("LINK_STATE").version.eq(status.version),
            reg("PEER_ID").eq(status.peer_id),
            ereg("NEIGHBOUR").heard.eq(node.epoch.port[p].heard),
            ereg("NEIGHBOUR").version.eq(node.epoch.port[p].child_version),
            ereg("CHILD_REPORT").eq(node.epoch.port[p].child_report),
        ]

        # EVENTS: the sticky "this counter moved" bits, set a cycle after the event (what
        # moved is registered next to the port: a W1C register's answer includes the bits
        # being set).
        events_set = bank.hw_set(f"PORT{p}.EVENTS")
        for field, event in (("link_down", "link_downs"), ("crc_error", "crc_errors"),
                             ("malformed", "malformed"), ("abort", "aborts")):
            moved = Signal(name=f"{field}_seen{p}")
            m.d.sync += moved.eq(status.events[event] != 0)
            m.d.comb += getattr(events_set, field).eq(moved)

        m.d.comb += [
            self.link_up[p].eq(status.state == LinkState.UP),
            self.activity[p].eq(phy_rx.valid | (phy_tx.valid & phy_tx.ready)),
        ]
        # (registered next to the port: the ports' faults are combined across the chip)
        m.d.sync += fault[p].eq(self.phy_error[p] | events_set.as_value().any())
