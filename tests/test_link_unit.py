"""Unit tests of one LinkEngine in Amaranth's simulator, against a scripted Python peer.

The peer speaks the frame format from :mod:`epochlink.hdl.frame` (the software reference
for CRC-32 and the digest), so every frame the engine sends is decoded and checked, and
every state-machine transition is driven by frames the test writes byte by byte.
"""
import pytest
from amaranth.sim import Simulator

from epochlink.hdl.frame import (Frame, FrameType, Hello, LinkState, FLAG_CTRL, FLAG_PROBE,
                                 HELLO_FRESH, HELLO_PEER_SEEN, SYNC, encode, decode, crc32)
from epochlink.hdl.link import LinkEngine

WINDOW, MAXP = 4, 16
TIMING = dict(hello_cycles=60, idle_cycles=50, dead_cycles=400, retx_cycles=150)


class Peer:
    """Scripted far end: writes frames into the engine's phy_rx, decodes its phy_tx."""

    def __init__(self, dut, ctx):
        self.dut, self.ctx = dut, ctx
        self.rx_bytes = bytearray()
        self.frames = []
        self.cycle = 0
        self.hello_cycles = []     # cycle at which each HELLO from the engine was complete
        self.collectors = []       # output streams sampled on every tick

    def watch(self, port):
        """Collect the messages the engine delivers on ``port`` while this peer ticks."""
        collector = Collector(self.ctx, port)
        self.collectors.append(collector)
        return collector

    async def tick(self, n=1):
        for _ in range(n):
            for collector in self.collectors:
                collector.sample()
            if self.ctx.get(self.dut.phy_tx.valid):
                self.rx_bytes.append(self.ctx.get(self.dut.phy_tx.payload))
                self._parse()
            await self.ctx.tick()
            self.cycle += 1

    def _parse(self):
        buf = self.rx_bytes
        while len(buf) >= 5:
            if tuple(buf[:2]) != SYNC:
                raise AssertionError(f"engine sent bytes outside a frame: {bytes(buf[:8]).hex()}")
            total = 5 + buf[4] + 6
            if len(buf) < total:
                return
            self.frames.append(decode(bytes(buf[:total])))   # raises on a bad FCS
            if self.frames[-1].type == FrameType.HELLO:
                self.hello_cycles.append(self.cycle)
            del buf[:total]

    async def send(self, wire: bytes, gap=0):
        for byte in wire:
            self.ctx.set(self.dut.phy_rx.valid, 1)
            self.ctx.set(self.dut.phy_rx.payload, byte)
            await self.tick()
            for _ in range(gap):
                self.ctx.set(self.dut.phy_rx.valid, 0)
                await self.tick()
        self.ctx.set(self.dut.phy_rx.valid, 0)

    async def send_frame(self, frame: Frame):
        await self.send(encode(frame))

    async def wait_for(self, predicate, timeout=2000):
        for _ in range(timeout):
            for i, frame in enumerate(self.frames):
                if predicate(frame):
                    del self.frames[:i + 1]
                    return frame
            await self.tick()
        raise AssertionError(f"timed out; frames seen: {self.frames}")

    def state(self):
        return LinkState(self.ctx.get(self.dut.status.state))

    def counter(self, name):
        return self.ctx.get(getattr(self.dut.status, name))

    async def bring_up(self, node_id=0x77, tx_base=0, rx_commit=0, fresh=True):
        """Complete the HELLO exchange as a (by default freshly reset) peer."""
        flags = HELLO_FRESH if fresh else 0
        hello = await self.wait_for(lambda f: f.type == FrameType.HELLO)
        await self.send_frame(Frame(FrameType.HELLO, payload=Hello(node_id, 1, 1, flags, tx_base, rx_commit).encode()))
        await self.wait_for(lambda f: f.type == FrameType.HELLO and Hello.decode(f.payload).flags & HELLO_PEER_SEEN)
        await self.send_frame(Frame(FrameType.HELLO, payload=Hello(node_id, 1, 1, flags | HELLO_PEER_SEEN, tx_base, rx_commit).encode()))
        await self.tick(5)
        assert self.state() == LinkState.UP
        return Hello.decode(hello.payload)


def watch_buffers(sim, dut, excused_reads=None):
    """Fail the test if a buffer without collision logic is read at an address in the cycle
    it is written, unless the engine says that read is harmless (a poisoned cut-through
    frame's).

    Those buffers are synthesized with ``no_rw_check``, so such a read would return what the
    block RAM happens to give (``LinkEngine.buf_access``). Harmless ones are counted in
    ``excused_reads[name]`` if given.
    """
    async def watcher(ctx):
        access = dut.buf_access     # (set when the simulator elaborates the engine)
        names = list(access)
        signals = [signal for name in names for signal in access[name]]
        async for _, _, *values in ctx.tick().sample(*signals):
            for k, name in enumerate(names):
                we, waddr, re, raddr, excused = values[5 * k:5 * k + 5]
                assert not (we and re and waddr == raddr) or excused, \
                    f"{name} read and written at address {waddr} in one cycle"
                if we and re and waddr == raddr and excused_reads is not None:
                    excused_reads[name] = excused_reads.get(name, 0) + 1
    sim.add_testbench(watcher, background=True)


def run(testbench, **engine_args):
    dut = LinkEngine(**{"window": WINDOW, "max_payload": MAXP, **TIMING, **engine_args})
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    watch_buffers(sim, dut)
    result = {}

    async def bench(ctx):
        ctx.set(dut.node_id, 0x1234)
        ctx.set(dut.payload_out.ready, 1)
        ctx.set(dut.ctrl_out.ready, 1)
        ctx.set(dut.phy_tx.ready, 1)
        result["value"] = await testbench(dut, ctx, Peer(dut, ctx))
    sim.add_testbench(bench)
    sim.run()
    return result.get("value")


async def push_message(peer, port, data: bytes):
    """Offer one message on an input stream, ticking through the peer (which samples phy_tx)."""
    ctx = peer.ctx
    for i, byte in enumerate(data):
        ctx.set(port.valid, 1)
        ctx.set(port.payload, {"data": byte, "last": i == len(data) - 1})
        while True:
            ready = ctx.get(port.ready)
            await peer.tick()
            if ready:
                break
    ctx.set(port.valid, 0)


class Collector:
    """Collects messages from an output stream while the peer ticks."""
    def __init__(self, ctx, port):
        self.ctx, self.port, self.messages, self.current = ctx, port, [], bytearray()
        self.drops = 0

    def sample(self):
        if self.ctx.get(self.port.valid) and self.ctx.get(self.port.ready):
            p = self.ctx.get(self.port.payload)
            if getattr(p, "drop", 0):
                # the link withdrew the message streamed so far (its frame failed)
                self.drops += 1
                self.current = bytearray()
                return
            self.current.append(p.data)
            if p.last:
                self.messages.append(bytes(self.current))
                self.current = bytearray()


def test_hello_exchange_and_state_transitions():
    async def bench(dut, ctx, peer):
        assert peer.state() == LinkState.DOWN
        hello = await peer.bring_up(node_id=0x77)
        assert hello.node_id == 0x1234 and hello.flags & HELLO_FRESH
        assert ctx.get(dut.status.peer_id) == 0x77
        assert ctx.get(dut.status.version) == 1
        # UP: an idle engine sends heartbeats.
        await peer.wait_for(lambda f: f.type == FrameType.SIGNAL, timeout=200)
        # Silence: the engine declares the link DOWN after dead_cycles and sends HELLOs
        # that are no longer FRESH.
        await peer.tick(TIMING["dead_cycles"] + 10)
        assert peer.state() == LinkState.DOWN
        assert peer.counter("link_downs") == 1
        hello = await peer.wait_for(lambda f: f.type == FrameType.HELLO)
        assert not Hello.decode(hello.payload).flags & HELLO_FRESH
        # A HELLO from the peer moves it to INIT, a confirmed one back to UP.
        await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(0x77, 1, 1, 0, 0, 0).encode()))
        await peer.tick(3)
        assert peer.state() == LinkState.INIT
        await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(0x77, 1, 1, HELLO_PEER_SEEN, 0, 0).encode()))
        await peer.tick(3)
        assert peer.state() == LinkState.UP
        # UP, and the peer says it has not seen us (it restarted): back to INIT at once.
        await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(0x77, 1, 1, HELLO_FRESH, 0, 0).encode()))
        await peer.tick(3)
        assert peer.state() == LinkState.INIT
        assert peer.counter("link_downs") == 2
    run(bench)


def test_incompatible_versions_keep_link_down():
    async def bench(dut, ctx, peer):
        ctx.set(dut.ver_min, 2)
        ctx.set(dut.ver_max, 3)
        await peer.wait_for(lambda f: f.type == FrameType.HELLO)
        await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(9, 4, 5, HELLO_PEER_SEEN, 0, 0).encode()))
        await peer.tick(5)
        assert peer.state() == LinkState.INCOMPATIBLE
        await peer.tick(300)
        assert peer.state() == LinkState.INCOMPATIBLE
        # Overlapping ranges agree on the highest common version.
        await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(9, 1, 2, 0, 0, 0).encode()))
        await peer.tick(5)
        assert peer.state() == LinkState.INIT and ctx.get(dut.status.version) == 2
    run(bench)


@pytest.mark.parametrize("max_payload", [MAXP, 12])   # (12: buffer addresses need an adder)
def test_transfer_phases_as_receiver(max_payload):
    """DATA -> REFLECT(digest) -> commit cursor -> delivery -> delivery cursor."""
    async def bench(dut, ctx, peer):
        out = peer.watch(dut.payload_out)
        await peer.bring_up()
        data = Frame(FrameType.DATA, seq=0, payload=b"hello", ccur=0, dcur=0)
        await peer.send_frame(data)
        reflect = await peer.wait_for(lambda f: f.type == FrameType.REFLECT)
        assert reflect.seq == 0 and int.from_bytes(reflect.payload, "little") == data.digest
        await peer.tick(100)
        assert out.messages == [], "delivered before the commit signal"
        # A duplicate is reflected again, with the digest of what is held.
        await peer.send_frame(data)
        reflect = await peer.wait_for(lambda f: f.type == FrameType.REFLECT)
        assert int.from_bytes(reflect.payload, "little") == data.digest
        # Commit: the engine delivers and advances its delivery cursor.
        await peer.send_frame(Frame(FrameType.SIGNAL, ccur=1, dcur=0))
        sig = await peer.wait_for(lambda f: f.dcur == 1)
        assert out.messages == [b"hello"]
        # A DATA frame for a delivered transfer is a duplicate: dropped, not delivered.
        await peer.send_frame(data)
        await peer.tick(50)
        assert peer.counter("duplicates") == 1 and out.messages == [b"hello"]
        assert peer.counter("delivered") == 1
        # A control-class message comes out of ctrl_out at its first intact arrival, before
        # the commit; a repeat of it and its commit do not deliver it again.
        ctrl = peer.watch(dut.ctrl_out)
        ctrl_data = Frame(FrameType.DATA, flags=FLAG_CTRL, seq=1, payload=b"\x05\x06", ccur=1, dcur=0)
        await peer.send_frame(ctrl_data)
        await peer.wait_for(lambda f: f.type == FrameType.REFLECT and f.seq == 1)
        await peer.tick(20)
        assert ctrl.messages == [b"\x05\x06"], "ctrl not delivered at first arrival"
        assert ctx.get(dut.status.rx_next) == 1, "the delivery cursor moved before the commit"
        await peer.send_frame(ctrl_data)
        await peer.wait_for(lambda f: f.type == FrameType.REFLECT and f.seq == 1)
        await peer.send_frame(Frame(FrameType.SIGNAL, ccur=2))
        await peer.wait_for(lambda f: f.dcur == 2)
        assert ctrl.messages == [b"\x05\x06"] and out.messages == [b"hello"]
        assert peer.counter("delivered") == 2
    run(bench, max_payload=max_payload)


def test_ctrl_early_delivery_in_sequence_order():
    """Early ctrl delivery follows sequence order: a ctrl transfer that arrives ahead of a
    missing one waits for it; payload in between is delivered only at its commit."""
    async def bench(dut, ctx, peer):
        out = peer.watch(dut.payload_out)
        ctrl = peer.watch(dut.ctrl_out)
        await peer.bring_up()
        frames = [Frame(FrameType.DATA, flags=FLAG_CTRL, seq=0, payload=b"c0"),
                  Frame(FrameType.DATA, seq=1, payload=b"p1"),
                  Frame(FrameType.DATA, flags=FLAG_CTRL, seq=2, payload=b"c2")]
        await peer.send_frame(frames[2])
        await peer.send_frame(frames[1])
        await peer.tick(30)
        assert ctrl.messages == [] and out.messages == []
        await peer.send_frame(frames[0])
        await peer.tick(40)
        assert ctrl.messages == [b"c0", b"c2"] and out.messages == []
        await peer.send_frame(Frame(FrameType.SIGNAL, ccur=3))
        await peer.wait_for(lambda f: f.dcur == 3)
        assert ctrl.messages == [b"c0", b"c2"] and out.messages == [b"p1"]
    run(bench)


def test_ctrl_early_delivery_across_reinit():
    """A ctrl transfer handed out early and re-sent after a re-init by the same sender
    incarnation is not delivered again; after a fresh peer's re-init, a new transfer under
    the same sequence number is."""
    async def bench(dut, ctx, peer):
        ctrl = peer.watch(dut.ctrl_out)
        await peer.bring_up()
        first = Frame(FrameType.DATA, flags=FLAG_CTRL, seq=0, payload=b"old")
        await peer.send_frame(first)
        await peer.wait_for(lambda f: f.type == FrameType.REFLECT)
        await peer.tick(20)
        assert ctrl.messages == [b"old"]
        # The peer went down (not reset): re-init, it sends seq 0 again.
        await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(0x77, 1, 1, 0, 0, 0).encode()))
        await peer.wait_for(lambda f: f.type == FrameType.HELLO)
        await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(0x77, 1, 1, HELLO_PEER_SEEN, 0, 0).encode()))
        await peer.tick(10)
        assert peer.state() == LinkState.UP
        await peer.send_frame(first)
        await peer.wait_for(lambda f: f.type == FrameType.REFLECT)
        await peer.tick(20)
        assert ctrl.messages == [b"old"], "re-sent transfer delivered again"
        # The peer restarts (fresh) before committing: its new seq 0 is a new message.
        await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(0x77, 1, 1, HELLO_FRESH, 0, 0).encode()))
        hello = Hello.decode((await peer.wait_for(lambda f: f.type == FrameType.HELLO)).payload)
        assert hello.rx_commit == 0
        await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(0x77, 1, 1, HELLO_FRESH | HELLO_PEER_SEEN, 0, 0).encode()))
        await peer.tick(10)
        assert peer.state() == LinkState.UP
        await peer.send_frame(Frame(FrameType.DATA, flags=FLAG_CTRL, seq=0, payload=b"new"))
        await peer.wait_for(lambda f: f.type == FrameType.REFLECT)
        await peer.send_frame(Frame(FrameType.SIGNAL, ccur=1))
        await peer.wait_for(lambda f: f.dcur == 1)
        assert ctrl.messages == [b"old", b"new"]
    run(bench)


def test_transfer_phases_as_sender():
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        await push_message(peer, dut.payload_in, b"abc")
        data = await peer.wait_for(lambda f: f.type == FrameType.DATA)
        assert data.seq == 0 and data.payload == b"abc"
        # No reflect: the engine retransmits after its timer.
        again = await peer.wait_for(lambda f: f.type == FrameType.DATA, timeout=TIMING["retx_cycles"] + 200)
        assert again.payload == b"abc" and again.digest == data.digest
        assert peer.counter("retransmits") >= 1
        # A reflect with the wrong digest is refused and takes the link down (abort).
        await peer.send_frame(Frame(FrameType.REFLECT, seq=0, payload=(data.digest ^ 1).to_bytes(4, "little")))
        await peer.tick(5)
        assert peer.counter("reflect_mismatches") == 1 and peer.state() != LinkState.UP
        # Re-initialise (the peer kept nothing: it reports commit cursor 0).
        await peer.bring_up(fresh=False)
        assert peer.counter("aborts") == 1
        data = await peer.wait_for(lambda f: f.type == FrameType.DATA)
        # The right reflect moves the commit cursor; the delivery cursor frees the slot.
        await peer.send_frame(Frame(FrameType.REFLECT, seq=0, payload=data.digest.to_bytes(4, "little")))
        commit = await peer.wait_for(lambda f: f.ccur == 1)
        assert ctx.get(dut.status.in_flight) == 1
        await peer.send_frame(Frame(FrameType.SIGNAL, ccur=0, dcur=1))
        await peer.tick(5)
        assert ctx.get(dut.status.in_flight) == 0
    run(bench)


def test_window_limits_and_loss_inference():
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        for i in range(WINDOW + 2):
            ctx.set(dut.payload_in.valid, 1)
            ctx.set(dut.payload_in.payload, {"data": i, "last": 1})
            for _ in range(20):
                await peer.tick()
                if ctx.get(dut.payload_in.ready):
                    break
        ctx.set(dut.payload_in.valid, 0)
        await peer.tick(200)
        datas = [f for f in peer.frames if f.type == FrameType.DATA]
        assert [f.seq for f in datas][:WINDOW] == list(range(WINDOW))
        assert max(f.seq for f in datas) == WINDOW - 1, "sent beyond the window"
        peer.frames.clear()
        # Reflect transfer 2 before 0 and 1: the engine infers they were lost and resends.
        await peer.send_frame(Frame(FrameType.REFLECT, seq=2, payload=datas[2].digest.to_bytes(4, "little")))
        resent = [await peer.wait_for(lambda f: f.type == FrameType.DATA, timeout=100) for _ in range(2)]
        assert sorted(f.seq for f in resent) == [0, 1]
    run(bench, retx_cycles=5000, dead_cycles=6000)


def test_ctrl_messages_take_priority():
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        ctx.set(dut.payload_in.valid, 1)
        ctx.set(dut.payload_in.payload, {"data": 0xAA, "last": 1})
        ctx.set(dut.ctrl_in.valid, 1)
        ctx.set(dut.ctrl_in.payload, {"data": 0xCC, "last": 1})
        await peer.tick()
        while not ctx.get(dut.ctrl_in.ready):
            await peer.tick()
        await peer.tick()
        ctx.set(dut.ctrl_in.valid, 0)
        first = await peer.wait_for(lambda f: f.type == FrameType.DATA)
        assert first.flags & FLAG_CTRL and first.payload == b"\xcc"
        ctx.set(dut.payload_in.valid, 0)
    run(bench)


@pytest.mark.parametrize("case", ["garbage", "bad_fcs", "truncated", "too_long", "unknown_type",
                                  "bad_length", "seq_outside_window", "reflect_unknown_seq"])
def test_bad_input_is_dropped_and_counted(case):
    async def bench(dut, ctx, peer):
        out = peer.watch(dut.payload_out)
        await peer.bring_up()
        good = encode(Frame(FrameType.DATA, seq=0, payload=b"ok"))
        before = {name: peer.counter(name) for name in ("crc_errors", "framing_errors", "malformed")}
        expect = None
        if case == "garbage":
            await peer.send(bytes([0xD5, 0x00, 0xD5, 0xD5, 0x13, 0x6B]) + bytes(range(40)))
        elif case == "bad_fcs":
            wire = bytearray(encode(Frame(FrameType.DATA, seq=0, payload=b"evil")))
            wire[7] ^= 0x10
            await peer.send(bytes(wire))
            expect = "crc_errors"
        elif case == "truncated":
            await peer.send(encode(Frame(FrameType.DATA, seq=0, payload=b"evil"))[:9])
            await peer.send(bytes(20))      # the line resumes with idle garbage
            expect = "crc_errors"
        elif case == "too_long":
            body = bytes([FrameType.DATA, 0, MAXP + 1])
            await peer.send(bytes(SYNC) + body + bytes(MAXP + 1))
            expect = "framing_errors"
        elif case == "unknown_type":
            await peer.send_frame(Frame(0x9, seq=0, payload=b"evil"))
            expect = "malformed"
        elif case == "bad_length":
            await peer.send_frame(Frame(FrameType.REFLECT, seq=0, payload=b"\x00\x00"))
            expect = "malformed"
        elif case == "seq_outside_window":
            await peer.send_frame(Frame(FrameType.DATA, seq=100, payload=b"evil", ccur=101))
            expect = "malformed"
        elif case == "reflect_unknown_seq":
            await peer.send_frame(Frame(FrameType.REFLECT, seq=77, payload=bytes(4)))
            expect = "malformed"
        await peer.tick(20)
        after = {name: peer.counter(name) for name in before}
        for name in before:
            assert after[name] == before[name] + (name == expect), (name, before, after)
        assert out.messages == []
        # The link is not wedged: a good transfer still goes through.
        assert peer.state() == LinkState.UP
        await peer.send(good)
        await peer.wait_for(lambda f: f.type == FrameType.REFLECT and f.seq == 0)
        await peer.send_frame(Frame(FrameType.SIGNAL, ccur=1))
        await peer.wait_for(lambda f: f.dcur == 1)
        assert out.messages == [b"ok"]
    run(bench)


def test_oversize_input_message_dropped_whole():
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        await push_message(peer, dut.payload_in, bytes(MAXP + 5))
        await push_message(peer, dut.payload_in, b"next")
        data = await peer.wait_for(lambda f: f.type == FrameType.DATA)
        assert data.payload == b"next" and data.seq == 0
        assert peer.counter("oversize") == 1
    run(bench)


def test_probe_is_answered():
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        await peer.tick(5)
        peer.frames.clear()
        await peer.send_frame(Frame(FrameType.SIGNAL, flags=FLAG_PROBE))
        await peer.wait_for(lambda f: f.type == FrameType.SIGNAL, timeout=30)
    run(bench, idle_cycles=500, hello_cycles=500, dead_cycles=2000)


def test_frames_match_software_crc_reference():
    """Every byte the engine sends parses as frames whose FCS is the software CRC-32."""
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        await push_message(peer, dut.payload_in, bytes(range(MAXP)))
        data = await peer.wait_for(lambda f: f.type == FrameType.DATA)
        wire = encode(data)
        body = wire[2:-4]
        assert crc32(body) == int.from_bytes(wire[-4:], "little")
        assert data.payload == bytes(range(MAXP))
    run(bench)


def test_hello_period_while_down():
    """While DOWN, one HELLO per hello_cycles (not two back to back)."""
    async def bench(dut, ctx, peer):
        await peer.tick(TIMING["hello_cycles"] * 10)
        gaps = [b - a for a, b in zip(peer.hello_cycles, peer.hello_cycles[1:])]
        assert len(peer.hello_cycles) >= 5 and min(gaps) >= TIMING["hello_cycles"], gaps
    run(bench)


@pytest.mark.parametrize("max_payload", [1, 4, 7])
def test_link_comes_up_with_small_max_payload(max_payload):
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        await push_message(peer, dut.payload_in, bytes(range(max_payload)))
        data = await peer.wait_for(lambda f: f.type == FrameType.DATA)
        assert data.payload == bytes(range(max_payload))
        # A DATA frame longer than max_payload (but a legal HELLO length) is malformed.
        if max_payload < 7:
            before = peer.counter("malformed")
            await peer.send_frame(Frame(FrameType.DATA, seq=0, payload=bytes(max_payload + 1)))
            await peer.tick(10)
            assert peer.counter("malformed") == before + 1
    run(bench, max_payload=max_payload)


def test_reinit_keeps_sender_window_at_receivers_delivery_cursor():
    """After a re-init, transfers the peer committed but has not delivered still occupy
    its window: the engine frees them only on the peer's delivery cursor."""
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        sent = []
        for i in range(WINDOW):
            await push_message(peer, dut.payload_in, bytes([i]))
            sent.append(await peer.wait_for(lambda f: f.type == FrameType.DATA))
        for data in sent:
            await peer.send_frame(Frame(FrameType.REFLECT, seq=data.seq, payload=data.digest.to_bytes(4, "little")))
        await peer.wait_for(lambda f: f.ccur == WINDOW)
        # The peer went down while it still had all four to deliver.
        await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(0x77, 1, 1, 0, 0, rx_commit=WINDOW, rx_next=0).encode()))
        hello = Hello.decode((await peer.wait_for(lambda f: f.type == FrameType.HELLO)).payload)
        await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(0x77, 1, 1, HELLO_PEER_SEEN, 0, WINDOW, 0).encode()))
        await peer.tick(300)     # (long enough for a resend to show)
        assert peer.state() == LinkState.UP
        assert ctx.get(dut.status.in_flight) == WINDOW and ctx.get(dut.status.tx_commit) == WINDOW
        assert not [f for f in peer.frames if f.type == FrameType.DATA], "resent committed transfers"
        await peer.send_frame(Frame(FrameType.SIGNAL, dcur=WINDOW))
        await peer.tick(10)
        assert ctx.get(dut.status.in_flight) == 0
    run(bench)


def test_reinit_resends_only_what_the_peer_did_not_commit():
    """A re-init HELLO whose commit cursor is inside our window: the transfers before it
    happened (they stay in flight until delivered), those after it are sent again, and
    nothing else is."""
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        for i in range(WINDOW):
            await push_message(peer, dut.payload_in, bytes([i]))
            await peer.wait_for(lambda f: f.type == FrameType.DATA)
        assert ctx.get(dut.status.tx_commit) == 0            # nothing reflected
        committed = 2
        await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(0x77, 1, 1, 0, 0, committed, 0).encode()))
        await peer.wait_for(lambda f: f.type == FrameType.HELLO)
        await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(0x77, 1, 1, HELLO_PEER_SEEN, 0, committed, 0).encode()))
        await peer.tick(300)
        assert peer.state() == LinkState.UP
        assert ctx.get(dut.status.tx_commit) == committed and ctx.get(dut.status.in_flight) == WINDOW
        resent = {f.seq for f in peer.frames if f.type == FrameType.DATA}
        assert resent == set(range(committed, WINDOW)), resent
    run(bench)


def test_reinit_with_cursors_beyond_what_was_sent_resends_everything():
    """A re-init HELLO that claims transfers we never sent (its commit cursor is past our
    next sequence number) is not believed: nothing counts as committed and everything in
    flight is sent again."""
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        for i in range(2):
            await push_message(peer, dut.payload_in, bytes([i]))
            await peer.wait_for(lambda f: f.type == FrameType.DATA)
        for bogus in (3, 2 + WINDOW):
            await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(0x77, 1, 1, 0, 0, bogus, 0).encode()))
            await peer.wait_for(lambda f: f.type == FrameType.HELLO)
            await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(0x77, 1, 1, HELLO_PEER_SEEN, 0, bogus, 0).encode()))
            await peer.tick(300)
            assert peer.state() == LinkState.UP
            assert ctx.get(dut.status.tx_commit) == 0 and ctx.get(dut.status.tx_next) == 2
            assert {f.seq for f in peer.frames if f.type == FrameType.DATA} == {0, 1}
            peer.frames.clear()
    run(bench)


def test_hello_reports_receive_cursors():
    """The engine's HELLO carries its commit and delivery cursors as a receiver."""
    async def bench(dut, ctx, peer):
        ctx.set(dut.payload_out.ready, 0)       # the host is not reading: nothing is delivered
        await peer.bring_up()
        for seq in range(2):
            await peer.send_frame(Frame(FrameType.DATA, seq=seq, payload=b"x"))
            await peer.wait_for(lambda f: f.type == FrameType.REFLECT and f.seq == seq)
        await peer.send_frame(Frame(FrameType.SIGNAL, ccur=2))
        await peer.tick(20)
        await peer.send_frame(Frame(FrameType.HELLO, payload=Hello(0x77, 1, 1, 0, 2, 0).encode()))
        hello = Hello.decode((await peer.wait_for(lambda f: f.type == FrameType.HELLO)).payload)
        assert (hello.rx_commit, hello.rx_next) == (2, 0)
    run(bench)


def test_ctrl_abort_drops_a_partial_ctrl_message():
    """A ctrl source reset inside a message: its first bytes are dropped, never spliced
    with the next message."""
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        for byte in b"\x11\x22":
            ctx.set(dut.ctrl_in.valid, 1)
            ctx.set(dut.ctrl_in.payload, {"data": byte, "last": 0})
            while True:
                ready = ctx.get(dut.ctrl_in.ready)
                await peer.tick()
                if ready:
                    break
        ctx.set(dut.ctrl_in.valid, 0)
        ctx.set(dut.ctrl_abort, 1)
        await peer.tick()
        ctx.set(dut.ctrl_abort, 0)
        await push_message(peer, dut.ctrl_in, b"\x05\x06\x07")
        data = await peer.wait_for(lambda f: f.type == FrameType.DATA)
        assert data.payload == b"\x05\x06\x07" and data.flags & FLAG_CTRL and data.seq == 0
        assert ctx.get(dut.status.tx_next) == 1
    run(bench)


class TolerantPeer(Peer):
    """A peer that records frames failing their FCS instead of raising."""

    def __init__(self, dut, ctx):
        super().__init__(dut, ctx)
        self.bad_frames = 0

    def _parse(self):
        from epochlink.hdl.frame import FrameError
        buf = self.rx_bytes
        while len(buf) >= 5:
            total = 5 + buf[4] + 6
            if len(buf) < total:
                return
            try:
                self.frames.append(decode(bytes(buf[:total])))
            except FrameError:
                self.bad_frames += 1
            del buf[:total]


async def push_ctrl(peer, data: bytes, hint: int, pause_at=None, pause=0):
    """Offer a ctrl message with a length hint; optionally pause before byte ``pause_at``."""
    ctx, dut = peer.ctx, peer.dut
    ctx.set(dut.ctrl_len, hint)
    for i, byte in enumerate(data):
        if i == pause_at:
            ctx.set(dut.ctrl_in.valid, 0)
            await peer.tick(pause)
        ctx.set(dut.ctrl_in.valid, 1)
        ctx.set(dut.ctrl_in.payload, {"data": byte, "last": i == len(data) - 1})
        while True:
            ready = ctx.get(dut.ctrl_in.ready)
            await peer.tick()
            if ready:
                break
    ctx.set(dut.ctrl_in.valid, 0)
    ctx.set(dut.ctrl_len, 0)


def run_tolerant(testbench, excused_reads=None):
    dut = LinkEngine(window=WINDOW, max_payload=MAXP, **TIMING)
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    watch_buffers(sim, dut, excused_reads)

    async def bench(ctx):
        ctx.set(dut.node_id, 0x1234)
        ctx.set(dut.payload_out.ready, 1)
        ctx.set(dut.ctrl_out.ready, 1)
        ctx.set(dut.phy_tx.ready, 1)
        await testbench(dut, ctx, TolerantPeer(dut, ctx))
    sim.add_testbench(bench)
    sim.run()


def test_ctrl_cut_through_with_length_hint():
    """With ctrl_len the DATA frame starts while the message is taken in; it is intact and
    sent once."""
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        await peer.tick(60)                  # past the bring-up SIGNALs
        while peer.rx_bytes:                 # (and the end of a heartbeat on the wire)
            await peer.tick()
        peer.frames.clear()
        message = bytes(range(1, 11))
        assert len(peer.rx_bytes) == 0
        await push_ctrl(peer, message, len(message))
        # the frame's header and first payload bytes were on the wire before the last byte
        # of the message was taken in
        assert len(peer.rx_bytes) >= 5 + 3, "no cut-through"
        data = await peer.wait_for(lambda f: f.type == FrameType.DATA)
        assert data.payload == message and data.flags & FLAG_CTRL and data.seq == 0
        await peer.send_frame(Frame(FrameType.REFLECT, seq=0, payload=data.digest.to_bytes(4, "little")))
        await peer.wait_for(lambda f: f.ccur == 1)
        await peer.tick(50)
        assert not [f for f in peer.frames if f.type == FrameType.DATA], "sent twice"
        assert peer.bad_frames == 0 and peer.counter("retransmits") == 0
    run_tolerant(bench)


@pytest.mark.parametrize("case", ["longer", "one", "shorter", "stalled", "aborted"])
def test_ctrl_cut_through_mismatch_poisons_the_frame(case):
    """A message that does not match its hint or falls behind its frame: that frame fails
    its FCS, and the message goes out again whole (or not at all when aborted)."""
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        await peer.tick(60)
        peer.frames.clear()
        message = bytes(range(1, 9))
        if case == "longer":
            await push_ctrl(peer, message, len(message) - 2)
        elif case == "one":                  # announced 1 byte: poisoned as its frame starts
            await push_ctrl(peer, message, 1)
        elif case == "shorter":
            await push_ctrl(peer, message, len(message) + 2)
        elif case == "stalled":
            await push_ctrl(peer, message, len(message), pause_at=3, pause=12)
        else:
            ctx.set(dut.ctrl_len, len(message))
            for byte in message[:3]:
                ctx.set(dut.ctrl_in.valid, 1)
                ctx.set(dut.ctrl_in.payload, {"data": byte, "last": 0})
                await peer.tick()
            ctx.set(dut.ctrl_in.valid, 0)
            ctx.set(dut.ctrl_abort, 1)
            await peer.tick()
            ctx.set(dut.ctrl_abort, 0)
            ctx.set(dut.ctrl_len, 0)
        await peer.tick(80)
        assert peer.bad_frames == 1
        datas = [f for f in peer.frames if f.type == FrameType.DATA]
        if case == "aborted":
            assert datas == [] and ctx.get(dut.status.tx_next) == 0
        else:
            assert [d.payload for d in datas] == [message] and datas[0].seq == 0
    run_tolerant(bench)


def test_cut_through_read_of_a_byte_being_stored_is_poisoned():
    """The transmit buffer has no collision logic, so a read of the byte being stored in the
    same cycle returns whatever the block RAM gives. Only a cut-through frame can do that, and
    it is then poisoned: whatever the read returned never reaches the peer intact. The message
    is sent again whole. (A source that pauses before byte 3 for 1 to 13 cycles: some pauses
    make the frame read byte 3 exactly as it is stored.)"""
    message = bytes(range(1, 9))
    excused_by_pause = {}
    for pause in range(1, 14):
        excused = {}

        async def bench(dut, ctx, peer):
            await peer.bring_up()
            await peer.tick(60)
            while peer.rx_bytes:
                await peer.tick()
            peer.frames.clear()
            await push_ctrl(peer, message, len(message), pause_at=3, pause=pause)
            await peer.tick(80)
            datas = [f for f in peer.frames if f.type == FrameType.DATA]
            assert [d.payload for d in datas] == [message] and datas[0].seq == 0
            if excused:
                assert peer.bad_frames == 1, "a read met the write and the frame was not poisoned"
        run_tolerant(bench, excused)
        excused_by_pause[pause] = excused.get("tx_buf", 0)
    assert any(excused_by_pause.values()), f"no pause made a read meet the write: {excused_by_pause}"


# ---- receive-side cut-through of ctrl messages ---------------------------------------------

class TransferLog(Collector):
    """A :class:`Collector` of ``ctrl_out`` that also logs every transfer with the cycle it
    was taken in (sampled each peer tick)."""

    def __init__(self, peer):
        super().__init__(peer.ctx, peer.dut.ctrl_out)
        self.peer, self.log = peer, []

    def sample(self):
        ctx = self.ctx
        if ctx.get(self.port.valid) and ctx.get(self.port.ready):
            p = ctx.get(self.port.payload)
            self.log.append((self.peer.cycle, p.data, p.last, p.drop))
        super().sample()


def watch_ctrl(peer):
    log = TransferLog(peer)
    peer.collectors.append(log)
    return log


def test_ctrl_streamed_as_it_arrives_last_byte_after_the_fcs():
    """A ctrl message in order is streamed on ctrl_out while its frame arrives; its last byte
    comes only after the frame's last FCS byte (when the frame is accepted), exactly once."""
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        log = watch_ctrl(peer)
        message = b"\x05\x06\x07\x08"
        wire = encode(Frame(FrameType.DATA, flags=FLAG_CTRL, seq=0, payload=message))
        start = peer.cycle
        await peer.send(wire)
        end = peer.cycle              # the cycle after the last FCS byte was on phy_rx
        await peer.tick(30)
        assert log.messages == [message] and log.drops == 0
        firsts = [c for c, _, last, _ in log.log if not last]
        last_at = [c for c, _, last, _ in log.log if last]
        # the first bytes went out before the frame was complete (cut-through) ...
        assert firsts and max(firsts) < end, (start, end, log.log)
        # ... the last one only once the FCS had been checked
        assert last_at[0] > end, (end, log.log)
        assert peer.counter("delivered") == 1
        # a repeat (its REFLECT lost) is not delivered again, nor streamed
        await peer.send(wire)
        await peer.tick(30)
        assert log.messages == [message] and log.drops == 0 and len(log.log) == len(message)
    run(bench)


@pytest.mark.parametrize("where", ["fcs_last", "fcs_first", "payload_last", "payload_first", "dcur",
                                   "seq", "len_short"])
def test_ctrl_stream_of_a_corrupt_frame_is_withdrawn(where):
    """A ctrl frame that fails (a bit error anywhere, found only at its FCS): the bytes streamed
    from it are withdrawn with a drop, its last byte never goes out, nothing is delivered; the
    intact retransmission is delivered once."""
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        log = watch_ctrl(peer)
        message = b"\x05\x06\x07\x08\x09"
        good = encode(Frame(FrameType.DATA, flags=FLAG_CTRL, seq=0, payload=message, ccur=0, dcur=0))
        n = len(good)
        index = {"fcs_last": n - 1, "fcs_first": n - 4, "payload_last": 4 + len(message),
                 "payload_first": 5, "dcur": n - 5, "seq": 3}.get(where)
        bad = bytearray(good)
        if where == "len_short":
            bad[4] = len(message) - 1       # a shorter frame: its "FCS" is the wrong bytes
        else:
            bad[index] ^= 0x10
        await peer.send(bytes(bad))
        await peer.tick(40)
        assert log.messages == [], log.log
        assert peer.counter("crc_errors") == 1 and peer.counter("delivered") == 0
        if where not in ("seq",):            # (a SEQ out of order is never streamed)
            assert log.drops == 1 and not any(last and not drop for _, _, last, drop in log.log)
        await peer.send(good)
        await peer.tick(40)
        assert log.messages == [message] and peer.counter("delivered") == 1
    run(bench)


def test_ctrl_stream_withdrawn_on_a_gap_then_delivered_whole():
    """A frame whose bytes stop coming (a cut wire, a slow PHY) is not streamed on: its stream
    is withdrawn, and the frame, once it has arrived intact, is delivered whole from the
    receive buffer."""
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        log = watch_ctrl(peer)
        message = b"\x05\x06\x07\x08"
        wire = encode(Frame(FrameType.DATA, flags=FLAG_CTRL, seq=0, payload=message))
        await peer.send(wire[:7])            # header and two payload bytes
        await peer.tick(3)                   # the wire pauses
        await peer.send(wire[7:])
        await peer.tick(30)
        assert log.drops == 1 and log.messages == [message], log.log
        assert peer.counter("delivered") == 1 and peer.counter("crc_errors") == 0
    run(bench)


def test_ctrl_stream_withdrawn_when_the_link_goes_down():
    """A frame cut short for good: the link goes down (dead timer) and withdraws the stream;
    nothing is delivered."""
    async def bench(dut, ctx, peer):
        await peer.bring_up()
        log = watch_ctrl(peer)
        wire = encode(Frame(FrameType.DATA, flags=FLAG_CTRL, seq=0, payload=b"\x05\x06\x07\x08"))
        await peer.send(wire[:8])
        await peer.tick(TIMING["dead_cycles"] + 20)
        assert peer.state() != LinkState.UP
        assert log.drops == 1 and log.messages == [] and peer.counter("delivered") == 0
    run(bench)
