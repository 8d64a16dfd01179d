"""The bilateral link engine: framed, CRC-checked, TIKTYKTIK-style transfers.

A :class:`LinkEngine` sits at one end of a byte-wide link. Messages written to its
``payload_in`` stream come out of the far engine's ``payload_out`` stream in order and
exactly once. Each message is one *transfer*, and every transfer goes through four one-way
trips (see ``docs/link.md``):

1. DATA A->B: Bob stores it *tentatively* in his receive window.
2. REFLECT B->A: Bob echoes the sequence number and the digest (CRC-32) of what he holds.
   Alice checks it against what she sent; now Alice knows Bob has it, intact.
3. commit A->B: Alice's commit cursor moves past the transfer (piggybacked on any frame).
   Bob now knows that Alice knows; he *delivers* the message and becomes responsible.
4. deliver B->A: Bob's delivery cursor moves past it; Alice frees her copy.

Messages written to ``ctrl_in`` (the control class: priority over payload, for idempotent,
monotone facts) take the same four trips, but Bob hands them out on ``ctrl_out`` already at
their first intact arrival (trip 1), in sequence order, at most once per sequence number while
neither end restarts, at least once across resets (the contract in ``hdl/contract.py``).

Up to ``window`` transfers are in flight at once (a replay buffer, as in PCIe's data link
layer); signals are cumulative cursors carried by every frame, so they coalesce and ride on
data. A lost DATA frame is inferred when a later one is reflected first (the wire keeps
order) or, failing that, when the retransmission timer expires. Duplicates are recognised
by sequence number; every phase is idempotent.

Liveness: an idle link sends SIGNAL heartbeats; a link that hears no valid frame for
``dead_cycles`` goes DOWN. Tentative (uncommitted) transfers are then aborted on both
sides, and the HELLO exchange that brings the link back UP tells each side exactly which
transfers the other committed, so both agree on which transfers happened.
"""
from __future__ import annotations

from collections import namedtuple

from amaranth import *
from amaranth.lib import data, stream, wiring, crc, fifo
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from .common import (message_signature, phy_tx_signature, phy_rx_signature, event_layout,
                     count_events, refuse)
from .frame import (SYNC, FrameType, FLAG_CTRL, FLAG_PROBE, HELLO_FRESH, HELLO_PEER_SEEN,
                    HELLO_LEN, REFLECT_LEN, LINK_COUNTERS, LinkState)

__all__ = ["LinkEngine", "LinkStatusSignature", "COUNTERS", "LINK_EVENTS", "CtrlByte",
           "ctrl_out_signature", "link_parameters"]

COUNTERS = LINK_COUNTERS
#: What moves each counter, cycle by cycle (a re-initialisation aborts several transfers at once).
LINK_EVENTS = event_layout(COUNTERS, {"aborts": 8})


class LinkStatusSignature(wiring.Signature):
    """Status of a link engine, ready for a register bank.

    ``events`` (:data:`LINK_EVENTS`) moves with the counters, one cycle before them; with
    ``counter_width`` 0 the counters are 0 bits wide and only the events remain.
    """
    def __init__(self, counter_width=32):
        members = {
            "state": Out(2),         #: :class:`~epochlink.hdl.frame.LinkState`
            "peer_id": Out(16),
            "version": Out(8),       #: protocol version agreed with the peer
            "in_flight": Out(8),     #: transfers sent and not yet freed
            # Sequence cursors (mod 256), for diagnostics and the contract scoreboard:
            "tx_free": Out(8),       #: oldest transfer this side still holds
            "tx_commit": Out(8),     #: transfers before it were reflected intact
            "tx_next": Out(8),       #: sequence number the next input message gets
            "rx_next": Out(8),       #: next transfer to deliver
            "rx_commit": Out(8),     #: transfers before it are committed by the peer
        }
        for name in COUNTERS:
            members[name] = Out(counter_width)
        members["events"] = Out(LINK_EVENTS)
        super().__init__(members)


#: One transfer on a link engine's ``ctrl_out``: a message byte, or a *drop*.
#:
#: A control message may be streamed while its frame is still arriving (before its FCS is
#: checked); its last byte (``last``) is only offered once the frame has been accepted. If the
#: frame fails instead, a transfer with ``drop`` = 1 (and ``last`` = 1, ``data`` meaningless)
#: ends the message: the consumer discards the bytes of it taken so far. A consumer that acts
#: on a message only at its last byte never acts on anything unchecked.
CtrlByte = data.StructLayout({"data": 8, "last": 1, "drop": 1})


def ctrl_out_signature():
    """The stream of :class:`CtrlByte` from a link engine's ``ctrl_out``."""
    return stream.Signature(CtrlByte)


def _flag_bit(flag):
    """Index of a ``FLAG_*`` bit within the 4-bit flags field (TYPE bits 7:4)."""
    return flag.bit_length() - 5


def _slot_address(slot, index, max_payload):
    """Address of byte ``index`` of ``slot`` in a buffer of ``max_payload``-byte slots.

    With a power-of-two ``max_payload`` the slot and index bits are concatenated (no adder in
    front of the block RAM; an index past the slot wraps inside it, and such reads are never
    used); otherwise ``slot * max_payload + index``."""
    if isinstance(index, int):
        index = Const(index, 8)
    if max_payload & (max_payload - 1) == 0:
        return Cat(index[:exact_log2(max_payload)], slot)
    return slot * max_payload + index


def _mod(value):
    """Sequence arithmetic is modulo 256."""
    return value[:8]


class _Serializer(Elaboratable):
    """Turns a frame request into bytes on ``phy_tx`` (SYNC, header, payload, trailer, FCS)."""

    def __init__(self, *, slot_bits, max_payload):
        self.phy_tx = phy_tx_signature().create()
        self.start = Signal()       # in: pulse while idle to send a frame
        # in, held from `start` until `done` (registers of the scheduler, not copied here):
        self.type_byte = Signal(8)
        self.seq = Signal(8)
        self.length = Signal(8)
        self.slot = Signal(slot_bits)
        self.small = Signal(HELLO_LEN * 8)  # REFLECT/HELLO payload bytes
        self.ccur = Signal(8)       # in, live: sampled when the trailer is sent
        self.dcur = Signal(8)
        self.sent_ccur = Signal(8)  # out: last cursors put on the wire
        self.sent_dcur = Signal(8)
        self.done = Signal()        # out: pulse when the last FCS byte is accepted
        self.digest = Signal(32)    # out: digest of the frame being sent, valid in `digest_we`
        self.digest_we = Signal()
        self.buf_addr = Signal(range((1 << slot_bits) * max_payload + 1))  # payload read port
        self.buf_en = Signal()
        self.buf_data = Signal(8)
        self.read_index = Signal(8)  # out: payload byte index read with buf_en
        self.poison = Signal()      # in: the frame in progress must fail its FCS
        self._slot_bits = slot_bits
        self._max_payload = max_payload

    def elaborate(self, platform):
        m = Module()
        m.submodules.crc = fcs = crc.catalog.CRC32_ETHERNET(8).create()

        bad = Signal()              # poisoned: the FCS goes out inverted
        with m.If(self.done):
            m.d.sync += bad.eq(0)
        with m.Elif(self.poison):
            m.d.sync += bad.eq(1)

        type_byte, seq, length, slot, small = self.type_byte, self.seq, self.length, self.slot, self.small
        index = Signal(8)
        index_up = Signal(exact_log2(HELLO_LEN))   # PAYLOAD: index + 1 for the small fields, kept
                                                   # with it (no adder in front of their multiplexer)
        # Every byte comes from a register loaded as the byte before it is accepted: DATA
        # payload from `staged` (read two ahead: a block RAM's output, slow to appear after
        # the clock edge, ends in this flip-flop), the FCS from the CRC register, everything
        # else from `next_byte`; flags choose among them. The CRC's input and the stream's
        # byte have one or two multiplexers in front.
        next_byte = Signal(8, init=SYNC[0])
        staged = Signal(8)
        in_data = Signal()
        in_fcs = Signal()
        at_last = Signal()      # PAYLOAD: index == length - 1
        is_data = type_byte[:4] == FrameType.DATA
        small_bytes = Array(small[8 * i:8 * i + 8] for i in range(HELLO_LEN))

        fcs_bytes = Array(fcs.crc[8 * i:8 * i + 8] for i in range(4))
        tx = self.phy_tx
        accepted = tx.valid & tx.ready
        m.d.comb += [
            tx.payload.eq(Mux(in_fcs, fcs_bytes[index[:2]] ^ Mux(bad | self.poison, 0xFF, 0),
                              Mux(in_data, staged, next_byte))),
            self.buf_addr.eq(_slot_address(slot, index, self._max_payload)),
            fcs.data.eq(Mux(in_data, staged, next_byte)),
        ]

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.next = "SYNC0"
            with m.State("SYNC0"):
                m.d.comb += [tx.valid.eq(1)]
                with m.If(accepted):
                    m.d.sync += next_byte.eq(SYNC[1])
                    m.next = "SYNC1"
            with m.State("SYNC1"):
                m.d.comb += [tx.valid.eq(1)]
                with m.If(accepted):
                    m.d.sync += next_byte.eq(type_byte)
                    m.next = "TYPE"
            with m.State("TYPE"):
                m.d.comb += [tx.valid.eq(1), fcs.start.eq(accepted), fcs.valid.eq(accepted)]
                with m.If(accepted):
                    m.d.sync += next_byte.eq(seq)
                    m.next = "SEQ"
            with m.State("SEQ"):
                m.d.comb += [tx.valid.eq(1), fcs.valid.eq(accepted)]
                with m.If(accepted):
                    m.d.comb += [self.buf_en.eq(1), self.buf_addr.eq(_slot_address(slot, 0, self._max_payload)),
                                 self.read_index.eq(0)]
                    m.d.sync += next_byte.eq(length)
                    m.next = "LEN"
            with m.State("LEN"):
                m.d.comb += [tx.valid.eq(1), fcs.valid.eq(accepted)]
                with m.If(accepted):
                    m.d.comb += [self.buf_en.eq(1), self.buf_addr.eq(_slot_address(slot, 1, self._max_payload)),
                                 self.read_index.eq(1)]
                    m.d.sync += [index.eq(0), index_up.eq(1), at_last.eq(length == 1)]
                    with m.If(length == 0):
                        m.d.sync += next_byte.eq(self.ccur)
                        m.next = "CCUR"
                    with m.Else():
                        m.d.sync += [staged.eq(self.buf_data), next_byte.eq(small_bytes[0]),
                                     in_data.eq(is_data)]
                        m.next = "PAYLOAD"
            with m.State("PAYLOAD"):
                m.d.comb += [tx.valid.eq(1), fcs.valid.eq(accepted)]
                with m.If(accepted):
                    m.d.comb += [self.buf_en.eq(1), self.buf_addr.eq(_slot_address(slot, (index + 2)[:8], self._max_payload)),
                                 self.read_index.eq(index + 2)]
                    m.d.sync += [index.eq(index + 1), index_up.eq(index_up + 1), staged.eq(self.buf_data),
                                 at_last.eq(index + 2 == length)]
                    with m.If(at_last):
                        m.d.sync += [next_byte.eq(self.ccur), in_data.eq(0)]
                        m.next = "CCUR"
                    with m.Else():
                        m.d.sync += next_byte.eq(small_bytes[index_up])
            with m.State("CCUR"):
                # (the cursors are sampled as the byte before them is accepted)
                m.d.comb += [tx.valid.eq(1), fcs.valid.eq(accepted)]
                with m.If(accepted):
                    # The CRC register now holds the digest over TYPE..PAYLOAD.
                    m.d.comb += [self.digest.eq(fcs.crc), self.digest_we.eq(is_data)]
                    m.d.sync += [self.sent_ccur.eq(next_byte), next_byte.eq(self.dcur)]
                    m.next = "DCUR"
            with m.State("DCUR"):
                m.d.comb += [tx.valid.eq(1), fcs.valid.eq(accepted)]
                with m.If(accepted):
                    m.d.sync += [self.sent_dcur.eq(next_byte), next_byte.eq(SYNC[0]), index.eq(0),
                                 in_fcs.eq(1)]
                    m.next = "FCS"
            with m.State("FCS"):
                m.d.comb += [tx.valid.eq(1)]
                with m.If(accepted):
                    m.d.sync += index.eq(index + 1)
                    with m.If(index == 3):
                        m.d.comb += self.done.eq(1)
                        m.d.sync += in_fcs.eq(0)
                        m.next = "IDLE"
        return m


class _Deframer(Elaboratable):
    """Finds frames in the byte stream from ``phy_rx``, checks LEN and FCS, latches fields.

    DATA payload bytes are written straight into the receive buffer, but only into a slot
    the link engine declared writable when the SEQ byte arrived (``write_allowed``), so a
    frame that later fails its FCS never overwrites a held transfer.
    """

    def __init__(self, *, slot_bits, max_payload):
        self.phy_rx = phy_rx_signature().flip().create()
        self.window_mask = (1 << slot_bits) - 1
        self.seq_now = Signal(8)         # out: the received byte: SEQ with seq_valid (for lookups)
        self.seq_valid = Signal()        # out: pulse when SEQ was just received
        self.len_valid = Signal()        # out: pulse when LEN was just received (fields latched)
        self.len_now = Signal(8)         # out: the received byte: LEN with len_valid
        self.write_allowed = Signal()    # in: sampled with seq_valid for DATA frames
        self.buf_addr = Signal(range((1 << slot_bits) * max_payload + 1))
        self.buf_data = Signal(8)
        self.buf_we = Signal()
        # Results, valid in the cycle of frame_ok (`end`: the cycle after the last FCS byte):
        self.end = Signal()
        self.frame_ok = Signal()
        self.crc_error = Signal()
        self.framing_error = Signal()
        self.type = Signal(4)
        self.flags = Signal(4)
        self.seq = Signal(8)
        self.length = Signal(8)
        self.ccur = Signal(8)
        self.dcur = Signal(8)
        self.digest = Signal(32)
        self.small = Signal(HELLO_LEN * 8)
        self.wrote = Signal()            # the payload went into the receive buffer
        self._slot_bits = slot_bits
        self._max_payload = max_payload

    def elaborate(self, platform):
        m = Module()
        m.submodules.crc = fcs = crc.catalog.CRC32_ETHERNET(8).create()
        rx = self.phy_rx
        byte = rx.payload
        index = Signal(8)
        check = Signal()
        m.d.comb += fcs.data.eq(byte)
        # (SEQ and LEN are the received byte as it is, whatever the state: only read with
        # seq_valid and len_valid, they reach the link's window checks without the state
        # machine in front)
        m.d.comb += [self.seq_now.eq(byte), self.len_now.eq(byte)]
        m.d.comb += [self.buf_data.eq(byte),
                     self.buf_addr.eq(_slot_address(self.seq[:self._slot_bits], index, self._max_payload))]

        # The FCS verdict is taken the cycle after the last FCS byte, while the FSM already
        # hunts for the next frame (the wire cannot be stalled).
        m.d.sync += check.eq(0)
        m.d.comb += self.end.eq(check)
        with m.If(check):
            m.d.comb += [self.frame_ok.eq(fcs.match_detected), self.crc_error.eq(~fcs.match_detected)]

        with m.FSM():
            with m.State("HUNT"):
                with m.If(rx.valid & (byte == SYNC[0])):
                    m.next = "SYNC1"
            with m.State("SYNC1"):
                with m.If(rx.valid):
                    with m.If(byte == SYNC[1]):
                        m.next = "TYPE"
                    with m.Elif(byte != SYNC[0]):
                        m.next = "HUNT"
            with m.State("TYPE"):
                with m.If(rx.valid):
                    m.d.comb += [fcs.start.eq(1), fcs.valid.eq(1)]
                    m.d.sync += [self.type.eq(byte[:4]), self.flags.eq(byte[4:]), self.wrote.eq(0)]
                    m.next = "SEQ"
            with m.State("SEQ"):
                with m.If(rx.valid):
                    m.d.comb += [fcs.valid.eq(1), self.seq_valid.eq(1)]
                    m.d.sync += [self.seq.eq(byte),
                                 self.wrote.eq(self.write_allowed & (self.type == FrameType.DATA))]
                    m.next = "LEN"
            with m.State("LEN"):
                with m.If(rx.valid):
                    m.d.comb += [fcs.valid.eq(1), self.len_valid.eq(1)]
                    m.d.sync += [self.length.eq(byte), index.eq(0)]
                    with m.If(byte > max(self._max_payload, HELLO_LEN)):
                        m.d.comb += self.framing_error.eq(1)
                        m.next = "HUNT"
                    with m.Elif(byte == 0):
                        m.next = "CCUR"
                    with m.Else():
                        m.next = "PAYLOAD"
            with m.State("PAYLOAD"):
                with m.If(rx.valid):
                    m.d.comb += [fcs.valid.eq(1), self.buf_we.eq(self.wrote & (index < self._max_payload))]
                    # Payload byte i (< 8) goes to small[8i:8i+8]; bytes of a shorter
                    # payload above its length keep stale values and are never used.
                    with m.Switch(index):
                        for i in range(HELLO_LEN):
                            with m.Case(i):
                                m.d.sync += self.small[8 * i:8 * i + 8].eq(byte)
                    m.d.sync += index.eq(index + 1)
                    with m.If(index == self.length - 1):
                        m.next = "CCUR"
            with m.State("CCUR"):
                with m.If(rx.valid):
                    m.d.comb += fcs.valid.eq(1)
                    m.d.sync += [self.ccur.eq(byte), self.digest.eq(fcs.crc)]
                    m.next = "DCUR"
            with m.State("DCUR"):
                with m.If(rx.valid):
                    m.d.comb += fcs.valid.eq(1)
                    m.d.sync += [self.dcur.eq(byte), index.eq(0)]
                    m.next = "FCS"
            with m.State("FCS"):
                with m.If(rx.valid):
                    m.d.comb += fcs.valid.eq(1)
                    m.d.sync += index.eq(index + 1)
                    with m.If(index == 3):
                        m.d.sync += check.eq(1)
                        m.next = "HUNT"
        return m


_SyncRead = namedtuple("_SyncRead", "addr en data")


def link_parameters(*, window=8, max_payload=64, hello_cycles=None, idle_cycles=None,
                    dead_cycles=None, retx_cycles=None) -> dict:
    """A :class:`LinkEngine`'s parameters with its timer defaults filled in.

    Raises ``ValueError`` for parameters a link engine refuses (``TypeError`` for an unknown
    one), so that a component which builds its link engines only in ``elaborate`` can refuse
    the same parameters in its constructor.
    """
    if window < 2 or window > 64 or window & (window - 1):
        raise ValueError(f"window must be a power of two in 2..64, not {window}")
    if not 1 <= max_payload <= 255:
        raise ValueError(f"max_payload must be in 1..255, not {max_payload}")
    frame_cycles = max_payload + 16
    params = dict(window=window, max_payload=max_payload,
                  hello_cycles=hello_cycles or 4 * frame_cycles,
                  idle_cycles=idle_cycles or 2 * frame_cycles,
                  dead_cycles=dead_cycles or 16 * frame_cycles + 256,
                  retx_cycles=retx_cycles or 4 * frame_cycles + 64)
    if params["dead_cycles"] <= 2 * max(params["idle_cycles"], params["hello_cycles"]):
        raise ValueError("dead_cycles must exceed twice the heartbeat and HELLO periods")
    return params


class LinkEngine(wiring.Component):
    """One end of a bilateral, bit-error-proof link.

    Parameters
    ----------
    window : int
        Transfers in flight at once (power of two, 2..64): the size of the replay buffer
        at the sender and of the receive window at the receiver.
    max_payload : int
        Longest message in bytes (1..255). Longer input messages are dropped whole and
        counted in ``status.oversize``.
    hello_cycles, idle_cycles, dead_cycles, retx_cycles : int
        HELLO period while DOWN; heartbeat after this many idle cycles while UP; link
        declared DOWN after this many cycles without a valid frame; retransmission timer.
        Defaults are derived from ``max_payload``; ``dead_cycles`` must exceed the round
        trip of the channel plus a few maximum-length frames.
    counter_width : int
        Width of the status counters (0: none; a NIC counts ``status.events`` in block RAM).

    Attributes
    ----------
    phy_tx, phy_rx : byte streams to and from the wire (``phy_rx`` cannot be stalled).
    payload_in, ctrl_in : messages to send; ``ctrl_in`` has priority.
    payload_out : delivered messages, in order, exactly once (at the commit).
    ctrl_out : control-class messages, in order, at their first intact arrival.
    node_id, ver_min, ver_max : this node's identity and supported protocol versions.
    ctrl_abort : while 1, a ctrl message being taken in is dropped (its source was reset
        inside it): no message is ever spliced from two.
    ctrl_len : the length of the ctrl message whose first byte is on ``ctrl_in`` (0: not
        known). With it the DATA frame may start while the message is still being taken in
        (cut-through); a message that does not match it, or falls behind the frame, makes
        that frame fail its FCS and is sent again whole.
    enable : while 0 the link is held DOWN and sends nothing.
    status : :class:`LinkStatusSignature`.
    buf_access : for each buffer synthesized without collision logic (``"tx_buf"``,
        ``"rx_buf"``, ``"rx_digests"``), its write enable and address, read enable and
        address, and whether a read meeting a write in that cycle is harmless (a poisoned
        cut-through frame); set by ``elaborate`` for tests that watch them.
    """

    def __init__(self, *, window=8, max_payload=64, hello_cycles=None, idle_cycles=None,
                 dead_cycles=None, retx_cycles=None, counter_width=32):
        try:
            params = link_parameters(window=window, max_payload=max_payload,
                                     hello_cycles=hello_cycles, idle_cycles=idle_cycles,
                                     dead_cycles=dead_cycles, retx_cycles=retx_cycles)
        except ValueError as error:
            refuse(self, str(error))
        self.window = params["window"]
        self.max_payload = params["max_payload"]
        self.hello_cycles = params["hello_cycles"]
        self.idle_cycles = params["idle_cycles"]
        self.dead_cycles = params["dead_cycles"]
        self.retx_cycles = params["retx_cycles"]
        self.counter_width = counter_width
        super().__init__({
            "phy_tx": Out(phy_tx_signature()),
            "phy_rx": In(phy_rx_signature()),
            "payload_in": In(message_signature()),
            "ctrl_in": In(message_signature()),
            "payload_out": Out(message_signature()),
            "ctrl_out": Out(ctrl_out_signature()),
            "ctrl_abort": In(1),
            "ctrl_len": In(8),
            "node_id": In(16),
            "ver_min": In(8, init=1),
            "ver_max": In(8, init=1),
            "enable": In(1, init=1),
            "status": Out(LinkStatusSignature(counter_width)),
        })

    def elaborate(self, platform):
        m = Module()
        W = self.window
        slot_bits = exact_log2(W)
        MAXP = self.max_payload

        m.submodules.ser = ser = _Serializer(slot_bits=slot_bits, max_payload=MAXP)
        m.submodules.dfr = dfr = _Deframer(slot_bits=slot_bits, max_payload=MAXP)
        m.d.comb += [
            self.phy_tx.valid.eq(ser.phy_tx.valid & self.enable),
            self.phy_tx.payload.eq(ser.phy_tx.payload),
            ser.phy_tx.ready.eq(self.phy_tx.ready | ~self.enable),
            dfr.phy_rx.valid.eq(self.phy_rx.valid & self.enable),
            dfr.phy_rx.payload.eq(self.phy_rx.payload),
        ]

        def slot_of(seq):
            return seq[:slot_bits]

        # ---- buffers -------------------------------------------------------------------
        # Block RAM even when small (synthesis would otherwise build small ones from flip-flops).
        block = {"ram_style": "block"}
        # Every buffer is read a cycle after its address is given, with the old data when the
        # address is written in that cycle. A block RAM leaves such a read undefined, so yosys
        # emulates it: it delays each write by a cycle and puts a multiplexer behind the RAM's
        # 5.8 ns clock-to-out (ECP5), the one LUT that made a lone link engine miss 8 ns. Where
        # no read ever meets a write of its address, synthesis is told so (`no_rw_check`) and
        # the RAM's data goes straight into a flip-flop:
        # * the transmit buffer: a slot is written only while it is free and being taken in;
        #   a frame reads only slots taken in, and a cut-through frame (`ctrl_len`) reads the
        #   slot being taken in but is poisoned (its FCS inverted, the receiver drops it)
        #   whenever it reads a byte not stored in an earlier cycle, so what such a read
        #   returns never counts (its digest is written again when the message goes whole);
        # * the receive buffer: a slot is written only while it is free and not being streamed
        #   early, and the early stream of a frame still arriving (SPEC) reads only bytes stored
        #   in earlier cycles;
        # * the received digests: written at a DATA frame's p2, read at the next frame's SEQ,
        #   at least 3 cycles later.
        # yosys takes the attribute only where it merges a register into an asynchronous read
        # port, so these reads are written that way (`_sync_read`): the same synchronous read
        # with an enable, old data on a collision. The unit tests check the claims on every
        # cycle (`buf_access`). The sent digests are written as a DATA frame goes out and read
        # as any frame's SEQ comes in, so those can meet: on the ECP5 they are LUT RAM, whose
        # asynchronous read registered at the write's clock edge is the old data by itself;
        # elsewhere (the iCE40 has no LUT RAM) yosys's emulation stays.
        unchecked = {**block, "no_rw_check": 1}
        m.submodules.tx_buf = tx_buf = Memory(shape=8, depth=W * MAXP, init=[], attrs=unchecked)
        m.submodules.rx_buf = rx_buf = Memory(shape=8, depth=W * MAXP, init=[], attrs=unchecked)
        lut_ram = getattr(platform, "family", None) == "ecp5"
        m.submodules.tx_digests = tx_digests = Memory(
            shape=32, depth=W, init=[], attrs={"ram_style": "distributed"} if lut_ram else block)
        m.submodules.rx_digests = rx_digests = Memory(shape=32, depth=W, init=[], attrs=unchecked)

        def _sync_read(memory, name):
            lookup = memory.read_port(domain="comb")
            port = _SyncRead(addr=lookup.addr, en=Signal(name=f"{name}_en"),
                             data=Signal(memory.shape, name=f"{name}_data", reset_less=True))
            with m.If(port.en):
                m.d.sync += port.data.eq(lookup.data)
            return port

        txb_w, txb_r = tx_buf.write_port(), _sync_read(tx_buf, "txb_r")
        rxb_w, rxb_r = rx_buf.write_port(), _sync_read(rx_buf, "rxb_r")
        txd_w, txd_r = tx_digests.write_port(), tx_digests.read_port()
        rxd_w, rxd_r = rx_digests.write_port(), _sync_read(rx_digests, "rxd_r")
        # (write, read, and whether their meeting in this cycle is harmless: `ser.poison`)
        self.buf_access = {name: (w.en, w.addr, r.en, r.addr, excused) for name, w, r, excused in (
            ("tx_buf", txb_w, txb_r, ser.poison), ("rx_buf", rxb_w, rxb_r, C(0)),
            ("rx_digests", rxd_w, rxd_r, C(0)))}

        # ---- link state ----------------------------------------------------------------
        up = Signal()               # transfers flow
        seen = Signal()             # while DOWN: reconciled with a HELLO from the peer
        fresh = Signal(init=1)      # out of reset, no transfer state yet
        incompatible = Signal()
        peer_id = Signal(16)
        version = Signal(8)

        # sender side
        tx_free = Signal(8)         # oldest transfer not yet freed
        tx_commit = Signal(8)       # commit cursor: all before it reflected intact
        tx_next = Signal(8)         # next sequence number to assign
        need_send = Signal(W)
        reflected = Signal(W)
        sent = Signal(W)
        tx_len = Array(Signal(8, name=f"tx_len{i}") for i in range(W))
        tx_ctrl = Signal(W)
        tx_order = Array(Signal(8, name=f"tx_order{i}") for i in range(W))
        send_count = Signal(8)

        # receiver side
        rx_next = Signal(8)         # delivery cursor: next transfer to deliver
        rx_commit = Signal(8)       # the peer's commit cursor as last heard
        rx_valid = Signal(W)
        rx_len = Array(Signal(8, name=f"rx_len{i}") for i in range(W))
        rx_ctrl = Signal(W)

        # Per-slot flag vectors are changed by several processes in the same cycle: each
        # contributes a set or clear mask (inside its own condition) and they are OR-ed.
        masks = {name: [] for name in ("need_set", "need_clr", "refl_set", "refl_clr",
                                       "sent_set", "sent_clr", "rxv_set", "rxv_clr")}

        def drive(name, value=None, *, bit=None):
            part = Signal(W, name=f"{name}{len(masks[name])}")
            if bit is None:
                m.d.comb += part.eq(value)
            else:
                m.d.comb += part.bit_select(bit, 1).eq(1)
            masks[name].append(part)

        # Sequence-distance comparisons against small constants and ranges of slots, built
        # from LUTs (no carry chains): on small FPGAs the many 8-bit `<`/`<=` of the
        # original formulation dominated both area and the critical path.
        def lt_w(value):
            """value < W for an 8-bit distance."""
            return value[slot_bits:] == 0

        def le_w(value):
            """value <= W for an 8-bit distance."""
            return lt_w(value) | (value == W)

        def low(value):
            """A distance known to be <= W, in slot_bits + 1 bits."""
            return value[:slot_bits + 1]

        def lut_lt(a, b):
            """a < b for two short unsigned values, as logic (no carry chain)."""
            result, equal_above = Const(0), Const(1)
            for k in reversed(range(len(a))):
                result = result | (equal_above & ~a[k] & b[k])
                equal_above = equal_above & ~(a[k] ^ b[k])
            return result

        def range_mask(base, count):
            """Slots holding sequence numbers base .. base+count-1 (all slots if count >= W).

            Per slot j: (j - base) mod W < count, with the offset from a table of base's slot
            bits (no shifter: this feeds the send and receive flags in many places)."""
            everything = count[slot_bits:] != 0
            base_slot = base[:slot_bits]
            bits = []
            for j in range(W):
                offset = Array(Const((j - f) % W, slot_bits) for f in range(W))[base_slot]
                bits.append(everything | lut_lt(offset, count[:slot_bits]))
            return Cat(*bits)

        tx_in_flight = _mod(tx_next - tx_free)
        tx_uncommitted = _mod(tx_next - tx_commit)
        # (tx_next - tx_commit and rx_commit - rx_next never exceed W)
        uncommitted_mask = range_mask(tx_commit, low(tx_uncommitted))
        rx_committed_mask = range_mask(rx_next, low(_mod(rx_commit - rx_next)))

        # ---- counters ------------------------------------------------------------------
        incr = {name: Signal(name=f"inc_{name}") for name in COUNTERS if name != "aborts"}
        aborted = Signal(8)   # added to `aborts` (several at once)
        # The events are registered: a counter moves one cycle after its event, and no event
        # logic reaches the counters' carry chains (or a CounterBank's accumulators).
        events = self.status.events
        m.d.sync += [events.aborts.eq(aborted),
                     *(events[name].eq(strobe) for name, strobe in incr.items())]
        count_events(m, events, self.status, self.counter_width)
        m.d.comb += [
            self.status.state.eq(Mux(incompatible, LinkState.INCOMPATIBLE,
                                     Mux(up, LinkState.UP, Mux(seen, LinkState.INIT, LinkState.DOWN)))),
            self.status.peer_id.eq(peer_id),
            self.status.version.eq(version),
            self.status.in_flight.eq(tx_in_flight),
            self.status.tx_free.eq(tx_free), self.status.tx_commit.eq(tx_commit),
            self.status.tx_next.eq(tx_next), self.status.rx_next.eq(rx_next),
            self.status.rx_commit.eq(rx_commit),
        ]

        # ---- receive pipeline ------------------------------------------------------------
        # A frame's verdict comes from the deframer in cycle `p1` (dfr.end). In p1 every
        # check on the frame is evaluated from the deframer's latched fields and the cursors,
        # and registered; in p2 the registered decisions are applied. Every other process that
        # changes state the checks read (ingest, delivery, the commit cursor, the transmit
        # scheduler, the timers) holds still in p1, so the state in p2 is the state the checks
        # saw: the result is the same as processing the frame in one cycle, in p2. A new frame
        # needs at least three bytes (SYNC, SYNC, TYPE) before any latched field changes, and
        # its SEQ byte (the first one that reads the cursors) comes after p2.
        p1 = dfr.end
        p2 = Signal()
        m.d.sync += p2.eq(p1)

        # ---- ingest: input messages into free replay-buffer slots ------------------------
        src_ctrl = Signal()
        ctrl_ingest = Signal()  # a ctrl message is being offered and taken in
        in_index = Signal(8)
        in_slot = slot_of(tx_next)
        m.d.comb += [txb_w.addr.eq(_slot_address(in_slot, in_index, MAXP))]
        # Cut-through (ctrl messages with a length hint): the DATA frame of slot tx_next may
        # start while the message is taken in. The serializer reads payload byte j four
        # bytes into the frame plus j; if a byte is not stored by then, the message
        # turns out another length, or it is aborted, the frame is poisoned (its FCS goes out
        # inverted, the receiver drops it) and the message is sent again once it is whole.
        ct_hint = Signal(8)         # the hint taken with the first byte (0: none)
        ct_started = Signal()       # a cut-through frame of the message being taken in is out
        ct_bad = Signal()           # it was poisoned
        ct_taking0 = Signal()       # comb: byte 0 of a ctrl message is taken this cycle
        ct_copying = Signal()       # comb: a ctrl message is being taken in (COPY)
        ct_start = Signal()         # comb: the scheduler starts the cut-through frame now
        ct_poison = Signal()        # comb: poison it now
        ct_hazard = Signal()        # comb: ... because it fell behind or was aborted
        ct_on_wire = Signal()       # the serializer is sending the cut-through frame
        ct_len_now = Mux(ct_taking0, self.ctrl_len, ct_hint)
        # (whether a length is usable is worked out for both candidates side by side, the
        # hint's kept with it: choosing the length first put the ingest state, a multiplexer
        # and two comparisons in front of the scheduler's every decision)
        ctrl_len_ok = (self.ctrl_len != 0) & (self.ctrl_len <= MAXP)
        ct_hint_ok = Signal()       # ct_hint != 0 and ct_hint <= MAXP
        ct_ready = ((ct_taking0 & ctrl_len_ok | ct_copying & ct_hint_ok) & ~ct_started & ~ct_bad)
        ct_live = ct_started | ct_start
        written = Mux(ct_taking0, 0, in_index)    # bytes stored before this cycle
        # (only the cut-through frame itself is ever poisoned)
        m.d.comb += ser.poison.eq(ct_poison & (ct_on_wire | ct_start))
        with m.If(ct_start):
            m.d.sync += ct_on_wire.eq(1)
        with m.Elif(ser.done):
            m.d.sync += ct_on_wire.eq(0)
        with m.If(ct_started & ct_on_wire & ser.buf_en & (ser.read_index < ct_hint) &
                  (ser.read_index >= written)):
            m.d.comb += ct_hazard.eq(1)
        with m.If(ct_started & self.ctrl_abort):
            m.d.comb += ct_hazard.eq(1)
        with m.If(ct_hazard):
            m.d.comb += ct_poison.eq(1)
        with m.If(ct_start):
            m.d.sync += ct_started.eq(1)

        # Room in the window for a new message, from flip-flops: tx_in_flight as it was a
        # cycle ago, counting the message completed then (cursors only ever free room
        # otherwise, except in a p2 that reconciles with a HELLO: no message starts the
        # cycle after a p2).
        took = Signal()         # comb: a message's last byte is taken (tx_next moves on)
        took_r, below_w, below_w1, p3 = Signal(), Signal(), Signal(), Signal()
        m.d.sync += [took_r.eq(took), below_w.eq(lt_w(tx_in_flight)),
                     below_w1.eq(lt_w(tx_in_flight) & ~tx_in_flight[:slot_bits].all()), p3.eq(p2)]
        room = ~p3 & (below_w1 | (below_w & ~took_r))
        # The slot a new message goes into is free while there is room: its `reflected` flag
        # is cleared then (not at the message's last byte, deep in the ingest logic).
        with m.If(room):
            drive("refl_clr", bit=in_slot)

        def take_byte(is_ctrl, index):
            """Store one input byte at ``index`` of slot tx_next; finish on its last byte."""
            src = Signal.like(self.ctrl_in.payload, name=f"src_at_{'0' if isinstance(index, int) else 'i'}")
            m.d.comb += [src.eq(Mux(is_ctrl, self.ctrl_in.payload, self.payload_in.payload)),
                         txb_w.addr.eq(_slot_address(in_slot, index, MAXP)), txb_w.data.eq(src.data), txb_w.en.eq(1),
                         self.ctrl_in.ready.eq(is_ctrl), self.payload_in.ready.eq(~is_ctrl)]
            m.d.sync += in_index.eq(index + 1)
            with m.If(src.last):
                m.d.comb += took.eq(1)
                m.d.sync += [tx_len[in_slot].eq(index + 1),
                             tx_ctrl.bit_select(in_slot, 1).eq(is_ctrl),
                             tx_next.eq(tx_next + 1), ct_started.eq(0)]
                with m.If(ct_live & (index + 1 == ct_len_now) & ~ct_hazard & ~ct_bad):
                    drive("sent_set", bit=in_slot)      # its frame is on the wire, intact
                with m.Else():
                    drive("need_set", bit=in_slot)
                    drive("sent_clr", bit=in_slot)
                    with m.If(ct_live):
                        m.d.comb += ct_poison.eq(1)
                m.next = "IDLE"
            with m.Elif(ct_live & (index + 1 == ct_len_now)):
                m.d.comb += ct_poison.eq(1)             # longer than announced
                with m.If(index == MAXP - 1):
                    m.d.comb += incr["oversize"].eq(1)
                    m.next = "DRAIN"
                with m.Else():
                    m.next = "COPY"
            with m.Elif(index == MAXP - 1):
                m.d.comb += incr["oversize"].eq(1)
                m.next = "DRAIN"
            with m.Else():
                m.next = "COPY"

        with m.FSM(name="ingest"):
            with m.State("IDLE"):
                # A message's first byte is taken at once (ctrl first at a message boundary).
                pick_ctrl = self.ctrl_in.valid & ~self.ctrl_abort
                with m.If(~fresh & room):
                    m.d.comb += ctrl_ingest.eq(self.ctrl_in.valid)
                    with m.If((pick_ctrl | self.payload_in.valid) & ~p1):
                        m.d.sync += [src_ctrl.eq(pick_ctrl), ct_hint.eq(Mux(pick_ctrl, self.ctrl_len, 0)),
                                     ct_hint_ok.eq(pick_ctrl & ctrl_len_ok),
                                     ct_bad.eq(0)]
                        m.d.comb += ct_taking0.eq(pick_ctrl)
                        take_byte(pick_ctrl, 0)
            with m.State("COPY"):
                m.d.comb += [ctrl_ingest.eq(src_ctrl & self.ctrl_in.valid), ct_copying.eq(src_ctrl)]
                with m.If(src_ctrl & self.ctrl_abort):
                    # the ctrl source was reset inside a message: drop what came of it
                    m.d.sync += ct_started.eq(0)
                    m.next = "IDLE"
                with m.Elif(Mux(src_ctrl, self.ctrl_in.valid, self.payload_in.valid) & ~p1):
                    take_byte(src_ctrl, in_index)
            with m.State("DRAIN"):
                valid = Mux(src_ctrl, self.ctrl_in.valid, self.payload_in.valid)
                last = Mux(src_ctrl, self.ctrl_in.payload.last, self.payload_in.payload.last)
                m.d.comb += [self.ctrl_in.ready.eq(src_ctrl), self.payload_in.ready.eq(~src_ctrl)]
                with m.If(valid & last | src_ctrl & self.ctrl_abort):
                    m.d.sync += ct_started.eq(0)
                    m.next = "IDLE"
        with m.If(ct_poison):      # (after the FSM: overrides the clear at a first byte)
            m.d.sync += ct_bad.eq(1)

        # ---- delivery ---------------------------------------------------------------------
        # Two cursors. `rx_next` (the delivery cursor, sent as DCUR) retires committed
        # transfers in order: payload is streamed out when it is retired. `rx_early` (E,
        # rx_next <= E <= rx_next + W) hands control-class messages out at their first intact
        # arrival: it passes held transfers in sequence order, streaming each ctrl one out on
        # `ctrl_out` as it passes it; payload is only passed. Every ctrl transfer in
        # [rx_next, E) has been delivered, so retiring it streams nothing. E is kept when the
        # link goes down (a transfer re-sent under the same sequence number by the same
        # sender incarnation is not delivered again); it is pulled back to rx_commit when a
        # fresh peer continues its numbering there (new transfers under those numbers).
        rx_early = Signal(8)
        dl_finish = Signal()    # a payload's last byte went out in p1: advance rx_next in p2
        early_moved = Signal()  # E was pulled back during an early stream: don't advance it
        out_index = Signal(8)
        st_slot = Signal(slot_bits)    # the slot being streamed
        st_final = Signal(8)           # its length less one (from rx_len of st_slot)
        st_last = Signal()             # out_index == the length, kept as a flag as it moves
        st_ctrl = Signal()
        st_early = Signal()
        streaming = Signal()
        dl_slot = slot_of(rx_next)
        e_slot = slot_of(rx_early)
        e_off = _mod(rx_early - rx_next)
        # (E - rx_next is in 0..W, so it is below W unless E and rx_next share their slot
        # bits and differ: no subtraction in front of the delivery decisions)
        e_behind = rx_early != rx_next
        e_in_window = ~((rx_early[:slot_bits] == rx_next[:slot_bits]) & e_behind)
        # What is held at E is looked up a cycle ahead too; the cycle after E moved, a p2 (where
        # transfers are stored, and E can be pulled back) or going down (which clears
        # uncommitted transfers, possibly the one at E) holds E's decisions off. (E passes
        # held payload transfers every other cycle.)
        e_held, e_ctrl, e_stale = Signal(), Signal(), Signal()
        e_moved = Signal()      # comb: E moves on (outside p2)
        m.d.sync += [e_held.eq(e_in_window & rx_valid.bit_select(e_slot, 1)),
                     e_ctrl.eq(rx_ctrl.bit_select(e_slot, 1))]
        e_ready = e_held & ~e_stale
        # The cursor comparisons in front of retiring, and what is held at rx_next, are a
        # cycle old; the cycle after rx_next moved, or after a p2 (the only place rx_commit
        # or E move back, and where transfers are stored), holds retiring off. Cursors moving
        # forward meanwhile only delay it by a cycle. (Going down outside p2 clears only
        # uncommitted transfers: never the one at rx_next while rx_next != rx_commit.)
        rx_pending, e_passed, cursors_moved = Signal(), Signal(), Signal()
        dl_held, dl_ctrl = Signal(), Signal()
        advance = Signal()      # comb: rx_next moves on
        m.d.sync += [rx_pending.eq(rx_next != rx_commit), e_passed.eq(e_behind),
                     cursors_moved.eq(advance | p2),
                     dl_held.eq(rx_valid.bit_select(dl_slot, 1)), dl_ctrl.eq(rx_ctrl.bit_select(dl_slot, 1))]
        retire_ok = rx_pending & e_passed & ~cursors_moved & dl_held & ~dl_finish
        delivered = Signal()
        m.d.comb += [rxb_r.addr.eq(_slot_address(st_slot, out_index, MAXP)), rxb_r.en.eq(0)]
        # (the block RAM's output goes to both streams as it is, whatever the state: it
        # appears late in the cycle, and the register stage after the link gets it directly)
        m.d.comb += [self.ctrl_out.payload.data.eq(rxb_r.data), self.payload_out.payload.data.eq(rxb_r.data)]
        early_arrival = Signal()  # p2: the ctrl transfer at E is being stored right now
        skip = Signal()         # rx_next retires a ctrl transfer E has delivered
        # Receive-side cut-through: the frame whose LEN byte came in the cycle before carries
        # the next ctrl message in order (DATA, FLAG_CTRL, SEQ = E, its slot writable): stream
        # it as it arrives (SPEC), its last byte only once the frame is accepted.
        sp_len = Signal(8)      # its length
        sp_stored = Signal(8)   # payload bytes of the frame stored so far
        # (out_index < sp_len and out_index < sp_stored, kept as flags as both move by one:
        # no comparator in front of the read decision)
        sp_more, sp_unread = Signal(), Signal()
        sp_have = Signal()
        sp_ok = Signal()        # the frame was accepted: the last byte may go
        sp_fail = Signal()      # it was not (or the link went down first): drop it
        sp_any = Signal()       # a byte of it was taken
        # (decided the cycle after LEN, from the latched length: the received byte has the
        # deframer's own decisions in front of it. At most one payload byte has been stored
        # by then, and E can have moved: it is compared again.)
        sp_candidate = Signal()
        m.d.sync += sp_candidate.eq(dfr.len_valid & dfr.wrote & (dfr.type == FrameType.DATA) &
                                    dfr.flags[_flag_bit(FLAG_CTRL)] &
                                    (dfr.len_now != 0) & (dfr.len_now <= MAXP))
        sp_go = Signal()
        m.d.comb += sp_go.eq(sp_candidate & (dfr.seq == rx_early) & up)
        sp_ended = Signal()     # the frame's FCS verdict came (p1)
        with m.FSM(name="deliver"):
            # (IDLE only chooses: its first read is FETCH's, from registers, so the choice
            # does not reach the block RAM's address in the same cycle. A ctrl transfer at E
            # that arrives while IDLE, outside SPEC, is streamed once it is held, the cycle
            # after its p2: the accept decision stays out of the choice.)
            with m.State("IDLE"):
                with m.If(e_ready & e_ctrl):
                    m.d.sync += [out_index.eq(0), st_slot.eq(e_slot), st_ctrl.eq(1), st_early.eq(1),
                                 early_moved.eq(0)]
                    m.next = "FETCH"
                with m.Elif(sp_go):
                    m.d.sync += [out_index.eq(0), st_slot.eq(slot_of(dfr.seq)), st_ctrl.eq(1), st_early.eq(1),
                                 early_moved.eq(0), sp_len.eq(dfr.length), sp_have.eq(0), sp_ok.eq(0),
                                 sp_fail.eq(~dfr.phy_rx.valid), sp_any.eq(0), sp_ended.eq(0),
                                 sp_stored.eq(dfr.buf_we), sp_more.eq(1), sp_unread.eq(dfr.buf_we)]
                    m.next = "SPEC"
                with m.Elif(retire_ok & ~dl_ctrl):
                    m.d.sync += [out_index.eq(0), st_slot.eq(dl_slot), st_ctrl.eq(0), st_early.eq(0)]
                    m.next = "FETCH"
                with m.If(retire_ok & dl_ctrl & ~p1):
                    m.d.comb += skip.eq(1)
            with m.State("FETCH"):
                m.d.comb += [streaming.eq(1), rxb_r.en.eq(1)]
                fetched_len = rx_len[st_slot]
                m.d.sync += [out_index.eq(1), st_final.eq(fetched_len - 1), st_last.eq(fetched_len == 1)]
                m.next = "STREAM"
            with m.State("STREAM"):
                m.d.comb += streaming.eq(1)
                last = st_last
                for port, is_ctrl in ((self.ctrl_out, 1), (self.payload_out, 0)):
                    m.d.comb += [port.valid.eq(st_ctrl == is_ctrl),
                                 port.payload.last.eq(last)]
                ready = Mux(st_ctrl, self.ctrl_out.ready, self.payload_out.ready)
                with m.If(ready):
                    m.d.comb += rxb_r.en.eq(1)
                    m.d.sync += [out_index.eq(out_index + 1), st_last.eq(out_index == st_final)]
                    with m.If(last):
                        m.d.comb += incr["delivered"].eq(1)
                        with m.If(st_early):
                            with m.If(~early_moved):
                                m.d.comb += e_moved.eq(1)
                                m.d.sync += rx_early.eq(rx_early + 1)
                        with m.Else():
                            m.d.comb += delivered.eq(1)
                            with m.If(p1):
                                m.d.sync += dl_finish.eq(1)
                        m.next = "IDLE"
            with m.State("SPEC"):
                # The ctrl message at E streamed while its frame arrives: byte j is read once
                # the deframer has stored it (out_index: bytes read; sp_have: the read port
                # holds byte out_index - 1). The last byte is offered only once the frame has
                # been accepted (early_arrival, p2); a frame that fails, or the link going
                # down first, ends the message with a drop (if any byte of it was taken).
                m.d.comb += streaming.eq(1)
                cur_last = ~sp_more     # (out_index never passes sp_len)
                # (the last byte goes the cycle after the p2 that accepts the frame: offering
                # it in p2 put the whole accept decision in front of the stream's valid)
                offer = sp_have & (~cur_last | sp_ok)
                drop_now = sp_fail & ~offer
                port = self.ctrl_out
                m.d.comb += [port.valid.eq(offer | drop_now & sp_any),
                             port.payload.last.eq(cur_last | drop_now),
                             port.payload.drop.eq(drop_now)]
                taken = offer & port.ready
                with m.If(taken):
                    m.d.sync += sp_any.eq(1)
                stored = Signal()
                read = Signal()
                m.d.comb += [stored.eq(dfr.buf_we & ~sp_ended),
                             read.eq((~sp_have | taken) & sp_more & (sp_unread | sp_ok) & ~sp_fail)]
                with m.If(stored):
                    m.d.sync += sp_stored.eq(sp_stored + 1)
                with m.If(p1):
                    m.d.sync += sp_ended.eq(1)
                with m.If(read):
                    m.d.comb += rxb_r.en.eq(1)     # (at the default address: byte out_index)
                    m.d.sync += [out_index.eq(out_index + 1), sp_have.eq(1),
                                 sp_more.eq(out_index + 1 != sp_len)]
                with m.Elif(taken):
                    m.d.sync += sp_have.eq(0)
                # (sp_stored - out_index, the bytes stored and not read, moves by one at most)
                unread_many = _mod(sp_stored - out_index) > 1
                with m.If(stored & ~read):
                    m.d.sync += sp_unread.eq(1)
                with m.Elif(read & ~stored):
                    m.d.sync += sp_unread.eq(unread_many)
                # the verdict: the first p2 in SPEC is this frame's
                # (only a frame that arrives back to back: a gap in it, as on a cut wire or a
                # slower PHY, withdraws it, so the consumer never waits long on a frame)
                gap = ~sp_ended & ~p1 & ~dfr.phy_rx.valid
                with m.If(~sp_ok & ~sp_fail):
                    with m.If(p2 & early_arrival):
                        m.d.sync += sp_ok.eq(1)
                    with m.Elif(p2 | ~up | gap):
                        m.d.sync += sp_fail.eq(1)
                with m.If(taken & cur_last):
                    m.d.comb += incr["delivered"].eq(1)
                    with m.If(~early_moved):
                        m.d.comb += e_moved.eq(1)
                        m.d.sync += rx_early.eq(rx_early + 1)
                    m.next = "IDLE"
                with m.If(drop_now & (port.ready | ~sp_any)):
                    m.next = "IDLE"
        # E passes held payload transfers while it is not streaming one of its own.
        with m.If(e_ready & ~e_ctrl & ~(streaming & st_early)):
            m.d.comb += e_moved.eq(1)
            m.d.sync += rx_early.eq(rx_early + 1)
        m.d.comb += advance.eq((delivered & ~p1) | dl_finish | skip)
        with m.If(advance):
            m.d.sync += [rx_next.eq(rx_next + 1), dl_finish.eq(0)]
            drive("rxv_clr", bit=dl_slot)

        # ---- timers ----------------------------------------------------------------------
        idle_timer = Signal(range(max(self.idle_cycles, self.hello_cycles) + 1))
        dead_timer = Signal(range(self.dead_cycles + 1))
        retx_timer = Signal(range(self.retx_cycles + 1))
        hello_due = Signal()
        probe_due = Signal()
        probe_reply_due = Signal()
        heard = Signal()        # a frame was accepted this cycle
        progress = Signal()     # the sender made progress this cycle

        # ---- reflect queue -----------------------------------------------------------------
        flush = Signal()
        m.submodules.reflect_q = reflect_q = ResetInserter(flush)(fifo.SyncFIFOBuffered(width=8 + 32, depth=max(4, W)))

        # ---- transmit scheduling -----------------------------------------------------------
        # The DATA frame to send next: the oldest slot, in sequence order from tx_free, that
        # needs sending, one-hot (`data_pick`). Slot i is it if it needs sending and no slot
        # in [tx_free, i) does; which slots come before i depends on tx_free's slot only (a
        # table), so the choice is a few LUTs deep.
        free_slot = tx_free[:slot_bits]
        data_pick = Signal(W)
        for i in range(W):
            before = Array(Const(sum(1 << j for j in range(W) if (j - f) % W < (i - f) % W), W)
                           for f in range(W))[free_slot]
            m.d.comb += data_pick[i].eq(need_send[i] & ((need_send & before) == 0))
        data_slot = Signal(slot_bits)
        for b in range(slot_bits):
            m.d.comb += data_slot[b].eq(Cat(data_pick[i] for i in range(W) if i >> b & 1).any())
        # its sequence number: tx_free's upper bits, plus one past the wrap of the slots (the
        # pick wrapped if no slot from tx_free's up needs sending: beside the pick, not after it)
        from_free = Array(Const(sum(1 << j for j in range(f, W)), W) for f in range(W))[free_slot]
        wrapped = (need_send & from_free) == 0
        free_high = tx_free[slot_bits:]
        data_seq = Signal(8)
        m.d.comb += data_seq.eq(Cat(data_slot, Mux(wrapped, free_high + 1, free_high)))
        # The pick and its frame's fields are registered, and the scheduler sends the pick of
        # the cycle before if its slot still needs sending (`data_ready`). Its fields are
        # still right then: a slot that needs sending keeps its length and kind, and its
        # sequence number stays the same while tx_free does not free it. A slot that has only
        # just come to need sending is sent a cycle later. (The length is selected from the
        # registered pick, AND-OR: after the pick it was the longest path.)
        # Only sending it and p2 (freeing, reconciling) clear a send flag, so the slot still
        # needs sending unless it was just sent or this is the cycle after a p2 (p3).
        pick = Signal(W)
        pick_slot = Signal(slot_bits)
        pick_seq = Signal(8)
        pick_ctrl = Signal()
        m.d.sync += [pick.eq(data_pick), pick_slot.eq(data_slot), pick_seq.eq(data_seq),
                     pick_ctrl.eq((tx_ctrl & data_pick).any())]
        pick_len = 0
        for i in range(W):
            pick_len = pick_len | Mux(pick[i], tx_len[i], 0)
        pick_live = Signal()
        data_ready = pick_live & ~p3

        # (a cycle old: the cursors last sent are settled long before the frame ends)
        cursors_dirty = Signal()
        m.d.sync += cursors_dirty.eq((ser.sent_ccur != tx_commit) | (ser.sent_dcur != rx_next))
        heartbeat_due = Signal()    # idle_timer >= idle_cycles, kept with the timer
        hello_fields = Signal(HELLO_LEN * 8)
        m.d.comb += hello_fields.eq(Cat(self.node_id, self.ver_min, self.ver_max,
                                        Cat(fresh, seen, Const(0, 6)), tx_free, rx_commit, rx_next))
        m.d.comb += [ser.ccur.eq(tx_commit), ser.dcur.eq(rx_next),
                     ser.buf_data.eq(txb_r.data), txb_r.addr.eq(ser.buf_addr), txb_r.en.eq(ser.buf_en)]

        # A ctrl source may announce a message before it offers it: `ctrl_len` != 0 while
        # `ctrl_in.valid` is 0 (the epoch engine does while it works out a message for this
        # port). Meanwhile no REFLECT, DATA or SIGNAL is started, so the ctrl frame finds the
        # serializer idle; held back at most `EXPECT_CYCLES` cycles per frame started.
        EXPECT_CYCLES = 32
        announced = Signal()
        hold_timer = Signal(range(EXPECT_CYCLES + 1))
        m.d.comb += announced.eq((self.ctrl_len != 0) & ~self.ctrl_in.valid &
                                 (hold_timer != EXPECT_CYCLES))
        held = Signal()         # comb: the scheduler would start a frame but for `announced`
        # The scheduler's choice and the frame's fields are registered: the serializer starts
        # the cycle after it (`ser.start`) from those registers, so none of the deciding logic
        # reaches the serializer in the same cycle. Its side effects (the send state, the
        # reflect queue) take effect at the choice, as the frame is then certain to go.
        start = Signal()        # comb: a frame is chosen now
        m.d.sync += ser.start.eq(start)
        # no frame chosen or on its way out (~ser.busy & ~ser.start, kept as a flip-flop)
        ser_free = Signal(init=1)
        with m.If(start):
            m.d.sync += ser_free.eq(0)
        with m.Elif(ser.done):
            m.d.sync += ser_free.eq(1)
        with m.If(start):
            m.d.sync += hold_timer.eq(0)
        with m.Elif(held):
            m.d.sync += hold_timer.eq(hold_timer + 1)

        sending_data = Signal()
        m.d.sync += pick_live.eq(data_pick.any() & ~sending_data)
        with m.If(ser_free & self.enable & ~p1):
            with m.If(hello_due & ~up):
                m.d.comb += start.eq(1)
                m.d.sync += [ser.type_byte.eq(FrameType.HELLO), ser.seq.eq(0),
                             ser.length.eq(HELLO_LEN), ser.small.eq(hello_fields)]
                m.d.sync += hello_due.eq(0)
            with m.Elif(up & ct_ready):
                # cut-through: the ctrl message being taken in goes out as it arrives (before
                # a REFLECT: the ctrl message is what a neighbour's epoch engine waits for)
                m.d.comb += [start.eq(1), ct_start.eq(1)]
                m.d.sync += [ser.type_byte.eq(FrameType.DATA | FLAG_CTRL),
                             ser.seq.eq(tx_next), ser.slot.eq(in_slot), ser.length.eq(ct_len_now)]
                drive("sent_set", bit=in_slot)
                m.d.sync += [tx_order[in_slot].eq(send_count), send_count.eq(send_count + 1)]
            with m.Elif(up & reflect_q.r_rdy & ~announced):
                m.d.comb += [start.eq(1), reflect_q.r_en.eq(1)]
                m.d.sync += [ser.type_byte.eq(FrameType.REFLECT),
                             ser.seq.eq(reflect_q.r_data[:8]), ser.length.eq(REFLECT_LEN),
                             ser.small.eq(reflect_q.r_data[8:])]
            with m.Elif(up & data_ready & ~announced):
                m.d.comb += [start.eq(1), sending_data.eq(1),
                             incr["retransmits"].eq((sent & pick).any())]
                m.d.sync += [ser.type_byte.eq(FrameType.DATA | Mux(pick_ctrl, FLAG_CTRL, 0)),
                             ser.seq.eq(pick_seq), ser.slot.eq(pick_slot), ser.length.eq(pick_len)]
                drive("need_clr", pick)
                drive("sent_set", pick)
                for i in range(W):
                    with m.If(pick[i]):
                        m.d.sync += tx_order[i].eq(send_count)
                m.d.sync += send_count.eq(send_count + 1)
            with m.Elif(up & (cursors_dirty | probe_due | probe_reply_due | heartbeat_due) & ~ctrl_ingest &
                        ~announced):
                # (not while a ctrl message is being taken in: its DATA frame follows at once
                # and carries the cursors; a SIGNAL started now would delay it a whole frame)
                m.d.comb += start.eq(1)
                m.d.sync += [ser.type_byte.eq(FrameType.SIGNAL | Mux(probe_due, FLAG_PROBE, 0)),
                             ser.seq.eq(0), ser.length.eq(0)]
                m.d.sync += [probe_due.eq(0), probe_reply_due.eq(0)]
            with m.Elif(up & announced & (reflect_q.r_rdy | (need_send != 0) | cursors_dirty | probe_due |
                                          probe_reply_due | heartbeat_due)):
                m.d.comb += held.eq(1)
        with m.If(start):
            m.d.comb += incr["frames_tx"].eq(1)
        # the digest of each DATA frame as sent, for checking its REFLECT (`ser.slot` holds
        # the frame's slot until the next frame is chosen)
        m.d.comb += [txd_w.addr.eq(ser.slot), txd_w.data.eq(ser.digest), txd_w.en.eq(ser.digest_we)]

        # (the idle timer restarts with `ser.start`, the cycle after a frame is chosen: the
        # scheduler's whole choice stays out of the timers; `~hello_due` keeps a HELLO that is
        # being chosen from being asked for again)
        with m.If(ser.start | ~self.enable):
            m.d.sync += [idle_timer.eq(0), heartbeat_due.eq(0)]
        with m.Elif(idle_timer < max(self.idle_cycles, self.hello_cycles)):
            m.d.sync += [idle_timer.eq(idle_timer + 1), heartbeat_due.eq(idle_timer >= self.idle_cycles - 1)]
        with m.If(~hello_due & ~up & self.enable & (idle_timer >= self.hello_cycles) & ~ser.start):
            m.d.sync += hello_due.eq(1)

        # ---- receive processing ------------------------------------------------------------
        rx_window_off = _mod(dfr.seq_now - rx_next)
        # (not into the slot an early ctrl stream is reading, even if it was dropped meanwhile)
        m.d.comb += dfr.write_allowed.eq(lt_w(rx_window_off) & ~rx_valid.bit_select(slot_of(dfr.seq_now), 1) &
                                         ~(streaming & st_early & (st_slot == slot_of(dfr.seq_now))))
        m.d.comb += [rxb_w.addr.eq(dfr.buf_addr), rxb_w.data.eq(dfr.buf_data), rxb_w.en.eq(dfr.buf_we)]
        # digest lookups by SEQ, ready long before the frame ends
        m.d.comb += [txd_r.addr.eq(slot_of(dfr.seq_now)), txd_r.en.eq(dfr.seq_valid),
                     rxd_r.addr.eq(slot_of(dfr.seq_now)), rxd_r.en.eq(dfr.seq_valid)]
        # ... and passed through flip-flops (a block RAM's output arrives late in the cycle;
        # the read ports hold their data until the next frame's SEQ, at least 3 cycles
        # after this frame's p2).
        tx_digest, rx_digest = Signal(32), Signal(32)
        m.d.sync += [tx_digest.eq(txd_r.data), rx_digest.eq(rxd_r.data)]

        f_type, f_seq, f_len = dfr.type, dfr.seq, dfr.length
        f_slot = slot_of(f_seq)
        h = dfr.small
        p_node, p_vmin, p_vmax, p_flags = h[0:16], h[16:24], h[24:32], h[32:40]
        p_tx_base, p_rx_commit, p_rx_next = h[40:48], h[48:56], h[56:64]
        p_fresh, p_seen = p_flags[0], p_flags[1]

        # -- p1: the checks, registered (each `c_*` is valid in p2) --
        def check(name, value, width=1):
            reg = Signal(width, name=f"c_{name}")
            m.d.sync += reg.eq(value)
            return reg

        is_data, is_reflect = f_type == FrameType.DATA, f_type == FrameType.REFLECT
        is_signal, is_hello = f_type == FrameType.SIGNAL, f_type == FrameType.HELLO
        len_ok = Mux(is_data, (f_len != 0) & (f_len <= MAXP),
                 Mux(is_reflect, f_len == REFLECT_LEN,
                 Mux(is_signal, f_len == 0,
                 Mux(is_hello, f_len == HELLO_LEN, 0))))
        data_in_window = lt_w(_mod(f_seq - rx_next))
        data_behind = le_w(_mod(rx_next - f_seq))
        # live: f_seq in [tx_commit, tx_next) (at most W transfers), as an offset from
        # tx_commit below the uncommitted count, compared in plain logic (as the mask of
        # uncommitted slots looked up by f_slot, it was the longest path into c_well_formed)
        refl_off = _mod(f_seq - tx_commit)
        refl_live = lt_w(refl_off) & (tx_uncommitted[slot_bits] |
                                      lut_lt(refl_off[:slot_bits], tx_uncommitted[:slot_bits]))
        refl_behind = le_w(_mod(tx_commit - f_seq))
        seq_ok = Mux(is_data, data_in_window | data_behind,
                 Mux(is_reflect, refl_live | refl_behind, 1))
        c_well_formed = check("well_formed", len_ok & seq_ok)
        c_data = check("data", is_data)
        c_reflect = check("reflect", is_reflect)
        c_signal = check("signal", is_signal)
        c_hello = check("hello", is_hello)
        c_in_window = check("in_window", data_in_window)
        c_held = check("held", rx_valid.bit_select(f_slot, 1))
        refl_ok = refl_live & ~reflected.bit_select(f_slot, 1) & sent.bit_select(f_slot, 1)
        digest_ok = dfr.small[:32] == tx_digest
        c_refl_ok = check("refl_ok", refl_ok)
        c_digest_ok = check("digest_ok", digest_ok)
        # The wire keeps order: anything sent before this transfer and still unreflected
        # was lost.
        # (slot i went out before: order - tx_order[i] - 1 < 127 modulo 256, with one adder,
        # as order + ~tx_order[i], and the comparison with 127 in plain logic. `order` is
        # looked up a cycle ahead: if the slot was sent again in that cycle, the inference
        # uses its previous transmission and finds a subset of the losses, never more.)
        order = Signal(8)
        m.d.sync += order.eq(tx_order[f_slot])

        def sent_before(i):
            d = _mod(order + ~tx_order[i])
            return ~d[7] & ~d[:7].all()
        c_lost = check("lost", Cat(*[sent[i] & ~reflected[i] & ~need_send[i] & uncommitted_mask[i] &
                                     sent_before(i) for i in range(W)]), W)

        agreed = Mux(p_vmax < self.ver_max, p_vmax, self.ver_max)
        # (agreed >= max(p_vmin, ver_min), as four comparisons side by side)
        compatible = ((p_vmax >= p_vmin) & (p_vmax >= self.ver_min) &
                      (self.ver_max >= p_vmin) & (self.ver_max >= self.ver_min))
        c_agreed = check("agreed", agreed, 8)

        # What the frame does to the link state if it turns out intact and well formed,
        # decided here from the state (which holds still in p1), so that p2 only combines
        # these with the verdict. A HELLO from an incompatible peer takes the link down; from
        # a compatible one: while UP, a peer that has not seen us went down or restarted (go
        # down, reconcile, answer with a HELLO), one that has gets a probe reply; while DOWN
        # we reconcile, and come UP if the peer has seen us. Any other frame is admitted while
        # UP or once reconciled, and brings the link UP.
        hello_ok = is_hello & compatible
        c_hello_bad = check("hello_bad", is_hello & ~compatible)
        c_hello_reconcile = check("hello_reconcile", hello_ok & ~(up & p_seen))
        c_hello_answer = check("hello_answer", hello_ok & ~p_seen)      # hello_due
        c_hello_reply = check("hello_reply", hello_ok & p_seen)         # probe_reply_due
        c_hello_up = check("hello_up", hello_ok & ~up & p_seen)
        admit = ~is_hello & (up | (seen & ~incompatible))
        c_admit = check("admit", admit)
        c_admit_up = check("admit_up", ~is_hello & ~up & seen & ~incompatible)
        # whether the frame's transfer is stored, and into which slot (one-hot): an admitted,
        # well-formed DATA frame in the window whose payload went into the receive buffer
        # (`dfr.wrote` holds still until the next frame's TYPE). p2 only ANDs this with the
        # verdict: the whole chain of checks was in front of the receive flags.
        store = (is_data & admit & (f_len != 0) & (f_len <= MAXP) & data_in_window & dfr.wrote)
        c_store = check("store", store)
        c_store_slot = check("store_slot", Cat(*[store & (f_slot == i) for i in range(W)]), W)
        # whether it takes the link down: an incompatible or restarted peer's HELLO, or an
        # admitted REFLECT of a live transfer whose digest is not what we sent
        c_down = check("down", is_hello & ~compatible | hello_ok & up & ~p_seen |
                               admit & is_reflect & refl_ok & ~digest_ok)

        # The peer's commit cursor for what we receive: it only moves forward, over held
        # transfers, at most W ahead of rx_next.
        ccur_off = _mod(dfr.ccur - rx_next)
        ccur_held = (range_mask(rx_next, ccur_off) & ~rx_valid) == 0
        c_ccur_ok = check("ccur_ok", le_w(ccur_off) & (low(ccur_off) >= low(_mod(rx_commit - rx_next))) & ccur_held)
        # Offsets from tx_free are taken a cycle ahead of p1: DCUR and a HELLO's fields are in
        # at least the four FCS bytes before the frame's end, and tx_free only moves in p2,
        # at least a minimal frame (11 bytes) before the next p1.
        dcur_off = Signal(8)
        m.d.sync += dcur_off.eq(_mod(dfr.dcur - tx_free))
        # The peer's delivery cursor for what we send: frees our copies up to tx_commit.
        c_dcur_ok = check("dcur_ok", (dcur_off != 0) & le_w(dcur_off) &
                          (low(dcur_off) <= low(_mod(tx_commit - tx_free))))
        c_dcur_freed = check("dcur_freed", range_mask(tx_free, low(dcur_off)), W)

        # Reconciliation with a HELLO when we are not fresh: the peer committed everything
        # before p_rx_commit and delivered everything before p_rx_next. What depends on the
        # HELLO's fields and tx_free alone is worked out a cycle ahead, as the offsets are;
        # only tx_next, which ingest may move until p1, is compared in p1.
        cursors_ok, rec_freed, peer_committed = Signal(), Signal(W), Signal(W)
        commit_ahead, next_ahead = _mod(p_rx_commit - tx_free), _mod(p_rx_next - tx_free)
        m.d.sync += [cursors_ok.eq(~p_fresh & le_w(commit_ahead) & le_w(next_ahead) &
                                   (low(next_ahead) <= low(commit_ahead))),
                     rec_freed.eq(range_mask(tx_free, low(next_ahead))),
                     peer_committed.eq(range_mask(tx_free, low(commit_ahead)))]
        # (p_rx_commit - tx_free <= tx_in_flight, both <= W, exactly when
        # tx_next - p_rx_commit <= W, as W < 128)
        redo_peer = _mod(tx_next - p_rx_commit)
        peer_ok = cursors_ok & le_w(redo_peer)
        c_new_free = check("new_free", Mux(peer_ok, p_rx_next, tx_free), 8)
        c_new_commit = check("new_commit", Mux(peer_ok, p_rx_commit, tx_free), 8)
        c_rec_freed = check("rec_freed", rec_freed & peer_ok.replicate(W), W)
        # what is sent again: [new commit cursor, tx_next), that is the transfers in flight
        # but for those before p_rx_commit if the peer's cursors are taken (a mask from
        # the peer's cursor itself was the longest path)
        in_flight_mask = range_mask(tx_free, low(tx_in_flight))
        c_redo = check("redo", in_flight_mask & ~(peer_committed & peer_ok.replicate(W)), W)
        c_redo_count = check("redo_count", Mux(peer_ok, redo_peer, tx_in_flight), 8)

        # -- p2: apply --
        frame_ok = Signal()
        m.d.sync += frame_ok.eq(dfr.frame_ok)
        m.d.comb += incr["crc_errors"].eq(dfr.crc_error), incr["framing_errors"].eq(dfr.framing_error)
        with m.If(frame_ok):
            m.d.comb += incr["frames_rx"].eq(1)
            with m.If(~c_well_formed):
                m.d.comb += incr["malformed"].eq(1)

        # Going down: abort tentative (uncommitted) transfers held for the peer.
        go_down = Signal()
        reconcile = Signal()
        go_up = Signal()
        with m.If(go_down):
            m.d.comb += flush.eq(1)
            drive("rxv_clr", ~rx_committed_mask)
            with m.If(up):
                m.d.comb += incr["link_downs"].eq(1)

        accept = Signal()   # a non-HELLO frame that the link state admits
        intact = Signal()   # an intact, well-formed frame while enabled
        m.d.comb += intact.eq(frame_ok & c_well_formed & self.enable)
        with m.If(intact & c_hello):
            m.d.comb += heard.eq(1)
            m.d.sync += peer_id.eq(p_node)
            with m.If(c_hello_bad):
                m.d.sync += incompatible.eq(1)
            with m.Else():
                m.d.sync += [incompatible.eq(0), version.eq(c_agreed)]
            with m.If(c_hello_reconcile):
                m.d.comb += reconcile.eq(1)
                m.d.sync += seen.eq(1)
            with m.If(c_hello_answer):
                m.d.sync += hello_due.eq(1)
            with m.If(c_hello_reply):
                m.d.sync += probe_reply_due.eq(1)
            with m.If(c_hello_up):
                m.d.comb += go_up.eq(1)
        with m.If(intact & c_down):     # (one registered decision: go_down feeds every flag)
            m.d.comb += go_down.eq(1)
        with m.If(intact & c_admit):
            m.d.comb += [accept.eq(1), heard.eq(1)]
            with m.If(c_admit_up):
                m.d.comb += go_up.eq(1)

        # Reconcile with the peer's HELLO: agree on which transfers happened.
        with m.If(reconcile):
            with m.If(fresh):
                # Nothing of our own to keep: continue the peer's numbering. Transfers of
                # our previous incarnation that the peer committed but has not yet
                # delivered still occupy its window: count them as ours, held and
                # reflected, so they are freed by its delivery cursor and never resent.
                m.d.sync += [rx_next.eq(p_tx_base), rx_commit.eq(p_tx_base), rx_early.eq(p_tx_base),
                             tx_free.eq(p_rx_next), tx_commit.eq(p_rx_commit), tx_next.eq(p_rx_commit)]
                drive("rxv_clr", ~0)
                drive("need_clr", ~0)
                drive("refl_set", ~0)
            with m.Else():
                # The rest of what we sent never happened: send it again.
                m.d.sync += [tx_free.eq(c_new_free), tx_commit.eq(c_new_commit)]
                drive("need_clr", c_rec_freed)
                drive("refl_clr", c_rec_freed | c_redo)
                drive("need_set", c_redo)
                # Tentative transfers from the peer are aborted; what it committed is
                # still delivered here (also when the peer has restarted since).
                drive("rxv_clr", ~rx_committed_mask)
                with m.If(~seen):
                    m.d.comb += aborted.eq(c_redo_count)
                # A fresh peer numbers its new transfers from our rx_commit on: ctrl messages
                # its previous incarnation sent there and we handed out early are not those.
                with m.If(p_fresh & (low(e_off) > low(_mod(rx_commit - rx_next)))):
                    m.d.sync += [rx_early.eq(rx_commit), early_moved.eq(1)]

        # Cursors from an accepted frame.
        with m.If(accept):
            with m.If(c_ccur_ok):
                m.d.sync += rx_commit.eq(dfr.ccur)
            with m.If(c_dcur_ok):
                m.d.sync += tx_free.eq(dfr.dcur)
                m.d.comb += progress.eq(1)
                drive("refl_clr", c_dcur_freed)
                drive("need_clr", c_dcur_freed)

            with m.If(c_data):
                with m.If(c_in_window):
                    with m.If(~dfr.wrote & c_held):
                        # Held already: reflect what we hold, not what just arrived.
                        m.d.comb += [reflect_q.w_data.eq(Cat(f_seq, rx_digest)), reflect_q.w_en.eq(1)]
                with m.Else():
                    m.d.comb += incr["duplicates"].eq(1)
            with m.If(c_reflect & c_refl_ok):
                with m.If(c_digest_ok):
                    m.d.comb += progress.eq(1)
                    drive("refl_set", bit=f_slot)
                    # Everything sent before it and still unreflected was lost: send it again.
                    drive("need_set", c_lost)
                with m.Else():
                    m.d.comb += incr["reflect_mismatches"].eq(1)
            with m.If(c_signal & dfr.flags[_flag_bit(FLAG_PROBE)]):
                m.d.sync += probe_reply_due.eq(1)

        # Store an accepted DATA frame's transfer (accept, DATA, in the window, written).
        with m.If(frame_ok & self.enable & c_store):
            m.d.comb += early_arrival.eq(dfr.flags[_flag_bit(FLAG_CTRL)] & (f_seq == rx_early))
            m.d.sync += [rx_len[f_slot].eq(f_len)]
            m.d.sync += rx_ctrl.bit_select(f_slot, 1).eq(dfr.flags[_flag_bit(FLAG_CTRL)])
            m.d.comb += [rxd_w.addr.eq(f_slot), rxd_w.data.eq(dfr.digest), rxd_w.en.eq(1),
                         reflect_q.w_data.eq(Cat(f_seq, dfr.digest)),
                         reflect_q.w_en.eq(1)]
        drive("rxv_set", Mux(frame_ok & self.enable, c_store_slot, 0))

        # Commit: advance over contiguous reflected transfers, one per cycle.
        with m.If(~reconcile & ~p1 & (tx_commit != tx_next) & reflected.bit_select(slot_of(tx_commit), 1)):
            m.d.sync += tx_commit.eq(tx_commit + 1)

        # ---- liveness and retransmission ---------------------------------------------------
        # (both timers hold in p1. The dead timer's expiry stays set until a frame is heard,
        # and takes the link down outside p2, so whether p2's frame is heard never reaches
        # go_down: a frame accepted in that p2 still keeps the link up.)
        dead_expired = Signal()
        with m.If(heard | ~up):
            m.d.sync += [dead_timer.eq(0), dead_expired.eq(0)]
        with m.Elif(~p1 & ~dead_expired):
            m.d.sync += dead_timer.eq(dead_timer + 1)
            m.d.sync += dead_expired.eq(dead_timer == self.dead_cycles - 2)
        with m.If(dead_expired & up & ~p1 & ~p2):
            m.d.comb += go_down.eq(1)
        m.d.sync += e_stale.eq(e_moved | p2 | go_down)
        disabled = Signal()     # `enable` fell in p1: go down in p2
        m.d.sync += disabled.eq(p1 & ~self.enable)
        with m.If((~self.enable & ~p1 | disabled) & up):
            m.d.comb += go_down.eq(1)

        # (`outstanding` is a cycle old, and `retx_expired` says retx_timer >= retx_cycles - 1:
        # the timer restarts or fires a cycle later at most, and keeps no deep logic in front
        # of the send flags)
        waiting = (sent & ~reflected & ~need_send & uncommitted_mask) != 0
        outstanding = Signal()
        m.d.sync += outstanding.eq(waiting | (tx_free != tx_commit))
        retx_expired = Signal()
        with m.If(p1):
            pass
        with m.Elif(progress | ~outstanding | ~up):
            m.d.sync += [retx_timer.eq(0), retx_expired.eq(0)]
        with m.Elif(retx_expired):
            m.d.sync += [retx_timer.eq(0), retx_expired.eq(0)]
            drive("need_set", sent & ~reflected & uncommitted_mask)
            with m.If(tx_free != tx_commit):
                m.d.sync += probe_due.eq(1)
        with m.Else():
            m.d.sync += [retx_timer.eq(retx_timer + 1), retx_expired.eq(retx_timer >= self.retx_cycles - 2)]

        # Link state changes last, so they override the per-frame updates above. `seen`
        # only has a meaning while DOWN: it says we reconciled with the peer's HELLO.
        with m.If(go_down):
            m.d.sync += [up.eq(0), seen.eq(reconcile), probe_due.eq(0), probe_reply_due.eq(0)]
        with m.Elif(go_up):
            m.d.sync += [up.eq(1), fresh.eq(0), seen.eq(0)]

        def combined(name):
            value = Const(0, W)
            for part in masks[name]:
                value = value | part
            return value
        for vector, prefix in ((need_send, "need"), (reflected, "refl"), (sent, "sent"), (rx_valid, "rxv")):
            m.d.sync += vector.eq((vector & ~combined(f"{prefix}_clr")) | combined(f"{prefix}_set"))
        return m
