"""HostLink + RegisterBank: directed tests in the Amaranth simulator, fuzzing and the
host protocol over the UART pins under Verilator (cocotb)."""
from __future__ import annotations

import gc
import json
import random
import warnings

import pytest
from amaranth import Module, Value
from amaranth.hdl import Fragment
from amaranth.lib import wiring
from amaranth.sim import Simulator

from epochlink.hdl.hostlink import HostLink, UARTHostLink
from epochlink.hdl.uart import UARTReceiver, UARTTransmitter
from epochlink.hostproto import SOF_REQUEST, Opcode, Status, build_request, build_response
from epochlink.registers import MAGIC, Access
from epochlink.sim.tb_hostlink import (DIRECT_TIMEOUT, NODE_ID, DirectHarness, fuzz_schedule,
                                       hardware_value, make_model)

READ, WRITE = Opcode.READ, Opcode.WRITE


# -- driving the direct harness in the Amaranth simulator -------------------------------------

class Run:
    """Result of :func:`run_direct`: response bytes, hardware snapshots and stall count."""

    def __init__(self):
        self.out = bytearray()
        self.stalls = 0
        self.peeks: dict[str, int] = {}

    def responses(self) -> list[tuple[int, int, int]]:
        out = bytes(self.out)
        assert len(out) % 9 == 0
        res = []
        for k in range(0, len(out), 9):
            frame = out[k:k + 9]
            assert frame == build_response(frame[1], frame[2], int.from_bytes(frame[3:7], "little"))
            res.append((frame[1], frame[2], int.from_bytes(frame[3:7], "little")))
        return res


def run_direct(ops, *, expect_bytes: int | None = None, tx_ready: float = 1.0, seed: int = 0,
               peek=None, dut: DirectHarness | None = None, tail: int = 40) -> Run:
    """Play ``ops`` (see :class:`~epochlink.sim.tb_hostlink.FuzzSchedule`) into a
    :class:`DirectHarness`; collect the response bytes.

    ``tx_ready`` < 1 stalls the response stream at random. ``peek(ctx, dut, run)`` is called
    at the end to look at internal signals.
    """
    dut = dut or DirectHarness()
    rng = random.Random(seed)
    run = Run()
    rx, tx = dut.rx, dut.tx

    async def tick(ctx, *extra):
        ready = rng.random() < tx_ready
        ctx.set(tx.ready, ready)
        _, _, valid, payload, *rest = await ctx.tick().sample(tx.valid, tx.payload, *extra)
        if valid and ready:
            run.out.append(payload)
        return rest

    async def bench(ctx):
        for op in ops:
            if op[0] == "set":
                while not ctx.get(dut.idle):
                    await tick(ctx)
                ctx.set(dut.events_set, op[1])
                await tick(ctx)
                ctx.set(dut.events_set, 0)
                continue
            _, byte, gap = op
            ctx.set(rx.valid, 1)
            ctx.set(rx.payload, byte)
            while True:
                ready, = await tick(ctx, rx.ready)
                if ready:
                    break
                run.stalls += 1
            ctx.set(rx.valid, 0)
            for _ in range(gap):
                await tick(ctx)
        idle = 0
        while idle < tail and (expect_bytes is None or len(run.out) < expect_bytes or idle < 10):
            n = len(run.out)
            await tick(ctx)
            idle = idle + 1 if len(run.out) == n else 0
        if peek is not None:
            peek(ctx, dut, run)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return run


def frames(*frames_, gap: int = 0):
    """Ops for byte strings sent back to back; ``gap`` idle cycles after each."""
    ops = []
    for f in frames_:
        for k, b in enumerate(f):
            ops.append(("b", b, gap if k == len(f) - 1 else 0))
    return ops


def pause(ops, cycles: int):
    last = ops[-1]
    ops[-1] = ("b", last[1], last[2] + cycles)
    return ops


def check_against_model(data: bytes, run: Run, model=None):
    model = model or make_model()
    expected = b"".join(model.feed(data))
    assert bytes(run.out) == expected
    return model


# -- directed tests -----------------------------------------------------------------------

def test_every_register_kind():
    """Read every register, write every register, read back; hardware ports follow."""
    dut = DirectHarness()
    regmap = dut.regmap
    rng = random.Random(1)
    data = bytearray()
    writes = {}
    for k, inst in enumerate(regmap):
        data += build_request(k & 0xFF, READ, inst.address)
    for k, inst in enumerate(regmap):
        reg = inst.register
        value = reg.encode(**{f.name: rng.randrange((1 << f.width) if f.max is None else f.max + 1)
                              for f in reg.fields})
        if inst.access is Access.W1C:
            value = 0xF
        writes[inst.name] = value
        data += build_request(k & 0xFF, WRITE, inst.address, value)
        data += build_request(k & 0xFF, READ, inst.address)
    seen = {}

    def peek(ctx, dut, run):
        seen["control1"] = ctx.get(Value.cast(dut.bank.hw_port("PORT1.CONTROL")))
        seen["enable1"] = ctx.get(dut.bank.port[1].control.enable)
        seen["loopback1"] = ctx.get(dut.bank.port[1].control.loopback)
        seen["threshold0"] = ctx.get(dut.bank.hw_port("PORT0.CHAN_ERROR_THRESHOLD"))
        seen["scratch"] = ctx.get(dut.bank.node.scratch)
        seen["strobes"] = ctx.get(dut.strobes)

    run = run_direct(frames(bytes(data)), peek=peek, dut=dut)
    model = check_against_model(bytes(data), run)
    by_tag = run.responses()
    assert by_tag[0] == (0, Status.OK, MAGIC)
    assert by_tag[regmap.instances.index(regmap["NODE_ID"])] == (
        regmap.instances.index(regmap["NODE_ID"]), Status.OK, NODE_ID)
    # RO registers refused the write, RW/W1C took it.
    for inst in regmap:
        status = model.bank.access(inst.address, False)[1]
        if inst.register.command is not None:
            assert model.bank.access(inst.address, False)[0] is Status.BAD_ADDRESS
        elif inst.access is Access.RW:
            assert status == writes[inst.name]
        elif inst.access is Access.W1C:
            assert status == 0
        elif not inst.register.constant and inst.name not in ("HOST_FRAMES", "HOST_ERRORS", "HOST_DISCARDED"):
            assert status == hardware_value(inst) & inst.register.mask
    control1 = writes["PORT1.CONTROL"]
    assert seen["control1"] == control1
    assert (seen["enable1"], seen["loopback1"]) == (control1 & 1, control1 >> 1 & 1)
    assert seen["threshold0"] == writes["PORT0.CHAN_ERROR_THRESHOLD"]
    assert seen["scratch"] == writes["SCRATCH"]
    assert seen["strobes"] == sum(1 for i in regmap if i.access is Access.RW and i.register.command is None)


def test_refused_writes_change_nothing():
    dut = DirectHarness()
    regmap = dut.regmap
    addr = regmap.address
    data = b"".join([
        build_request(1, WRITE, addr("SCRATCH"), 0x1234),
        build_request(2, WRITE, addr("PORT0.CONTROL"), 0x2),
        build_request(3, WRITE, addr("MAGIC"), 0),                   # constant
        build_request(4, WRITE, addr("PORT0.FRAMES_TX"), 0),         # RO, hardware driven
        build_request(5, WRITE, 0x0005, 1),                          # hole in the NODE block
        build_request(6, WRITE, addr("PORT0.CONTROL") + 0x80, 1),    # port 2: absent
        build_request(7, WRITE, 0x08F0, 1),                          # reserved range
        build_request(8, WRITE, addr("PORT0.CONTROL"), 0x4),         # undefined bit
        build_request(9, WRITE, addr("PORT0.CHAN_CUT"), 2),
        build_request(10, READ, 0xFFFF),
        build_request(11, READ, addr("SCRATCH")),
        build_request(12, READ, addr("PORT0.CONTROL")),
        build_request(13, READ, addr("PORT0.CHAN_CUT")),
    ])
    seen = {}

    def peek(ctx, dut, run):
        seen["control"] = ctx.get(Value.cast(dut.bank.hw_port("PORT0.CONTROL")))
        seen["strobes"] = ctx.get(dut.strobes)

    run = run_direct(frames(data), peek=peek, dut=dut)
    check_against_model(data, run)
    assert run.responses() == [
        (1, Status.OK, 0x1234), (2, Status.OK, 0x2),
        (3, Status.READ_ONLY, MAGIC),
        (4, Status.READ_ONLY, hardware_value(regmap["PORT0.FRAMES_TX"])),
        (5, Status.BAD_ADDRESS, 0), (6, Status.BAD_ADDRESS, 0), (7, Status.BAD_ADDRESS, 0),
        (8, Status.ILLEGAL_VALUE, 0x2), (9, Status.ILLEGAL_VALUE, 0),
        (10, Status.BAD_ADDRESS, 0),
        (11, Status.OK, 0x1234), (12, Status.OK, 0x2), (13, Status.OK, 0),
    ]
    assert seen == {"control": 0x2, "strobes": 2}


def test_link_errors_answered_and_recovered():
    regmap = make_model().bank.regmap
    scratch = regmap.address("SCRATCH")
    bad_crc = bytearray(build_request(2, WRITE, scratch, 0x66))
    bad_crc[-2] ^= 0x01
    flipped_data = bytearray(build_request(3, WRITE, scratch, 0x77))
    flipped_data[6] ^= 0x80
    ops = frames(build_request(1, WRITE, scratch, 0x55), bytes(bad_crc), bytes(flipped_data),
                 bytes([SOF_REQUEST, 4, 0x03, 0, 0, 0, 0]),        # unknown opcode, then junk
                 b"\x00\xff\x13\x5a",                               # garbage (no SOF)
                 build_request(5, READ, scratch))
    ops += pause(frames(build_request(6, WRITE, scratch, 0x88)[:5]), DIRECT_TIMEOUT)  # truncated
    ops += pause(frames(bytes([SOF_REQUEST])), DIRECT_TIMEOUT + 3)  # lone SOF: silent
    ops += frames(build_request(7, READ, scratch), build_request(8, READ, regmap.address("HOST_ERRORS")),
                  build_request(9, READ, regmap.address("HOST_DISCARDED")),
                  build_request(10, READ, regmap.address("HOST_FRAMES")))
    run = run_direct(ops)
    assert run.responses() == [
        (1, Status.OK, 0x55), (2, Status.BAD_CHECKSUM, 0), (3, Status.BAD_CHECKSUM, 0),
        (4, Status.BAD_OPCODE, 0), (5, Status.OK, 0x55), (6, Status.TRUNCATED, 0),
        (7, Status.OK, 0x55),
        (8, Status.OK, 4),
        (9, Status.OK, 4 + 4 + 1),     # 4 junk bytes after the bad opcode, 4 garbage, lone SOF
        (10, Status.OK, 5),            # frames 1, 5, 7, 8, 9 executed before this one
    ]


@pytest.mark.parametrize("gap,truncated", [(DIRECT_TIMEOUT - 1, False), (DIRECT_TIMEOUT, True)])
def test_inter_byte_timeout_boundary(gap, truncated):
    """A frame is abandoned after exactly ``timeout`` idle cycles between two bytes."""
    frame = build_request(9, READ, 0)
    ops = frames(frame[:3]) + frames(frame[3:])
    ops = pause(ops[:3], gap) + ops[3:]
    run = run_direct(ops, tail=DIRECT_TIMEOUT + 20)
    if truncated:
        # the rest of the frame is then hunted through as garbage: no second answer
        assert run.responses() == [(9, Status.TRUNCATED, 0)]
    else:
        assert run.responses() == [(9, Status.OK, MAGIC)]


def test_pipelined_back_to_back_with_backpressure():
    """Many requests without waiting, the response side stalling at random: nothing lost,
    order kept, the request side stalls only while the response queue is full."""
    rng = random.Random(5)
    model = make_model()
    regmap = model.bank.regmap
    data = bytearray()
    for k in range(60):
        inst = rng.choice(list(regmap))
        if rng.random() < 0.5:
            data += build_request(k, READ, inst.address)
        else:
            data += build_request(k, WRITE, inst.address, rng.getrandbits(8))
    run = run_direct(frames(bytes(data)), tx_ready=0.3, seed=2)
    check_against_model(bytes(data), run, model)
    assert [r[0] for r in run.responses()] == list(range(60))
    assert run.stalls > 0        # the queue filled up (the host exceeded its window)

    # Full speed: one request byte per cycle, responses drain at one byte per cycle.
    run = run_direct(frames(bytes(data)))
    check_against_model(bytes(data), run)


def test_w1c_events():
    regmap = make_model().bank.regmap
    events = regmap.address("PORT0.EVENTS")
    ops = frames(build_request(1, READ, events))
    ops.append(("set", 0b1010))
    ops += frames(build_request(2, READ, events), build_request(3, WRITE, events, 0b0010),
                  build_request(4, READ, events))
    ops.append(("set", 0b0001))
    ops += frames(build_request(5, WRITE, events, 0xFFFF_FFF0), build_request(6, READ, events),
                  build_request(7, WRITE, events, 0xF), build_request(8, READ, events))
    run = run_direct(ops)
    assert run.responses() == [(1, 0, 0), (2, 0, 0b1010), (3, 0, 0b1000), (4, 0, 0b1000),
                               (5, 0, 0b1001), (6, 0, 0b1001), (7, 0, 0), (8, 0, 0)]


def test_fuzz_small_in_amaranth_simulator():
    """A short fuzz run in the Amaranth simulator (the long one runs under Verilator)."""
    sched = fuzz_schedule(250, seed=11)
    seen = {}

    def peek(ctx, dut, run):
        seen["strobes"] = ctx.get(dut.strobes)

    run = run_direct(sched.ops, expect_bytes=len(sched.expected), peek=peek)
    assert bytes(run.out) == bytes(sched.expected)
    assert seen["strobes"] == sched.valid_writes_ok
    assert sched.valid_requests > 50


# -- UARTHostLink at bit level, Amaranth simulator ---------------------------------------

class UARTPair(wiring.Component):
    """Host-side UART transmitter/receiver wired to a UARTHostLink + bank."""

    def __init__(self, divisor: int):
        from epochlink.sim.tb_hostlink import UARTHarness
        self.host_tx = UARTTransmitter(divisor)
        self.host_rx = UARTReceiver(divisor)
        self.node = UARTHarness(divisor=divisor, timeout=30 * 10 * divisor)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.submodules.host_tx = self.host_tx
        m.submodules.host_rx = self.host_rx
        m.submodules.node = self.node
        m.d.comb += [self.node.uart_rx.eq(self.host_tx.tx), self.host_rx.rx.eq(self.node.uart_tx)]
        return m


def test_uart_host_link_bit_level():
    dut = UARTPair(divisor=4)
    regmap = dut.node.regmap
    data = (build_request(1, WRITE, regmap.address("SCRATCH"), 0xCAFEF00D)
            + build_request(2, READ, regmap.address("SCRATCH"))
            + build_request(3, READ, regmap.address("MAGIC")))
    got = bytearray()

    async def send(ctx):
        for b in data:
            ctx.set(dut.host_tx.i.valid, 1)
            ctx.set(dut.host_tx.i.payload, b)
            await ctx.tick().until(dut.host_tx.i.ready)
        ctx.set(dut.host_tx.i.valid, 0)

    async def receive(ctx):
        ctx.set(dut.host_rx.o.ready, 1)
        while len(got) < 27:
            b, = await ctx.tick().sample(dut.host_rx.o.payload).until(dut.host_rx.o.valid)
            got.append(b)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(send)
    sim.add_testbench(receive)
    sim.run()
    assert bytes(got) == (build_response(1, 0, 0xCAFEF00D) + build_response(2, 0, 0xCAFEF00D)
                          + build_response(3, 0, MAGIC))


def test_parameters_checked():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # the refused objects are never elaborated
        with pytest.raises(ValueError):
            HostLink(timeout=1)
        with pytest.raises(ValueError):
            UARTHostLink(divisor=4, timeout=40)     # shorter than a byte
        with pytest.raises(ValueError):
            UARTHostLink.for_clock(48e6, 5e6)       # 4 % off
        gc.collect()
    link = UARTHostLink.for_clock(48e6, 12e6)
    assert (link.divisor, link.timeout) == (4, 96_000)
    Fragment.get(link, None)
    link = UARTHostLink.for_clock(12e6, 115200, timeout_s=1e-3)
    assert (link.divisor, link.timeout) == (104, 20_800)
    Fragment.get(link, None)


# -- Verilator (cocotb) -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def design():
    from epochlink.sim.tb_hostlink import build_design
    return build_design()


def _run_cocotb(design, testcase: str, tmp_path, env=None) -> dict:
    from epochlink.sim.verilator import run
    report = tmp_path / "report.json"
    run(design, "epochlink.sim.tb_hostlink", testcase=testcase,
        env={"TB_REPORT": str(report), **(env or {})})
    data = json.loads(report.read_text())
    print(json.dumps(data, indent=2))
    return data


def test_fuzz_verilator(design, tmp_path):
    """10^4 random/mutated frames against the reference model, byte for byte."""
    data = _run_cocotb(design, "fuzz_direct", tmp_path, {"FUZZ_FRAMES": "10000", "FUZZ_SEED": "1"})
    assert data["fuzz"]["frames"] == 10000
    assert data["fuzz"]["valid_requests"] > 3000


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_fuzz_verilator_soak(design, tmp_path, seed):
    """``make soak``: 10^5 more frames per seed."""
    data = _run_cocotb(design, "fuzz_direct", tmp_path, {"FUZZ_FRAMES": "100000", "FUZZ_SEED": str(seed)})
    assert data["fuzz"]["frames"] == 100000


def test_host_protocol_over_uart_verilator(design, tmp_path):
    """The host library's sans-I/O code against the gateware through the UART pins."""
    data = _run_cocotb(design, "host_protocol_over_uart", tmp_path)
    assert data["uart"]["transactions"] >= 40
