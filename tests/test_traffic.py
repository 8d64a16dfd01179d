"""Tests of the traffic generator, the traffic checker and their Python reference."""
import random
from collections import Counter

import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from epochlink.hdl.traffic import (TrafficChecker, TrafficGenerator, expected_message,
                                   message_length)


def simulate(top, testbench):
    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()


def checker_counters(ctx, chk):
    return {name: ctx.get(getattr(chk, name)) for name in
            ("received", "bytes", "errors_sequence", "errors_content", "last_sequence")}


def reference_check(messages, min_length, max_length):
    """What TrafficChecker must report for ``messages`` (a scoreboard written from the spec)."""
    expected = received = n_bytes = errors_sequence = errors_content = last = 0
    for msg in messages:
        header = bytearray(expected.to_bytes(4, "little"))
        header[:len(msg[:4])] = msg[:4]
        seq = int.from_bytes(header, "little")
        errors_sequence += seq != expected
        errors_content += msg[4:] != expected_message(seq, min_length, max_length)[4:] or \
            len(msg) != message_length(seq, min_length, max_length)
        received += 1
        n_bytes += len(msg)
        last = seq
        expected = (seq + 1) % 2**32
    return {"received": received, "bytes": n_bytes, "errors_sequence": errors_sequence,
            "errors_content": errors_content, "last_sequence": last}


# --- reference --------------------------------------------------------------------------

def test_reference_format():
    msg = expected_message(0x12345678, 10, 10)
    assert len(msg) == 10 and msg[:4] == bytes([0x78, 0x56, 0x34, 0x12])
    assert expected_message(0x12345678, 2, 2) == bytes([0x78, 0x56])
    assert expected_message(7, 0, 0) == bytes([7])  # length 0 means 1
    assert len(expected_message(7, 9, 3)) == 9  # max below min means fixed at min
    # Content depends on the sequence number.
    assert expected_message(1, 40, 40)[4:] != expected_message(2, 40, 40)[4:]


@pytest.mark.parametrize("lo, hi", [(1, 1), (1, 16), (4, 200), (255, 255), (1, 255)])
def test_reference_lengths_cover_range(lo, hi):
    lengths = Counter(message_length(seq, lo, hi) for seq in range(4096))
    assert set(lengths) == set(range(lo, hi + 1))
    assert max(lengths.values()) <= 2 * min(lengths.values())


# --- generator --------------------------------------------------------------------------

@pytest.mark.parametrize("lo, hi, count", [(1, 1, 40), (1, 12, 40), (3, 5, 30), (0, 0, 10),
                                           (20, 9, 5), (180, 255, 3)])
def test_generator_matches_reference(lo, hi, count):
    """Byte for byte, under random backpressure and enable; stops after `count` messages."""
    gen = TrafficGenerator()
    rng = random.Random(lo * 256 + hi)

    async def testbench(ctx):
        ctx.set(gen.min_length, lo)
        ctx.set(gen.max_length, hi)
        ctx.set(gen.count, count)
        messages, current, idle = [], bytearray(), 0
        while idle < 50:
            ready = rng.random() < 0.7
            ctx.set(gen.out.ready, ready)
            ctx.set(gen.enable, rng.random() < 0.9)
            if ctx.get(gen.out.valid) and ready:
                current.append(ctx.get(gen.out.payload.data))
                if ctx.get(gen.out.payload.last):
                    messages.append(bytes(current))
                    current = bytearray()
                idle = 0
            else:
                idle += 1
            await ctx.tick()
        assert not current
        assert messages == [expected_message(seq, lo, hi) for seq in range(count)]
        assert ctx.get(gen.sent) == count

    simulate(gen, testbench)


def test_generator_saturates_and_holds():
    """One byte per cycle when never stalled; a stalled byte is held until taken."""
    gen = TrafficGenerator()

    async def testbench(ctx):
        ctx.set(gen.min_length, 1)
        ctx.set(gen.max_length, 6)
        ctx.set(gen.enable, 1)
        ctx.set(gen.out.ready, 1)
        await ctx.tick()
        stream = bytearray()
        for _ in range(500):
            assert ctx.get(gen.out.valid), "the generator left a gap"
            stream.append(ctx.get(gen.out.payload.data))
            await ctx.tick()
        reference = b"".join(expected_message(seq, 1, 6) for seq in range(500))
        assert bytes(stream) == reference[:500]

        ctx.set(gen.out.ready, 0)
        held = ctx.get(gen.out.payload.as_value())
        ctx.set(gen.enable, 0)  # disabling must not withdraw an offered byte
        for _ in range(5):
            await ctx.tick()
            assert ctx.get(gen.out.valid) and ctx.get(gen.out.payload.as_value()) == held
        ctx.set(gen.out.ready, 1)
        await ctx.tick()
        assert not ctx.get(gen.out.valid)

    simulate(gen, testbench)


def test_generator_count_lowered_mid_message():
    """A message in progress is always completed; `count` only gates the next one."""
    gen = TrafficGenerator()

    async def testbench(ctx):
        ctx.set(gen.min_length, 10)
        ctx.set(gen.max_length, 10)
        ctx.set(gen.enable, 1)
        ctx.set(gen.out.ready, 1)
        await ctx.tick().repeat(25)  # in the middle of message 2
        ctx.set(gen.count, 1)
        await ctx.tick().repeat(40)
        assert ctx.get(gen.sent) == 3 and not ctx.get(gen.out.valid)

    simulate(gen, testbench)


# --- generator into checker --------------------------------------------------------------

def test_generator_into_checker():
    lo, hi, count = 1, 16, 300
    m = Module()
    m.submodules.gen = gen = TrafficGenerator()
    m.submodules.chk = chk = TrafficChecker()
    wiring.connect(m, gen.out, chk.inp)

    async def testbench(ctx):
        for dut in (gen, chk):
            ctx.set(dut.min_length, lo)
            ctx.set(dut.max_length, hi)
        ctx.set(gen.count, count)
        ctx.set(gen.enable, 1)
        await ctx.tick().until(chk.received == count)
        await ctx.tick().repeat(20)
        expected = reference_check([expected_message(s, lo, hi) for s in range(count)], lo, hi)
        assert expected["errors_sequence"] == expected["errors_content"] == 0
        assert checker_counters(ctx, chk) == expected
        assert ctx.get(gen.sent) == count

    simulate(m, testbench)


# --- checker against damaged streams -----------------------------------------------------

LO, HI = 2, 12  # short messages (< 4 bytes) included on purpose
N = 24


def clean():
    return [expected_message(seq, LO, HI) for seq in range(N)]


def _with(messages, index, replacement):
    return messages[:index] + replacement + messages[index + 1:]


def _long_index(messages, start=5):
    return next(i for i in range(start, N) if len(messages[i]) >= 6)


def _flip(msg, i, mask=0x10):
    return msg[:i] + bytes([msg[i] ^ mask]) + msg[i + 1:]


def drop(ms):
    return _with(ms, 5, [])


def duplicate(ms):
    return _with(ms, 5, [ms[5], ms[5]])


def reorder(ms):
    return ms[:5] + [ms[6], ms[5]] + ms[7:]


def flip_content(ms):
    i = _long_index(ms)
    return _with(ms, i, [_flip(ms[i], 5)])


def flip_sequence(ms):
    i = _long_index(ms)
    return _with(ms, i, [_flip(ms[i], 1)])


def truncate(ms):
    i = _long_index(ms)
    return _with(ms, i, [ms[i][:-1]])


def extend(ms):
    i = _long_index(ms)
    return _with(ms, i, [ms[i] + b"\x00"])


def merge(ms):  # the `last` of one message is lost
    return _with(ms, 5, [ms[5] + ms[6]])[:6] + ms[7:]


# (damage, errors_sequence, errors_content), counted by hand from the checker's rules.
DAMAGE = [
    (lambda ms: ms, 0, 0),
    (drop, 1, 0),
    (duplicate, 1, 0),
    (reorder, 3, 0),          # 6 (expected 5), 5 (expected 7), 7 (expected 6)
    (flip_content, 0, 1),
    (flip_sequence, 2, 1),    # that message and the next; its content is someone else's
    (truncate, 0, 1),
    (extend, 0, 1),
    (merge, 1, 1),            # the merged message is too long; the one after is "lost"
]


async def send_messages(ctx, chk, messages, rng):
    for msg in messages:
        for i, byte in enumerate(msg):
            while rng.random() < 0.3:  # idle cycles inside and between messages
                ctx.set(chk.inp.valid, 0)
                await ctx.tick()
            assert ctx.get(chk.inp.ready) == 1
            ctx.set(chk.inp.valid, 1)
            ctx.set(chk.inp.payload.data, byte)
            ctx.set(chk.inp.payload.last, i == len(msg) - 1)
            await ctx.tick()
    ctx.set(chk.inp.valid, 0)
    await ctx.tick()


@pytest.mark.parametrize("damage, errors_sequence, errors_content", DAMAGE,
                         ids=[d[0].__name__ for d in DAMAGE])
def test_checker_counts_damage(damage, errors_sequence, errors_content):
    chk = TrafficChecker()
    messages = damage(clean())

    async def testbench(ctx):
        ctx.set(chk.min_length, LO)
        ctx.set(chk.max_length, HI)
        await send_messages(ctx, chk, messages, random.Random(1))
        got = checker_counters(ctx, chk)
        assert got["errors_sequence"] == errors_sequence
        assert got["errors_content"] == errors_content
        assert got["received"] == len(messages)
        assert got["bytes"] == sum(map(len, messages))
        assert got == reference_check(messages, LO, HI)

    simulate(chk, testbench)


def test_checker_random_damage():
    """Many random losses, duplicates, swaps and bit flips against the Python scoreboard."""
    rng = random.Random(2024)
    lo, hi = 1, 9
    messages = []
    for seq in range(150):
        msg = expected_message(seq, lo, hi)
        roll = rng.random()
        if roll < 0.05:
            continue
        if roll < 0.10:
            messages.append(msg)
        elif roll < 0.15 and messages:
            messages[-1], msg = msg, messages[-1]
        elif roll < 0.25:
            msg = _flip(msg, rng.randrange(len(msg)), 1 << rng.randrange(8))
        messages.append(msg)
    expected = reference_check(messages, lo, hi)
    assert expected["errors_sequence"] > 10 and expected["errors_content"] > 5
    chk = TrafficChecker()

    async def testbench(ctx):
        ctx.set(chk.min_length, lo)
        ctx.set(chk.max_length, hi)
        await send_messages(ctx, chk, messages, rng)
        assert checker_counters(ctx, chk) == expected

    simulate(chk, testbench)


def test_checker_follows_jump_and_wrap():
    """A jump to a high sequence number is one sequence error; the 2**32 wrap is none."""
    chk = TrafficChecker()
    lo, hi = 1, 40
    messages = [expected_message(seq % 2**32, lo, hi) for seq in range(2**32 - 6, 2**32 + 6)]

    async def testbench(ctx):
        ctx.set(chk.min_length, lo)
        ctx.set(chk.max_length, hi)
        await send_messages(ctx, chk, messages, random.Random(4))
        got = checker_counters(ctx, chk)
        assert got["errors_sequence"] == 1 and got["errors_content"] == 0
        assert got["last_sequence"] == 5
        assert got == reference_check(messages, lo, hi)

    simulate(chk, testbench)


def test_checker_over_long_message():
    """A message longer than any legal one (lost `last` flags) is one content error."""
    chk = TrafficChecker()
    glued = b"".join(expected_message(seq, 200, 255) for seq in range(2))[:-1]
    messages = [glued[:300], expected_message(1, 200, 255)]

    async def testbench(ctx):
        ctx.set(chk.min_length, 200)
        ctx.set(chk.max_length, 255)
        await send_messages(ctx, chk, messages, random.Random(3))
        got = checker_counters(ctx, chk)
        assert got["errors_content"] == 1 and got["errors_sequence"] == 0
        assert got == reference_check(messages, 200, 255)

    simulate(chk, testbench)
