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
``e{k}_cut``                          in     1 cuts edge ``k`` (both directions)
``cycle``                             out    cycles since ``rst`` (64 bits)
===================================== ====== ===============================================

Node ``i`` has ``max(1, neighbours)`` link ports in :meth:`Topology.ports` order (the parent
first, then the children); edge ``k`` is ``Topology.edges[k]``. The cores' ``phy_error``
inputs are tied to 0.
"""
from __future__ import annotations

from amaranth import ClockDomain, ClockSignal, DomainRenamer, Module, ResetSignal
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..boards.top import NICCore
from ..hdl.channel import ChannelModel
from ..hdl.uart import UARTReceiver, UARTTransmitter, uart_divisor
from .cluster import Topology

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
    """

    def __init__(self, topology: Topology, *, core=NICCore, clk_hz: float = SIM_CLK_HZ,
                 baud: int = SIM_BAUD, delay: int = 8, seed: int = 1, core_args=None):
        if not isinstance(topology, Topology):
            raise TypeError(f"topology must be a Topology, not {topology!r}")
        if not isinstance(seed, int) or seed < 1:
            raise ValueError(f"seed must be a positive integer, not {seed!r}")
        self.topology = topology
        self.core = core
        self.clk_hz = clk_hz
        self.baud = baud
        self.delay = delay
        self.seed = seed
        self.core_args = dict(core_args or {})
        self.divisor = uart_divisor(clk_hz, baud)      # raises for an unusable baud rate
        self.ports = [max(1, len(topology.ports(i))) for i in range(topology.nodes)]
        # The cores are made here, so bad parameters fail at once, not in a build.
        self.cores = []
        for i in range(topology.nodes):
            try:
                self.cores.append(self.make_core(i))
            except ValueError as exc:
                raise ValueError(f"node {i}, a NIC core with {self.ports[i]} link port(s): "
                                 f"{exc}") from None
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
        for i in range(topo.nodes):
            domain = f"node{i}"
            cd = ClockDomain(domain)
            m.domains += cd
            m.d.comb += [cd.clk.eq(ClockSignal("sync")),
                         cd.rst.eq(ResetSignal("sync") | getattr(self, f"n{i}_rst"))]
            core = DomainRenamer(domain)(self.cores[i])
            m.submodules[f"node{i}"] = core
            cores.append(core)
            m.d.comb += [core.phy_error.eq(0), getattr(self, f"n{i}_link_up").eq(core.link_up)]
            if not topo.ports(i):      # a one-node cluster: the lone port has no wire
                m.d.comb += [core.phy_tx[0].ready.eq(1), core.phy_rx[0].valid.eq(0)]

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
            for direction, (src, sp, dst, dp) in enumerate(((a, pa, b, pb), (b, pb, a, pa))):
                channel = ChannelModel(delay=self.delay, seed=self.seed + 2 * k + direction)
                m.submodules[f"e{k}_{'down' if direction == 0 else 'up'}"] = channel
                tx, rx = cores[src].phy_tx[sp], cores[dst].phy_rx[dp]
                m.d.comb += [
                    channel.tx.valid.eq(tx.valid), channel.tx.payload.eq(tx.payload),
                    tx.ready.eq(channel.tx.ready),
                    rx.valid.eq(channel.rx.valid), rx.payload.eq(channel.rx.payload),
                    channel.error_threshold.eq(getattr(self, f"e{k}_error_threshold")),
                    channel.cut.eq(getattr(self, f"e{k}_cut")),
                ]
        return m
