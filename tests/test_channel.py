"""Tests of the noisy-link channel model (hdl/channel.py).

Amaranth-simulator unit tests first (exact behaviour and short statistics), then one
cocotb run under Verilator of a million-cycle bench with an in-design source and checker.
"""
import math
import random

import pytest
from amaranth import ClockDomain, Module
from amaranth.sim import Simulator

from epochlink.hdl.channel import (ChannelModel, ber_to_threshold,
                                   threshold_to_byte_error_probability)

# Delays covering both delay-line implementations and their boundary.
DELAYS = [1, 2, ChannelModel.REGISTER_DELAY_MAX, ChannelModel.REGISTER_DELAY_MAX + 1, 8, 40]


def simulate(dut, testbench, *, top=None):
    sim = Simulator(top if top is not None else dut)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()


def set_knobs(ctx, dut, *, error=0, burst=0, burst_length=0, cut=0):
    ctx.set(dut.error_threshold, error)
    ctx.set(dut.burst_threshold, burst)
    ctx.set(dut.burst_length, burst_length)
    ctx.set(dut.cut, cut)


def counters(ctx, dut):
    return {name: ctx.get(getattr(dut, name)) for name in
            ("bytes_in", "bytes_out", "bytes_corrupted", "bits_flipped", "bytes_dropped")}


async def drive(ctx, dut, n_cycles, rng, *, p_valid=0.7, cut_cycles=()):
    """Drive random bytes for ``n_cycles`` cycles, then idle until the line is empty.

    Returns (sent, arrived): per cycle, the byte put on ``tx`` and the byte seen on ``rx``
    (``None`` when not valid). ``cut`` is 1 in the cycles listed in ``cut_cycles``.
    """
    sent, arrived = [], []
    for cycle in range(n_cycles + dut.delay + 2):
        byte = rng.randrange(256) if cycle < n_cycles and rng.random() < p_valid else None
        ctx.set(dut.tx.valid, byte is not None)
        ctx.set(dut.tx.payload, byte or 0)
        ctx.set(dut.cut, cycle in cut_cycles)
        assert ctx.get(dut.tx.ready) == 1, "a wire never stalls"
        arrived.append(ctx.get(dut.rx.payload) if ctx.get(dut.rx.valid) else None)
        sent.append(byte)
        await ctx.tick()
    return sent, arrived


def delivered_pairs(sent, arrived, delay):
    """(sent byte, arrived byte) for every byte sent; checks timing of every arrival."""
    pairs = []
    for cycle, got in enumerate(arrived):
        then = cycle - delay
        expected = sent[then] if then >= 0 else None
        assert (got is None) == (expected is None), \
            f"cycle {cycle}: arrival {got} but {expected} was sent {delay} cycles earlier"
        if got is not None:
            pairs.append((expected, got))
    return pairs


# --- helpers ---------------------------------------------------------------------------

def test_ber_to_threshold():
    assert ber_to_threshold(0) == 0
    assert ber_to_threshold(1e-3) == round(8e-3 * 2**32)
    assert ber_to_threshold(1 / 8) == 2**32 - 1  # one event per byte: clipped
    assert ber_to_threshold(0.5) == 2**32 - 1
    assert threshold_to_byte_error_probability(ber_to_threshold(1e-3)) == pytest.approx(8e-3)
    assert threshold_to_byte_error_probability(0) == 0
    with pytest.raises(ValueError):
        ber_to_threshold(-1e-3)
    with pytest.raises(ValueError):
        threshold_to_byte_error_probability(2**32)


@pytest.mark.parametrize("kwargs", [{"delay": 0}, {"delay": 2.5}, {"seed": 0}, {"seed": -3}])
def test_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        ChannelModel(**kwargs)


# --- exact behaviour --------------------------------------------------------------------

@pytest.mark.parametrize("delay", DELAYS)
def test_delay_is_exact(delay):
    """Every byte arrives exactly `delay` cycles after it entered, unchanged at threshold 0."""
    dut = ChannelModel(delay=delay, seed=7)

    async def testbench(ctx):
        # Bursts are armed (length 8) but can never start at threshold 0.
        set_knobs(ctx, dut, burst_length=8)
        sent, arrived = await drive(ctx, dut, 300, random.Random(delay))
        pairs = delivered_pairs(sent, arrived, delay)
        assert all(a == b for a, b in pairs)
        c = counters(ctx, dut)
        assert c == {"bytes_in": len(pairs), "bytes_out": len(pairs), "bytes_corrupted": 0,
                     "bits_flipped": 0, "bytes_dropped": 0}

    simulate(dut, testbench)


@pytest.mark.parametrize("delay", [3, 40])
def test_reset_flushes_line(delay):
    """After a reset nothing sent before it comes out (the memory line is not reset)."""
    dut = ChannelModel(delay=delay)
    m = Module()
    m.domains.sync = sync = ClockDomain()
    m.submodules.dut = dut

    async def testbench(ctx):
        set_knobs(ctx, dut)
        ctx.set(dut.tx.valid, 1)
        await ctx.tick().repeat(2 * delay)
        ctx.set(dut.tx.valid, 0)
        ctx.set(sync.rst, 1)
        await ctx.tick()
        ctx.set(sync.rst, 0)
        for _ in range(2 * delay + 4):
            assert not ctx.get(dut.rx.valid), "a byte sent before the reset came out"
            await ctx.tick()
        assert counters(ctx, dut)["bytes_out"] == 0

    simulate(dut, testbench, top=m)


def test_cut_drops_and_counts():
    delay = 6
    dut = ChannelModel(delay=delay, seed=3)
    cut_cycles = range(100, 160)

    async def testbench(ctx):
        set_knobs(ctx, dut)
        sent, arrived = await drive(ctx, dut, 300, random.Random(1), p_valid=0.8,
                                    cut_cycles=cut_cycles)
        # Outside the cut delivery is exact; inside it, exactly what would have arrived is lost.
        lost = []
        for cycle, got in enumerate(arrived):
            expected = sent[cycle - delay] if cycle >= delay else None
            if cycle in cut_cycles:
                assert got is None, f"cycle {cycle}: a byte came through the cut"
                if expected is not None:
                    lost.append(expected)
            else:
                assert got == expected, f"cycle {cycle}: {got} arrived, {expected} expected"
        c = counters(ctx, dut)
        assert len(lost) > 30
        assert c["bytes_dropped"] == len(lost)
        assert c["bytes_out"] == sum(a is not None for a in arrived)
        assert c["bytes_in"] == c["bytes_out"] + c["bytes_dropped"]

    simulate(dut, testbench)


def test_each_event_flips_one_bit():
    """At P(event) = 1/2 every changed byte differs in exactly one bit, any of the 8."""
    dut = ChannelModel(delay=5, seed=11)

    async def testbench(ctx):
        set_knobs(ctx, dut, error=2**31)
        sent, arrived = await drive(ctx, dut, 3000, random.Random(2))
        diffs = [a ^ b for a, b in delivered_pairs(sent, arrived, dut.delay)]
        corrupted = [d for d in diffs if d]
        assert all(d & (d - 1) == 0 for d in corrupted), "more than one bit in one event"
        n, k = len(diffs), len(corrupted)
        assert abs(k - n / 2) <= 5 * math.sqrt(n / 4)
        for bit in range(8):  # ~ k/8 each; 5 sigma below that is still well above 70
            assert sum(d == 1 << bit for d in corrupted) > 70, f"bit {bit} rarely flipped"
        c = counters(ctx, dut)
        assert c["bytes_corrupted"] == c["bits_flipped"] == k

    simulate(dut, testbench)


@pytest.mark.parametrize("length", [1, 5])
def test_bursts_corrupt_consecutive_bytes(length):
    """Corrupted bytes come in runs of whole bursts: multiples of burst_length bytes."""
    dut = ChannelModel(delay=3, seed=5)

    async def testbench(ctx):
        set_knobs(ctx, dut, burst=round(0.05 * 2**32), burst_length=length)
        sent, arrived = await drive(ctx, dut, 3000, random.Random(3))
        diffs = [a ^ b for a, b in delivered_pairs(sent, arrived, dut.delay)]
        runs, run = [], 0
        for d in diffs:
            if d:
                run += 1
            elif run:
                runs.append(run)
                run = 0
        # A run still open at the end may have been cut short by the end of the input.
        assert len(runs) > 40
        assert all(r % length == 0 for r in runs), sorted(set(runs))
        assert runs.count(length) > len(runs) // 2, "bursts should mostly stand alone"
        c = counters(ctx, dut)
        assert c["bytes_corrupted"] == sum(d != 0 for d in diffs)
        assert c["bits_flipped"] == sum(bin(d).count("1") for d in diffs)

    simulate(dut, testbench)


def test_burst_length_zero_disables_bursts():
    dut = ChannelModel(delay=2)

    async def testbench(ctx):
        set_knobs(ctx, dut, burst=2**32 - 1, burst_length=0)
        ctx.set(dut.tx.valid, 1)
        await ctx.tick().repeat(500)
        assert counters(ctx, dut)["bytes_corrupted"] == 0
        ctx.set(dut.burst_length, 3)
        await ctx.tick().repeat(500)
        assert counters(ctx, dut)["bytes_corrupted"] >= 495

    simulate(dut, testbench)


def test_seed_sets_the_error_pattern():
    """The same seed repeats the same errors on the same traffic; another seed does not."""
    def error_pattern(seed):
        dut = ChannelModel(delay=2, seed=seed)
        result = []

        async def testbench(ctx):
            set_knobs(ctx, dut, error=2**30, burst=2**26, burst_length=3)
            sent, arrived = await drive(ctx, dut, 400, random.Random(0))
            result.extend(a ^ b for a, b in delivered_pairs(sent, arrived, dut.delay))

        simulate(dut, testbench)
        return result

    first = error_pattern(1)
    assert any(first)
    assert error_pattern(1) == first
    assert error_pattern(2) != first


# --- statistics --------------------------------------------------------------------------

@pytest.mark.parametrize("p, n", [(1e-2, 40_000), (0.25, 8_000)])
def test_byte_error_rate(p, n):
    """The measured event rate is within 5 sigma of threshold / 2**32 (binomial)."""
    dut = ChannelModel(delay=2, seed=12345)
    threshold = ber_to_threshold(p / 8)
    p = threshold_to_byte_error_probability(threshold)

    async def testbench(ctx):
        set_knobs(ctx, dut, error=threshold)
        ctx.set(dut.tx.payload, 0x5A)
        ctx.set(dut.tx.valid, 1)
        await ctx.tick().repeat(n)
        c = counters(ctx, dut)
        assert c["bytes_in"] == n
        assert c["bits_flipped"] == c["bytes_corrupted"]
        assert abs(c["bytes_corrupted"] - n * p) <= 5 * math.sqrt(n * p * (1 - p)), c

    simulate(dut, testbench)


# --- Verilator ---------------------------------------------------------------------------

def test_channel_under_verilator():
    """A million cycles per phase: bit errors, bursts, cut (see sim/tb_channel.py)."""
    from epochlink.sim.tb_channel import ChannelBench
    from epochlink.sim.verilator import build, run

    delay = 37
    design = build("tb_channel", lambda: ChannelBench(delay=delay, seed=3))
    run(design, "epochlink.sim.tb_channel",
        env={"TB_CHANNEL_DELAY": str(delay), "TB_CHANNEL_CYCLES": "1000000"})
