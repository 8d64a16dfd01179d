"""Multi-node epochlink clusters as one Verilog top, for cocotb under Verilator.

A :class:`Topology` is a tree of N nodes rooted at node 0 (line, star, balanced tree, or any
tree given as ``(parent, child)`` edges). :class:`Cluster` instantiates one
:class:`~epochlink.hdl.node.NICNode` per node, with exactly as many link ports as the node
has neighbours (port 0 faces the parent, the others the children in edge order), and two
:class:`~epochlink.hdl.channel.ChannelModel` s per edge. Every node's command interface,
epoch status, link status and reset, and every edge's error rate and cut switch are
top-level ports, so a testbench drives the whole cluster without per-cycle Python.

Port names: ``n{i}_rst``, ``n{i}_cmd__*``, ``n{i}_rsp__*``, ``n{i}_epoch__*``,
``n{i}_link__{p}__*``, ``n{i}_ver_min``/``_ver_max``; ``e{k}_error_threshold``, ``e{k}_cut``
for edge k in :attr:`Topology.edges` order; ``cycle``.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from amaranth import *
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..hdl.channel import ChannelModel
from ..hdl.common import forward_status
from ..hdl.epoch import EpochCommand, EpochResponse, EpochStatusSignature
from ..hdl.epoch_format import Role
from ..hdl.link import LinkStatusSignature
from ..hdl.node import NICNode

__all__ = ["Topology", "Cluster", "node_domain", "wire_edge"]


@dataclass(frozen=True)
class Topology:
    """A tree of ``nodes`` nodes rooted at node 0; ``edges`` are ``(parent, child)`` pairs."""
    name: str
    nodes: int
    edges: tuple

    def __post_init__(self):
        if self.nodes < 1:
            raise ValueError("a cluster needs at least one node")
        if len(self.edges) != self.nodes - 1:
            raise ValueError(f"a tree of {self.nodes} nodes has {self.nodes - 1} edges, not {len(self.edges)}")
        parents = {}
        for parent, child in self.edges:
            if not (0 <= parent < self.nodes and 0 <= child < self.nodes) or parent == child:
                raise ValueError(f"bad edge {(parent, child)}")
            if child in parents or child == 0:
                raise ValueError(f"node {child} has two parents (or is the root)")
            parents[child] = parent
        for node in range(1, self.nodes):   # every node reaches the root
            seen, n = set(), node
            while n != 0:
                if n in seen or n not in parents:
                    raise ValueError(f"node {node} is not connected to the root")
                seen.add(n)
                n = parents[n]

    @classmethod
    def line(cls, n):
        return cls("line", n, tuple((i, i + 1) for i in range(n - 1)))

    @classmethod
    def star(cls, n):
        return cls("star", n, tuple((0, i) for i in range(1, n)))

    @classmethod
    def tree(cls, n, fanout=2):
        return cls(f"tree{fanout}", n, tuple(((i - 1) // fanout, i) for i in range(1, n)))

    @classmethod
    def from_edges(cls, edges, name="custom"):
        edges = tuple((int(a), int(b)) for a, b in edges)
        return cls(name, len(edges) + 1, edges)

    @classmethod
    def named(cls, name, n):
        builders = {"line": cls.line, "star": cls.star, "tree": cls.tree}
        if name not in builders:
            raise ValueError(f"unknown topology {name!r}; choose from {', '.join(builders)}")
        return builders[name](n)

    def parent(self, node):
        return next((p for p, c in self.edges if c == node), None)

    def children(self, node):
        return [c for p, c in self.edges if p == node]

    def ports(self, node):
        """``[(peer, role), ...]`` in port order: the parent first, then the children."""
        parent = self.parent(node)
        return ([(parent, Role.PARENT)] if parent is not None else []) + \
               [(child, Role.CHILD) for child in self.children(node)]

    def port_to(self, node, peer):
        return [p for p, _ in self.ports(node)].index(peer)

    @property
    def depth(self):
        depth = {0: 0}
        queue = deque([0])
        while queue:
            n = queue.popleft()
            for c in self.children(n):
                depth[c] = depth[n] + 1
                queue.append(c)
        return max(depth.values())


class Cluster(wiring.Component):
    """N NIC nodes and their links, per :class:`Topology`."""

    def __init__(self, topology: Topology, *, domains=4, delay=8, window=4, max_payload=16,
                 counter_width=32, **timing):
        self.topology = topology
        self.domains = domains
        self.delay = delay
        self.node_args = dict(domains=domains, window=window, max_payload=max_payload,
                              counter_width=counter_width, **timing)
        members = {"cycle": Out(32)}
        for i in range(topology.nodes):
            ports = max(1, len(topology.ports(i)))
            members.update({
                f"n{i}_rst": In(1),
                f"n{i}_ver_min": In(8),
                f"n{i}_ver_max": In(8),
                f"n{i}_cmd": In(stream.Signature(EpochCommand)),
                f"n{i}_rsp": Out(stream.Signature(EpochResponse)),
                f"n{i}_epoch": Out(EpochStatusSignature(domains, ports, 32, counter_width)),
                f"n{i}_link": Out(LinkStatusSignature(counter_width)).array(ports),
            })
        for k in range(len(topology.edges)):
            members.update({f"e{k}_error_threshold": In(32), f"e{k}_cut": In(1)})
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        topo = self.topology
        m.d.sync += self.cycle.eq(self.cycle + 1)
        nodes = []
        for i in range(topo.nodes):
            domain = node_domain(m, i, getattr(self, f"n{i}_rst"))
            ports = max(1, len(topo.ports(i)))
            node = DomainRenamer(domain)(NICNode(ports=ports, **self.node_args))
            m.submodules[f"node{i}"] = node
            nodes.append(node)
            m.d.comb += [node.node_id.eq(i + 1),
                         node.ver_min.eq(getattr(self, f"n{i}_ver_min")),
                         node.ver_max.eq(getattr(self, f"n{i}_ver_max"))]
            wiring.connect(m, wiring.flipped(getattr(self, f"n{i}_cmd")), node.cmd)
            wiring.connect(m, node.rsp, wiring.flipped(getattr(self, f"n{i}_rsp")))
            forward_status(m, node.epoch, getattr(self, f"n{i}_epoch"))
            for p in range(ports):
                forward_status(m, node.link[p], getattr(self, f"n{i}_link")[p])
                m.d.comb += [node.payload_in[p].valid.eq(0), node.payload_out[p].ready.eq(1)]
            if not topo.ports(i):      # a one-node cluster: the lone port has no wire
                m.d.comb += node.phy_tx[0].ready.eq(1)

        for k in range(len(topo.edges)):
            wire_edge(m, topo, k, nodes, delay=self.delay, seed=1,
                      error_threshold=getattr(self, f"e{k}_error_threshold"),
                      cut=getattr(self, f"e{k}_cut"))
        return m


def node_domain(m, i: int, reset) -> str:
    """Add clock domain ``node{i}``: the ``sync`` clock, reset by ``sync``'s reset or ``reset``
    (one node's own reset); returns its name."""
    domain = f"node{i}"
    cd = ClockDomain(domain)
    m.domains += cd
    m.d.comb += [cd.clk.eq(ClockSignal("sync")), cd.rst.eq(ResetSignal("sync") | reset)]
    return domain


def wire_edge(m, topology: Topology, k: int, nodes, *, delay: int, seed: int,
              error_threshold, cut) -> None:
    """Wire edge ``k`` of ``topology`` between the ``phy_tx``/``phy_rx`` byte streams of
    ``nodes`` (anything with those port arrays) through two
    :class:`~epochlink.hdl.channel.ChannelModel` s (submodules ``e{k}_down``/``e{k}_up``,
    seeds ``seed + 2k`` and ``seed + 2k + 1``), both driven by ``error_threshold`` and ``cut``."""
    a, b = topology.edges[k]
    pa, pb = topology.port_to(a, b), topology.port_to(b, a)
    for direction, (src, sp, dst, dp) in enumerate(((a, pa, b, pb), (b, pb, a, pa))):
        channel = ChannelModel(delay=delay, seed=seed + 2 * k + direction)
        m.submodules[f"e{k}_{'down' if direction == 0 else 'up'}"] = channel
        tx, rx = nodes[src].phy_tx[sp], nodes[dst].phy_rx[dp]
        m.d.comb += [
            channel.tx.valid.eq(tx.valid), channel.tx.payload.eq(tx.payload),
            tx.ready.eq(channel.tx.ready),
            rx.valid.eq(channel.rx.valid), rx.payload.eq(channel.rx.payload),
            channel.error_threshold.eq(error_threshold),
            channel.cut.eq(cut),
        ]
