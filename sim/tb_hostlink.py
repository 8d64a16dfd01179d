"""Host-interface testbenches: the designs, a fuzz generator, and the cocotb tests.

Designs (Amaranth):

* :class:`DirectHarness`: :class:`~epochlink.hdl.hostlink.HostLink` + a
  :class:`~epochlink.hdl.regbank.RegisterBank` on byte streams (no UART). RO registers are
  driven with :func:`hardware_value`, the HOST_* counters by the host link itself.
* :class:`UARTHarness`: :class:`~epochlink.hdl.hostlink.UARTHostLink` + a register bank
  on UART pins.
* :class:`HostLinkTestTop`: both side by side, one Verilator build for every cocotb test
  here (run them with :func:`build_design` and ``epochlink.sim.verilator.run``).

cocotb tests (run inside the simulator):

* ``fuzz_direct``: random and mutated request frames into the direct harness, byte for byte
  against the Python reference model (:mod:`epochlink.hostmodel`).
* ``host_protocol_over_uart``: the host library's sans-I/O protocol code
  (:mod:`epochlink.host.protocol`) against the gateware through the UART pins, bit level.

Parameters come from the environment: ``FUZZ_FRAMES``, ``FUZZ_SEED``, ``TB_REPORT`` (a JSON
file the tests write their measurements to).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

from amaranth import Module, Signal, Value
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from epochlink.hdl.hostlink import HostLink, UARTHostLink
from epochlink.hdl.regbank import RegisterBank
from epochlink.hostmodel import HostLinkModel, RegisterBankModel
from epochlink.hostproto import (SOF_REQUEST, Opcode, Status, build_request, build_response,
                                 crc16)
from epochlink.registers import Access, RegisterInstance, RegisterMap, register_map

__all__ = ["TB_PORTS", "NODE_ID", "DIRECT_TIMEOUT", "UART_DIVISOR", "UART_TIMEOUT", "CLOCK_NS",
           "hardware_value", "DirectHarness", "UARTHarness", "HostLinkTestTop", "make_model",
           "FuzzSchedule", "fuzz_schedule", "build_design"]

TB_PORTS = 2
NODE_ID = 0x0E1D
DIRECT_TIMEOUT = 24          # inter-byte timeout of the direct harness, cycles
UART_DIVISOR = 4             # 12 Mbaud at 48 MHz
UART_TIMEOUT = 40 * UART_DIVISOR * 10   # 40 byte times
CLOCK_NS = 10

_LINK_COUNTERS = {"HOST_FRAMES": "frames_ok", "HOST_ERRORS": "frame_errors",
                  "HOST_DISCARDED": "discarded"}
_UART_COUNTERS = {"UART_FRAMING_ERRORS": "framing_errors", "UART_OVERRUNS": "overruns"}
EVENTS_REGISTER = "PORT0.EVENTS"


def hardware_value(inst: RegisterInstance) -> int:
    """What the test harnesses' hardware drives on RO register ``inst`` (a fixed pattern)."""
    if inst.name == "NODE_ID":
        return NODE_ID
    return ((inst.address * 0x9E3779B1) ^ 0x5A5A_0000 ^ (inst.address << 3)) & 0xFFFF_FFFF


def _drive_registers(m: Module, bank: RegisterBank, counters: dict[str, Value],
                     events_set: Value) -> Value:
    """Drive the bank's hardware inputs; return a signal that pulses on any RW write."""
    any_strobe = Signal()
    strobes = []
    for inst in bank.regmap:
        reg = inst.register
        if reg.command is not None:
            continue                    # not in the bank (served by the epoch engine in a NIC)
        if reg.access is Access.RO and not reg.constant:
            port = Value.cast(bank.hw_port(inst.name))
            if inst.name in counters:
                m.d.comb += port.eq(counters[inst.name])
            else:
                m.d.comb += port.eq(hardware_value(inst) & ((1 << len(port)) - 1))
        elif reg.access is Access.RW:
            strobes.append(bank.hw_strobe(inst.name))
        elif reg.access is Access.W1C and inst.name == EVENTS_REGISTER:
            m.d.comb += Value.cast(bank.hw_set(inst.name)).eq(events_set)
    m.d.comb += any_strobe.eq(Value.cast(0) if not strobes else _or(strobes))
    return any_strobe


def _or(values):
    out = values[0]
    for v in values[1:]:
        out = out | v
    return out


class DirectHarness(wiring.Component):
    """HostLink + RegisterBank on byte streams; see the module docstring.

    ``strobes`` counts RW write strobes, ``idle`` is the host link's idle output.
    """

    def __init__(self, *, timeout: int = DIRECT_TIMEOUT, ports: int = TB_PORTS) -> None:
        self.timeout = timeout
        self.regmap = register_map(ports)
        self.link = HostLink(timeout=timeout)
        self.bank = RegisterBank(self.regmap)
        super().__init__({
            "rx": In(stream.Signature(8)),
            "tx": Out(stream.Signature(8)),
            "events_set": In(4),
            "strobes": Out(32),
            "idle": Out(1),
        })

    def elaborate(self, platform) -> Module:
        m = Module()
        m.submodules.link = link = self.link
        m.submodules.bank = bank = self.bank
        wiring.connect(m, link.bus, bank.bus)
        wiring.connect(m, wiring.flipped(self.rx), link.rx)
        wiring.connect(m, link.tx, wiring.flipped(self.tx))
        counters = {name: getattr(link, attr) for name, attr in _LINK_COUNTERS.items()}
        strobe = _drive_registers(m, bank, counters, self.events_set)
        with m.If(strobe):
            m.d.sync += self.strobes.eq(self.strobes + 1)
        m.d.comb += self.idle.eq(link.idle)
        return m


class UARTHarness(wiring.Component):
    """UARTHostLink + RegisterBank on UART pins; see the module docstring."""

    def __init__(self, *, divisor: int = UART_DIVISOR, timeout: int = UART_TIMEOUT,
                 ports: int = TB_PORTS) -> None:
        self.divisor = divisor
        self.timeout = timeout
        self.regmap = register_map(ports)
        self.link = UARTHostLink(divisor=divisor, timeout=timeout)
        self.bank = RegisterBank(self.regmap)
        super().__init__({
            "uart_rx": In(1, init=1),
            "uart_tx": Out(1, init=1),
            "events_set": In(4),
        })

    def elaborate(self, platform) -> Module:
        m = Module()
        m.submodules.link = link = self.link
        m.submodules.bank = bank = self.bank
        wiring.connect(m, link.bus, bank.bus)
        m.d.comb += [link.rx.eq(self.uart_rx), self.uart_tx.eq(link.tx)]
        counters = {name: getattr(link, attr)
                    for name, attr in {**_LINK_COUNTERS, **_UART_COUNTERS}.items()}
        _drive_registers(m, bank, counters, self.events_set)
        return m


class HostLinkTestTop(wiring.Component):
    """Both harnesses in one design (one Verilator build). Ports: ``uart_rx``, ``uart_tx``,
    ``rx``/``tx`` byte streams, ``events_set``, ``strobes``, ``idle``."""

    def __init__(self) -> None:
        super().__init__({
            "uart_rx": In(1, init=1),
            "uart_tx": Out(1, init=1),
            "rx": In(stream.Signature(8)),
            "tx": Out(stream.Signature(8)),
            "events_set": In(4),
            "strobes": Out(32),
            "idle": Out(1),
        })

    def elaborate(self, platform) -> Module:
        m = Module()
        m.submodules.direct = direct = DirectHarness()
        m.submodules.uart = uart = UARTHarness()
        wiring.connect(m, wiring.flipped(self.rx), direct.rx)
        wiring.connect(m, direct.tx, wiring.flipped(self.tx))
        m.d.comb += [
            direct.events_set.eq(self.events_set),
            uart.events_set.eq(self.events_set),
            self.strobes.eq(direct.strobes),
            self.idle.eq(direct.idle),
            uart.uart_rx.eq(self.uart_rx),
            self.uart_tx.eq(uart.uart_tx),
        ]
        return m


def make_model(ports: int = TB_PORTS, *, uart: bool = False) -> HostLinkModel:
    """Reference model of a harness. ``uart``: the UART one, whose UART error counters are
    whatever the test sets in ``model.hw_overrides`` (0 while the line is clean)."""
    regmap = register_map(ports)
    link: HostLinkModel
    overrides: dict[str, int] = {name: 0 for name in _UART_COUNTERS} if uart else {}

    def hardware(inst: RegisterInstance) -> int:
        if inst.name in _LINK_COUNTERS:
            return getattr(link, _LINK_COUNTERS[inst.name])
        if inst.name in overrides:
            return overrides[inst.name]
        return hardware_value(inst)

    link = HostLinkModel(RegisterBankModel(regmap, hardware))
    link.hw_overrides = overrides     # type: ignore[attr-defined]
    return link


def build_design():
    """Build (or reuse) the Verilator model of :class:`HostLinkTestTop`."""
    from epochlink.sim.verilator import build
    return build("hostlink_tb", HostLinkTestTop())


# ------------------------------------------------------------------------------------------
# Fuzz generator (pure Python; also used by the Amaranth-simulator tests)
# ------------------------------------------------------------------------------------------

@dataclass
class FuzzSchedule:
    """Stimulus for the direct harness and the responses it must produce.

    ``ops``: ``("b", byte, gap)`` presents ``byte`` and then leaves ``gap`` idle cycles;
    ``("set", bits)`` waits until the link is idle and pulses ``events_set``.
    """
    ops: list[tuple] = field(default_factory=list)
    expected: bytearray = field(default_factory=bytearray)
    kinds: dict[str, int] = field(default_factory=dict)
    valid_requests: int = 0
    valid_writes_ok: int = 0
    frames: int = 0
    model: HostLinkModel | None = None


def _valid_request(rng: random.Random, regmap: RegisterMap) -> tuple[bytes, bool]:
    tag = rng.randrange(256)
    insts = [i for i in regmap if i.register.command is None]      # the bank's registers
    if rng.random() < 0.8:
        inst = rng.choice(insts)
        addr = inst.address
    else:
        inst, addr = None, rng.randrange(0x10000)
    if rng.random() < 0.5:
        return build_request(tag, Opcode.READ, addr), False
    reg = inst.register if inst is not None else None
    r = rng.random()
    if reg is not None and r < 0.5:
        value = reg.encode(**{f.name: rng.randrange(((1 << f.width) - 1 if f.max is None else f.max) + 1)
                              for f in reg.fields})
    elif r < 0.8:
        value = rng.getrandbits(32)
    else:
        value = rng.choice([0, 0xFFFF_FFFF, 1, 2, 3, 4, 0x8000_0000])
    return build_request(tag, Opcode.WRITE, addr, value), True


def _mutate(rng: random.Random, frame: bytes) -> tuple[bytes, str]:
    data = bytearray(frame)
    kind = rng.choice(["flip", "flip", "truncate", "insert", "delete", "opcode", "crc",
                       "garbage", "sof_garbage", "lone_sof", "double"])
    if kind == "flip":
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        data = data[:rng.randrange(1, len(data))]
    elif kind == "insert":
        data.insert(rng.randrange(1, len(data) + 1), rng.randrange(256))
    elif kind == "delete":
        del data[rng.randrange(1, len(data))]
    elif kind == "opcode":
        op = rng.choice([0, 3, 4, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        body = bytes(data[1:2]) + bytes([op]) + bytes(data[3:-2])
        data = bytearray([SOF_REQUEST]) + body + crc16(body).to_bytes(2, "little")
    elif kind == "crc":
        data[-1] ^= rng.randrange(1, 256)
    elif kind == "garbage":
        data = bytearray(rng.randbytes(rng.randrange(1, 24)))
    elif kind == "sof_garbage":
        data = bytearray([SOF_REQUEST]) + rng.randbytes(rng.randrange(1, 16))
    elif kind == "lone_sof":
        data = bytearray([SOF_REQUEST])
    elif kind == "double":
        data = data + data
    return bytes(data), kind


def fuzz_schedule(frames: int, seed: int, *, timeout: int = DIRECT_TIMEOUT,
                  ports: int = TB_PORTS, readback: bool = True) -> FuzzSchedule:
    """Random valid, mutated and garbage request frames for the direct harness.

    Every expected response comes from the reference model. Valid requests sent while the
    link is hunting for a SOF are checked to be answered by exactly their own response.
    Ends (``readback``) with a read of every register, so a register changed by a frame
    that was not a valid write shows up as a mismatch.
    """
    rng = random.Random(seed)
    model = make_model(ports)
    regmap = model.bank.regmap
    sched = FuzzSchedule(model=model)
    small_gap = max(1, timeout // 2)
    big_gap = timeout + 2

    def send(data: bytes, *, gaps: bool) -> list[bytes]:
        out: list[bytes] = []
        for byte in data:
            gap = rng.randrange(1, small_gap) if gaps and rng.random() < 0.05 else 0
            sched.ops.append(("b", byte, gap))
            n_exec = len(model.executed)
            out += model.feed_byte(byte)
            for addr, write, wdata in model.executed[n_exec:]:
                inst = regmap.at(addr)
                if write and inst is not None and inst.access is Access.RW and \
                        inst.register.command is None and inst.register.check_write(wdata) == Status.OK:
                    sched.valid_writes_ok += 1
        return out

    def pause() -> None:
        last = sched.ops[-1]
        if last[0] == "b":
            sched.ops[-1] = ("b", last[1], max(last[2], big_gap + rng.randrange(4)))
        for r in model.timeout():
            sched.expected += r

    for _ in range(frames):
        sched.frames += 1
        frame, is_write = _valid_request(rng, regmap)
        if rng.random() < 0.4:
            was_idle = model.idle
            before = dict(model.bank.stored)
            responses = send(frame, gaps=True)
            sched.kinds["valid"] = sched.kinds.get("valid", 0) + 1
            if was_idle:
                sched.valid_requests += 1
                addr = int.from_bytes(frame[4:6], "little")
                inst = regmap.at(addr)
                # Exactly one response, for this request.
                assert len(responses) == 1 and responses[0][1] == frame[1], responses
                if not is_write or Status(responses[0][2]) != Status.OK:
                    assert model.bank.stored == before
        else:
            bad, kind = _mutate(rng, frame)
            sched.kinds[kind] = sched.kinds.get(kind, 0) + 1
            responses = send(bad, gaps=False)
        for r in responses:
            sched.expected += r
        if not model.idle and rng.random() < 0.7:
            pause()
        if rng.random() < 0.01:
            if not model.idle:
                pause()
            bits = rng.randrange(1, 16)
            sched.ops.append(("set", bits))
            model.bank.set_bits(EVENTS_REGISTER, bits)

    if readback:
        if not model.idle:
            pause()
        for i, inst in enumerate(regmap):
            frame = build_request(i & 0xFF, Opcode.READ, inst.address)
            for r in send(frame, gaps=False):
                sched.expected += r
    return sched


# ------------------------------------------------------------------------------------------
# cocotb tests
# ------------------------------------------------------------------------------------------

try:
    import cocotb
    from cocotb.clock import Clock
    from cocotb.triggers import FallingEdge, RisingEdge, Timer
except ImportError:      # pragma: no cover - cocotb is a dependency
    cocotb = None


def _report(key: str, value) -> None:
    path = os.environ.get("TB_REPORT")
    if not path:
        return
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[key] = value
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


async def _reset(dut) -> None:
    Clock(dut.clk, CLOCK_NS, unit="ns").start()
    dut.rst.value = 1
    dut.rx__valid.value = 0
    dut.rx__payload.value = 0
    dut.tx__ready.value = 1
    dut.events_set.value = 0
    dut.uart_rx.value = 1
    for _ in range(3):
        await RisingEdge(dut.clk)
    dut.rst.value = 0


if cocotb is not None:

    @cocotb.test()
    async def fuzz_direct(dut):
        """Fuzz the HostLink + RegisterBank byte streams against the reference model."""
        import time
        frames = int(os.environ.get("FUZZ_FRAMES", "10000"))
        seed = int(os.environ.get("FUZZ_SEED", "1"))
        t0 = time.monotonic()
        sched = fuzz_schedule(frames, seed)
        t_gen = time.monotonic() - t0
        expected = bytes(sched.expected)
        await _reset(dut)

        got = bytearray()
        ops = sched.ops
        n_ops = len(ops)
        clk_fall = FallingEdge(dut.clk)
        tx_valid, tx_payload = dut.tx__valid, dut.tx__payload
        rx_valid, rx_payload, rx_ready = dut.rx__valid, dut.rx__payload, dut.rx__ready
        events_set, idle = dut.events_set, dut.idle
        i = 0
        gap = 0
        valid = False          # rx_valid as driven
        presenting = False     # ops[i] is on rx_payload
        taken = False          # ... and is taken at the next rising edge
        pulsed = False
        cycles = 0
        t0 = time.monotonic()
        limit = 64 * n_ops + 100_000
        # One callback per cycle: at each falling edge read what the next rising edge will
        # transfer and set up the inputs for it (neither ready depends on the inputs).
        while True:
            await clk_fall
            cycles += 1
            if tx_valid.value:
                got.append(int(tx_payload.value))
            if pulsed:
                events_set.value = 0
                pulsed = False
            if taken:
                taken = presenting = False
                gap = ops[i][2]
                i += 1
            if gap:
                gap -= 1
                if valid:
                    rx_valid.value = valid = False
            elif i < n_ops:
                op = ops[i]
                if op[0] == "set":
                    if valid:
                        rx_valid.value = valid = False
                    if idle.value:
                        events_set.value = op[1]
                        pulsed = True
                        i += 1
                else:
                    if not presenting:
                        rx_payload.value = op[1]
                        presenting = True
                        if not valid:
                            rx_valid.value = valid = True
                    taken = bool(rx_ready.value)
            else:
                if valid:
                    rx_valid.value = valid = False
                if len(got) >= len(expected):
                    break
            assert cycles < limit, f"stuck: {len(got)}/{len(expected)} response bytes, op {i}/{n_ops}"
        t_sim = time.monotonic() - t0
        for _ in range(100):                   # nothing more may come out
            await clk_fall
            if tx_valid.value:
                got.append(int(tx_payload.value))

        if bytes(got) != expected:
            n = next(k for k in range(min(len(got), len(expected))) if got[k] != expected[k]) \
                if any(a != b for a, b in zip(got, expected)) else min(len(got), len(expected))
            f = n // 9 * 9
            raise AssertionError(
                f"response stream differs at byte {n} (response {n // 9}): "
                f"got {bytes(got[f:f + 27]).hex()} expected {expected[f:f + 27].hex()}")
        assert int(dut.strobes.value) == sched.valid_writes_ok
        dut._log.info("fuzz: %d frames (%s), %d valid requests, %d response bytes, %d cycles, "
                      "%.1f s simulated (%.0f frames/s), %.1f s generating",
                      sched.frames, sched.kinds, sched.valid_requests, len(got), cycles, t_sim,
                      sched.frames / t_sim, t_gen)
        _report("fuzz", {"frames": sched.frames, "valid_requests": sched.valid_requests,
                         "kinds": sched.kinds, "cycles": cycles, "response_bytes": len(got),
                         "sim_seconds": round(t_sim, 2), "gen_seconds": round(t_gen, 2),
                         "frames_per_second": round(sched.frames / t_sim)})

    # -- UART, bit level -------------------------------------------------------------------

    BIT_NS = UART_DIVISOR * CLOCK_NS

    class UartLine:
        """Bit-level host end of the UART: sends on ``uart_rx``, decodes ``uart_tx``."""

        def __init__(self, dut) -> None:
            self.dut = dut
            self.received = bytearray()
            self.stop_errors = 0
            self.last_stop_ns = 0.0
            self.bit_ns = float(BIT_NS)
            cocotb.start_soon(self._monitor())

        async def _monitor(self) -> None:
            from cocotb.utils import get_sim_time
            pin = self.dut.uart_tx
            while True:
                await FallingEdge(pin)
                await Timer(BIT_NS / 2, unit="ns")
                if pin.value:
                    continue
                byte = 0
                for k in range(8):
                    await Timer(BIT_NS, unit="ns")
                    byte |= int(pin.value) << k
                await Timer(BIT_NS, unit="ns")
                if not pin.value:
                    self.stop_errors += 1
                self.received.append(byte)
                self.last_stop_ns = get_sim_time("ns") + BIT_NS / 2

        async def send(self, data: bytes, *, stop: int = 1) -> None:
            pin = self.dut.uart_rx
            bit_ns = round(self.bit_ns, 3)
            for byte in data:
                for b in [0] + [(byte >> k) & 1 for k in range(8)] + [stop]:
                    pin.value = b
                    await Timer(bit_ns, unit="ns")
            pin.value = 1

        async def idle(self, bits: float) -> None:
            self.dut.uart_rx.value = 1
            await Timer(round(self.bit_ns * bits, 3), unit="ns")

        def take(self) -> bytes:
            data = bytes(self.received)
            self.received.clear()
            return data

    @cocotb.test()
    async def host_protocol_over_uart(dut):
        """The host library's protocol code against the gateware through the UART pins.

        Every response is checked against the reference model and the interesting ones
        explicitly as well.
        """
        from cocotb.utils import get_sim_time

        from epochlink.host.protocol import (BadResponseChecksum, GarbageBytes, Response,
                                             ResponseParser, encode_read, encode_write)
        from epochlink.registers import MAGIC

        await _reset(dut)
        line = UartLine(dut)
        parser = ResponseParser()
        model = make_model(uart=True)
        regmap = model.bank.regmap
        addr = regmap.address
        transactions = 0
        report: dict = {}
        timeout_bits = UART_TIMEOUT / UART_DIVISOR + 20

        async def collect(count: int, settle_bits: float = 20) -> list[Response]:
            events: list = []
            for _ in range(4000):
                events += parser.feed(line.take())
                if sum(isinstance(e, Response) for e in events) >= count:
                    break
                await line.idle(settle_bits)
            await line.idle(2)
            events += parser.feed(line.take())
            bad = [e for e in events if not isinstance(e, Response)]
            assert not bad, bad
            assert len(events) == count, events
            return events

        async def exchange(data: bytes, count: int, *, settle_bits: float = 20,
                           model_bytes: bytes | None = None) -> list[tuple]:
            """Send ``data`` and check the ``count`` responses against the model."""
            nonlocal transactions
            expected = model.feed(data if model_bytes is None else model_bytes)
            await line.send(data)
            events = await collect(count, settle_bits)
            got = [build_response(e.tag, int(e.status), e.value) for e in events]
            assert got == expected, (
                [g.hex() for g in got], [e.hex() for e in expected])
            transactions += count
            return [(e.tag, e.status, e.value) for e in events]

        async def truncate_pause() -> list[bytes]:
            await line.idle(timeout_bits)
            return model.timeout()

        # Identity and a write/read round trip.
        r = await exchange(encode_read(1, addr("MAGIC")) + encode_read(2, addr("NODE_ID"))
                           + encode_read(3, addr("CAPS")), 3)
        assert r == [(1, Status.OK, MAGIC), (2, Status.OK, NODE_ID),
                     (3, Status.OK, regmap.reset(regmap["CAPS"]))]
        r = await exchange(encode_write(4, addr("SCRATCH"), 0xDEADBEEF)
                           + encode_read(5, addr("SCRATCH")), 2)
        assert r == [(4, Status.OK, 0xDEADBEEF), (5, Status.OK, 0xDEADBEEF)]

        # Every register: read, and write (all RW/W1C registers, some RO ones).
        rng = random.Random(7)
        frames = []
        for k, inst in enumerate(regmap):
            if inst.name == "SCRATCH":
                continue
            frames.append(encode_read(k & 0xFF, inst.address))
            if inst.access is not Access.RO or rng.random() < 0.3:
                frames.append(encode_write((k + 100) & 0xFF, inst.address,
                                           rng.choice([0, 1, 3, 0x55AA])))
        for c in range(0, len(frames), 8):           # within the node's window
            chunk = frames[c:c + 8]
            await exchange(b"".join(chunk), len(chunk))

        # Refused writes change nothing.
        control = model.bank.value(regmap["PORT0.CONTROL"])
        cut = model.bank.value(regmap["PORT1.CHAN_CUT"])
        r = await exchange(encode_write(10, addr("MAGIC"), 0) + encode_write(11, 0x0FFF, 1)
                           + encode_write(12, addr("PORT0.CONTROL"), 0x4)
                           + encode_write(13, addr("PORT1.CHAN_CUT"), 2)
                           + encode_read(14, addr("PORT0.CONTROL")), 5)
        assert r == [(10, Status.READ_ONLY, MAGIC), (11, Status.BAD_ADDRESS, 0),
                     (12, Status.ILLEGAL_VALUE, control), (13, Status.ILLEGAL_VALUE, cut),
                     (14, Status.OK, control)]

        # Link-layer errors.
        bad_crc = bytearray(encode_write(20, addr("SCRATCH"), 1))
        bad_crc[7] ^= 0x10
        r = await exchange(bytes(bad_crc) + encode_read(21, addr("SCRATCH")), 2)
        assert r == [(20, Status.BAD_CHECKSUM, 0), (21, Status.OK, 0xDEADBEEF)]
        r = await exchange(bytes([SOF_REQUEST, 22, 0x07]) + encode_read(23, addr("SCRATCH")), 2)
        assert r == [(22, Status.BAD_OPCODE, 0), (23, Status.OK, 0xDEADBEEF)]
        r = await exchange(b"\x00\x13\x37garbage" + encode_read(24, addr("SCRATCH")), 1)
        assert r == [(24, Status.OK, 0xDEADBEEF)]
        truncated = encode_write(25, addr("SCRATCH"), 5)[:6]
        model.feed(truncated)
        await line.send(truncated)
        assert await truncate_pause() == [build_response(25, Status.TRUNCATED, 0)]
        assert [(e.tag, e.status) for e in await collect(1)] == [(25, Status.TRUNCATED)]
        transactions += 1

        # A byte with a bad stop bit inside a frame is dropped: the frame comes up short.
        frame = encode_write(27, addr("SCRATCH"), 6)
        await line.send(frame[:3])
        await line.send(frame[3:4], stop=0)
        await line.idle(2)
        await line.send(frame[4:])
        model.feed(frame[:3] + frame[4:])
        model.hw_overrides["UART_FRAMING_ERRORS"] = 1
        assert await truncate_pause() == [build_response(27, Status.TRUNCATED, 0)]
        await collect(1)
        r = await exchange(encode_read(28, addr("SCRATCH")) + encode_read(29, addr("UART_FRAMING_ERRORS"))
                           + encode_read(30, addr("HOST_ERRORS")), 3)
        assert r == [(28, Status.OK, 0xDEADBEEF), (29, Status.OK, 1),
                     (30, Status.OK, 4)]             # bad checksum, opcode, 2x truncated

        # A break (line held low for 30 bit times) costs one framing error, no wedge.
        dut.uart_rx.value = 0
        await Timer(30 * BIT_NS, unit="ns")
        await line.idle(2)
        model.hw_overrides["UART_FRAMING_ERRORS"] = 2
        r = await exchange(encode_read(31, addr("UART_FRAMING_ERRORS")), 1)
        assert r == [(31, Status.OK, 2)]

        # Host bit time 2 % off in either direction.
        for skew in (-0.02, 0.02):
            line.bit_ns = BIT_NS * (1 + skew)
            r = await exchange(encode_write(40, addr("SCRATCH"), 0x12345678)
                               + encode_read(41, addr("SCRATCH")), 2)
            assert r == [(40, Status.OK, 0x12345678), (41, Status.OK, 0x12345678)]
        line.bit_ns = float(BIT_NS)
        assert line.stop_errors == 0

        # The parser copes with a damaged response stream.
        events = parser.feed(b"\x01\x02" + build_response(1, 0, 5)[:-1] + b"\x00"
                             + build_response(2, 0, 6))
        assert isinstance(events[0], GarbageBytes) and isinstance(events[1], BadResponseChecksum)
        assert events[-1] == Response(2, Status.OK, 6)

        # Throughput: a window of back-to-back pipelined requests.
        for kind, count, make, req_bytes in (
                ("read", 16, lambda k: encode_read(k, addr("SCRATCH")), 7),
                ("write", 16, lambda k: encode_write(k, addr("SCRATCH"), k), 11)):
            await line.idle(4)
            start = get_sim_time("ns")
            r = await exchange(b"".join(make(k) for k in range(count)), count, settle_bits=1)
            assert [t for t, _, _ in r] == list(range(count))
            elapsed = (line.last_stop_ns - start) / CLOCK_NS
            per = elapsed / count
            floor = max(req_bytes, 9) * 10 * UART_DIVISOR
            floor_total = floor * count + min(req_bytes, 9) * 10 * UART_DIVISOR
            report[kind] = {"transactions": count, "total_cycles": round(elapsed),
                            "wire_floor_total_cycles": floor_total,
                            "cycles_per_transaction": round(per, 1),
                            "wire_floor_per_transaction": floor}
            dut._log.info("pipelined %ss: %d cycles for %d (wire floor %d), %.1f per transaction",
                          kind, elapsed, count, floor_total, per)

        assert transactions >= 40
        report["transactions"] = transactions
        _report("uart", report)
