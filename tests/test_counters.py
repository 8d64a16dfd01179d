"""The CounterBank (event counters in block RAM) in the Amaranth simulator, against a
scoreboard of the events it was given: no event is lost, reads never run ahead of the events
nor lag them by more than the documented bound, and bad accesses change nothing."""
from __future__ import annotations

import random

import pytest
from amaranth import ResetInserter, Signal
from amaranth.hdl import Fragment
from amaranth.sim import Simulator

from epochlink.hdl.counters import CounterBank, counter_field
from epochlink.hdl.regbank import BusStatus, RegisterBank
from epochlink.registers import register_map

from .test_registers import bus_access

COUNTERS = [("strobe_a", 0x20, 1), ("strobe_b", 0x21, 1), ("burst", 0x22, 3), ("rare", 0x30, 1)]


def run(dut, bench):
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()


def test_counts_every_event_and_reads_lag_by_at_most_the_scan_period():
    bank = CounterBank(COUNTERS, width=32)
    rng = random.Random(5)
    cycle = 0
    history = []            # true counts after each cycle
    reads = []              # (name, cycle the response came, value)
    true = {name: 0 for name, _, _ in COUNTERS}

    async def events(ctx):
        nonlocal cycle
        # Every event source busy: strobes almost every cycle, the 3-bit one at full rate.
        for _ in range(3000):
            amounts = {"strobe_a": 1, "strobe_b": rng.random() < 0.5,
                       "burst": rng.randrange(8), "rare": rng.random() < 0.01}
            for name, amount in amounts.items():
                ctx.set(bank.events[name], int(amount))
            await ctx.tick()
            for name, amount in amounts.items():
                true[name] += int(amount)
            history.append(dict(true))
            cycle += 1
        for name in true:
            ctx.set(bank.events[name], 0)

    async def reader(ctx):
        await ctx.tick().repeat(3)
        while cycle < 2990:
            name, address, _ = rng.choice(COUNTERS)
            status, rdata, _ = await bus_access(ctx, bank, address)
            assert status is BusStatus.OK
            reads.append((name, cycle, rdata))
        await ctx.tick().repeat(bank.read_lag + 20)
        for name, address, _ in COUNTERS:
            status, rdata, _ = await bus_access(ctx, bank, address)
            assert (status, rdata) == (BusStatus.OK, true[name]), name

    sim = Simulator(bank)
    sim.add_clock(1e-6)
    sim.add_testbench(events, background=True)
    sim.add_testbench(reader)
    sim.run()

    assert len(reads) > 500
    last = {}
    for name, at, value in reads:
        # (a few cycles of slack: the testbenches' view of "now" and the pipeline's stages)
        now = history[min(at + 1, len(history) - 1)][name]
        then = history[max(at - 3 - bank.read_lag, 0)][name]
        assert then <= value <= now, (name, at, value, then, now)
        assert value >= last.get(name, 0), "a counter went backwards"
        last[name] = value


def test_writes_are_refused_and_unknown_addresses_answer_bad_address():
    bank = CounterBank(COUNTERS, width=8)

    async def bench(ctx):
        ctx.set(bank.events.burst, 5)
        await ctx.tick().repeat(60)      # 300 events: wraps at 2**8
        ctx.set(bank.events.burst, 0)
        await ctx.tick().repeat(bank.read_lag + 2)
        assert await bus_access(ctx, bank, 0x22) == (BusStatus.OK, 300 % 256, 0)
        assert await bus_access(ctx, bank, 0x22, write=True, wdata=0) == \
            (BusStatus.READ_ONLY, 300 % 256, 0)
        assert await bus_access(ctx, bank, 0x22) == (BusStatus.OK, 300 % 256, 0)
        assert await bus_access(ctx, bank, 0x23) == (BusStatus.BAD_ADDRESS, 0, 0)
        assert await bus_access(ctx, bank, 0x23, write=True, wdata=1) == (BusStatus.BAD_ADDRESS, 0, 0)
        assert await bus_access(ctx, bank, 0x20) == (BusStatus.OK, 0, 0)

    run(bank, bench)


def test_reset_sweeps_the_counters_to_zero_without_losing_new_events():
    bank = CounterBank(COUNTERS, width=32)
    clear = Signal()
    dut = ResetInserter(clear)(bank)

    async def bench(ctx):
        ctx.set(bank.events.strobe_a, 1)
        await ctx.tick().repeat(100)
        ctx.set(bank.events.strobe_a, 0)
        await ctx.tick().repeat(bank.read_lag + 2)
        assert (await bus_access(ctx, bank, 0x20))[1] == 100
        # (an unknown address answers zero, never a counter)
        assert await bus_access(ctx, bank, 0x23) == (BusStatus.BAD_ADDRESS, 0, 0)
        ctx.set(clear, 1)
        await ctx.tick()
        ctx.set(clear, 0)
        ctx.set(bank.events.strobe_a, 1)      # events during the sweep are kept
        await ctx.tick().repeat(3)
        ctx.set(bank.events.strobe_a, 0)
        await ctx.tick().repeat(bank.read_lag + 2)
        assert (await bus_access(ctx, bank, 0x20))[1] == 3
        assert (await bus_access(ctx, bank, 0x22))[1] == 0

    run(dut, bench)


def test_bank_for_the_register_map():
    regmap = register_map(2)
    bank = CounterBank.for_map(regmap, increments={"PORT1.ABORTS": 8})
    names = [name for name, _, _ in bank.counters]
    assert counter_field("PORT1.FRAMES_TX") in names and "refused" in names
    assert "port0_link_state" not in names and "scratch" not in names
    assert dict((n, w) for n, _, w in bank.counters)["port1_aborts"] == 8
    assert {a for _, a, _ in bank.counters} == {i.address for i in regmap if i.register.counter}
    Fragment.get(bank, None)
    # The register bank built for it leaves the counters alone.
    regs = RegisterBank(regmap, serve_counters=False)
    assert not hasattr(regs.port[0], "frames_tx") and hasattr(regs.port[0], "peer_id")
    Fragment.get(regs, None)
    with pytest.raises(ValueError, match="not counter registers"):
        CounterBank.for_map(regmap, increments={"PORT0.PEER_ID": 2})


@pytest.mark.parametrize("args, message", [
    (([],), "at least one counter"),
    (([("a", 1, 1), ("a", 2, 1)],), "names must be unique"),
    (([("a", 1, 1), ("b", 1, 1)],), "addresses must be unique"),
    (([("a", 1, 0)],), "increment widths"),
])
def test_bad_parameters(args, message):
    with pytest.raises(ValueError, match=message):
        CounterBank(*args)
    with pytest.raises(ValueError, match="width must be 1..32"):
        CounterBank([("a", 1, 1)], width=33)
