"""The register map description, its generated documentation, and the RegisterBank built
from it (driven directly on its bus in the Amaranth simulator)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from amaranth import Value
from amaranth.hdl import Fragment
from amaranth.sim import Simulator

from epochlink import registers as R
from epochlink.hdl.regbank import BusStatus, RegisterBank
from epochlink.hostmodel import RegisterBankModel
from epochlink.hostproto import Status
from epochlink.registers import (Access, Block, Field, Register, RegisterMap, Reserved,
                                 register_map)

ROOT = Path(__file__).resolve().parent.parent


# -- the map -------------------------------------------------------------------------------

def test_port_blocks():
    m = register_map(3)
    assert m.ports == 3
    for p in range(3):
        base = 0x100 + 0x40 * p
        assert m.address(f"PORT{p}.LINK_STATE") == base
        assert R.port_address(p, "FRAMES_TX") == m.address(f"PORT{p}.FRAMES_TX")
        for inst in m:
            if inst.name.startswith(f"PORT{p}."):
                assert base <= inst.address < base + 0x40
    assert "PORT3.LINK_STATE" not in m
    assert m.at(0x100 + 0x40 * 3) is None


def test_required_content():
    m = register_map(2)
    ls = m["PORT0.LINK_STATE"].register
    assert ls.access is Access.RO
    assert (ls.field("state").width, ls.field("version").width) == (2, 8)
    assert dict(ls.field("state").values) == {"DOWN": 0, "INIT": 1, "UP": 2, "INCOMPATIBLE": 3}
    assert m["PORT0.PEER_ID"].register.width == 16
    for name in ["FRAMES_TX", "FRAMES_RX", "CRC_ERRORS", "MALFORMED", "RETRANSMITS", "ABORTS",
                 "LINK_DOWNS", "DELIVERED"]:
        reg = m[f"PORT1.{name}"].register
        assert reg.access is Access.RO and reg.width == 32 and not reg.constant
    control = m["PORT0.CONTROL"].register
    assert control.access is Access.RW
    assert (control.field("enable").lsb, control.field("loopback").lsb) == (0, 1)
    assert m["PORT0.CHAN_ERROR_THRESHOLD"].register.width == 32
    assert m["PORT0.CHAN_CUT"].register.width == 1
    assert m["SCRATCH"].register.access is Access.RW
    assert m.reset(m["MAGIC"]) == R.MAGIC
    caps = m["CAPS"].register.decode(m.reset(m["CAPS"]))
    assert caps["ports"] == 2 and caps["map_version"] == R.MAP_VERSION


def test_addresses_unique_and_outside_reserved_ranges():
    m = register_map(R.MAX_PORTS)
    addrs = [i.address for i in m]
    assert len(addrs) == len(set(addrs))
    assert all(0 <= a <= 0xFFFF for a in addrs)
    for r in R.RESERVED_RANGES:
        assert not any(r.start <= a <= r.end for a in addrs)
    full = register_map(R.MAX_PORTS, R.MAX_DOMAINS)
    assert len({i.address for i in full}) == len(full)
    assert full.at(R.domain_address(R.MAX_DOMAINS - 1, "DISABLE")).name == "DOMAIN255.DISABLE"


def test_epoch_blocks_follow_the_build():
    m = register_map(ports=2, domains=5)
    assert "DOMAIN4.PERSISTED" in m and "DOMAIN5.PERSISTED" not in m
    assert "EPOCH_PORT1.ROLE" in m and "EPOCH_PORT2.ROLE" not in m
    config = m["CONFIG"].register.decode(m.reset(m["CONFIG"]))
    assert config == {"domains": 5, "epoch_width": 32}
    commands = {i.name for i in m if i.register.command is not None}
    assert commands == {"ONLINE", "ACTIVE", "EPOCH_PORT0.ROLE", "EPOCH_PORT1.ROLE",
                        *(f"DOMAIN{d}.{r}" for d in range(5) for r in ("PERSISTED", "ENABLE", "DISABLE"))}
    with pytest.raises(ValueError):
        register_map(domains=0)
    with pytest.raises(ValueError):
        register_map(domains=R.MAX_DOMAINS + 1)


def test_write_rules():
    m = register_map(1)
    control = m["PORT0.CONTROL"].register
    assert control.check_write(0x3) is Status.OK
    assert control.check_write(0x4) is Status.ILLEGAL_VALUE
    assert m["PORT0.CHAN_CUT"].register.check_write(2) is Status.ILLEGAL_VALUE
    assert m["PORT0.FRAMES_TX"].register.check_write(0) is Status.READ_ONLY
    assert m["MAGIC"].register.check_write(0) is Status.READ_ONLY
    assert m["SCRATCH"].register.check_write(0xFFFF_FFFF) is Status.OK
    assert m["PORT0.EVENTS"].register.check_write(0xFFFF_FFFF) is Status.OK


def test_field_helpers():
    ls = register_map(1)["PORT0.LINK_STATE"].register
    value = ls.encode(state=R.LinkState.UP, version=7)
    assert value == 0x0702
    assert ls.decode(value) == {"state": 2, "version": 7}
    with pytest.raises(ValueError):
        ls.encode(state=4)
    with pytest.raises(KeyError):
        ls.field("nope")


def test_malformed_maps_rejected():
    f = (Field("value", 0, 8),)
    with pytest.raises(ValueError):
        Register("X", 0, Access.RW, (Field("a", 0, 4), Field("b", 3, 4)))       # overlap
    with pytest.raises(ValueError):
        Register("X", 0, Access.RW, f, reset=0x100)                              # reset too wide
    with pytest.raises(ValueError):
        Register("X", 0, Access.RW, f, constant=True)
    with pytest.raises(ValueError):
        Block("B", 0, 4, (Register("X", 0, Access.RW, f), Register("Y", 0, Access.RW, f)))
    with pytest.raises(ValueError):
        RegisterMap([Block("A", 0, 16, (Register("X", 0, Access.RW, f),))],
                    reserved=[Reserved("R", 8, 32, "")])


def test_docs_generated_and_in_sync():
    text = R.render_markdown()
    assert "| `0x0004` | SCRATCH | RW |" in text
    assert "DOMAIN_EXT" in text and "| `0x0804` | COMMITTED | RO | hw |" in text
    for inst in register_map(1):
        assert inst.register.name in text
    out = subprocess.run([sys.executable, "-m", "epochlink.registers"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    assert out == text
    assert (ROOT / "docs" / "registers.md").read_text() == text, \
        "docs/registers.md is stale: python -m epochlink.registers > docs/registers.md"


# -- the register bank, straight on its bus --------------------------------------------------

def _custom_map() -> RegisterMap:
    block = Block("TEST", 0x10, 0x10, (
        Register("LIMITED", 0, Access.RW, (Field("count", 0, 6, max=40), Field("mode", 8, 2, max=2)),
                 reset=0x105),
        Register("STICKY", 1, Access.W1C, (Field("a", 0, 1), Field("b", 1, 1), Field("c", 4, 1))),
        Register("STATUS", 2, Access.RO, (Field("lo", 0, 4), Field("hi", 12, 4))),
        Register("ID", 3, Access.RO, (Field("value", 0, 32),), reset=0xABCD, constant=True),
    ))
    return RegisterMap([block])


async def bus_access(ctx, bank, addr, write=False, wdata=0, watch=0):
    """One bus access; returns (status, rdata, ``watch`` sampled with the response)."""
    req, rsp = bank.bus.req, bank.bus.rsp
    ctx.set(req.valid, 1)
    ctx.set(req.payload.addr, addr)
    ctx.set(req.payload.write, write)
    ctx.set(req.payload.wdata, wdata)
    await ctx.tick().until(req.ready)
    ctx.set(req.valid, 0)
    rdata, status, seen = await ctx.tick().sample(
        rsp.payload.rdata, rsp.payload.status, watch).until(rsp.valid)
    return BusStatus(status), rdata, seen


def test_bank_rules_ports_and_strobes():
    regmap = _custom_map()
    bank = RegisterBank(regmap)
    model = RegisterBankModel(regmap, {"STATUS": 0xF00F})
    log = []

    async def bench(ctx):
        ctx.set(Value.cast(bank.hw_port("STATUS")), 0xFFFF)   # bits outside fields read 0
        port = bank.hw_port("LIMITED")
        assert (ctx.get(port.count), ctx.get(port.mode)) == (5, 1)    # reset value
        accesses = [
            (0x10, False, 0), (0x10, True, 40 | (2 << 8)), (0x10, True, 41), (0x10, True, 3 << 8),
            (0x10, True, 1 << 7), (0x10, False, 0), (0x11, False, 0), (0x12, False, 0),
            (0x12, True, 1), (0x13, False, 0), (0x13, True, 0), (0x14, False, 0), (0x0F, True, 0),
        ]
        for addr, write, wdata in accesses:
            status, rdata, strobe = await bus_access(ctx, bank, addr, write, wdata,
                                                     watch=bank.hw_strobe("LIMITED"))
            log.append((addr, write, wdata, status.value, rdata, strobe))
        # strobe: one cycle, together with the new value (the request is registered and
        # decoded first)
        req = bank.bus.req
        ctx.set(req.valid, 1)
        ctx.set(req.payload.addr, 0x10)
        ctx.set(req.payload.write, 1)
        ctx.set(req.payload.wdata, 7)
        await ctx.tick()
        ctx.set(req.valid, 0)
        assert ctx.get(bank.hw_strobe("LIMITED")) == 0
        await ctx.tick()
        assert ctx.get(bank.hw_strobe("LIMITED")) == 0
        await ctx.tick()
        assert ctx.get(bank.hw_strobe("LIMITED")) == 1 and ctx.get(port.count) == 7
        await ctx.tick()
        assert ctx.get(bank.hw_strobe("LIMITED")) == 0
        # W1C: hardware sets, host clears, a set in the same cycle as a clear wins
        sticky, setp = bank.hw_port("STICKY"), bank.hw_set("STICKY")
        ctx.set(Value.cast(setp), 0b10011)
        await ctx.tick()
        ctx.set(Value.cast(setp), 0)
        await ctx.tick()
        assert ctx.get(Value.cast(sticky)) == 0b10011
        ctx.set(req.valid, 1)
        ctx.set(req.payload.addr, 0x11)
        ctx.set(req.payload.wdata, 0b10011)
        await ctx.tick()
        ctx.set(req.valid, 0)
        await ctx.tick()
        ctx.set(Value.cast(setp), 0b00010)       # in the cycle the clear is executed
        await ctx.tick()
        ctx.set(Value.cast(setp), 0)
        await ctx.tick()
        assert ctx.get(Value.cast(sticky)) == 0b00010

    sim = Simulator(bank)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()

    expected = []
    for addr, write, wdata, *_ in log:
        status, rdata = model.access(addr, write, wdata)
        expected.append((addr, write, wdata, int(status), rdata))
    assert [entry[:5] for entry in log] == expected
    assert [entry[3] for entry in log] == [
        0, 0, Status.ILLEGAL_VALUE, Status.ILLEGAL_VALUE, Status.ILLEGAL_VALUE, 0, 0, 0,
        Status.READ_ONLY, 0, Status.READ_ONLY, Status.BAD_ADDRESS, Status.BAD_ADDRESS]
    assert log[7][4] == 0xF00F and log[9][4] == 0xABCD
    # the strobe rises with the response of the one accepted write, never for refused ones
    assert [entry[5] for entry in log] == [0, 1] + [0] * 11


def test_bank_ports_named_after_map():
    bank = RegisterBank(register_map(2))
    Fragment.get(bank, None)                                     # it elaborates
    assert len(bank.port) == 2
    assert len(bank.port[1].frames_tx) == 32
    assert len(bank.port[0].link_state.as_value()) == 16
    assert len(bank.port[0].chan_cut) == 1
    assert hasattr(bank.port[0], "control_wstb") and hasattr(bank.port[0], "events_set")
    assert not hasattr(bank.node, "magic")                      # constants have no port
    assert bank.hw_port("PORT1.PEER_ID") is bank.port[1].peer_id
    with pytest.raises(ValueError):
        bank.hw_port("MAGIC")
    with pytest.raises(ValueError):
        bank.hw_strobe("PORT0.FRAMES_TX")
