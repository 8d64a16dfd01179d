"""Two boards in simulation: NIC cores behind serial PHYs, wired pin to pin through noisy lines.

Unit tests of the line-noise model (Amaranth simulator) first, then one 2-node cluster
built as two iCEBreakers are wired (``phy_divisor=5``: 48 MHz, 9.6 Mbit/s) and served by
the simulation server; the host driver talks to each node over its UART bridge. The first
build of the design takes a minute or two (cached by content afterwards).
"""
from __future__ import annotations

import random
import time

import pytest
from amaranth import Module
from amaranth.sim import Simulator

from epochlink.hdl.channel import ber_to_threshold
from epochlink.hdl.epoch_format import Role
from epochlink.hdl.frame import LinkState
from epochlink.hdl.line_noise import LineNoise, ber_to_line_threshold, line_threshold_to_ber
from epochlink.hdl.serdes import SerialPHY
from epochlink.host.node import Node
from epochlink.sim.server import SimServer

DIVISOR = 5                 # the iCEBreaker: 48 MHz / 9.6 Mbit/s
BER = 1e-3                  # per bit time on the wire: a 26-byte DATA frame is hit ~23 % of the time
TIMEOUT = 3.0               # driver timeout per request, s (wall clock)


# -- the line-noise model ------------------------------------------------------------------

def test_line_threshold_mapping():
    assert ber_to_line_threshold(0) == 0
    assert ber_to_line_threshold(1e-4) == round(1e-4 * 2**32)
    assert ber_to_line_threshold(1.0) == 2**32 - 1 == ber_to_line_threshold(3.0)
    # The byte-level channel's threshold is per byte (one flipped bit of eight): 8x larger.
    assert ber_to_threshold(1e-4) == pytest.approx(8 * ber_to_line_threshold(1e-4), abs=8)
    assert line_threshold_to_ber(ber_to_line_threshold(1e-3)) == pytest.approx(1e-3)
    with pytest.raises(ValueError):
        ber_to_line_threshold(-1)
    with pytest.raises(ValueError):
        LineNoise(2)
    with pytest.raises(ValueError):
        LineNoise(5, cut_level=2)


def _run(dut, testbench):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()


@pytest.mark.parametrize("divisor", [5, 13])
def test_line_noise_flips_whole_bit_times(divisor):
    """Every flip inverts the line for a multiple of the bit time, the number of events per
    bit time is threshold / 2**32, and the output is the input one cycle later."""
    dut = LineNoise(divisor, seed=3)
    p = 0.02                                   # events per bit time
    bit_times = 6000
    rng = random.Random(1)

    async def testbench(ctx):
        ctx.set(dut.error_threshold, ber_to_line_threshold(p))
        runs, run = [], 0
        for _ in range(bit_times * divisor):
            line_in = rng.getrandbits(1)
            ctx.set(dut.line_in, line_in)
            await ctx.tick()
            if ctx.get(dut.line_out) != line_in:      # registered: this cycle's input
                run += 1
            elif run:
                runs.append(run)
                run = 0
        assert all(r % divisor == 0 for r in runs), sorted(set(runs))
        events = sum(r // divisor for r in runs)
        # Events during a flip in progress are dropped (a fraction ~p of them).
        expected = bit_times * p * (1 - p)
        assert abs(events - expected) < 5 * expected ** 0.5, (events, expected)
        assert abs(ctx.get(dut.flips) - events) <= 1

    _run(dut, testbench)


def test_line_noise_cut_holds_idle_and_zero_is_transparent():
    dut = LineNoise(DIVISOR, seed=1)

    async def testbench(ctx):
        ctx.set(dut.error_threshold, 0)
        for bit in [0, 1, 1, 0, 0, 1, 0] * 10:
            ctx.set(dut.line_in, bit)
            await ctx.tick()
            assert ctx.get(dut.line_out) == bit
        ctx.set(dut.error_threshold, 2**32 - 1)      # flipping all the time
        ctx.set(dut.cut, 1)
        for bit in [0, 1] * 50:
            ctx.set(dut.line_in, bit)
            await ctx.tick()
            assert ctx.get(dut.line_out) == 1        # a cut line reads idle (pull-up)
        assert ctx.get(dut.flips) > 0

    _run(dut, testbench)


def test_one_flip_one_bit_through_the_phy():
    """Through a real PHY pair at divisor 5: a flip (one bit time, at an arbitrary phase)
    that lies inside a frame's data bits changes exactly one bit of the received byte,
    whatever its phase against the transmitter's bit cells."""
    m = Module()
    m.submodules.tx = tx = SerialPHY(DIVISOR)
    m.submodules.rx = rx = SerialPHY(DIVISOR)
    m.submodules.wire = wire = LineNoise(DIVISOR, seed=7)
    m.d.comb += [wire.line_in.eq(tx.tx_line), rx.rx_line.eq(wire.line_out)]
    rng = random.Random(2)
    n = DIVISOR
    period = 14 * n                      # a frame and 4 idle bit times

    async def testbench(ctx):
        ctx.set(wire.error_threshold, ber_to_line_threshold(0.006))
        cycle, sent, starts, events, got = 0, [], [], [], {}
        flips = 0
        for _ in range(700):
            byte = rng.randrange(256)
            ctx.set(tx.tx.valid, 1)
            ctx.set(tx.tx.payload, byte)
            while not ctx.get(tx.tx.ready):
                await ctx.tick()
                cycle += 1
            starts.append(cycle)         # accepted in this cycle: start bit from cycle + 1
            sent.append(byte)
            for k in range(period):
                if k == 1:
                    ctx.set(tx.tx.valid, 0)
                await ctx.tick()
                if ctx.get(wire.flips) != flips:
                    flips = ctx.get(wire.flips)
                    events.append(cycle)         # the line is inverted from this cycle on
                cycle += 1
                if ctx.get(rx.rx.valid):
                    got.setdefault(len(sent) - 1, []).append(ctx.get(rx.rx.payload))
        checked, checked_at = 0, []
        for i, start in enumerate(starts):
            near = [t - (start + 1) for t in events if start - 3 * period < t < start + period]
            # One flip inside d0..d7, none before it that could have misframed the receiver
            # (a false start in an idle gap can misframe the next frames too).
            if len(near) == 1 and n <= near[0] <= 8 * n:
                checked += 1
                checked_at.append(near[0])
                assert [bin(b ^ sent[i]).count("1") for b in got.get(i, [])] == [1], \
                    (i, near, got.get(i))
        phases = {(t % n) for t in checked_at}
        print(f"{len(events)} flips, {checked} inside data bits: one wrong bit each "
              f"(phases against the bit cells: {sorted(phases)})")
        assert checked >= 10 and len(phases) >= 3

    _run(m, testbench)


# -- two boards: NIC cores + serial PHYs + wires, through the simulation server -------------

@pytest.fixture(scope="module")
def pair():
    t0 = time.monotonic()
    sim = SimServer(nodes=2, topology="line", phy_divisor=DIVISOR)
    sim.build_design()
    built = time.monotonic() - t0
    sim.start()
    print(f"\nbuild (or cache hit) {built:.1f} s, start {time.monotonic() - t0 - built:.1f} s")
    nodes = [Node(url, timeout=TIMEOUT) for url in sim.urls]
    yield sim, nodes
    for node in nodes:
        node.close()
    sim.stop()


def link_states(nodes):
    return [LinkState(n.read("PORT0.LINK_STATE") & 0x3) for n in nodes]


def wait_for(predicate, what, limit_s=30.0):
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_identify_and_links_up(pair):
    sim, nodes = pair
    assert sim.info["phy_divisor"] == DIVISOR
    for i, node in enumerate(nodes):
        info = node.identify()
        assert info.node_id == i + 1 and info.ports == 1
    wait_for(lambda: link_states(nodes) == [LinkState.UP] * 2, "both links UP")
    print(f"links UP by cycle {sim.cycle()}")
    assert [n.read("PORT0.PEER_ID") for n in nodes] == [2, 1]
    status = sim.status()
    assert all(p["link_up"] for n in status["nodes"] for p in n["ports"])
    assert status["edges"][0]["flips"] == 0         # no noise yet


def test_commit_under_bit_errors(pair):
    sim, (root, leaf) = pair
    root.bring_up({0: 0}, [Role.CHILD])             # node 0: the root, node 1 its child
    leaf.bring_up({0: 0}, [Role.PARENT])
    # The root is online (and sends COMMIT) before the leaf has set its port's role: the
    # leaf may count that one message as misrouted. Nothing else may be.
    misrouted0 = [n.epoch_status().misrouted for n in (root, leaf)]
    assert sum(misrouted0) <= 1

    reply = sim.set_ber(BER)
    assert reply["threshold"] == ber_to_line_threshold(BER)
    before = sim.status()
    crc0 = [n.read("PORT0.CRC_ERRORS") for n in (root, leaf)]
    downs0 = [n.read("PORT0.LINK_DOWNS") for n in (root, leaf)]
    start = sim.cycle()
    for node in (root, leaf):
        node.persisted(0, 3)
    for node in (root, leaf):
        assert node.wait_committed(3, timeout=60.0) == 3    # never beyond what was persisted
    print(f"epoch 3 committed on both after {sim.cycle() - start} cycles at BER {BER:g}")

    # More epochs and more time on the noisy wire, to see the errors caught.
    for epoch in (4, 5, 6):
        start = sim.cycle()
        for node in (root, leaf):
            node.persisted(0, epoch)
        for node in (root, leaf):
            assert node.wait_committed(epoch, timeout=60.0) == epoch
        print(f"epoch {epoch} committed on both after {sim.cycle() - start} cycles")
    sim.run_cycles(1_000_000)
    after = sim.status()

    flips = after["edges"][0]["flips"] - before["edges"][0]["flips"]
    crc = [n.read("PORT0.CRC_ERRORS") - c for n, c in zip((root, leaf), crc0)]
    phy = [a["phy_errors"] - b["phy_errors"] for a, b in zip(after["nodes"], before["nodes"])]
    print(f"{flips} bit-time flips injected in {after['cycle'] - before['cycle']} cycles; "
          f"caught: CRC errors {crc}, PHY errors {phy}")
    assert flips > 0 and sum(crc) > 0 and sum(phy) > 0
    # The link stayed up, and nothing wrong was committed or delivered.
    counters = {name: [n.read(f"PORT0.{name}") for n in (root, leaf)]
                for name in ("LINK_DOWNS", "REFLECT_MISMATCHES", "RETRANSMITS", "ABORTS", "FRAMING_ERRORS")}
    print("link counters (root, leaf):", counters)
    assert link_states((root, leaf)) == [LinkState.UP] * 2
    assert counters["LINK_DOWNS"] == downs0, counters
    for node, misrouted in zip((root, leaf), misrouted0):
        assert node.committed() == 6
        status = node.epoch_status()
        assert (status.malformed, status.refused, status.misrouted) == (0, 0, misrouted)
        assert node.read("PORT0.REFLECT_MISMATCHES") == 0


def test_cut_and_restore(pair):
    sim, nodes = pair
    sim.set_ber(0)
    wait_for(lambda: link_states(nodes) == [LinkState.UP] * 2, "both links UP")
    downs0 = [n.read("PORT0.LINK_DOWNS") for n in nodes]
    sim.cut(0)
    start = sim.cycle()
    wait_for(lambda: all(s != LinkState.UP for s in link_states(nodes)), "both links DOWN")
    print(f"cut: links DOWN after {sim.cycle() - start} cycles")
    assert [n.read("PORT0.LINK_DOWNS") for n in nodes] == [d + 1 for d in downs0]
    sim.cut(0, False)
    start = sim.cycle()
    wait_for(lambda: link_states(nodes) == [LinkState.UP] * 2, "both links UP again")
    print(f"restored: links UP after {sim.cycle() - start} cycles")
    for node in nodes:
        assert node.committed() >= 3            # COMMITTED survives a link going down


@pytest.mark.parametrize("value", ["2", "x", "-5"])
def test_sim_main_rejects_bad_phy_divisor(value, capsys):
    from epochlink.sim.server import sim_main
    with pytest.raises(SystemExit) as exc:
        sim_main(["--phy-divisor", value])
    assert exc.value.code == 2 and "--phy-divisor" in capsys.readouterr().err


def test_phy_divisor_is_checked():
    with pytest.raises(ValueError, match="phy_divisor"):
        SimServer(nodes=2, phy_divisor=2)
