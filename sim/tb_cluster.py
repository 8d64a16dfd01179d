"""cocotb testbench for :class:`~epochlink.sim.cluster.Cluster`: Conv(P,e) under faults.

Every node has a host model that persists its domains' epochs through the node's command
port, remembering what is durable. A monitor checks, every few cycles, the two safety
invariants: no node's COMMITTED exceeds the durable epoch of any enabled domain of any node,
and no node's COMMITTED decreases (except by that node's own reset). Bit errors, link cuts
and node resets hit at random times; after the faults stop, every node must reach the
global meet (liveness), which is also what the pure-Python reference model computes.

Parameters: JSON in ``EPOCHLINK_TB_CONFIG`` (``topology`` as edges, ``domains``, ...);
results as JSON to ``EPOCHLINK_TB_RESULT``.
"""
from __future__ import annotations

import json
import os
import random
import time

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, Lock, RisingEdge, Timer

from amaranth.lib import data

from epochlink.hdl.channel import ber_to_threshold
from epochlink.hdl.epoch import EpochCommand, EpochResponse
from epochlink.hdl.epoch_format import CmdStatus, Op, Role
from epochlink.hdl.frame import LinkState
from epochlink.sim.cluster import Topology
from epochlink.sim.epoch_model import Cluster as ModelCluster

CLOCK_NS = 10
_CMD = data.Layout.cast(EpochCommand)
_RSP = data.Layout.cast(EpochResponse)


def pack_command(**fields) -> int:
    """An EpochCommand as the integer on the ``n{i}_cmd__payload`` port."""
    return sum(int(value) << _CMD[name].offset for name, value in fields.items())


def response_field(word: int, name: str) -> int:
    field = _RSP[name]
    return (word >> field.offset) & ((1 << field.width) - 1)


def config():
    return json.loads(os.environ.get("EPOCHLINK_TB_CONFIG", "{}"))


def write_result(result):
    path = os.environ.get("EPOCHLINK_TB_RESULT")
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def sig(dut, name):
    return getattr(dut, name)


class CommandError(AssertionError):
    pass


class Host:
    """The training node's driver for one NIC: commands in order, durable state in Python."""

    def __init__(self, dut, index, topology, domains, active=1):
        self.dut, self.i, self.topology, self.domains = dut, index, topology, domains
        self.cmd_valid = sig(dut, f"n{index}_cmd__valid")
        self.cmd_ready = sig(dut, f"n{index}_cmd__ready")
        self.cmd_payload = sig(dut, f"n{index}_cmd__payload")
        self.rsp_valid = sig(dut, f"n{index}_rsp__valid")
        self.rsp_payload = sig(dut, f"n{index}_rsp__payload")
        sig(dut, f"n{index}_rsp__ready").value = 1
        self.cmd_valid.value = 0
        self.durable = {d: 0 for d in range(domains)}   # what storage holds, per domain
        self.enabled = set(range(domains))
        self.active = active
        self.lock = Lock()   # one command at a time; a reset and restore hold it throughout

    async def command(self, op, index=0, value=0):
        """One command; returns (status, value)."""
        async with self.lock:
            return await self._command(op, index, value)

    async def _command(self, op, index=0, value=0):
        self.cmd_payload.value = pack_command(op=op, index=index, value=value)
        self.cmd_valid.value = 1
        while True:
            await RisingEdge(self.dut.clk)
            if int(self.cmd_ready.value):
                break
        self.cmd_valid.value = 0
        for _ in range(64):
            if int(self.rsp_valid.value):
                word = int(self.rsp_payload.value)
                await RisingEdge(self.dut.clk)
                return CmdStatus(response_field(word, "status")), response_field(word, "value")
            await RisingEdge(self.dut.clk)
        raise CommandError(f"node {self.i}: no response to {Op(op).name}")

    async def restore(self):
        """At start: domains at their durable epochs, roles, version, then online."""
        async with self.lock:
            await self._restore()

    async def reset_and_restore(self, monitor):
        """The node crashes (its NIC is reset) and its host brings it back from storage."""
        async with self.lock:
            sig(self.dut, f"n{self.i}_rst").value = 1
            monitor.node_reset(self.i)
            await ClockCycles(self.dut.clk, 3)
            sig(self.dut, f"n{self.i}_rst").value = 0
            await ClockCycles(self.dut.clk, 1)
            monitor.reset_done(self.i)
            await self._restore()

    async def _restore(self):
        for d in sorted(self.enabled):
            status, _ = await self._command(Op.ENABLE, d, self.durable[d])
            assert status == CmdStatus.OK, f"node {self.i}: ENABLE {d} -> {status.name}"
        for port, (_, role) in enumerate(self.topology.ports(self.i)):
            status, _ = await self._command(Op.ROLE, port, int(role))
            assert status == CmdStatus.OK, f"node {self.i}: ROLE {port} -> {status.name}"
        status, _ = await self._command(Op.ACTIVE, 0, self.active)
        assert status == CmdStatus.OK
        status, _ = await self._command(Op.ONLINE, 0, 1)
        assert status == CmdStatus.OK

    async def set_active(self, version):
        status, _ = await self.command(Op.ACTIVE, 0, version)
        assert status == CmdStatus.OK
        self.active = version

    async def persist(self, domain, epoch):
        """The domain's write of ``epoch`` is durable: record it, then tell the NIC."""
        self.durable[domain] = max(self.durable[domain], epoch)
        status, _ = await self.command(Op.PERSIST, domain, epoch)
        assert status == CmdStatus.OK, f"node {self.i}: PERSIST {domain} {epoch} -> {status.name}"


def committed(dut, i):
    return int(sig(dut, f"n{i}_epoch__committed").value)


class SafetyMonitor:
    """Checks the invariants every ``period`` cycles while the cluster runs."""

    def __init__(self, dut, hosts, period=16):
        self.dut, self.hosts, self.period = dut, hosts, period
        self.last = [0] * len(hosts)
        self.resetting = set()
        self.samples = 0
        self.max_committed = 0

    def node_reset(self, i):
        # (a sample in the cycles before the reset takes effect still sees the old value:
        # node i is not checked for a fall until its reset is done)
        self.resetting.add(i)
        self.last[i] = 0

    def reset_done(self, i):
        self.resetting.discard(i)
        self.last[i] = 0

    async def run(self):
        while True:
            await ClockCycles(self.dut.clk, self.period)
            floor = min(h.durable[d] for h in self.hosts for d in h.enabled)
            for i in range(len(self.hosts)):
                c = committed(self.dut, i)
                assert c <= floor, f"SAFETY: node {i} COMMITTED {c} > durable meet {floor}"
                if i in self.resetting:
                    continue
                assert c >= self.last[i], f"SAFETY: node {i} COMMITTED fell from {self.last[i]} to {c}"
                self.last[i] = c
                self.max_committed = max(self.max_committed, c)
            self.samples += 1


def configure(dut, topology, cfg):
    for i in range(topology.nodes):
        sig(dut, f"n{i}_rst").value = 0
        sig(dut, f"n{i}_ver_min").value = cfg.get("ver_min", {}).get(str(i), 1)
        sig(dut, f"n{i}_ver_max").value = cfg.get("ver_max", {}).get(str(i), 2)
    for k in range(len(topology.edges)):
        sig(dut, f"e{k}_error_threshold").value = ber_to_threshold(cfg.get("ber", 0.0))
        sig(dut, f"e{k}_cut").value = 0


async def start(dut, cfg):
    topology = Topology.from_edges(cfg["edges"])
    cocotb.start_soon(Clock(dut.clk, CLOCK_NS, unit="ns").start())
    configure(dut, topology, cfg)
    dut.rst.value = 1
    await ClockCycles(dut.clk, 4)
    dut.rst.value = 0
    await ClockCycles(dut.clk, 2)
    hosts = [Host(dut, i, topology, cfg.get("domains", 4), cfg.get("active", {}).get(str(i), 1))
             for i in range(topology.nodes)]
    for h in hosts:
        await h.restore()
    return topology, hosts


async def wait_all_committed(dut, n, epoch, limit, step=8):
    start = int(dut.cycle.value)
    while True:
        if all(committed(dut, i) >= epoch for i in range(n)):
            return int(dut.cycle.value) - start
        assert int(dut.cycle.value) - start < limit, (
            f"LIVENESS: after {limit} cycles COMMITTED is {[committed(dut, i) for i in range(n)]}, "
            f"expected {epoch} everywhere")
        await ClockCycles(dut.clk, step)


@cocotb.test()
async def random_faults(dut):
    """Random persists, bit errors, cuts and resets; safety throughout, liveness after."""
    cfg = config()
    rng = random.Random(cfg.get("seed", 1))
    topology, hosts = await start(dut, cfg)
    monitor = SafetyMonitor(dut, hosts)
    cocotb.start_soon(monitor.run())
    epochs = cfg.get("epochs", 6)
    resets = cuts = 0
    # The reference model replays the same host actions and faults (untimed, with random
    # interleaving and message loss/duplication at link resets), checking its own
    # invariants at every step; at the end both must agree on every node's COMMITTED.
    model = ModelCluster(topology.nodes, [tuple(e) for e in topology.edges], domains=hosts[0].domains)
    model_rng = random.Random(cfg.get("seed", 1) + 1)
    for i in range(topology.nodes):
        model.hosts[i].durable = {d: 0 for d in range(hosts[i].domains)}
        model.restore(i)
    for a, b in topology.edges:
        model.link_up(a, b)

    async def faults():
        nonlocal resets, cuts
        kind = rng.randrange(2)
        while True:
            await ClockCycles(dut.clk, rng.randint(*cfg.get("fault_gap", (1500, 5000))))
            kind ^= 1                     # node resets and link cuts take turns
            if kind:
                resets += 1
                node = rng.randrange(topology.nodes)
                model.reset_node(node, model_rng)
                await hosts[node].reset_and_restore(monitor)
                model.restore(node)
                for j in model.neighbours(node):
                    model.link_up(node, j)
                model.run(model_rng)
            elif topology.edges:
                cuts += 1
                k = rng.randrange(len(topology.edges))
                model.link_down(*topology.edges[k], model_rng)
                model.link_up(*topology.edges[k])
                model.run(model_rng)
                sig(dut, f"e{k}_cut").value = 1
                await ClockCycles(dut.clk, rng.randint(200, 4000))
                sig(dut, f"e{k}_cut").value = 0

    fault_task = cocotb.start_soon(faults()) if cfg.get("faults", True) else None
    for epoch in range(1, epochs + 1):
        # Every domain of every node persists this epoch, in random order with random delays.
        writes = [(h, d) for h in hosts for d in range(h.domains)]
        rng.shuffle(writes)
        for h, d in writes:
            await ClockCycles(dut.clk, rng.randint(0, cfg.get("persist_gap", 60)))
            await h.persist(d, epoch)
            model.persist(h.i, d, epoch)
            model.run(model_rng)
        # Training runs between checkpoints; faults keep coming meanwhile.
        await ClockCycles(dut.clk, rng.randint(*cfg.get("epoch_gap", (1000, 4000))))
    if fault_task is not None:
        fault_task.cancel()
    for k in range(len(topology.edges)):
        sig(dut, f"e{k}_cut").value = 0
    # A reset in flight when the faults stopped has been restored by now (restore awaits).
    # Faults stopped: every node reaches the global meet, which is `epochs` by construction.
    meet = min(h.durable[d] for h in hosts for d in h.enabled)
    assert meet == epochs
    cycles = await wait_all_committed(dut, topology.nodes, meet, cfg.get("liveness_cycles", 200_000))
    await ClockCycles(dut.clk, 200)
    model.settle(model_rng)
    model.check_converged()
    model_committed = [node.committed for node in model.nodes]
    result = {"nodes": topology.nodes, "meet": meet, "committed": [committed(dut, i) for i in range(topology.nodes)],
              "model_committed": model_committed, "settle_cycles": cycles, "resets": resets, "cuts": cuts, "safety_samples": monitor.samples,
              "link_downs": sum(int(sig(dut, f"n{i}_link__{p}__link_downs").value)
                                for i in range(topology.nodes) for p in range(max(1, len(topology.ports(i))))),
              "crc_errors": sum(int(sig(dut, f"n{i}_link__{p}__crc_errors").value)
                                for i in range(topology.nodes) for p in range(max(1, len(topology.ports(i)))))}
    dut._log.info("result: %s", json.dumps(result))
    write_result(result)
    assert result["committed"] == [meet] * topology.nodes
    assert model_committed == result["committed"], f"reference model: {model_committed}"


@cocotb.test()
async def convergence_latency(dut):
    """Cycles from the last persist write to the last node showing the new COMMITTED."""
    cfg = config()
    topology, hosts = await start(dut, cfg)
    await ClockCycles(dut.clk, 2000)
    # One-way delay of a minimal frame over one hop (node 0 to its first child), idle link.
    child = topology.children(0)[0]
    tx = sig(dut, "n0_link__0__frames_tx")
    rx = sig(dut, f"n{child}_link__0__frames_rx")
    one_way = []
    for _ in range(4):
        sent = int(tx.value)
        while int(tx.value) == sent:
            await RisingEdge(dut.clk)
        sent_at, received = int(dut.cycle.value), int(rx.value)
        while int(rx.value) == received:
            await RisingEdge(dut.clk)
        one_way.append(int(dut.cycle.value) - sent_at)
    samples = []
    for epoch in range(1, cfg.get("trials", 4) + 1):
        # All domains but domain 0 first; let that settle (COMMITTED cannot move yet).
        for h in hosts:
            for d in range(1, h.domains):
                await h.persist(d, epoch)
        await ClockCycles(dut.clk, 3000)
        # The last writes: domain 0 of every node, issued together; the clock starts when
        # the last of them has been taken by its NIC.
        tasks = [cocotb.start_soon(h.persist(0, epoch)) for h in hosts]
        for t in tasks:
            await t
        samples.append(await wait_all_committed(dut, topology.nodes, epoch, 100_000, step=1))
    # Simulation speed of the whole cluster, idle but alive (heartbeats on every link).
    wall = time.perf_counter()
    await Timer(20_000 * CLOCK_NS, unit="ns")
    wall = time.perf_counter() - wall
    write_result({"samples": samples, "depth": topology.depth, "nodes": topology.nodes,
                  "one_way": one_way, "cycles_per_s": 20_000 / wall})


@cocotb.test()
async def versions(dut):
    """Mixed versions converge to min ACTIVE; a rolling upgrade; a rollback."""
    cfg = config()
    topology, hosts = await start(dut, cfg)
    n = topology.nodes

    def converged():
        return [int(sig(dut, f"n{i}_epoch__version_converged").value) for i in range(n)]

    async def wait_version(v, limit=50_000):
        for _ in range(limit // 16):
            if converged() == [v] * n:
                return
            await ClockCycles(dut.clk, 16)
        raise AssertionError(f"versions {converged()}, expected {v} everywhere")

    for h in hosts:
        for d in range(h.domains):
            await h.persist(d, 1)
    await wait_version(1)
    # Rolling upgrade to 2: the converged version stays 1 until the last node has moved.
    for i, h in enumerate(hosts):
        await h.set_active(2)
        await ClockCycles(dut.clk, 3000)
        expected = 2 if i == n - 1 else 1
        await wait_version(expected)
        # The cluster keeps committing in the mixed state.
        for hh in hosts:
            for d in range(hh.domains):
                await hh.persist(d, 2 + i)
        await wait_all_committed(dut, n, 2 + i, 50_000)
    # Rollback of one node: the converged version goes back to 1 everywhere.
    await hosts[n // 2].set_active(1)
    await wait_version(1)
    write_result({"ok": True})


@cocotb.test()
async def incompatible_link(dut):
    """A node whose link version range shares nothing with its parent's: the link stays
    down with a clear status and nothing is committed past what that subtree persisted."""
    cfg = config()
    topology, hosts = await start(dut, cfg)
    leaf = topology.nodes - 1
    parent = topology.parent(leaf)
    await ClockCycles(dut.clk, 3000)
    state_leaf = int(sig(dut, f"n{leaf}_link__0__state").value)
    state_parent = int(sig(dut, f"n{parent}_link__{topology.port_to(parent, leaf)}__state").value)
    assert state_leaf == LinkState.INCOMPATIBLE and state_parent == LinkState.INCOMPATIBLE, (state_leaf, state_parent)
    for h in hosts:
        for d in range(h.domains):
            await h.persist(d, 3)
    await ClockCycles(dut.clk, 20_000)
    # The root cannot hear from the cut-off subtree: nothing may be committed.
    assert all(committed(dut, i) == 0 for i in range(topology.nodes)), [committed(dut, i) for i in range(topology.nodes)]
    write_result({"ok": True})


@cocotb.test()
async def bad_commands(dut):
    """Lowering writes, absent domains, illegal roles: refused, counted, nothing changed."""
    cfg = config()
    topology, hosts = await start(dut, cfg)
    h = hosts[0]
    await h.persist(0, 5)
    refused = int(sig(dut, "n0_epoch__refused").value)
    cases = [(Op.PERSIST, 0, 4, CmdStatus.LOWER), (Op.PERSIST, h.domains, 9, CmdStatus.BAD_INDEX),
             (Op.ROLE, 0, 3, CmdStatus.ILLEGAL), (Op.ROLE, 7, int(Role.CHILD), CmdStatus.BAD_INDEX),
             (Op.ACTIVE, 0, 0, CmdStatus.ILLEGAL), (7, 0, 0, CmdStatus.ILLEGAL)]
    for op, index, value, expected in cases:
        status, _ = await h.command(op, index, value)
        assert status == expected, (op, index, value, status, expected)
    status, value = await h.command(Op.READ, 0)
    assert status == CmdStatus.OK and value == 5
    await ClockCycles(dut.clk, 2)
    assert int(sig(dut, "n0_epoch__refused").value) == refused + len(cases)
    write_result({"ok": True})
