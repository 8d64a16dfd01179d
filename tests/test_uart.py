"""UART receiver/transmitter in the Amaranth simulator."""
from __future__ import annotations

import gc
import random
import warnings

import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from epochlink.hdl.uart import UARTReceiver, UARTTransmitter, uart_divisor


# -- helpers ---------------------------------------------------------------------------------

async def drive_bits(ctx, pin, bits: list[int], period: float) -> None:
    """Drive ``bits`` on ``pin``, each ``period`` cycles long (fractional periods accumulate)."""
    t = 0.0
    now = 0
    for bit in bits:
        ctx.set(pin, bit)
        t += period
        n = round(t) - now
        now += n
        await ctx.tick().repeat(n)


def frame_bits(byte: int, stop: int = 1) -> list[int]:
    return [0] + [(byte >> i) & 1 for i in range(8)] + [stop]


async def collect(ctx, stream, out: list[int], count: int) -> None:
    ctx.set(stream.ready, 1)
    while len(out) < count:
        payload, = await ctx.tick().sample(stream.payload).until(stream.valid)
        out.append(payload)


def run(dut, *benches, deadline: int | None = None) -> None:
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    for bench in benches:
        sim.add_testbench(bench, background=getattr(bench, "background", False))
    if deadline is None:
        sim.run()
    else:
        sim.run_until(deadline * 1e-6)


# -- divisor ---------------------------------------------------------------------------------

def test_uart_divisor():
    assert uart_divisor(48e6, 12e6) == 4
    assert uart_divisor(48e6, 1e6) == 48
    assert uart_divisor(12e6, 115200) == 104          # 0.16 % off
    assert uart_divisor(100e6, 3e6) == 33             # 1 % off
    with pytest.raises(ValueError):
        uart_divisor(48e6, 5e6)                       # 9.6 -> 10: 4.2 % off
    with pytest.raises(ValueError):
        uart_divisor(48e6, 20e6)                      # below the minimum divisor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # the refused object is never elaborated
        with pytest.raises(ValueError):
            UARTReceiver(3)
        gc.collect()


# -- transmitter -----------------------------------------------------------------------------

@pytest.mark.parametrize("divisor", [4, 7])
def test_transmitter_waveform(divisor):
    """Every bit lasts exactly ``divisor`` cycles and queued bytes leave back to back."""
    dut = UARTTransmitter(divisor)
    data = [0x55, 0x00, 0xFF, 0xA5, 0x3C]
    line: list[int] = []

    async def source(ctx):
        for byte in data:
            ctx.set(dut.i.valid, 1)
            ctx.set(dut.i.payload, byte)
            await ctx.tick().until(dut.i.ready)
        ctx.set(dut.i.valid, 0)

    async def probe(ctx):
        for _ in range((len(data) * 10 + 4) * divisor):
            _, _, tx = await ctx.tick().sample(dut.tx)
            line.append(tx)

    run(dut, source, probe)
    start = line.index(0)
    assert all(line[:start])
    expected = []
    for byte in data:
        for bit in frame_bits(byte):
            expected += [bit] * divisor
    assert line[start:start + len(expected)] == expected
    assert all(line[start + len(expected):])          # idle high afterwards


# -- loopback --------------------------------------------------------------------------------

class Loopback(wiring.Component):
    def __init__(self, divisor: int):
        self.divisor = divisor
        self.tx = UARTTransmitter(divisor)
        self.rx = UARTReceiver(divisor)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.submodules.tx = self.tx
        m.submodules.rx = self.rx
        m.d.comb += self.rx.rx.eq(self.tx.tx)
        return m


@pytest.mark.parametrize("divisor,count", [(4, 64), (16, 24), (48, 6)])
def test_loopback(divisor, count):
    """Random bytes through transmitter -> receiver, back to back (divisor 48: 1 Mbaud at 48 MHz)."""
    rng = random.Random(divisor)
    data = [0x00, 0xFF, 0x55, 0xAA] + [rng.randrange(256) for _ in range(count - 4)]
    dut = Loopback(divisor)
    got: list[int] = []

    async def source(ctx):
        for byte in data:
            ctx.set(dut.tx.i.valid, 1)
            ctx.set(dut.tx.i.payload, byte)
            await ctx.tick().until(dut.tx.i.ready)
        ctx.set(dut.tx.i.valid, 0)

    async def sink(ctx):
        await collect(ctx, dut.rx.o, got, len(data))
        await ctx.tick().repeat(12 * divisor)
        assert ctx.get(dut.rx.o.valid) == 0
        assert ctx.get(dut.rx.framing_errors) == 0
        assert ctx.get(dut.rx.overruns) == 0

    run(dut, source, sink)
    assert got == data


def _receive(divisor: int, bits: list[int], period: float, *, settle: int = 0):
    """Drive ``bits`` into a receiver; return (bytes, framing_errors, overruns)."""
    dut = UARTReceiver(divisor)
    got: list[int] = []
    result = {}

    async def line(ctx):
        ctx.set(dut.rx, 1)
        await ctx.tick().repeat(3 * divisor)
        await drive_bits(ctx, dut.rx, bits, period)
        ctx.set(dut.rx, 1)
        await ctx.tick().repeat(settle + 3 * divisor)
        result["framing"] = ctx.get(dut.framing_errors)
        result["overruns"] = ctx.get(dut.overruns)

    async def sink(ctx):
        # (a plain per-cycle loop: a background testbench may be stopped at any await)
        ctx.set(dut.o.ready, 1)
        while True:
            _, _, valid, payload = await ctx.tick().sample(dut.o.valid, dut.o.payload)
            if valid:
                got.append(payload)
    sink.background = True

    run(dut, line, sink)
    return got, result["framing"], result["overruns"]


@pytest.mark.parametrize("divisor,skew", [(4, -0.02), (4, 0.02), (16, -0.035), (16, 0.035)])
def test_receiver_baud_tolerance(divisor, skew):
    """The sender's bit time may be a few percent off."""
    data = [0x00, 0xFF, 0x01, 0x80, 0x5A, 0xC3]
    bits = [b for byte in data for b in frame_bits(byte)]
    got, framing, _ = _receive(divisor, bits, divisor * (1 + skew))
    assert got == data
    assert framing == 0


@pytest.mark.parametrize("divisor", [4, 16])
def test_receiver_framing_error(divisor):
    """A 0 stop bit drops the byte and counts a framing error; the next byte is fine."""
    bits = frame_bits(0x42, stop=0) + [1] * 2 + frame_bits(0x43) + frame_bits(0x44)
    got, framing, _ = _receive(divisor, bits, divisor)
    assert got == [0x43, 0x44]
    assert framing == 1


@pytest.mark.parametrize("divisor", [4, 16])
def test_receiver_break(divisor):
    """A line held low for many frames is one framing error, and no wedge."""
    bits = frame_bits(0x11) + [0] * 40 + [1] + frame_bits(0x22) + frame_bits(0x33)
    got, framing, _ = _receive(divisor, bits, divisor)
    assert got == [0x11, 0x22, 0x33]
    assert framing == 1


def test_receiver_glitch_ignored():
    """A low pulse shorter than half a bit is not a start bit."""
    divisor = 16
    # one element per cycle: a 1-cycle glitch, then a real frame
    line = [1] * 4 + [0] + [1] * (2 * divisor) + [b for b in frame_bits(0x7E) for _ in range(divisor)]
    got, framing, _ = _receive(divisor, line, 1)
    assert got == [0x7E]
    assert framing == 0


def test_receiver_overrun():
    """A byte arriving while the previous one was not taken is dropped and counted."""
    divisor = 4
    dut = UARTReceiver(divisor)
    result = {}

    async def bench(ctx):
        ctx.set(dut.rx, 1)
        ctx.set(dut.o.ready, 0)
        await ctx.tick().repeat(8)
        await drive_bits(ctx, dut.rx, frame_bits(0x01) + frame_bits(0x02) + [1] * 4, divisor)
        result["overruns"] = ctx.get(dut.overruns)
        result["first"] = (ctx.get(dut.o.valid), ctx.get(dut.o.payload))
        ctx.set(dut.o.ready, 1)
        await ctx.tick()
        ctx.set(dut.o.ready, 0)
        await drive_bits(ctx, dut.rx, frame_bits(0x03) + [1] * 4, divisor)
        result["next"] = (ctx.get(dut.o.valid), ctx.get(dut.o.payload))

    run(dut, bench)
    assert result["overruns"] == 1
    assert result["first"] == (1, 0x01)
    assert result["next"] == (1, 0x03)
