"""Board tops and the board build/flash flow.

* the self-test core in simulation (PRBS over a byte loopback, the UART report);
* PLL parameter solvers against the vendor-independent PLL tools (yowasp-icepll/ecppll);
* pin assignments and the command line (usage errors, flash without a board);
* the iCEBreaker bitstream build (normal: ``make test`` builds it), the ULX3S build (slow);
* a hardware-in-the-loop test, skipped unless a board is attached.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest
from amaranth import Elaboratable, Module, Signal
from amaranth.sim import Simulator

from epochlink.boards.__main__ import (BOARDS, _classify_loader_failure, board_attached,
                                       critical_path_summary, parse_nextpnr_report)
from epochlink.boards.icebreaker import ICEBreakerTop, ice40_pll_parameters
from epochlink.boards.top import (REPORT_LINE, NICCore, PRBSChecker, PRBSGenerator,
                                  SelfTestCore)
from epochlink.hdl.frame import LinkState
from epochlink.hostproto import RESPONSE_LENGTH, Opcode, Status, build_request, build_response
from epochlink.registers import MAGIC, register_map
from epochlink.boards.ulx3s import ULX3STop, ecp5_pll_parameters

PYTHON = sys.executable
VENV_BIN = os.path.dirname(sys.executable)


def run_cli(*args, timeout=1200):
    return subprocess.run([PYTHON, "-m", "epochlink.boards", *args], capture_output=True,
                          text=True, timeout=timeout)


# --- self-test core in simulation -----------------------------------------------------------

CLK_HZ = 16 * 115200          # UART divisor 16: a short simulation


class CoreHarness(Elaboratable):
    """SelfTestCore with every port's phy_tx looped to its phy_rx (one byte per 10 cycles),
    an error injector (XOR on the looped byte) and the host UART line exposed."""

    def __init__(self, ports):
        self.core = SelfTestCore(ports=ports, clk_hz=CLK_HZ)
        self.ports = ports
        self.corrupt = Signal(ports)

    def elaborate(self, platform):
        m = Module()
        m.submodules.core = core = self.core
        pace = Signal(range(10))
        m.d.sync += pace.eq(pace + 1)
        with m.If(pace == 9):
            m.d.sync += pace.eq(0)
        for p in range(self.ports):
            tx, rx = core.phy_tx[p], core.phy_rx[p]
            m.d.comb += tx.ready.eq(pace == 0)
            m.d.sync += [rx.valid.eq(tx.valid & tx.ready),
                         rx.payload.eq(tx.payload ^ self.corrupt[p])]
        return m


async def uart_send(ctx, line, byte, divisor=16):
    for bit in [0] + [(byte >> i) & 1 for i in range(8)] + [1]:
        ctx.set(line, bit)
        await ctx.tick().repeat(divisor)


def uart_decoder(line, text, divisor=16):
    """Background testbench: decode 8N1 characters on ``line`` into the list ``text``."""
    async def decoder(ctx):
        countdown, bits = None, []
        async for _, _, value in ctx.tick().sample(line):
            if countdown is None:
                if value == 0:                          # start bit: sample mid-bit from now
                    countdown, bits = divisor + divisor // 2 - 1, []
                continue
            countdown -= 1
            if countdown == 0:
                bits.append(value)
                countdown = divisor
                if len(bits) == 9:
                    assert bits[8] == 1, "stop bit"
                    text.append(chr(sum(b << i for i, b in enumerate(bits[:8]))))
                    countdown = None
    return decoder


def parse_report(text, ports):
    pattern = re.compile(r"P(\d) (UP  |DOWN) rx ([0-9a-f]{8}) bad ([0-9a-f]{8}) "
                         r"err ([0-9a-f]{8})\r\n")
    lines = pattern.findall(text)
    assert len(lines) == ports and "".join(
        f"P{p} {s} rx {r} bad {b} err {e}\r\n" for p, s, r, b, e in lines) == text, text
    return {int(p): {"up": s == "UP  ", "rx": int(r, 16), "bad": int(b, 16), "err": int(e, 16)}
            for p, s, r, b, e in lines}


def test_prbs_checker_locks_and_resyncs():
    gen, chk = PRBSGenerator(), PRBSChecker()
    results = []

    class Pair(Elaboratable):
        def elaborate(self, platform):
            m = Module()
            m.submodules.gen, m.submodules.chk = gen, chk
            return m

    async def bench(ctx):
        history = []
        for i in range(120):
            ctx.set(gen.o.ready, 1)
            byte = ctx.get(gen.o.payload)
            history.append(byte)
            if i == 60:
                byte ^= 0x10                   # one flipped bit
            if i == 90:
                await ctx.tick()
                continue                       # one dropped byte
            ctx.set(chk.i.valid, 1)
            ctx.set(chk.i.payload, byte)
            await ctx.tick()
            ctx.set(gen.o.ready, 0)
            ctx.set(chk.i.valid, 0)
            results.append((ctx.get(chk.good), ctx.get(chk.bad)))
        # PRBS-15: never two zero bytes in a row.
        assert all(a or b for a, b in zip(history, history[1:]))

    sim = Simulator(Pair())
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    bad = [i for i, (_, b) in enumerate(results) if b]
    # Two bytes to lock; the flipped byte and the two predicted from it; the byte after
    # the gap and the next one.
    assert bad[:2] == [0, 1]
    assert 1 <= len([i for i in bad if 60 <= i < 63]) <= 3
    assert 1 <= len([i for i in bad if 89 <= i < 93]) <= 2
    assert len(bad) <= 2 + 3 + 2
    assert all(good for good, _ in results[95:])


def test_selftest_core_report_and_clear():
    ports = 2
    dut = CoreHarness(ports)
    core = dut.core
    reports = []
    line_len = len(REPORT_LINE)

    async def bench(ctx):
        await ctx.tick().repeat(60 * 10)                      # ~60 bytes per port
        assert ctx.get(core.link_up) == 0b11
        # One corrupted byte on port 1: 1..3 bad bytes, link drops and comes back.
        ctx.set(dut.corrupt, 0b10)
        await ctx.tick().repeat(10)
        ctx.set(dut.corrupt, 0)
        await ctx.tick().repeat(30)
        assert ctx.get(core.link_up) == 0b01
        await ctx.tick().repeat(50 * 10)
        assert ctx.get(core.link_up) == 0b11

        for command in b"rcr":
            del text[:]
            await uart_send(ctx, core.uart_rx, command)
            for _ in range(100 * ports * line_len):
                if len(text) >= ports * line_len:
                    break
                await ctx.tick().repeat(16)
            await ctx.tick().repeat(40 * 16)
            reports.append(parse_report("".join(text), ports))

    text = []
    sim = Simulator(dut)
    sim.add_clock(1 / CLK_HZ)
    sim.add_testbench(bench)
    sim.add_testbench(uart_decoder(core.uart_tx, text), background=True)
    sim.run()

    first, cleared, after = reports
    for p in range(ports):
        assert first[p]["up"] and first[p]["rx"] > 100 and first[p]["err"] == 0
    assert first[0]["bad"] == 2                              # the two bytes before lock
    assert 3 <= first[1]["bad"] <= 5                         # + 1..3 for the corruption
    # "c" reports the counts it clears; the next report counts from zero again.
    assert cleared[0]["rx"] >= first[0]["rx"] and cleared[1]["bad"] == first[1]["bad"]
    assert after[0]["bad"] == 0 and after[1]["bad"] == 0
    assert 0 < after[0]["rx"] < cleared[0]["rx"]


# --- the integrated NIC core ----------------------------------------------------------------

NIC_CLK_HZ = 8e6              # host UART at 1 Mbaud: divisor 8


class NICPair(Elaboratable):
    """Two single-port NICCores (node ids 1 and 2) wired back to back at byte level,
    one byte per four cycles in each direction."""

    def __init__(self):
        self.a = NICCore(ports=1, clk_hz=NIC_CLK_HZ, node_id=1)
        self.b = NICCore(ports=1, clk_hz=NIC_CLK_HZ, node_id=2)
        self.connected = Signal(init=1)

    def elaborate(self, platform):
        m = Module()
        m.submodules.a, m.submodules.b = self.a, self.b
        pace = Signal(2)
        m.d.sync += pace.eq(pace + 1)
        for src, dst in ((self.a, self.b), (self.b, self.a)):
            tx, rx = src.phy_tx[0], dst.phy_rx[0]
            m.d.comb += tx.ready.eq(pace == 0)
            m.d.sync += [rx.valid.eq(tx.valid & tx.ready & self.connected),
                         rx.payload.eq(tx.payload)]
        return m


async def wait_for(ctx, condition, limit=100_000):
    """Tick until ``condition`` holds; fail (instead of hanging) after ``limit`` cycles."""
    for _ in range(limit // 16):
        if ctx.get(condition):
            return
        await ctx.tick().repeat(16)
    raise AssertionError(f"condition not reached within {limit} cycles")


async def host_access(ctx, core, text, tag, opcode, addr, data=None, divisor=8):
    """One host-protocol request on ``core``'s UART; returns (status, data)."""
    del text[:]
    for byte in build_request(tag, opcode, addr, data):
        await uart_send(ctx, core.uart_rx, byte, divisor)
    for _ in range(100 * RESPONSE_LENGTH):
        if len(text) >= RESPONSE_LENGTH:
            break
        await ctx.tick().repeat(divisor)
    assert len(text) >= RESPONSE_LENGTH, "no response from the host link"
    frame = bytes(ord(c) for c in text[:RESPONSE_LENGTH])
    assert frame == build_response(tag, frame[2], int.from_bytes(frame[3:7], "little"))
    return frame[2], int.from_bytes(frame[3:7], "little")


def test_nic_core_links_up_and_answers_the_host():
    dut = NICPair()
    text_a, text_b = [], []
    regs = register_map(1)

    async def bench(ctx):
        status, magic = await host_access(ctx, dut.a, text_a, 1, Opcode.READ,
                                          regs.address("MAGIC"))
        assert (status, magic) == (Status.OK, MAGIC)
        await wait_for(ctx, dut.a.link_up[0] & dut.b.link_up[0])
        for core, text, peer in ((dut.a, text_a, 2), (dut.b, text_b, 1)):
            assert await host_access(ctx, core, text, 2, Opcode.READ,
                                     regs.address("PORT0.PEER_ID")) == (Status.OK, peer)
            status, state = await host_access(ctx, core, text, 3, Opcode.READ,
                                              regs.address("PORT0.LINK_STATE"))
            assert status == Status.OK and state & 3 == LinkState.UP
        # Cut the wire: the link goes down and EVENTS.link_down is set.
        ctx.set(dut.connected, 0)
        await wait_for(ctx, ~dut.a.link_up[0])
        status, events = await host_access(ctx, dut.a, text_a, 4, Opcode.READ,
                                           regs.address("PORT0.EVENTS"))
        assert status == Status.OK and events & 1
        # Loopback on node a: its port talks to itself and comes up again.
        control = regs["PORT0.CONTROL"].register.encode(enable=1, loopback=1)
        assert (await host_access(ctx, dut.a, text_a, 5, Opcode.WRITE,
                                  regs.address("PORT0.CONTROL"), control))[0] == Status.OK
        await wait_for(ctx, dut.a.link_up[0])
        assert await host_access(ctx, dut.a, text_a, 6, Opcode.READ,
                                 regs.address("PORT0.PEER_ID")) == (Status.OK, 1)

    sim = Simulator(dut)
    sim.add_clock(1 / NIC_CLK_HZ)
    sim.add_testbench(bench)
    sim.add_testbench(uart_decoder(dut.a.uart_tx, text_a, 8), background=True)
    sim.add_testbench(uart_decoder(dut.b.uart_tx, text_b, 8), background=True)
    sim.run()


@pytest.mark.parametrize("top_class", [ICEBreakerTop, ULX3STop])
def test_nic_core_elaborates_in_board_tops(top_class):
    top = top_class(ports=1, core="nic")
    plan = top_class.make_platform().build(top, name="top", do_build=False)
    assert "top.il" in plan.files


# --- PLLs, pins, command line ---------------------------------------------------------------

def _tool_output(tool, *args, cwd=None):
    exe = os.path.join(VENV_BIN, tool)
    result = subprocess.run([exe, *args], capture_output=True, text=True, timeout=600, cwd=cwd)
    return result.stdout + result.stderr


@pytest.mark.parametrize("f_out", [48e6, 36e6, 60e6])
def test_ice40_pll_matches_icepll(f_out):
    ours = ice40_pll_parameters(12e6, f_out)
    assert ours["f_out"] == f_out
    text = _tool_output("yowasp-icepll", "-i", "12", "-o", f"{f_out / 1e6:g}")
    theirs = {key: int(value) for key, value in
              re.findall(r"^(DIVR|DIVF|DIVQ|FILTER_RANGE):\s+(\d+)", text, re.M)}
    assert theirs == {k: ours[k] for k in ("DIVR", "DIVF", "DIVQ", "FILTER_RANGE")}


@pytest.mark.parametrize("f_out", [125e6, 100e6])
def test_ecp5_pll_matches_ecppll(f_out, tmp_path):
    ours = ecp5_pll_parameters(25e6, f_out)
    assert ours["f_out"] == f_out
    out = tmp_path / "pll.v"
    # The WebAssembly tools only see the working directory: give a relative path.
    _tool_output("yowasp-ecppll", "-i", "25", "-o", f"{f_out / 1e6:g}", "-f", out.name,
                 cwd=tmp_path)
    theirs = {key: int(value) for key, value in
              re.findall(r"\.(CLKI_DIV|CLKFB_DIV|CLKOP_DIV|CLKOP_CPHASE)\((\d+)\)",
                         out.read_text())}
    assert theirs == {k: ours[k] for k in ("CLKI_DIV", "CLKFB_DIV", "CLKOP_DIV",
                                           "CLKOP_CPHASE")}


def test_icebreaker_pins():
    top = ICEBreakerTop(ports=8)
    plan = ICEBreakerTop.make_platform().build(top, name="top", do_build=False)
    pcf = plan.files["top.pcf"]
    # Port 0: PMOD1A pin 1 (FPGA 4) out, pin 7 (FPGA 3) in; port 7: PMOD1B pin 4 / pin 10.
    assert "set_io link_0__tx__io 4\n" in pcf and "set_io link_0__rx__io 3\n" in pcf
    assert "set_io link_7__tx__io 31\n" in pcf and "set_io link_7__rx__io 28\n" in pcf
    assert "set_io uart_0__rx__io 6\n" in pcf and "set_io uart_0__tx__io 9\n" in pcf
    pins = re.findall(r"^set_io \S+ (\d+)$", pcf, re.M)
    assert len(pins) == len(set(pins))


def test_ulx3s_pins():
    top = ULX3STop(ports=8)
    plan = ULX3STop.make_platform().build(top, name="top", do_build=False)
    lpf = plan.files["top.lpf"]
    assert 'LOCATE COMP "link_0__tx__io" SITE "B11";' in lpf      # GP0
    assert 'LOCATE COMP "link_0__rx__io" SITE "C11";' in lpf      # GN0
    assert 'LOCATE COMP "link_7__rx__io" SITE "B6";' in lpf       # GN7
    assert 'IOBUF PORT "link_0__rx__io" IO_TYPE=LVCMOS33 PULLMODE=UP;' in lpf
    sites = re.findall(r'SITE "(\w+)"', lpf)
    assert len(sites) == len(set(sites))


def test_port_count_and_rate_validation():
    with pytest.raises(ValueError):
        ICEBreakerTop(ports=9)
    with pytest.raises(ValueError):
        ULX3STop(ports=0)
    with pytest.raises(ValueError):
        ICEBreakerTop(ports=1, bit_rate=12.5e6)      # 48 MHz / 12.5 MHz is not an integer


def test_nextpnr_report_parsing():
    spec = BOARDS["icebreaker"]
    raw = {"utilization": {"ICESTORM_LC": {"used": 1000, "available": 5280},
                           "ICESTORM_RAM": {"used": 2, "available": 30},
                           "SB_IO": {"used": 10, "available": 96}},
           "fmax": {"clk": {"achieved": 47.5, "constraint": 48.0}}}
    report = parse_nextpnr_report(spec, raw, 48e6)
    assert (report["cells_used"], report["cells_total"], report["ram_used"],
            report["ram_total"]) == (1000, 5280, 2, 30)
    assert report["fits"] and not report["timing_met"] and report["fmax_mhz"] == 47.5
    raw["fmax"]["clk"]["achieved"] = 52.0
    raw["utilization"]["ICESTORM_LC"]["used"] = 6000
    report = parse_nextpnr_report(spec, raw, 48e6)
    assert report["timing_met"] and not report["fits"]


def test_critical_path_summary():
    def step(kind, delay, cell):
        return {"type": kind, "delay": delay, "from": {"cell": cell}, "to": {"cell": cell}}

    short = [step("clk-to-q", 0.5, "core.a_TRELLIS_FF_Q"), step("routing", 1.0, "x"),
             step("setup", 0.0, "core.b_TRELLIS_FF_Q_3")]
    worst = [step("clk-to-q", 5.8, "core.ram.0.0"), step("routing", 2.0, "n"),
             step("logic", 0.24, "core.c_LUT4_Z"),
             *[step("logic", 0.07, "core.c$CCU2_COMB0") for _ in range(4)],  # a carry chain
             step("routing", 0.5, "n"), step("logic", 0.45, "core.c_CCU2C_S0"),
             step("setup", 0.0, "core.staged_TRELLIS_FF_Q_1")]
    to_pin = [step("clk-to-q", 0.5, "led_TRELLIS_FF_Q"), step("routing", 12.0, "led")]
    clock = "posedge $glbnet$clk"
    raw = {"critical_paths": [{"from": clock, "to": clock, "path": short},
                              {"from": clock, "to": clock, "path": worst},
                              {"from": clock, "to": "<async>", "path": to_pin},
                              {"from": clock, "to": clock, "path": []}]}
    assert critical_path_summary(raw) == {
        "from": "core.ram.0.0", "to": "core.staged", "delay_ns": 9.27, "logic_ns": 6.77,
        "route_ns": 2.5, "logic_levels": 2}
    assert critical_path_summary({"critical_paths": []}) is None
    # a path to a pin only when there is nothing else
    assert critical_path_summary({"critical_paths": [raw["critical_paths"][2]]})["to"] == "led"
    assert parse_nextpnr_report(BOARDS["ulx3s-85f"], raw, 125e6)["critical_path"]["to"] == "core.staged"


def test_cli_unknown_board():
    result = run_cli("build", "de0-nano", timeout=120)
    assert result.returncode == 2
    assert "valid boards: icebreaker, ulx3s-85f" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("flash", "nope", timeout=120)
    assert result.returncode == 2 and "icebreaker" in result.stderr


def test_loader_failure_messages():
    spec = BOARDS["ulx3s-85f"]
    missing = ("openFPGALoader: error while loading shared libraries: libftdi1.so.2: cannot "
               "open shared object file: No such file or directory")
    assert "missing system library libftdi1.so.2" in _classify_loader_failure(spec, missing)
    nothing = "unable to open ftdi device: -3 (device not found)\nJTAG init failed"
    assert _classify_loader_failure(spec, nothing).startswith("no board found: plug in the ULX3S")
    denied = "unable to open ftdi device: -8 (inappropriate permissions on device!)"
    assert "udev" in _classify_loader_failure(spec, denied)


def test_cli_flash_without_bitstream(tmp_path):
    result = run_cli("flash", "icebreaker", "--bitstream", str(tmp_path / "missing.bin"),
                     timeout=120)
    assert result.returncode == 1
    assert "no bitstream" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(board_attached("icebreaker") or board_attached("ulx3s-85f"),
                    reason="a board is attached: would try to program it with a dummy file")
@pytest.mark.parametrize("board", ["icebreaker", "ulx3s-85f"])
def test_cli_flash_without_board(board, tmp_path):
    dummy = tmp_path / f"dummy.{BOARDS[board].bitstream_ext}"
    dummy.write_bytes(b"\xff" * 64)
    result = run_cli("flash", board, "--bitstream", str(dummy), timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    # Either the loader runs and finds no board, or it cannot start on this machine.
    assert ("no board found: plug in" in result.stderr
            or "missing system library" in result.stderr), result.stderr


# --- bitstreams -----------------------------------------------------------------------------

def _check_report(board, ports):
    report = json.loads((BOARDS[board].build_dir() / "report.json").read_text())
    for key in ("board", "ports", "cells_used", "cells_total", "ram_used", "ram_total",
                "fmax_mhz", "target_mhz"):
        assert key in report
    assert report["board"] == board and report["ports"] == ports
    assert 0 < report["cells_used"] <= report["cells_total"] and report["fits"]
    assert report["ram_used"] <= report["ram_total"]
    assert report["fmax_mhz"] >= report["target_mhz"] and report["timing_met"]
    assert os.path.getsize(report["bitstream"]) > 0
    return report


def test_icebreaker_bitstream():
    result = run_cli("build", "icebreaker", "--ports", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = _check_report("icebreaker", 2)
    assert report["target_mhz"] == 48 and report["cells_total"] == 5280
    assert report["placer_opts"] == ""      # nextpnr's defaults


@pytest.mark.slow
def test_ulx3s_bitstream():
    result = run_cli("build", "ulx3s-85f", "--ports", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = _check_report("ulx3s-85f", 2)
    assert report["target_mhz"] == 125
    # the placer options reached nextpnr
    placer_opts = BOARDS["ulx3s-85f"].placer_opts
    assert placer_opts and report["placer_opts"] == placer_opts
    assert placer_opts in (BOARDS["ulx3s-85f"].build_dir() / "build_top.sh").read_text()


# --- hardware in the loop -------------------------------------------------------------------

def _serial_port(board):
    if os.environ.get("EPOCHLINK_SERIAL"):
        return os.environ["EPOCHLINK_SERIAL"]
    from serial.tools import list_ports
    vid, pid = (int(x, 16) for x in BOARDS[board].usb_ids)
    ports = sorted(p.device for p in list_ports.comports() if p.vid == vid and p.pid == pid)
    # The FT2232H of the iCEBreaker: interface 0 programs, interface 1 is the UART.
    return ports[-1] if ports else None


@pytest.mark.hardware
@pytest.mark.parametrize("board", ["icebreaker", "ulx3s-85f"])
def test_hardware_selftest(board):
    """Flash the self-test design and read its report over the host UART. With
    EPOCHLINK_HW_LOOPBACK=1 (every port's TX wired to its own RX, or to a second board
    running the same design) the ports must be up and error free."""
    if not board_attached(board):
        pytest.skip(f"no {BOARDS[board].usb_name} attached")
    import serial

    if not os.path.exists(BOARDS[board].build_dir() / f"top.{BOARDS[board].bitstream_ext}"):
        assert run_cli("build", board).returncode == 0
    result = run_cli("flash", board, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    port = _serial_port(board)
    assert port, "board attached but no serial port found (set EPOCHLINK_SERIAL)"
    ports = json.loads((BOARDS[board].build_dir() / "report.json").read_text())["ports"]
    time.sleep(1.0)
    with serial.Serial(port, 115200, timeout=2) as uart:
        uart.reset_input_buffer()
        uart.write(b"c")                                   # clear, then measure for 1 s
        uart.read(ports * len(REPORT_LINE))
        time.sleep(1.0)
        uart.write(b"r")
        text = uart.read(ports * len(REPORT_LINE)).decode("ascii")
    report = parse_report(text, ports)
    if os.environ.get("EPOCHLINK_HW_LOOPBACK") == "1":
        for p, line in report.items():
            assert line["up"] and line["bad"] == 0 and line["err"] == 0, (p, line)
            assert line["rx"] > 0
