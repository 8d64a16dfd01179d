"""cocotb testbench for :class:`~epochlink.hdl.channel.ChannelModel` under Verilator.

The design under test is :class:`ChannelBench`: the channel between an in-design byte
source and an independent in-design checker, so that a million cycles run without
per-cycle Python. The testbench only sets knobs, waits, and reads counters.

Environment (set by the pytest that builds the bench):
``TB_CHANNEL_DELAY`` (the bench's ``delay``), ``TB_CHANNEL_CYCLES`` (cycles per phase).
"""
import math
import os

import cocotb
from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, ReadOnly, RisingEdge, Timer

from ..hdl.channel import ChannelModel, ber_to_threshold, threshold_to_byte_error_probability

__all__ = ["ChannelBench"]

_COUNTERS = ("bytes_in", "bytes_out", "bytes_corrupted", "bits_flipped", "bytes_dropped")


class ChannelBench(wiring.Component):
    """A :class:`ChannelModel` with a byte source in front and a checker behind it.

    The source sends, while ``enable`` is 1, byte ``g(c) = c[0:8] ^ c[8:16] ^ c[16:24]``
    in every cycle ``c`` with ``c mod 8 != 7`` (``c`` is a free-running cycle count). As
    the channel delay is fixed, the checker knows what must arrive in cycle ``c``:
    ``g(c - delay)``, and only when ``(c - delay) mod 8 != 7``. It counts arriving bytes
    (``seen``), bytes that differ (``seen_wrong``), differing bits (``seen_bits``) and
    bytes arriving in a cycle where none can (``spurious``). The channel's knobs and
    counters are passed through.
    """

    enable: In(1)
    error_threshold: In(32)
    burst_threshold: In(32)
    burst_length: In(16)
    cut: In(1)
    bytes_in: Out(32)
    bytes_out: Out(32)
    bytes_corrupted: Out(32)
    bits_flipped: Out(32)
    bytes_dropped: Out(32)
    seen: Out(32)
    seen_wrong: Out(32)
    seen_bits: Out(32)
    spurious: Out(32)

    def __init__(self, *, delay: int, seed: int = 1):
        self.delay = delay
        self.seed = seed
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.submodules.channel = channel = ChannelModel(delay=self.delay, seed=self.seed)
        for name in ("error_threshold", "burst_threshold", "burst_length", "cut"):
            m.d.comb += getattr(channel, name).eq(getattr(self, name))
        for name in _COUNTERS:
            m.d.comb += getattr(self, name).eq(getattr(channel, name))

        def pattern(c):
            return c[0:8] ^ c[8:16] ^ c[16:24], c[0:3] != 7

        cycle = Signal(32)
        m.d.sync += cycle.eq(cycle + 1)
        data, slot = pattern(cycle)
        m.d.comb += [channel.tx.payload.eq(data), channel.tx.valid.eq(self.enable & slot)]

        then = Signal(32)
        m.d.comb += then.eq(cycle - self.delay)
        want, want_slot = pattern(then)
        diff = Signal(8)
        m.d.comb += diff.eq(channel.rx.payload ^ want)
        with m.If(channel.rx.valid):
            m.d.sync += [
                self.seen.eq(self.seen + 1),
                self.seen_bits.eq(self.seen_bits + sum(diff[i] for i in range(8))),
            ]
            with m.If(diff != 0):
                m.d.sync += self.seen_wrong.eq(self.seen_wrong + 1)
            with m.If(~want_slot):
                m.d.sync += self.spurious.eq(self.spurious + 1)
        return m


# --- cocotb tests -------------------------------------------------------------------------

_PERIOD_NS = 10


def _env_int(name, default):
    return int(os.environ.get(name, default))


async def _start(dut):
    Clock(dut.clk, _PERIOD_NS, unit="ns").start()
    dut.rst.value = 1
    for name in ("enable", "error_threshold", "burst_threshold", "burst_length", "cut"):
        getattr(dut, name).value = 0
    await ClockCycles(dut.clk, 3)
    dut.rst.value = 0
    await ClockCycles(dut.clk, 1)


async def _run_cycles(dut, cycles):
    """Let the design run ``cycles`` cycles without waking Python on every edge."""
    await Timer(cycles * _PERIOD_NS, unit="ns")
    await RisingEdge(dut.clk)


async def _drain(dut):
    """Stop the source and wait until every byte in flight has left the wire."""
    dut.enable.value = 0
    await ClockCycles(dut.clk, _env_int("TB_CHANNEL_DELAY", 1) + 4)


def _counters(dut):
    names = _COUNTERS + ("seen", "seen_wrong", "seen_bits", "spurious")
    counters = {name: int(getattr(dut, name).value) for name in names}
    dut._log.info("counters: %s", counters)
    return counters


def _check_delivery(c):
    """Without a cut, every byte arrives exactly once and the checker agrees with the channel."""
    assert c["bytes_in"] > 0
    assert c["bytes_out"] == c["seen"] == c["bytes_in"], "every byte must arrive exactly once"
    assert c["bytes_dropped"] == 0 and c["spurious"] == 0
    assert c["seen_wrong"] == c["bytes_corrupted"], "channel and checker disagree on bytes"
    assert c["seen_bits"] == c["bits_flipped"], "channel and checker disagree on bits"


def _within(log, what, measured, expected, tolerance):
    log.info("%s: measured %d, expected %.1f +- %.1f", what, measured, expected, tolerance)
    assert abs(measured - expected) <= tolerance, \
        f"{what}: {measured} is not within {tolerance:.1f} of {expected:.1f}"


@cocotb.test()
async def single_bit_errors(dut):
    """A high bit error rate: counters match the checker, the rate matches the knob."""
    await _start(dut)
    threshold = ber_to_threshold(1e-2)
    p = threshold_to_byte_error_probability(threshold)
    dut.error_threshold.value = threshold
    dut.enable.value = 1
    await _run_cycles(dut, _env_int("TB_CHANNEL_CYCLES", 1_000_000))
    await _drain(dut)
    c = _counters(dut)
    _check_delivery(c)
    assert c["bits_flipped"] == c["bytes_corrupted"], "an error event flips exactly one bit"
    n = c["bytes_in"]
    _within(dut._log, "corrupted bytes", c["bytes_corrupted"], n * p,
            5 * math.sqrt(n * p * (1 - p)))


@cocotb.test()
async def bursts(dut):
    """Bursts only: the corrupted fraction matches a renewal-process estimate."""
    await _start(dut)
    length, q_threshold = 16, round(1e-2 * 2**32)
    q = threshold_to_byte_error_probability(q_threshold)
    dut.burst_threshold.value = q_threshold
    dut.burst_length.value = length
    dut.enable.value = 1
    await _run_cycles(dut, _env_int("TB_CHANNEL_CYCLES", 1_000_000))
    await _drain(dut)
    c = _counters(dut)
    _check_delivery(c)
    # Bursts of `length` bytes separated by geometric gaps (mean (1 - q) / q bytes): the
    # number of bursts in n bytes is about normal, mean n / mu, variance n * var_gap / mu**3.
    # One more burst of slack for the one cut short when the source stopped.
    n = c["bytes_in"]
    mu = length + (1 - q) / q
    var_gap = (1 - q) / q**2
    _within(dut._log, "corrupted bytes", c["bytes_corrupted"], length * n / mu,
            length * (5 * math.sqrt(n * var_gap / mu**3) + 1))
    # Burst patterns are nonzero bytes, about uniform: 1024 / 255 = 4.02 bits on average.
    bits_per_byte = c["bits_flipped"] / c["bytes_corrupted"]
    assert 3.8 < bits_per_byte < 4.2, f"{bits_per_byte:.3f} bits flipped per corrupted byte"


@cocotb.test()
async def cut(dut):
    """A cut drops every byte that reaches the end of the wire, and counts it."""
    await _start(dut)
    dut.enable.value = 1
    await ClockCycles(dut.clk, 1000)
    dut.cut.value = 1
    await ClockCycles(dut.clk, 1)
    seen_at_cut = int(dut.seen.value)
    await ClockCycles(dut.clk, 5000)
    await ReadOnly()
    assert int(dut.seen.value) == seen_at_cut, "bytes arrived through a cut"
    await RisingEdge(dut.clk)
    dut.cut.value = 0
    await ClockCycles(dut.clk, 1000)
    await _drain(dut)
    c = _counters(dut)
    assert c["bytes_dropped"] >= 5000 * 7 // 8
    assert c["bytes_in"] == c["bytes_out"] + c["bytes_dropped"]
    assert c["seen"] == c["bytes_out"] and c["seen_wrong"] == 0 and c["spurious"] == 0
