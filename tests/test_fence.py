"""Epoch-tagged datapath: EpochTagger -> EpochFence in Amaranth's simulator."""
import random

import pytest
from amaranth import Elaboratable, Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from epochlink.hdl.fence import (EpochFence, EpochTagger, FenceMode, MARK_BIT, TAG_BYTES,
                                 decode_tag, encode_tag)


class Pair(Elaboratable):
    """A tagger feeding a fence; with ``raw`` the fence alone, fed by the test."""
    def __init__(self, raw=False):
        self.raw = raw
        self.tagger, self.fence = None if raw else EpochTagger(), EpochFence()

    def elaborate(self, platform):
        m = Module()
        m.submodules.fence = self.fence
        if not self.raw:
            m.submodules.tagger = self.tagger
            wiring.connect(m, self.tagger.o, self.fence.i)
        return m


def run(messages, mode, receiver_epoch, raw=False):
    """messages: (sender_epoch, body) pairs; returns (delivered messages, counters)."""
    dut = Pair(raw)
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    out, counters = [], {}

    async def source(ctx):
        if not raw:
            ctx.set(dut.tagger.version, 3)
        ctx.set(dut.fence.epoch, receiver_epoch)
        ctx.set(dut.fence.mode, mode)
        port = dut.fence.i if raw else dut.tagger.i
        for epoch, body in messages:
            if not raw:
                ctx.set(dut.tagger.epoch, epoch)
            for k, byte in enumerate(body):
                ctx.set(port.valid, 1)
                ctx.set(port.payload, {"data": byte, "last": k == len(body) - 1})
                await ctx.tick().until(port.ready)
            ctx.set(port.valid, 0)
        await ctx.tick().repeat(50)
        for name in ("older", "same", "newer", "dropped", "malformed"):
            counters[name] = ctx.get(getattr(dut.fence, name))

    async def sink(ctx):
        rng = random.Random(1)
        current = bytearray()
        while True:
            ready = rng.random() < 0.7
            ctx.set(dut.fence.o.ready, ready)
            valid, p = ctx.get(dut.fence.o.valid), ctx.get(dut.fence.o.payload)
            await ctx.tick()
            if valid and ready:
                current.append(p.data)
                if p.last:
                    out.append(bytes(current))
                    current = bytearray()

    sim.add_testbench(source)
    sim.add_testbench(sink, background=True)
    sim.run()
    return out, counters


MESSAGES = [(5, b"same epoch"), (4, b"older"), (6, b"newer"), (5, b"x")]


def test_pass_mode_delivers_everything_tagged_and_counts():
    out, c = run(MESSAGES, FenceMode.PASS, receiver_epoch=5)
    assert [m[TAG_BYTES:] for m in out] == [b for _, b in MESSAGES]
    assert [decode_tag(m) for m in out] == [(5, 3, False), (4, 3, False), (6, 3, False), (5, 3, False)]
    assert c == {"older": 1, "same": 2, "newer": 1, "dropped": 0, "malformed": 0}


def test_mark_mode_marks_cross_epoch_messages():
    out, c = run(MESSAGES, FenceMode.MARK, receiver_epoch=5)
    assert [decode_tag(m)[2] for m in out] == [False, True, True, False]
    assert out[1][4] == 3 | MARK_BIT


def test_drop_mode_fences_cross_epoch_messages():
    out, c = run(MESSAGES, FenceMode.DROP, receiver_epoch=5)
    assert [m[TAG_BYTES:] for m in out] == [b"same epoch", b"x"]
    assert c["dropped"] == 2 and c["older"] == 1 and c["newer"] == 1


def test_untagged_short_message_is_malformed_and_stream_recovers():
    raw = [(0, b"\x01\x02"), (0, encode_tag(7, 1) + b"ok")]
    out, c = run(raw, FenceMode.PASS, receiver_epoch=7, raw=True)
    assert out == [encode_tag(7, 1) + b"ok"]
    assert c["malformed"] == 1 and c["same"] == 1


@pytest.mark.parametrize("seed", [1, 2])
def test_random_against_reference(seed):
    rng = random.Random(seed)
    msgs = [(rng.randint(0, 3), bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))) for _ in range(30)]
    mode = rng.choice(list(FenceMode))
    out, c = run(msgs, mode, receiver_epoch=2)
    expected = [encode_tag(e, 3 | (MARK_BIT if mode == FenceMode.MARK and e != 2 else 0)) + b
                for e, b in msgs if not (mode == FenceMode.DROP and e != 2)]
    assert out == expected
    assert c["older"] == sum(e < 2 for e, _ in msgs) and c["newer"] == sum(e > 2 for e, _ in msgs)
