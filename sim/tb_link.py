"""cocotb testbench for :class:`~epochlink.sim.link_pair.LinkPair` under Verilator.

Parameters come as JSON in ``EPOCHLINK_TB_CONFIG``; measured results are written as JSON
to ``EPOCHLINK_TB_RESULT``. Queue-based source and sink models drive engine A's input and
drain engine B's output; a scoreboard checks the delivered stream against what was sent
and, at every fault, classifies each in-flight transfer by phase and checks its outcome
against the contract table in ``docs/link.md``.
"""
from __future__ import annotations

import json
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge, Timer

from epochlink.hdl.channel import ber_to_threshold
from epochlink.hdl.frame import LinkState

CLOCK_NS = 10


def config() -> dict:
    return json.loads(os.environ.get("EPOCHLINK_TB_CONFIG", "{}"))


def write_result(result: dict) -> None:
    path = os.environ.get("EPOCHLINK_TB_RESULT")
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def sig(dut, name):
    return getattr(dut, name)


def status(dut, node, name) -> int:
    return int(sig(dut, f"{node}_status__{name}").value)


async def reset(dut, cycles=4):
    dut.rst.value = 1
    await ClockCycles(dut.clk, cycles)
    dut.rst.value = 0


def configure_channels(dut, cfg):
    for direction in ("ab", "ba"):
        sig(dut, f"{direction}_error_threshold").value = ber_to_threshold(cfg.get("ber", 0.0))
        sig(dut, f"{direction}_burst_threshold").value = int(cfg.get("burst_probability", 0.0) * 2**32)
        sig(dut, f"{direction}_burst_length").value = cfg.get("burst_length", 0)
        sig(dut, f"{direction}_cut").value = 0
    # Top-level inputs have no reset values in Verilog: drive every one of them.
    for node, node_id in (("a", 0xA), ("b", 0xB)):
        sig(dut, f"{node}_node_id").value = node_id
        sig(dut, f"{node}_enable").value = 1
        sig(dut, f"{node}_ver_min").value = cfg.get(f"{node}_ver_min", 1)
        sig(dut, f"{node}_ver_max").value = cfg.get(f"{node}_ver_max", 1)
        sig(dut, f"{node}_rst").value = 0
        sig(dut, f"{node}_in__valid").value = 0
        sig(dut, f"{node}_ctrl_in__valid").value = 0
        sig(dut, f"{node}_out__ready").value = 1
        sig(dut, f"{node}_ctrl_out__ready").value = 1
    dut.use_generator.value = 0
    dut.gen_enable.value = 0


@dataclass
class Message:
    ident: int
    data: bytes
    seq: int = -1            #: sequence number engine A gave it (set when accepted)
    incarnation: int = 0     #: A's incarnation that accepted it


class MessageSource:
    """Offers messages on ``<prefix>__valid/payload``; records when each is accepted."""

    def __init__(self, dut, prefix, node):
        self.dut, self.node = dut, node
        self.valid = sig(dut, f"{prefix}__valid")
        self.ready = sig(dut, f"{prefix}__ready")
        self.payload = sig(dut, f"{prefix}__payload")
        self.queue: deque[Message] = deque()
        self.accepted: list[Message] = []
        self.incarnation = 0
        self.valid.value = 0
        self._current: Message | None = None
        self._index = 0

    def abort_current(self):
        """The node was reset: the message it was taking in is gone; offer it anew."""
        if self._current is not None:
            self.queue.appendleft(self._current)
        self._current, self._index = None, 0
        self.valid.value = 0
        self.incarnation += 1

    def _drive(self):
        if self._current is None and self.queue:
            self._current, self._index = self.queue.popleft(), 0
        if self._current is None:
            self.valid.value = 0
            return
        data = self._current.data
        self.payload.value = data[self._index] | (int(self._index == len(data) - 1) << 8)
        self.valid.value = 1

    async def run(self):
        self._drive()
        while True:
            await RisingEdge(self.dut.clk)
            if int(self.valid.value) and int(self.ready.value):
                msg = self._current
                if self._index == len(msg.data) - 1:
                    msg.seq = status(self.dut, self.node, "tx_next")
                    msg.incarnation = self.incarnation
                    self.accepted.append(msg)
                    self._current = None
                else:
                    self._index += 1
            self._drive()


class MessageSink:
    """Drains ``<prefix>__valid/payload`` (optionally with random backpressure)."""

    def __init__(self, dut, prefix, backpressure=0.0, rng=None):
        self.dut = dut
        self.valid = sig(dut, f"{prefix}__valid")
        self.ready = sig(dut, f"{prefix}__ready")
        self.payload = sig(dut, f"{prefix}__payload")
        self.backpressure = backpressure
        self.rng = rng or random.Random(1)
        self.messages: list[bytes] = []
        self.current = bytearray()
        self.drops = 0          # messages withdrawn by the link after some of their bytes
        self.ready.value = 1
        self.resetting = False

    def abort_current(self):
        """The node is being reset: a partly delivered message is void."""
        self.current = bytearray()
        self.resetting = True
        self.ready.value = 0

    def reset_done(self):
        self.resetting = False
        self.ready.value = 1

    async def run(self):
        while True:
            await RisingEdge(self.dut.clk)
            if self.resetting:
                continue
            if int(self.valid.value) and int(self.ready.value):
                word = int(self.payload.value)
                if word >> 9 & 1:
                    # drop: the message streamed so far was withdrawn (its frame failed)
                    self.drops += 1
                    self.current = bytearray()
                else:
                    self.current.append(word & 0xFF)
                    if word >> 8 & 1:
                        self.messages.append(bytes(self.current))
                        self.current = bytearray()
            if self.backpressure:
                self.ready.value = int(self.rng.random() >= self.backpressure)


def make_messages(rng, count, min_len, max_len, start=0):
    messages = []
    for i in range(start, start + count):
        length = rng.randint(max(min_len, 4), max(max_len, 4))
        messages.append(Message(i, i.to_bytes(4, "little") + bytes(rng.randrange(256) for _ in range(length - 4))))
    return messages


def seq_in(seq, lo, hi):
    """``seq`` in the half-open range [lo, hi) of sequence space (mod 256)."""
    return (seq - lo) % 256 < (hi - lo) % 256


@dataclass
class Scoreboard:
    """What the contract allows for each message of one direction (``sender`` to
    ``receiver``), from the faults seen so far."""
    sender: str = "a"
    receiver: str = "b"
    may_duplicate: set = field(default_factory=set)   # committed at A, not freed, at a B reset
    may_lose: set = field(default_factory=set)        # held by A, not committed at B, at an A reset
    must_deliver: set = field(default_factory=set)    # committed at B at an A reset
    events: list = field(default_factory=list)

    def in_flight(self, source: MessageSource, dut):
        current = [m for m in source.accepted if m.incarnation == source.incarnation]
        n = status(dut, self.sender, "in_flight")
        return current[len(current) - n:] if n else []

    def on_reset_receiver(self, dut, source, cycle):
        tx_free, tx_commit = status(dut, self.sender, "tx_free"), status(dut, self.sender, "tx_commit")
        held = self.in_flight(source, dut)
        dup = [m.ident for m in held if seq_in(m.seq, tx_free, tx_commit)]
        self.may_duplicate.update(dup)
        self.events.append({"cycle": cycle, "fault": f"reset_{self.receiver}", "in_flight": len(held),
                            "committed_not_freed": len(dup)})

    def on_reset_sender(self, dut, source, delivered_idents, cycle):
        rx_next, rx_commit = status(dut, self.receiver, "rx_next"), status(dut, self.receiver, "rx_commit")
        held = [m for m in self.in_flight(source, dut) if m.ident not in delivered_idents]
        committed = [m.ident for m in held if seq_in(m.seq, rx_next, rx_commit)]
        tentative = [m.ident for m in held if m.ident not in committed]
        self.must_deliver.update(committed)
        self.may_lose.update(tentative)
        self.events.append({"cycle": cycle, "fault": f"reset_{self.sender}", "in_flight": len(held),
                            "committed_at_b": len(committed), "tentative": len(tentative)})

    def check(self, sent: list[Message], delivered: list[bytes]):
        by_ident = {m.ident: m for m in sent}
        counts: dict[int, int] = {}
        last = -1
        for data in delivered:
            ident = int.from_bytes(data[:4], "little")
            assert ident in by_ident, f"delivered a message never sent: {data[:16].hex()}"
            assert by_ident[ident].data == data, f"message {ident} corrupted"
            counts[ident] = counts.get(ident, 0) + 1
            if counts[ident] > 1:
                assert ident in self.may_duplicate, f"message {ident} delivered twice"
            else:
                assert ident > last, f"message {ident} delivered after {last}: reordered"
                last = ident
        for m in sent:
            n = counts.get(m.ident, 0)
            if m.ident in self.must_deliver:
                assert n >= 1, f"message {m.ident} was committed at B when A reset, but never delivered"
            if n == 0:
                assert m.ident in self.may_lose, f"message {m.ident} lost"
        return counts


async def inject_faults(dut, cfg, rng, directions, until_cycle):
    """Cuts and node resets at random times, until ``until_cycle``.

    ``directions``: (source, sink, scoreboard) per traffic direction; the first is A->B.
    """
    scoreboard = directions[0][2]
    cuts, resets = cfg.get("cuts", 0), cfg.get("resets", [])
    if not cuts and not resets:
        return
    faults = ["cut"] * cuts + list(resets)
    rng.shuffle(faults)
    spacing = until_cycle // (len(faults) + 1)
    for fault in faults:
        await ClockCycles(dut.clk, rng.randint(spacing // 2, spacing))
        # Act after every coroutine woken by this edge has sampled it, so source and sink
        # see the fault between two edges.
        await Timer(1, unit="ns")
        cycle = int(dut.cycle.value)
        if fault == "cut":
            direction = rng.choice(["ab", "ba", "both"])
            length = rng.randint(*cfg.get("cut_cycles", (200, 3000)))
            for d in (["ab", "ba"] if direction == "both" else [direction]):
                sig(dut, f"{d}_cut").value = 1
            scoreboard.events.append({"cycle": cycle, "fault": f"cut_{direction}", "cycles": length})
            await ClockCycles(dut.clk, length)
            dut.ab_cut.value = 0
            dut.ba_cut.value = 0
        else:
            node = fault[-1]
            for source, sink, board in directions:
                if board.sender == node:
                    delivered = {int.from_bytes(d[:4], "little") for d in sink.messages}
                    board.on_reset_sender(dut, source, delivered, cycle)
                    source.abort_current()
                else:
                    board.on_reset_receiver(dut, source, cycle)
                    sink.abort_current()
            sig(dut, f"{node}_rst").value = 1
            await ClockCycles(dut.clk, 3)
            sig(dut, f"{node}_rst").value = 0
            for source, sink, board in directions:
                if board.receiver == node:
                    sink.reset_done()


@cocotb.test()
async def stream_integrity(dut):
    """Messages A->B through noisy channels, cuts and resets: the scoreboard must agree."""
    cfg = config()
    rng = random.Random(cfg.get("seed", 1))
    cocotb.start_soon(Clock(dut.clk, CLOCK_NS, unit="ns").start())
    configure_channels(dut, cfg)
    dut.use_generator.value = 0
    dut.a_rst.value = 0
    dut.b_rst.value = 0
    source = MessageSource(dut, "a_in", "a")
    sink = MessageSink(dut, "b_out", cfg.get("backpressure", 0.0), rng)
    # B->A traffic too, when asked, so both directions carry data and signals at once.
    reverse_source = MessageSource(dut, "b_in", "b")
    reverse_sink = MessageSink(dut, "a_out")
    await reset(dut)
    messages = make_messages(rng, cfg.get("messages", 200), cfg.get("min_length", 4), cfg.get("max_length", 64))
    source.queue.extend(messages)
    cocotb.start_soon(source.run())
    cocotb.start_soon(sink.run())
    if cfg.get("bidirectional"):
        reverse_source.queue.extend(make_messages(rng, cfg.get("messages", 200), 4, cfg.get("max_length", 64), 1 << 20))
        cocotb.start_soon(reverse_source.run())
        cocotb.start_soon(reverse_sink.run())

    scoreboard = Scoreboard("a", "b")
    reverse_scoreboard = Scoreboard("b", "a")
    directions = [(source, sink, scoreboard)]
    if cfg.get("bidirectional"):
        directions.append((reverse_source, reverse_sink, reverse_scoreboard))
    await inject_faults(dut, cfg, rng, directions, cfg.get("fault_cycles", 60000))

    # Faults have stopped: liveness. Everything offered must be taken in, delivered and freed.
    limit = cfg.get("max_cycles", 400000)
    def settled():
        return (not source.queue and source._current is None
                and status(dut, "a", "in_flight") == 0 and status(dut, "b", "in_flight") == 0
                and int(dut.a_status__state.value) == LinkState.UP
                and int(dut.b_status__state.value) == LinkState.UP
                and (not cfg.get("bidirectional") or not reverse_source.queue))
    while not settled():
        await ClockCycles(dut.clk, 500)
        assert int(dut.cycle.value) < limit, (
            f"not settled after {limit} cycles: {len(sink.messages)} delivered of "
            f"{len(messages)}, A in flight {status(dut, 'a', 'in_flight')}, states "
            f"{int(dut.a_status__state.value)}/{int(dut.b_status__state.value)}")
    await ClockCycles(dut.clk, 200)

    counts = scoreboard.check(source.accepted, sink.messages)
    if cfg.get("bidirectional"):
        reverse_scoreboard.check(reverse_source.accepted, reverse_sink.messages)
    counters = {f"{node}_{name}": status(dut, node, name) for node in ("a", "b")
                for name in ("frames_tx", "frames_rx", "crc_errors", "framing_errors", "malformed",
                             "duplicates", "retransmits", "aborts", "link_downs", "delivered")}
    result = {
        "cycles": int(dut.cycle.value),
        "sent": len(source.accepted),
        "delivered": len(sink.messages),
        "duplicated": sum(1 for n in counts.values() if n > 1),
        "lost_by_contract": sum(1 for m in source.accepted if m.ident not in counts),
        "bits_flipped": int(dut.ab_bits_flipped.value) + int(dut.ba_bits_flipped.value),
        "events": scoreboard.events,
        **counters,
    }
    dut._log.info("result: %s", json.dumps({k: v for k, v in result.items() if k != "events"}))
    write_result(result)
    if not cfg.get("resets"):
        assert len(sink.messages) == len(messages), "every message exactly once"
    wire_bytes = int(dut.ab_bytes_in.value) + int(dut.ba_bytes_in.value)
    expected_events = wire_bytes * (8 * cfg.get("ber", 0) + cfg.get("burst_probability", 0))
    if expected_events >= 10:
        assert result["bits_flipped"] > 0, f"the channel injected no errors (expected ~{expected_events:.0f})"


@cocotb.test()
async def generator_run(dut):
    """In-design traffic for a fixed number of cycles: goodput and error counters."""
    cfg = config()
    cocotb.start_soon(Clock(dut.clk, CLOCK_NS, unit="ns").start())
    configure_channels(dut, cfg)
    dut.use_generator.value = 1
    dut.b_out__ready.value = 1
    dut.gen_min_length.value = cfg.get("min_length", 64)
    dut.gen_max_length.value = cfg.get("max_length", 64)
    dut.gen_count.value = 0
    dut.gen_enable.value = 0
    await reset(dut)
    # Wait for the link to come up, then measure over a window of cycles.
    while int(dut.b_status__state.value) != LinkState.UP or int(dut.a_status__state.value) != LinkState.UP:
        await ClockCycles(dut.clk, 100)
    dut.gen_enable.value = 1
    await ClockCycles(dut.clk, cfg.get("warmup_cycles", 2000))
    start = {"cycle": int(dut.cycle.value), "bytes": int(dut.chk_bytes.value),
             "received": int(dut.chk_received.value)}
    wall = time.perf_counter()
    await Timer(cfg.get("cycles", 100000) * CLOCK_NS, unit="ns")
    wall = time.perf_counter() - wall
    end = {"cycle": int(dut.cycle.value), "bytes": int(dut.chk_bytes.value),
           "received": int(dut.chk_received.value)}
    cycles = end["cycle"] - start["cycle"]
    result = {
        "cycles": cycles,
        "payload_bytes": end["bytes"] - start["bytes"],
        "messages": end["received"] - start["received"],
        "goodput": (end["bytes"] - start["bytes"]) / cycles,
        "cycles_per_s": cycles / wall,
        "errors_sequence": int(dut.chk_errors_sequence.value),
        "errors_content": int(dut.chk_errors_content.value),
        "bytes_on_wire": int(dut.ab_bytes_in.value),
        **{f"{node}_{name}": status(dut, node, name) for node in ("a", "b")
           for name in ("frames_tx", "frames_rx", "crc_errors", "framing_errors", "retransmits", "link_downs",
                        "malformed")},
    }
    dut._log.info("result: %s", json.dumps(result))
    write_result(result)
    assert result["errors_sequence"] == 0 and result["errors_content"] == 0


@cocotb.test()
async def idle_latency(dut):
    """One transfer on an idle link: cycles to delivery at B and to release at A."""
    cfg = config()
    cocotb.start_soon(Clock(dut.clk, CLOCK_NS, unit="ns").start())
    configure_channels(dut, {})
    dut.use_generator.value = 0
    dut.b_out__ready.value = 1
    dut.a_in__valid.value = 0
    await reset(dut)
    while int(dut.b_status__state.value) != LinkState.UP or int(dut.a_status__state.value) != LinkState.UP:
        await ClockCycles(dut.clk, 100)
    await ClockCycles(dut.clk, 400)
    # One-way delay of a minimal (SIGNAL heartbeat) frame: from the cycle engine A starts
    # it to the cycle engine B accepts it, on an otherwise idle link.
    one_way = []
    for _ in range(4):
        sent = status(dut, "a", "frames_tx")
        while status(dut, "a", "frames_tx") == sent:
            await RisingEdge(dut.clk)
        start, received = int(dut.cycle.value), status(dut, "b", "frames_rx")
        while status(dut, "b", "frames_rx") == received:
            await RisingEdge(dut.clk)
        one_way.append(int(dut.cycle.value) - start)
    length = cfg.get("length", 4)
    samples = []
    for trial in range(cfg.get("trials", 8)):
        # Wait for a quiet moment (no frame on either wire), then offer one message.
        while int(dut.a_status__in_flight.value):
            await RisingEdge(dut.clk)
        data = bytes([trial]) * length
        for i, byte in enumerate(data):
            dut.a_in__payload.value = byte | (int(i == length - 1) << 8)
            dut.a_in__valid.value = 1
            await RisingEdge(dut.clk)
            while not int(dut.a_in__ready.value):
                await RisingEdge(dut.clk)
        start = int(dut.cycle.value)        # the last byte is accepted at this edge
        dut.a_in__valid.value = 0
        delivered = released = None
        while released is None:
            await RisingEdge(dut.clk)
            now = int(dut.cycle.value)
            if delivered is None and int(dut.b_out__valid.value) and (int(dut.b_out__payload.value) >> 8):
                delivered = now - start
            if delivered is not None and int(dut.a_status__in_flight.value) == 0:
                released = now - start
        samples.append((delivered, released))
        await ClockCycles(dut.clk, 300)
    write_result({"samples": samples, "one_way": one_way})
    dut._log.info("latency samples (delivery, release): %s", samples)
