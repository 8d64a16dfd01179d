"""EpochRegisters + EpochEngine under the Amaranth simulator: the epoch engine's command
registers on the register bus, checked against the reference model's command semantics."""
import random

import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from epochlink.hdl.epoch import EpochEngine
from epochlink.hdl.epoch_format import CmdStatus, Op, Role
from epochlink.hdl.epoch_regs import EpochRegisters, command_addresses
from epochlink.hostproto import Status
from epochlink.registers import register_map
from epochlink.sim.epoch_model import Node as ModelNode

DOMAINS, PORTS = 4, 2
REGMAP = register_map(PORTS, DOMAINS)
CMD_TO_BUS = {CmdStatus.OK: Status.OK, CmdStatus.DISABLED: Status.REFUSED_DISABLED,
              CmdStatus.LOWER: Status.REFUSED_LOWER, CmdStatus.ILLEGAL: Status.ILLEGAL_VALUE,
              CmdStatus.BAD_INDEX: Status.BAD_ADDRESS}


class Bench(wiring.Component):
    def __init__(self):
        self.regs = EpochRegisters(REGMAP)
        self.engine = EpochEngine(domains=DOMAINS, ports=PORTS)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.submodules.regs, m.submodules.engine = self.regs, self.engine
        wiring.connect(m, self.regs.cmd, self.engine.cmd)
        wiring.connect(m, self.engine.rsp, self.regs.rsp)
        status = self.engine.status
        m.d.comb += [self.regs.online.eq(status.online), self.regs.active.eq(status.active)]
        m.d.comb += [self.regs.role[p].eq(status.port[p].role) for p in range(PORTS)]
        for p in range(PORTS):
            m.d.comb += [self.engine.link_up[p].eq(0), self.engine.ctrl_in[p].valid.eq(0),
                         self.engine.ctrl_out[p].ready.eq(1)]
        return m


async def access(ctx, bench, addr, write=False, wdata=0, limit=200):
    req, rsp = bench.regs.bus.req, bench.regs.bus.rsp
    ctx.set(req.payload.addr, addr)
    ctx.set(req.payload.write, write)
    ctx.set(req.payload.wdata, wdata)
    ctx.set(req.valid, 1)
    for _ in range(limit):
        if ctx.get(req.ready):
            break
        await ctx.tick()
    else:
        raise AssertionError("request not taken")
    await ctx.tick()                # the request is taken at this edge
    ctx.set(req.valid, 0)
    for _ in range(limit):
        if ctx.get(rsp.valid):
            status, rdata = Status(ctx.get(rsp.payload.status).value), ctx.get(rsp.payload.rdata)
            await ctx.tick()
            return status, rdata
        await ctx.tick()
    raise AssertionError("no response")


def run(testbench):
    bench = Bench()
    sim = Simulator(bench)
    sim.add_clock(1e-8)

    async def main(ctx):
        await testbench(ctx, bench)

    sim.add_testbench(main)
    sim.run()


def test_command_addresses_are_exactly_the_command_registers():
    addrs = command_addresses(REGMAP)
    assert REGMAP.address("DOMAIN3.DISABLE") in addrs and REGMAP.address("COMMITTED") not in addrs
    assert len(addrs) == 2 + PORTS + 3 * DOMAINS


def test_rules_and_refusals():
    A = REGMAP.address

    async def testbench(ctx, bench):
        expect = [
            # (register, write?, value, status, rdata)
            ("ONLINE", False, 0, Status.OK, 0),
            ("ONLINE", True, 2, Status.ILLEGAL_VALUE, 0),
            ("ACTIVE", True, 0, Status.ILLEGAL_VALUE, 1),
            ("ACTIVE", True, 256, Status.ILLEGAL_VALUE, 1),
            ("ACTIVE", True, 7, Status.OK, 7),
            ("ACTIVE", False, 0, Status.OK, 7),
            ("DOMAIN0.PERSISTED", True, 5, Status.REFUSED_DISABLED, 0),
            ("DOMAIN0.ENABLE", False, 0, Status.OK, 0),
            ("DOMAIN0.ENABLE", True, 3, Status.OK, 1),
            ("DOMAIN0.PERSISTED", False, 0, Status.OK, 3),
            ("DOMAIN0.PERSISTED", True, 9, Status.OK, 9),
            ("DOMAIN0.PERSISTED", True, 4, Status.REFUSED_LOWER, 9),
            ("DOMAIN0.PERSISTED", True, 9, Status.OK, 9),
            ("DOMAIN0.DISABLE", True, 2, Status.ILLEGAL_VALUE, 0),
            ("DOMAIN0.DISABLE", True, 0, Status.OK, 0),
            ("DOMAIN0.ENABLE", False, 0, Status.OK, 1),
            ("DOMAIN0.DISABLE", True, 1, Status.OK, 0),
            ("DOMAIN0.ENABLE", False, 0, Status.OK, 0),
            ("DOMAIN0.PERSISTED", False, 0, Status.OK, 0),
            ("EPOCH_PORT0.ROLE", True, 3, Status.ILLEGAL_VALUE, 0),
            ("EPOCH_PORT0.ROLE", True, Role.PARENT, Status.OK, Role.PARENT),
            ("EPOCH_PORT1.ROLE", True, Role.PARENT, Status.ILLEGAL_VALUE, Role.OFF),
            ("EPOCH_PORT1.ROLE", True, Role.CHILD, Status.OK, Role.CHILD),
            ("EPOCH_PORT1.ROLE", False, 0, Status.OK, Role.CHILD),
            ("ONLINE", True, 1, Status.OK, 1),
            ("ONLINE", False, 0, Status.OK, 1),
        ]
        for name, write, value, status, rdata in expect:
            got = await access(ctx, bench, A(name), write, value)
            assert got == (status, rdata), (name, write, value, got)
        assert await access(ctx, bench, A("COMMITTED")) == (Status.BAD_ADDRESS, 0)
        assert await access(ctx, bench, 0x1000 + 4 * DOMAINS, True, 1) == (Status.BAD_ADDRESS, 0)
        refusals = sum(1 for e in expect if e[3] in (Status.REFUSED_LOWER, Status.REFUSED_DISABLED))
        # Refused by the engine (not by the range check) count in the engine's counter.
        assert ctx.get(bench.engine.status.refused) == refusals + 2   # ACTIVE 0, 2nd PARENT

    run(testbench)


@pytest.mark.parametrize("seed", [1, 2])
def test_random_against_model(seed):
    rng = random.Random(seed)
    model = ModelNode(domains=DOMAINS, ports=PORTS)

    async def testbench(ctx, bench):
        for _ in range(150):
            d = rng.randrange(DOMAINS)
            kind = rng.choice(["PERSISTED", "ENABLE", "DISABLE", "READ"])
            value = rng.choice([0, 1, 2, 5, 9, 17, rng.randrange(40)])
            addr = REGMAP.address(f"DOMAIN{d}.{'PERSISTED' if kind == 'READ' else kind}")
            if kind == "READ":
                status, persisted, enabled = model.command(Op.READ, d, 0)
                got = await access(ctx, bench, addr)
                assert got == (Status.OK, persisted), (kind, d, got)
                continue
            op = {"PERSISTED": Op.PERSIST, "ENABLE": Op.ENABLE, "DISABLE": Op.DISABLE}[kind]
            if kind == "DISABLE":
                value = 1
            status, persisted, enabled = model.command(op, d, value)
            got_status, got_value = await access(ctx, bench, addr, True, value)
            assert got_status == CMD_TO_BUS[status], (kind, d, value, got_status, status)
            if kind == "PERSISTED":
                assert got_value == persisted
            elif kind == "ENABLE":
                assert got_value == int(enabled)

    run(testbench)
