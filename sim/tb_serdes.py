"""cocotb testbench: two serial PHYs on unrelated clocks, wired line to line, with bit errors.

The design (:class:`SerdesPair`) holds PHY ``a`` in clock domain ``a`` and PHY ``b`` in clock
domain ``b``; ``a.tx_line`` drives ``b.rx_line`` through an XOR with the ``flip_ab`` input and
``b.tx_line`` drives ``a.rx_line`` through ``flip_ba``. The testbench clocks the two domains at
frequencies 1400 ppm apart, sends random bytes with random gaps in both directions at once and
flips the wires at random, unaligned times (glitches shorter than a clock cycle up to several
bit-times), in three phases:

1. clean: every byte arrives, in order, and no receiver error is flagged;
2. noisy: bytes may be lost or corrupted, receivers flag errors, nothing wedges;
3. clean again: after at most ``resync_interval + 2`` frames every byte arrives in order.

Build and run (the pytest in ``tests/test_serdes.py`` does this)::

    from epochlink.sim import tb_serdes, verilator
    design = verilator.build("serdes_pair", tb_serdes.SerdesPair(divisor=5), toplevel="serdes_pair")
    verilator.run(design, "epochlink.sim.tb_serdes")

Parameters come from the environment: ``SERDES_DIVISOR`` (must match the design, default 5),
``SERDES_RESYNC`` (default 16), ``SERDES_BYTES`` (bytes per direction and phase, default 300).
"""
import difflib
import os
import random

from amaranth import ClockDomain, ClockSignal, DomainRenamer, Module, ResetSignal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..hdl.common import phy_tx_signature
from ..hdl.serdes import FRAME_BITS, SerialPHY

__all__ = ["SerdesPair"]


class SerdesPair(wiring.Component):
    """Two :class:`~epochlink.hdl.serdes.SerialPHY` in clock domains ``a`` and ``b``, lines
    cross-connected through error injectors.

    Attributes
    ----------
    a_clk, a_rst, b_clk, b_rst : In(1)
        Clock and synchronous reset of domains ``a`` and ``b``.
    a_tx, b_tx : In(phy_tx_signature())
        Bytes to send from PHY a (to b) and from PHY b (to a).
    a_rx_valid, a_rx_payload, b_rx_valid, b_rx_payload : Out(1), Out(8)
        Bytes received by PHY a (from b) and by PHY b (from a). (Plain signals: an always-ready
        stream's constant ``ready`` cannot be a port of a top-level design.)
    flip_ab, flip_ba : In(1)
        While high, the a->b (b->a) wire is inverted.
    a_error, b_error : Out(1)
        Receiver error pulses of PHY a and PHY b.
    """

    def __init__(self, divisor=5, resync_interval=16):
        self.divisor = divisor
        self.resync_interval = resync_interval
        self.phy_a = SerialPHY(divisor, resync_interval=resync_interval)
        self.phy_b = SerialPHY(divisor, resync_interval=resync_interval)
        super().__init__({
            "a_clk": In(1),
            "a_rst": In(1),
            "b_clk": In(1),
            "b_rst": In(1),
            "a_tx": In(phy_tx_signature()),
            "a_rx_valid": Out(1),
            "a_rx_payload": Out(8),
            "b_tx": In(phy_tx_signature()),
            "b_rx_valid": Out(1),
            "b_rx_payload": Out(8),
            "flip_ab": In(1),
            "flip_ba": In(1),
            "a_error": Out(1),
            "b_error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.domains.a = ClockDomain("a")
        m.domains.b = ClockDomain("b")
        m.d.comb += [
            ClockSignal("a").eq(self.a_clk), ResetSignal("a").eq(self.a_rst),
            ClockSignal("b").eq(self.b_clk), ResetSignal("b").eq(self.b_rst),
        ]
        m.submodules.phy_a = phy_a = DomainRenamer("a")(self.phy_a)
        m.submodules.phy_b = phy_b = DomainRenamer("b")(self.phy_b)
        wiring.connect(m, wiring.flipped(self.a_tx), phy_a.tx)
        wiring.connect(m, wiring.flipped(self.b_tx), phy_b.tx)
        m.d.comb += [
            self.a_rx_valid.eq(phy_a.rx.valid),
            self.a_rx_payload.eq(phy_a.rx.payload),
            self.b_rx_valid.eq(phy_b.rx.valid),
            self.b_rx_payload.eq(phy_b.rx.payload),
            phy_b.rx_line.eq(phy_a.tx_line ^ self.flip_ab),
            phy_a.rx_line.eq(phy_b.tx_line ^ self.flip_ba),
            self.a_error.eq(phy_a.rx_error),
            self.b_error.eq(phy_b.rx_error),
        ]
        return m


# --- cocotb side (only imported by the simulator, but importable anywhere) -----------------

import cocotb                                              # noqa: E402
from cocotb.clock import Clock                             # noqa: E402
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge, Timer  # noqa: E402

CLK_A_PS = 10_000        # 100 MHz
CLK_B_PS = 10_014        # 1400 ppm slower (even: the clock needs half periods)


def _params():
    return (int(os.environ.get("SERDES_DIVISOR", "5")),
            int(os.environ.get("SERDES_RESYNC", "16")),
            int(os.environ.get("SERDES_BYTES", "300")))


class Direction:
    """One direction of the link: driver on the sending PHY, monitor on the receiving PHY,
    and the scoreboard that compares them."""

    def __init__(self, dut, name, src, dst, rng):
        self.name = name
        self.clk = getattr(dut, f"{src}_clk")
        self.valid = getattr(dut, f"{src}_tx__valid")
        self.payload = getattr(dut, f"{src}_tx__payload")
        self.ready = getattr(dut, f"{src}_tx__ready")
        self.rx_valid = getattr(dut, f"{dst}_rx_valid")
        self.rx_payload = getattr(dut, f"{dst}_rx_payload")
        self.rx_error = getattr(dut, f"{dst}_error")
        self.rng = rng
        self.sent = []
        self.received = []
        self.errors = 0
        self.valid.value = 0
        self.payload.value = 0

    async def send(self, count, max_gap):
        for _ in range(count):
            if self.rng.random() < 0.4:
                await ClockCycles(self.clk, self.rng.randrange(1, max_gap))
            byte = self.rng.randrange(256)
            # Offer the byte mid-cycle, so the next rising edge is the first that can take it;
            # `ready` (settled mid-cycle) does not depend on `valid`.
            await FallingEdge(self.clk)
            self.valid.value = 1
            self.payload.value = byte
            while not self.ready.value:
                await RisingEdge(self.ready)
                await FallingEdge(self.clk)
            await RisingEdge(self.clk)               # the transfer
            self.valid.value = 0
            self.sent.append(byte)

    async def monitor(self):
        while True:
            await RisingEdge(self.rx_valid)          # valid is a one-cycle pulse
            self.received.append(int(self.rx_payload.value))

    async def count_errors(self):
        while True:
            await RisingEdge(self.rx_error)
            self.errors += 1


async def _inject(dut, rng, bit_ps, active):
    """Flip either wire at random times for random durations while ``active[0]``."""
    wires = [dut.flip_ab, dut.flip_ba]
    while True:
        await Timer(rng.randrange(5 * bit_ps, 60 * bit_ps), unit="ps")
        if not active[0]:
            continue
        wire = rng.choice(wires)
        duration = rng.choice([bit_ps // 20, bit_ps // 3, bit_ps, 2 * bit_ps, 5 * bit_ps])
        wire.value = 1
        await Timer(max(1, duration + rng.randrange(-duration // 4, duration // 4 + 1)), unit="ps")
        wire.value = 0


@cocotb.test()
async def link_with_bit_errors(dut):
    """Full-duplex random traffic across 1400 ppm, with a noisy phase between clean ones."""
    divisor, resync, count = _params()
    rng = random.Random(cocotb.RANDOM_SEED)
    bit_ps = divisor * CLK_B_PS
    cocotb.start_soon(Clock(dut.a_clk, CLK_A_PS, unit="ps").start())
    cocotb.start_soon(Clock(dut.b_clk, CLK_B_PS, unit="ps").start())
    dut.flip_ab.value = 0
    dut.flip_ba.value = 0
    ab = Direction(dut, "a->b", "a", "b", random.Random(rng.random()))
    ba = Direction(dut, "b->a", "b", "a", random.Random(rng.random()))
    dut.a_rst.value = 1
    dut.b_rst.value = 1
    await ClockCycles(dut.a_clk, 4)
    dut.a_rst.value = 0
    dut.b_rst.value = 0
    for d in (ab, ba):
        cocotb.start_soon(d.monitor())
        cocotb.start_soon(d.count_errors())
    active = [False]
    cocotb.start_soon(_inject(dut, random.Random(rng.random()), bit_ps, active))
    max_gap = 3 * FRAME_BITS * divisor

    async def phase(noisy):
        active[0] = noisy
        marks = [(len(d.sent), len(d.received), d.errors) for d in (ab, ba)]
        senders = [cocotb.start_soon(d.send(count, max_gap)) for d in (ab, ba)]
        for task in senders:
            await task
        active[0] = False
        await ClockCycles(dut.b_clk, 3 * FRAME_BITS * divisor)
        return marks

    # Phase 1: clean.
    await phase(noisy=False)
    for d in (ab, ba):
        assert d.received == d.sent, f"{d.name}: clean phase lost or corrupted bytes"
        assert d.errors == 0, f"{d.name}: {d.errors} receiver errors on a clean line"

    # Phase 2: noisy.
    marks = await phase(noisy=True)
    total_errors = 0
    for d, (sent0, received0, errors0) in zip((ab, ba), marks):
        sent, got = d.sent[sent0:], d.received[received0:]
        matcher = difflib.SequenceMatcher(None, sent, got, autojunk=False)
        intact = sum(block.size for block in matcher.get_matching_blocks())
        total_errors += d.errors - errors0
        dut._log.info(f"{d.name} noisy phase: sent {len(sent)}, received {len(got)}, "
                      f"{intact} delivered intact, {d.errors - errors0} receiver errors")
        # Every frame produces at most one byte; spurious frames only come from flips.
        assert len(got) <= len(sent) + 200, f"{d.name}: receiver produced garbage"
    assert total_errors > 0, "injected errors were never flagged"

    # Phase 3: clean again; the receiver must be back in frame within resync + 2 frames.
    marks = await phase(noisy=False)
    for d, (sent0, received0, _) in zip((ab, ba), marks):
        sent = d.sent[sent0:]
        good = sent[resync + 2:]
        assert d.received[-len(good):] == good, f"{d.name}: did not recover after errors"
        dut._log.info(f"{d.name} recovery phase: last {len(good)} of {len(sent)} bytes exact")
