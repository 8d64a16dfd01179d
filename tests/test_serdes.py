"""Serial PHY: exact line format, TX->RX across mismatched clocks, line errors, resync.

The link tests run the transmitter and the receiver in two clock domains whose frequencies
differ (by ±200 ppm, and by most of the tolerance the receiver is designed for), with the
line between them passing through an XOR the testbench uses to inject glitches and bit errors.
"""
import random

import pytest
from amaranth import ClockDomain, DomainRenamer, Elaboratable, Fragment, Module, Signal
from amaranth.sim import Simulator

from epochlink.hdl.serdes import (FRAME_BITS, SerialPHY, SerialReceiver, SerialTransmitter,
                                  clock_tolerance, divisor_for, line_rate, payload_rate)

CLK_PERIOD = 1e-8   # transmitter clock: 100 MHz nominal (the value only scales time)


# --- software model of the line, used to construct the misframing case ---------------------

def frame_bits(byte):
    return [0] + [(byte >> i) & 1 for i in range(8)] + [1]


def model_receiver(bits, position=0):
    """Bit-level model of the receiver's framing: yields (start_position, byte or None)."""
    n = len(bits)
    wait_idle = False
    while True:
        while wait_idle and position < n and bits[position] == 0:     # WAIT_IDLE
            position += 1
        while position < n and bits[position] == 1:                   # HUNT
            position += 1
        if position + FRAME_BITS > n:
            return
        frame = bits[position:position + FRAME_BITS]
        if frame[0] == 1:                                              # (not reached)
            continue
        wait_idle = frame[9] == 0
        yield position, None if wait_idle else sum(b << i for i, b in enumerate(frame[1:9]))
        position += FRAME_BITS - 1 if wait_idle else FRAME_BITS


def find_sticky_misframing():
    """A byte repeated back to back, and a frame whose start bit, if lost, leaves a plain
    UART receiver misframed for good (decoding wrong bytes with valid stop bits)."""
    for byte in range(256):
        stream = [byte] * 60
        bits = sum((frame_bits(b) for b in stream), [])
        # Lose the start bit of frame 2: the receiver starts hunting inside that frame.
        bits[2 * FRAME_BITS] = 1
        decoded = list(model_receiver(bits))
        tail = [(pos, value) for pos, value in decoded if pos > 40 * FRAME_BITS]
        if tail and all(value is not None and value != byte and pos % FRAME_BITS != 0
                        for pos, value in tail):
            return byte
    raise AssertionError("no sticky misframing pattern found")


# --- simulation harness ---------------------------------------------------------------------

class WireHarness(Elaboratable):
    """Transmitter in domain ``tx``, receiver in domain ``rx``, an XOR on the wire."""

    def __init__(self, divisor, *, resync_interval, majority=None):
        self.transmitter = SerialTransmitter(divisor, resync_interval=resync_interval)
        self.receiver = SerialReceiver(divisor, majority=majority)
        self.flip = Signal()

    def elaborate(self, platform):
        m = Module()
        m.domains.tx = ClockDomain()
        m.domains.rx = ClockDomain()
        m.submodules.transmitter = DomainRenamer("tx")(self.transmitter)
        m.submodules.receiver = DomainRenamer("rx")(self.receiver)
        m.d.comb += self.receiver.line.eq(self.transmitter.line ^ self.flip)
        return m


def run_link(divisor, items, *, rx_ppm=0.0, resync_interval=64, majority=None, flips=(),
             tail_bits=40):
    """Send ``items`` (byte, idle cycles before it) and return (received bytes, error pulses).

    ``flips`` is a list of (start, duration) in transmitter bit-times from the beginning of the
    simulation during which the wire is inverted. The receiver clock period is scaled by
    ``1 + rx_ppm * 1e-6`` (positive: slower receiver).
    """
    dut = WireHarness(divisor, resync_interval=resync_interval, majority=majority)
    tx, rx = dut.transmitter, dut.receiver
    bit_time = divisor * CLK_PERIOD
    sim = Simulator(dut)
    sim.add_clock(CLK_PERIOD, domain="tx")
    sim.add_clock(CLK_PERIOD * (1 + rx_ppm * 1e-6), domain="rx")
    received, errors = [], [0]

    async def source(ctx):
        for byte, gap in items:
            if gap:
                await ctx.tick("tx").repeat(gap)
            ctx.set(tx.tx.valid, 1)
            ctx.set(tx.tx.payload, byte)
            await ctx.tick("tx").until(tx.tx.ready)
            ctx.set(tx.tx.valid, 0)
        await ctx.delay(tail_bits * bit_time)

    async def sink(ctx):
        async for _, _, valid, payload, error in ctx.tick("rx").sample(rx.rx.valid, rx.rx.payload,
                                                                        rx.error):
            if valid:
                received.append(payload)
            errors[0] += error

    async def wire(ctx):
        now = 0.0
        for start, duration in sorted(flips):
            await ctx.delay(start * bit_time - now)
            ctx.set(dut.flip, 1)
            await ctx.delay(duration * bit_time)
            ctx.set(dut.flip, 0)
            now = (start + duration) * bit_time

    sim.add_testbench(source)
    sim.add_testbench(sink, background=True)
    sim.add_testbench(wire, background=True)
    sim.run()
    return received, errors[0]


def traffic(rng, count, *, max_gap):
    """Random bytes; about a third are sent back to back, the rest after a random idle gap."""
    return [(rng.randrange(256), 0 if rng.random() < 0.35 else rng.randrange(max_gap))
            for _ in range(count)]


# --- exact line format ----------------------------------------------------------------------

@pytest.mark.parametrize("divisor", [3, 4, 7])
def test_transmitter_line_format(divisor):
    """Each byte: start, 8 data bits LSB first, stop, each exactly N cycles; back-to-back frames
    take exactly 10 N cycles; an idle frame follows every ``resync_interval`` frames."""
    resync = 3
    dut = SerialTransmitter(divisor, resync_interval=resync)
    payload = [0x00, 0xFF, 0xA5, 0x3C, 0x01, 0x80, 0x5A]
    line = []
    accepted = []

    async def source(ctx):
        for byte in payload:
            ctx.set(dut.tx.valid, 1)
            ctx.set(dut.tx.payload, byte)
            await ctx.tick().until(dut.tx.ready)
            accepted.append(len(line))
        ctx.set(dut.tx.valid, 0)
        await ctx.tick().repeat(FRAME_BITS * divisor + 5)

    async def probe(ctx):
        async for _, _, value in ctx.tick().sample(dut.line):
            line.append(value)

    sim = Simulator(dut)
    sim.add_clock(CLK_PERIOD)
    sim.add_testbench(source)
    sim.add_testbench(probe, background=True)
    sim.run()

    expected = []
    for index, byte in enumerate(payload):
        if index and index % resync == 0:
            expected += [1] * FRAME_BITS        # forced idle frame
        expected += frame_bits(byte)
    first = line.index(0)
    assert all(v == 1 for v in line[:first])
    assert first <= 2
    cells = line[first:first + len(expected) * divisor]
    assert cells == [bit for bit in expected for _ in range(divisor)]
    assert all(v == 1 for v in line[first + len(expected) * divisor:])
    # Back-to-back acceptance every 10 N cycles, 20 N across a forced idle frame.
    steps = [b - a for a, b in zip(accepted, accepted[1:])]
    assert steps == [FRAME_BITS * divisor * (2 if (i + 1) % resync == 0 else 1)
                     for i in range(len(payload) - 1)]


def test_idle_line_resets_resync_count():
    """A line that was idle for a whole frame needs no forced idle frame."""
    divisor, resync = 3, 2
    dut = SerialTransmitter(divisor, resync_interval=resync)
    starts = []

    async def source(ctx):
        for _ in range(6):
            ctx.set(dut.tx.valid, 1)
            ctx.set(dut.tx.payload, 0xFF)          # only start bits have falling edges
            await ctx.tick().until(dut.tx.ready)
            ctx.set(dut.tx.valid, 0)
            # Each byte waits three frame times after the previous one was accepted, so the
            # line is idle for two (a forced idle frame would make the step 4 frame times).
            await ctx.tick().repeat(3 * FRAME_BITS * divisor - 1)
        await ctx.tick().repeat(FRAME_BITS * divisor)

    async def probe(ctx):
        cycle, previous = 0, 1
        async for _, _, value in ctx.tick().sample(dut.line):
            if previous == 1 and value == 0:
                starts.append(cycle)
            previous, cycle = value, cycle + 1

    sim = Simulator(dut)
    sim.add_clock(CLK_PERIOD)
    sim.add_testbench(source)
    sim.add_testbench(probe, background=True)
    sim.run()
    steps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(starts) == 6 and steps == [3 * FRAME_BITS * divisor] * 5


# --- TX -> RX across clock domains ----------------------------------------------------------

@pytest.mark.parametrize("divisor", [3, 4, 5, 8, 16])
@pytest.mark.parametrize("ppm", [-200, 200])
def test_link_crystal_mismatch(divisor, ppm):
    rng = random.Random(divisor * 1000 + ppm)
    items = traffic(rng, 120, max_gap=4 * FRAME_BITS * divisor)
    received, errors = run_link(divisor, items, rx_ppm=ppm, resync_interval=16)
    assert received == [byte for byte, _ in items]
    assert errors == 0


@pytest.mark.parametrize("divisor", [3, 4, 5, 13])
@pytest.mark.parametrize("sign", [-1, 1])
def test_link_large_mismatch(divisor, sign):
    """80 % of the designed frequency tolerance (±2.2 % .. ±3.7 %), back-to-back traffic."""
    ppm = sign * 0.8 * clock_tolerance(divisor) * 1e6
    rng = random.Random(divisor * 10 + sign)
    items = [(byte, 0 if rng.random() < 0.8 else rng.randrange(3 * divisor))
             for byte, _ in traffic(rng, 150, max_gap=1)]
    received, errors = run_link(divisor, items, rx_ppm=ppm, resync_interval=32)
    assert received == [byte for byte, _ in items]
    assert errors == 0


def test_link_beyond_tolerance_corrupts():
    """Sanity check of the harness: far outside the tolerance, bytes do get corrupted."""
    divisor = 4
    rng = random.Random(7)
    items = [(rng.randrange(256), 0) for _ in range(60)]
    received, _ = run_link(divisor, items, rx_ppm=3 * clock_tolerance(divisor) * 1e6)
    assert received != [byte for byte, _ in items]


# --- line errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("divisor", [5, 8])
def test_idle_glitches_are_rejected(divisor):
    """Short low glitches on an idle line are false starts: flagged, no byte produced, and the
    following bytes arrive intact. With majority voting (N >= 5) sub-cycle glitches inside
    frames are filtered too."""
    rng = random.Random(divisor)
    gap = 8 * FRAME_BITS * divisor                      # cycles between accepted bytes
    items = [(rng.randrange(256), gap) for _ in range(25)]
    # Frame k starts (k + 1) * (gap + 1) cycles in; the idle line is 7 frames long.
    start = [(k + 1) * (gap + 1) / divisor for k in range(25)]   # in bit-times
    idle_glitches = [(start[k] - 3 * FRAME_BITS, 0.3) for k in range(1, 25, 2)]
    # Glitches shorter than a clock cycle, inside frames (only with majority voting), on the
    # start bit, data bits and the stop bit.
    frame_glitches = [(start[k] + rng.choice([0.4, 3.5, 6.3, 9.5]), 0.4 / divisor)
                      for k in range(0, 25, 2)]
    received, errors = run_link(divisor, items, rx_ppm=150, flips=idle_glitches + frame_glitches)
    assert received == [byte for byte, _ in items]
    assert errors == len(idle_glitches)


@pytest.mark.parametrize("divisor", [3, 4, 5, 8])
def test_bit_errors_never_wedge(divisor):
    """Random inverted stretches (sub-bit glitches to several bit-times) during saturated and
    gappy traffic: bytes may be lost or corrupted while errors happen, but after the last error
    the receiver is back in frame within resync_interval + 2 frames and delivers every byte."""
    rng = random.Random(100 + divisor)
    resync = 8
    items = [(rng.randrange(256), 0 if rng.random() < 0.7 else rng.randrange(30 * divisor))
             for _ in range(220)]
    # Errors only during roughly the first 90 frame-times.
    flips = []
    at = 5.0
    while at < 90 * FRAME_BITS:
        flips.append((at, rng.choice([0.5, 1.0, 1.5, 3.0, 0.25]) * rng.uniform(0.5, 1.5)))
        at += rng.uniform(20, 120)
    received, errors = run_link(divisor, items, rx_ppm=-300, resync_interval=resync, flips=flips)
    sent = [byte for byte, _ in items]
    assert errors > 0, "the injected errors should have been noticed"
    # The last 100 bytes were sent well after the last error (220 bytes >= 220 frame-times).
    tail = sent[-100:]
    assert received[-100:] == tail
    assert len(received) <= len(sent) + len(flips)


def test_resync_recovers_sticky_misframing():
    """A lost start bit in a periodic back-to-back stream misframes a plain UART receiver for
    good; the forced idle frames bring this receiver back within resync_interval + 2 frames."""
    byte = find_sticky_misframing()
    divisor, resync, count = 4, 16, 120
    items = [(byte, 0)] * count
    # Invert the start bit of the third frame (the transmitter starts one cycle in).
    lost_start = [(2 * FRAME_BITS + 1 / divisor, 1.0)]

    plain, _ = run_link(divisor, items, resync_interval=0, flips=lost_start)
    assert plain[-50:] != [byte] * 50, "control: without forced idle frames it stays misframed"

    received, _ = run_link(divisor, items, resync_interval=resync, flips=lost_start)
    assert received[:2] == [byte] * 2 and received[2:resync] != [byte] * (resync - 2)
    # Every byte after the first forced idle frame following the error is correct.
    good = count - (resync + 3)
    assert received[-good:] == [byte] * good


# --- parameters and helpers -----------------------------------------------------------------

def test_rates_and_divisors():
    assert divisor_for(48e6, 9.6e6) == 5
    assert divisor_for(125e6, 9.6e6) == 13
    assert line_rate(48e6, 5) == 9.6e6
    assert payload_rate(48e6, 5, 0) == 960e3
    assert payload_rate(48e6, 5, 64) == pytest.approx(960e3 * 64 / 65)
    with pytest.raises(ValueError):
        divisor_for(48e6, 20e6)              # below 3 samples per bit
    with pytest.raises(ValueError):
        divisor_for(125e6, 12e6)             # 125/10 = 12.5: 4 % off
    with pytest.raises(ValueError):
        SerialTransmitter(2)
    with pytest.raises(ValueError):
        SerialReceiver(4, majority=True)
    phy = SerialPHY(13)
    Fragment.get(phy, None)
    assert phy.line_rate(125e6) == pytest.approx(9.615e6, rel=1e-3)
    assert phy.payload_rate(125e6) == pytest.approx(125e6 / 130 * 64 / 65)
    assert clock_tolerance(3) == pytest.approx(1 / 30)
    assert clock_tolerance(5) == pytest.approx(2 / 50)


def test_phy_loopback():
    """SerialPHY with its line looped back: the byte streams connect through."""
    divisor = 4
    dut = SerialPHY(divisor)
    rng = random.Random(3)
    payload = [rng.randrange(256) for _ in range(40)]
    received = []

    class Loop(Elaboratable):
        def elaborate(self, platform):
            m = Module()
            m.submodules.phy = dut
            m.d.comb += dut.rx_line.eq(dut.tx_line)
            return m

    async def source(ctx):
        for byte in payload:
            ctx.set(dut.tx.valid, 1)
            ctx.set(dut.tx.payload, byte)
            await ctx.tick().until(dut.tx.ready)
        ctx.set(dut.tx.valid, 0)
        await ctx.tick().repeat(3 * FRAME_BITS * divisor)

    async def sink(ctx):
        async for _, _, valid, data in ctx.tick().sample(dut.rx.valid, dut.rx.payload):
            if valid:
                received.append(data)

    sim = Simulator(Loop())
    sim.add_clock(CLK_PERIOD)
    sim.add_testbench(source)
    sim.add_testbench(sink, background=True)
    sim.run()
    assert received == payload


# --- cocotb under Verilator -----------------------------------------------------------------

@pytest.mark.parametrize("divisor", [3, 5])
def test_cocotb_two_phys_with_bit_errors(divisor):
    """Two SerialPHYs on different clocks wired line to line, bit errors injected on both
    wires, checked by the Python scoreboard in ``epochlink.sim.tb_serdes``."""
    from epochlink.sim import tb_serdes, verilator

    resync = 16
    design = verilator.build("serdes_pair", tb_serdes.SerdesPair(divisor, resync),
                             toplevel="serdes_pair")
    verilator.run(design, "epochlink.sim.tb_serdes", seed=1234 + divisor,
                  env={"SERDES_DIVISOR": str(divisor), "SERDES_RESYNC": str(resync),
                       "SERDES_BYTES": "500"},
                  run_name=f"tb_serdes_n{divisor}")
