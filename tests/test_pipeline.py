"""PipelineRegister: a stream register stage, registered in both directions (Amaranth sim)."""
import random

import pytest
from amaranth.sim import Simulator

from epochlink.hdl.common import MessageByte
from epochlink.hdl.pipeline import PipelineRegister


def simulate(stage, *benches):
    sim = Simulator(stage)
    sim.add_clock(1e-6)
    for bench in benches:
        sim.add_testbench(bench)
    sim.run()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_passes_every_transfer_in_order_under_random_stalls(seed):
    rng = random.Random(seed)
    stage = PipelineRegister(MessageByte)
    sent = [(rng.randrange(256), rng.randrange(2)) for _ in range(400)]
    received = []

    async def producer(ctx):
        for data, last in sent:
            ctx.set(stage.i.valid, 1)
            ctx.set(stage.i.payload.data, data)
            ctx.set(stage.i.payload.last, last)
            await ctx.tick().until(stage.i.ready)
            if rng.random() < 0.3:
                ctx.set(stage.i.valid, 0)
                await ctx.tick().repeat(rng.randrange(1, 4))
        ctx.set(stage.i.valid, 0)

    async def consumer(ctx):
        while len(received) < len(sent):
            ready = rng.random() < 0.6
            ctx.set(stage.o.ready, ready)
            _, _, valid, data, last = await ctx.tick().sample(
                stage.o.valid, stage.o.payload.data, stage.o.payload.last)
            if valid and ready:
                received.append((data, last))

    simulate(stage, producer, consumer)
    assert received == sent


def test_full_throughput_and_one_cycle_latency():
    stage = PipelineRegister(8)
    seen = []

    async def bench(ctx):
        ctx.set(stage.o.ready, 1)
        for value in range(1, 11):
            ctx.set(stage.i.valid, 1)
            ctx.set(stage.i.payload, value)
            assert ctx.get(stage.i.ready)
            await ctx.tick()
            seen.append((ctx.get(stage.o.valid), ctx.get(stage.o.payload)))
        ctx.set(stage.i.valid, 0)
        await ctx.tick()
        assert not ctx.get(stage.o.valid)

    simulate(stage, bench)
    assert seen == [(1, v) for v in range(1, 11)]


def test_outputs_and_ready_come_from_flip_flops():
    """A change on ``i.valid``/``i.payload`` or ``o.ready`` shows on the other side only
    after a clock edge."""
    stage = PipelineRegister(8)

    async def bench(ctx):
        ctx.set(stage.o.ready, 0)
        ctx.set(stage.i.valid, 1)
        ctx.set(stage.i.payload, 0x5A)
        assert not ctx.get(stage.o.valid)            # nothing passes combinationally
        await ctx.tick()
        assert ctx.get(stage.o.valid) and ctx.get(stage.o.payload) == 0x5A
        ctx.set(stage.i.payload, 0x3C)               # offered while o stalls: goes to the skid
        assert ctx.get(stage.i.ready)
        await ctx.tick()
        ctx.set(stage.i.valid, 0)
        assert not ctx.get(stage.i.ready)            # full: ready fell after the edge
        ctx.set(stage.o.ready, 1)
        assert not ctx.get(stage.i.ready)            # o.ready does not reach i.ready
        await ctx.tick()
        assert ctx.get(stage.o.payload) == 0x3C and ctx.get(stage.i.ready)
        await ctx.tick()
        assert not ctx.get(stage.o.valid)

    simulate(stage, bench)
