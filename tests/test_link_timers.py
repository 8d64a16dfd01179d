"""The NIC's link timers against what a bit error does to an idle link (Amaranth simulator).

A bit error in the LEN byte of a heartbeat turns it, for the receiver, into the start of a
long frame that swallows the next heartbeats before its FCS fails. The dead-link timer must
outlast that silence and a few lost heartbeats more, or one flipped bit takes an idle link
down. The scripted peer paces its bytes as a PHY of ``PHY_CYCLES`` cycles a byte would.
"""
import pytest

from epochlink.hdl.frame import OVERHEAD_BYTES, Frame, FrameType, LinkState, encode
from epochlink.hdl.link import LinkEngine
from epochlink.hdl.nic import link_timers
from amaranth.sim import Simulator

from .test_link_unit import Peer

MAX_PAYLOAD = 64
PHY_CYCLES = 2
HEARTBEATS = 24


def idle_link_with_a_flipped_len(timers: dict, lost_after: int) -> tuple[LinkState, int]:
    """Bring a link up, then feed it paced heartbeats; the third has LEN flipped to the
    maximum and the ``lost_after`` heartbeats after those it swallows are lost too.
    Returns the link state and LINK_DOWNS at the end."""
    dut = LinkEngine(window=4, max_payload=MAX_PAYLOAD, **timers)
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    result = {}
    heartbeat = encode(Frame(FrameType.SIGNAL))
    assert len(heartbeat) == OVERHEAD_BYTES
    corrupted = bytearray(heartbeat)
    corrupted[4] = MAX_PAYLOAD                  # LEN: 0 -> 64, one flipped bit
    swallowed = -(-(MAX_PAYLOAD + OVERHEAD_BYTES) // OVERHEAD_BYTES)
    period = timers["idle_cycles"]

    async def bench(ctx):
        ctx.set(dut.node_id, 0x1234)
        ctx.set(dut.phy_tx.ready, 1)
        peer = Peer(dut, ctx)
        await peer.bring_up()
        for i in range(HEARTBEATS):
            if i == 2:
                wire = bytes(corrupted)
            elif 2 + swallowed <= i < 2 + swallowed + lost_after:
                wire = b""                      # lost on the wire
            else:
                wire = heartbeat
            await peer.send(wire, gap=PHY_CYCLES - 1)
            await peer.tick(period - len(wire) * PHY_CYCLES)
        result["state"], result["downs"] = peer.state(), peer.counter("link_downs")
        result["crc_errors"] = peer.counter("crc_errors")

    sim.add_testbench(bench)
    sim.run()
    assert result["crc_errors"] >= 1            # the corrupted frame was caught by its FCS
    return result["state"], result["downs"]


@pytest.mark.parametrize("lost_after", [0, 4])
def test_nic_timers_ride_out_a_flipped_len(lost_after):
    state, downs = idle_link_with_a_flipped_len(link_timers(MAX_PAYLOAD, PHY_CYCLES), lost_after)
    assert (state, downs) == (LinkState.UP, 0)


def test_a_short_dead_timer_drops_the_idle_link():
    """The control: with the dead timer at 16 frame times + 256 cycles (the sizing before
    the timers accounted for a swallowing frame), the same bit error and two lost
    heartbeats take the link down."""
    timers = link_timers(MAX_PAYLOAD, PHY_CYCLES)
    timers["dead_cycles"] = 16 * (MAX_PAYLOAD + 16) * PHY_CYCLES + 256
    state, downs = idle_link_with_a_flipped_len(timers, lost_after=2)
    assert downs == 1
