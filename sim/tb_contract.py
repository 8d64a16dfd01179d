"""Drive one transfer into each phase of the contract, inject each fault, record the outcome.

For both transfer classes (payload: ``a_in`` -> ``b_out``; control: ``a_ctrl_in`` ->
``b_ctrl_out``) and every (phase, fault) cell of :data:`epochlink.hdl.contract.PHASES` this testbench
steers a real :class:`~epochlink.sim.link_pair.LinkPair` with channel cuts timed on the
engines' own cursors, so the transfer is held in exactly that phase, then cuts the link or
resets a node, lets the link recover, and counts how often the message came out of B.
Measured outcomes go to ``EPOCHLINK_TB_RESULT`` (JSON, one entry per cell); the pytest
side compares them with the table.
"""
from __future__ import annotations

import json
import os

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge, Timer

from epochlink.hdl.contract import CLASSES, FAULTS, NEVER, ONCE, PHASES, TWICE
from epochlink.hdl.frame import LinkState
from epochlink.sim.tb_link import CLOCK_NS, Message, MessageSink, MessageSource, configure_channels, status

async def start(dut):
    cocotb.start_soon(Clock(dut.clk, CLOCK_NS, unit="ns").start())
    configure_channels(dut, {})
    dut.rst.value = 1
    await ClockCycles(dut.clk, 4)
    dut.rst.value = 0
    await wait_up(dut)


async def wait_up(dut, limit=50000):
    for _ in range(limit // 50):
        if (int(dut.a_status__state.value) == LinkState.UP and int(dut.b_status__state.value) == LinkState.UP):
            return
        await ClockCycles(dut.clk, 50)
    raise AssertionError("link did not come up")


async def wait_for(dut, predicate, what, limit=20000):
    for _ in range(limit):
        await RisingEdge(dut.clk)
        if predicate():
            await Timer(1, unit="ns")   # act between edges, after the samplers have run
            return
    raise AssertionError(f"timed out waiting for {what}")


def record(cell, result):
    path = os.environ.get("EPOCHLINK_TB_RESULT")
    if not path:
        return
    results = json.loads(open(path).read()) if os.path.exists(path) else {}
    results[cell] = result
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


def cell_name(klass, phase, fault):
    return f"{phase}/{fault}" if klass == "payload" else f"{klass}:{phase}/{fault}"


@cocotb.test()
@cocotb.parametrize(klass=list(CLASSES), phase=[p.name for p in PHASES], fault=list(FAULTS))
async def contract_cell(dut, klass, phase, fault):
    await start(dut)
    ctrl = klass == "ctrl"
    source = MessageSource(dut, "a_ctrl_in" if ctrl else "a_in", "a")
    sink = MessageSink(dut, "b_ctrl_out" if ctrl else "b_out")
    cocotb.start_soon(source.run())
    cocotb.start_soon(sink.run())
    ident = 0xC0DE0000 + len(sink.messages)
    message = ident.to_bytes(4, "little") + b"contract"
    seq = status(dut, "a", "tx_next")
    a_cut, b_cut = dut.ab_cut, dut.ba_cut

    # Steer the transfer into the phase.
    if phase == "SENT":
        a_cut.value = 1
    elif phase == "TENTATIVE":
        b_cut.value = 1
    source.queue.append(Message(ident, message))
    if phase in ("SENT", "TENTATIVE"):
        await wait_for(dut, lambda: bool(source.accepted), "the message to be taken in")
        await ClockCycles(dut.clk, 300)    # DATA crossed (or died on) the wire
    elif phase == "REFLECTED":
        await wait_for(dut, lambda: status(dut, "a", "tx_commit") == (seq + 1) % 256, "A to see the REFLECT")
        a_cut.value = 1                   # the commit cursor never reaches B
        await ClockCycles(dut.clk, 300)
    elif phase == "DELIVERED":
        await wait_for(dut, lambda: status(dut, "b", "rx_next") == (seq + 1) % 256, "B to deliver")
        b_cut.value = 1                   # the delivery cursor never reaches A
        await ClockCycles(dut.clk, 300)
    elif phase == "FREED":
        await wait_for(dut, lambda: source.accepted and status(dut, "a", "in_flight") == 0, "A to free its copy")

    held_by_a = status(dut, "a", "in_flight")
    delivered_before = len(sink.messages)
    expected_held = {"SENT": 1, "TENTATIVE": 1, "REFLECTED": 1, "DELIVERED": 1, "FREED": 0}[phase]
    # (the control class is delivered at its first intact arrival)
    expected_delivered = 1 if phase in ("DELIVERED", "FREED") or (ctrl and phase != "SENT") else 0
    assert held_by_a == expected_held and delivered_before == expected_delivered, (
        f"could not hold the transfer in {phase}: A holds {held_by_a}, B delivered {delivered_before}")

    # The fault.
    if fault == "cut":
        a_cut.value = 1
        b_cut.value = 1
        await ClockCycles(dut.clk, 3000)  # longer than dead_cycles: both sides go DOWN
        assert int(dut.a_status__state.value) != LinkState.UP and int(dut.b_status__state.value) != LinkState.UP
    elif fault == "reset_a":
        dut.a_rst.value = 1
        await ClockCycles(dut.clk, 3)
        dut.a_rst.value = 0
    elif fault == "reset_b":
        dut.b_rst.value = 1
        sink.abort_current()
        await ClockCycles(dut.clk, 3)
        dut.b_rst.value = 0
        sink.reset_done()
    a_cut.value = 0
    b_cut.value = 0

    # Recovery: the link comes back and settles.
    await wait_up(dut)
    await wait_for(dut, lambda: status(dut, "a", "in_flight") == 0, "A to settle")
    await ClockCycles(dut.clk, 500)
    count = sum(1 for m in sink.messages if m == message)
    outcome = {0: NEVER, 1: ONCE, 2: TWICE}.get(count, f"{count} times")
    record(cell_name(klass, phase, fault), {"outcome": outcome, "a_held_at_fault": held_by_a,
                                "b_delivered_at_fault": delivered_before,
                                "a_aborts": status(dut, "a", "aborts"),
                                "a_link_downs": status(dut, "a", "link_downs"),
                                "b_link_downs": status(dut, "b", "link_downs")})
    expected = next(p for p in PHASES if p.name == phase).outcomes(klass)[fault]
    assert outcome == expected, f"{klass} {phase} + {fault}: {outcome}, contract says {expected}"
