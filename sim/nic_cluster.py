"""A cluster of complete NIC cores as one Verilog top, with a byte bridge to every host UART.

:class:`NICCluster` instantiates one NIC core per node of a
:class:`~epochlink.sim.cluster.Topology` (any component with the
:class:`~epochlink.boards.top.NICCoreSignature` interface, made by a core factory as the board
tops do), wires their link ports through two :class:`~epochlink.hdl.channel.ChannelModel` s
per edge, and puts a *host byte bridge* in front of every node's host UART, so that a
testbench (the simulation server, :mod:`epochlink.sim.tb_server`) exchanges whole bytes
with the node and never toggles UART bits itself::

    h{i}_in  ─► SyncFIFOBuffered(64) ─► UARTTransmitter ─► core.uart_rx
    h{i}_out ◄─ SyncFIFOBuffered(64) ◄─ UARTReceiver    ◄─ core.uart_tx

The bridge's UARTs run at the core's host baud rate (``baud``; the default 12 Mbaud at
48 MHz is a divisor of 4 cycles per bit, 40 cycles per byte). The bridge stays in the
``sync`` domain: resetting a node (``n{i}_rst``) does not flush it.

Top-level ports (besides ``clk`` and ``rst``):

===================================== ====== ===============================================
port                                  dir    meaning
===================================== ====== ===============================================
``n{i}_rst``                          in     holds node ``i`` (its core) in reset
``h{i}_in__valid/payload/ready``      in     bytes to node ``i``'s host UART (stream)
``h{i}_out__valid/payload/ready``     out    bytes from node ``i``'s host UART (stream)
``h{i}_framing_errors``               out    bridge receiver: bytes with a bad stop bit
``h{i}_overruns``                     out    bridge receiver: bytes lost, output FIFO full
``n{i}_link_up``                      out    the core's ``link_up`` (one bit per port)
``e{k}_error_threshold``              in     edge ``k``'s channels (both directions), see
                                             :func:`~epochlink.hdl.channel.ber_to_threshold`
                                             (with ``phy_divisor``: its wires, see
                                             :func:`~epochlink.hdl.line_noise.ber_to_line_threshold`)
``e{k}_cut``                          in     1 cuts edge ``k`` (both directions)
``e{k}_flips``                        out    with ``phy_divisor`` only: bit-time flips
                                             injected on edge ``k`` (both wires, wrapping)
``n{i}_phy_errors``                   out    with ``phy_divisor`` only: ``rx_error`` pulses
                                             of node ``i``'s PHYs (false starts, bad stop
                                             bits; all ports, wrapping; not reset with the
                                             node). The core itself has no such counter: on
                                             a board the pulses only light the fault LED.
``cycle``                             out    cycles since ``rst`` (64 bits)
===================================== ====== ===============================================

Node ``i`` has ``max(1, neighbours)`` link ports in :meth:`Topology.ports` order (the parent
first, then the children); edge ``k`` is ``Topology.edges[k]``.

Two ways to wire an edge:

* **Byte level** (default, ``phy_divisor=None``): one byte-wide
  :class:`~epochlink.hdl.channel.ChannelModel` per direction between the cores' ``phy_tx``
  and ``phy_rx`` (a byte per cycle, ``delay`` cycles of latency, one-bit errors per byte).
  The cores' ``phy_error`` inputs are tied to 0.
* **As two boards are wired** (``phy_divisor=N``): every core port goes through its own
  :class:`~epochlink.hdl.serdes.SerialPHY` ``(N)`` in the node's domain (reset with the
  node), exactly as :class:`~epochlink.boards.top.BoardTop` connects it, ``rx_error``
  included; one PHY's ``tx_line`` drives the peer PHY's ``rx_line`` through a
  :class:`~epochlink.hdl.line_noise.LineNoise` per direction (bit-time flips, cut = line
  held idle high). The cores get ``phy_cycles_per_byte=11 * N`` (their link timers scale
  with the byte time) and ``cut_through=False``, as on a board. ``delay`` is not used: the wire adds one cycle and
  the PHYs their own latency (about a frame, ``10 N`` cycles). Not simulated: the PLL and
  the IO buffers (the board tops' FPGA primitives), i.e. every PHY runs on the one
  simulation clock (same frequency, no drift).
"""
from __future__ import annotations

from amaranth import DomainRenamer, Module
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..boards.top import NICCore
from ..hdl.common import refuse
from ..hdl.line_noise import LineNoise
from ..hdl.serdes import SerialPHY
from ..hdl.uart import UARTReceiver, UARTTransmitter, uart_divisor
from .cluster import Topology, node_domain, wire_edge

__all__ = ["NICCluster", "SIM_CLK_HZ", "SIM_BAUD", "BRIDGE_DEPTH"]

#: Default clock of the simulated NICs (the iCEBreaker's).
SIM_CLK_HZ = 48e6
#: Default host UART rate in simulation: 48 MHz / 4, the smallest divisor the UART supports.
SIM_BAUD = 12_000_000
#: Depth of each bridge FIFO, bytes.
BRIDGE_DEPTH = 64


class NICCluster(wiring.Component):
    """N NIC cores, their links per :class:`Topology`, and a host byte bridge per node.

    Parameters
    ----------
    topology : Topology
        The cluster's shape.
    core : callable
        NIC core factory, called as ``core(ports=P, clk_hz=clk_hz, baud=baud, node_id=i + 1,
        **core_args)``; returns a component with the ``NICCoreSignature(P)`` interface.
    clk_hz : float
        Clock frequency the cores are built for (sets their UART divisor and timeouts).
    baud : int
        Host UART rate of the cores and of the bridges.
    delay : int
        Latency of every wire, cycles (:class:`ChannelModel` ``delay``).
    seed : int
        Offsets the channel models' PRNG seeds (edge ``k`` uses ``seed + 2k`` downwards and
        ``seed + 2k + 1`` upwards; ``seed=1`` is what :class:`~epochlink.sim.cluster.Cluster`
        uses). Part of the design: another seed is another build.
    core_args : dict
        More keyword arguments for ``core``.
    phy_divisor : int or None
        None (default): byte-level wires (``ChannelModel``). An integer ``N >= 3``: serial
        PHYs at ``N`` cycles per bit and noisy serial wires (``LineNoise``, seeded like the
        channel models), with ``phy_cycles_per_byte=11 * N`` and ``cut_through=False``
        added to ``core_args`` unless given there (the factory must accept them, as
        :class:`NICCore` does).
    """

    def __init__(self, topology: Topology, *, core=NICCore, clk_hz: float = SIM_CLK_HZ,
                 baud: int = SIM_BAUD, delay: int = 8, seed: int = 1, core_args=None,
                 phy_divisor: int | None = None):
        if not isinstance(topology, Topology):
            refuse(self, f"topology must be a Topology, not {topology!r}", TypeError)
        if not isinstance(seed, int) or seed < 1:
            refuse(self, f"seed must be a positive integer, not {seed!r}")
        self.topology = topology
        self.core = core
        self.clk_hz = clk_hz
        self.baud = baud
        self.delay = delay
        self.seed = seed
        if phy_divisor is not None and (isinstance(phy_divisor, bool) or
                                        not isinstance(phy_divisor, int) or phy_divisor < 3):
            refuse(self, f"phy_divisor must be None or an integer >= 3, not {phy_divisor!r}")
        self.phy_divisor = phy_divisor
        self.core_args = dict(core_args or {})
        if phy_divisor is not None:
            # A byte on the serial PHY: 10 bit times plus the resync gaps, and no epoch
            # cut-through (as BoardTop builds the core).
            self.core_args = {"phy_cycles_per_byte": 11 * phy_divisor, "cut_through": False,
                              **self.core_args}
        self.divisor = uart_divisor(clk_hz, baud)      # raises for an unusable baud rate
        self.ports = [max(1, len(topology.ports(i))) for i in range(topology.nodes)]
        # The cores are made here, so bad parameters fail at once, not in a build.
        self.cores = []
        for i in range(topology.nodes):
            try:
                self.cores.append(self.make_core(i))
            except ValueError as exc:
                refuse(self, f"node {i}, a NIC core with {self.ports[i]} link port(s): {exc}")
        members = {"cycle": Out(64)}
        for i in range(topology.nodes):
            members.update({
                f"n{i}_rst": In(1),
                f"n{i}_link_up": Out(self.ports[i]),
                f"h{i}_in": In(stream.Signature(8)),
                f"h{i}_out": Out(stream.Signature(8)),
                f"h{i}_framing_errors": Out(32),
                f"h{i}_overruns": Out(32),
            })
        for k in range(len(topology.edges)):
            members.update({f"e{k}_error_threshold": In(32), f"e{k}_cut": In(1)})
            if phy_divisor is not None:
                members[f"e{k}_flips"] = Out(32)
        if phy_divisor is not None:
            for i in range(topology.nodes):
                members[f"n{i}_phy_errors"] = Out(32)
        super().__init__(members)

    def make_core(self, i: int):
        """A new NIC core for node ``i`` (:attr:`cores` holds the ones used)."""
        return self.core(ports=self.ports[i], clk_hz=self.clk_hz, baud=self.baud,
                         node_id=i + 1, **self.core_args)

    def elaborate(self, platform):
        m = Module()
        topo = self.topology
        m.d.sync += self.cycle.eq(self.cycle + 1)
        cores = []
        phys = {}                          # (node, port) -> SerialPHY, with phy_divisor
        for i in range(topo.nodes):
            domain = node_domain(m, i, getattr(self, f"n{i}_rst"))
            core = DomainRenamer(domain)(self.cores[i])
            m.submodules[f"node{i}"] = core
            cores.append(core)
            m.d.comb += getattr(self, f"n{i}_link_up").eq(core.link_up)
            if self.phy_divisor is None:
                m.d.comb += core.phy_error.eq(0)
                if not topo.ports(i):      # a one-node cluster: the lone port has no wire
                    m.d.comb += [core.phy_tx[0].ready.eq(1), core.phy_rx[0].valid.eq(0)]
            else:                          # as BoardTop: one SerialPHY per port
                for p in range(self.ports[i]):
                    phy = DomainRenamer(domain)(SerialPHY(self.phy_divisor))
                    m.submodules[f"node{i}_phy{p}"] = phy
                    wiring.connect(m, core.phy_tx[p], phy.tx)
                    wiring.connect(m, phy.rx, core.phy_rx[p])
                    m.d.comb += core.phy_error[p].eq(phy.rx_error)
                    phys[i, p] = phy
                errors = getattr(self, f"n{i}_phy_errors")
                m.d.sync += errors.eq(errors + sum(phys[i, p].rx_error
                                                   for p in range(self.ports[i])))

            # Host byte bridge (sync domain: survives the node's reset).
            m.submodules[f"h{i}_in_fifo"] = in_fifo = SyncFIFOBuffered(width=8, depth=BRIDGE_DEPTH)
            m.submodules[f"h{i}_out_fifo"] = out_fifo = SyncFIFOBuffered(width=8, depth=BRIDGE_DEPTH)
            m.submodules[f"h{i}_uart_tx"] = uart_tx = UARTTransmitter(self.divisor)
            m.submodules[f"h{i}_uart_rx"] = uart_rx = UARTReceiver(self.divisor)
            wiring.connect(m, wiring.flipped(getattr(self, f"h{i}_in")), in_fifo.w_stream)
            wiring.connect(m, in_fifo.r_stream, uart_tx.i)
            wiring.connect(m, uart_rx.o, out_fifo.w_stream)
            wiring.connect(m, out_fifo.r_stream, wiring.flipped(getattr(self, f"h{i}_out")))
            m.d.comb += [
                core.uart_rx.eq(uart_tx.tx),
                uart_rx.rx.eq(core.uart_tx),
                getattr(self, f"h{i}_framing_errors").eq(uart_rx.framing_errors),
                getattr(self, f"h{i}_overruns").eq(uart_rx.overruns),
            ]

        for k, (a, b) in enumerate(topo.edges):
            pa, pb = topo.port_to(a, b), topo.port_to(b, a)
            if self.phy_divisor is not None:
                flips = []
                for direction, (src, sp, dst, dp) in enumerate(((a, pa, b, pb), (b, pb, a, pa))):
                    wire = LineNoise(self.phy_divisor, seed=self.seed + 2 * k + direction)
                    m.submodules[f"e{k}_{'down' if direction == 0 else 'up'}"] = wire
                    m.d.comb += [
                        wire.line_in.eq(phys[src, sp].tx_line),
                        phys[dst, dp].rx_line.eq(wire.line_out),
                        wire.error_threshold.eq(getattr(self, f"e{k}_error_threshold")),
                        wire.cut.eq(getattr(self, f"e{k}_cut")),
                    ]
                    flips.append(wire.flips)
                m.d.comb += getattr(self, f"e{k}_flips").eq(flips[0] + flips[1])
                continue
            wire_edge(m, topo, k, cores, delay=self.delay, seed=self.seed,
                      error_threshold=getattr(self, f"e{k}_error_threshold"),
                      cut=getattr(self, f"e{k}_cut"))
        return m
