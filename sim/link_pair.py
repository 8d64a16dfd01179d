"""Two link engines joined by two noisy channels: the design the link testbenches run.

::

        a_in ──►┌──────────┐  phy_tx   ┌──────────────┐  phy_rx  ┌──────────┐──► b_out
                │  engine  ├──────────►│ channel a→b  ├─────────►│  engine  │
     (or gen)   │    A     │  phy_rx   ┌──────────────┐  phy_tx  │    B     │  (and checker)
        a_out ◄─│          │◄──────────┤ channel b→a  │◄─────────┤          │◄── b_in
                └──────────┘           └──────────────┘          └──────────┘

Every knob is a top-level port, so cocotb sets error rates, bursts, cuts and resets
without any per-cycle Python. Each engine has its own reset (``a_rst``, ``b_rst``) on top
of the global one. A :class:`~epochlink.hdl.traffic.TrafficGenerator` can feed A and a
:class:`~epochlink.hdl.traffic.TrafficChecker` watches B's output (``use_generator``), for
runs long enough to measure goodput.
"""
from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..hdl.channel import ChannelModel
from ..hdl.common import message_signature
from ..hdl.link import LinkEngine, LinkStatusSignature, ctrl_out_signature
from ..hdl.traffic import TrafficChecker, TrafficGenerator

__all__ = ["LinkPair"]


class LinkPair(wiring.Component):
    """Two :class:`LinkEngine` s and two :class:`ChannelModel` s, as one Verilog top."""

    def __init__(self, *, delay=16, window=8, max_payload=64, counter_width=32, **timing):
        self.delay = delay
        self.engine_args = dict(window=window, max_payload=max_payload,
                                counter_width=counter_width, **timing)
        members = {"use_generator": In(1)}
        for node in ("a", "b"):
            members.update({
                f"{node}_rst": In(1),
                f"{node}_enable": In(1, init=1),
                f"{node}_node_id": In(16),
                f"{node}_ver_min": In(8, init=1),
                f"{node}_ver_max": In(8, init=1),
                f"{node}_in": In(message_signature()),
                f"{node}_out": Out(message_signature()),
                f"{node}_ctrl_in": In(message_signature()),
                f"{node}_ctrl_out": Out(ctrl_out_signature()),
                f"{node}_status": Out(LinkStatusSignature(counter_width)),
            })
        for direction in ("ab", "ba"):
            members.update({
                f"{direction}_error_threshold": In(32),
                f"{direction}_burst_threshold": In(32),
                f"{direction}_burst_length": In(16),
                f"{direction}_cut": In(1),
                f"{direction}_bytes_in": Out(32),
                f"{direction}_bytes_corrupted": Out(32),
                f"{direction}_bits_flipped": Out(32),
            })
        members.update({
            "gen_enable": In(1),
            "gen_min_length": In(8),
            "gen_max_length": In(8),
            "gen_count": In(32),
            "gen_sent": Out(32),
            "chk_received": Out(32),
            "chk_bytes": Out(32),
            "chk_errors_sequence": Out(32),
            "chk_errors_content": Out(32),
            "cycle": Out(32),
        })
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.cycle.eq(self.cycle + 1)
        engines = {}
        for index, node in enumerate(("a", "b")):
            domain = f"node_{node}"
            cd = ClockDomain(domain)
            m.domains += cd
            m.d.comb += [cd.clk.eq(ClockSignal("sync")),
                         cd.rst.eq(ResetSignal("sync") | getattr(self, f"{node}_rst"))]
            engine = DomainRenamer(domain)(LinkEngine(**self.engine_args))
            m.submodules[f"engine_{node}"] = engines[node] = engine
            m.d.comb += [
                engine.enable.eq(getattr(self, f"{node}_enable")),
                engine.node_id.eq(getattr(self, f"{node}_node_id")),
                engine.ver_min.eq(getattr(self, f"{node}_ver_min")),
                engine.ver_max.eq(getattr(self, f"{node}_ver_max")),
            ]
            wiring.connect(m, wiring.flipped(getattr(self, f"{node}_ctrl_in")), engine.ctrl_in)
            wiring.connect(m, engine.ctrl_out, wiring.flipped(getattr(self, f"{node}_ctrl_out")))
            wiring.connect(m, engine.status, wiring.flipped(getattr(self, f"{node}_status")))

        for index, (direction, src, dst) in enumerate((("ab", "a", "b"), ("ba", "b", "a"))):
            channel = ChannelModel(delay=self.delay, seed=0x5EED + index)
            m.submodules[f"channel_{direction}"] = channel
            m.d.comb += [
                channel.tx.valid.eq(engines[src].phy_tx.valid),
                channel.tx.payload.eq(engines[src].phy_tx.payload),
                engines[src].phy_tx.ready.eq(channel.tx.ready),
                engines[dst].phy_rx.valid.eq(channel.rx.valid),
                engines[dst].phy_rx.payload.eq(channel.rx.payload),
            ]
            for knob in ("error_threshold", "burst_threshold", "burst_length", "cut"):
                m.d.comb += getattr(channel, knob).eq(getattr(self, f"{direction}_{knob}"))
            for counter in ("bytes_in", "bytes_corrupted", "bits_flipped"):
                m.d.comb += getattr(self, f"{direction}_{counter}").eq(getattr(channel, counter))

        # A's payload input: from cocotb, or from the traffic generator.
        m.submodules.generator = gen = TrafficGenerator()
        m.submodules.checker = chk = TrafficChecker()
        m.d.comb += [gen.enable.eq(self.gen_enable & self.use_generator),
                     gen.min_length.eq(self.gen_min_length), gen.max_length.eq(self.gen_max_length),
                     gen.count.eq(self.gen_count), self.gen_sent.eq(gen.sent),
                     chk.min_length.eq(self.gen_min_length), chk.max_length.eq(self.gen_max_length),
                     self.chk_received.eq(chk.received), self.chk_bytes.eq(chk.bytes),
                     self.chk_errors_sequence.eq(chk.errors_sequence),
                     self.chk_errors_content.eq(chk.errors_content)]
        a, b = engines["a"], engines["b"]
        with m.If(self.use_generator):
            m.d.comb += [a.payload_in.valid.eq(gen.out.valid), a.payload_in.payload.eq(gen.out.payload),
                         gen.out.ready.eq(a.payload_in.ready)]
        with m.Else():
            m.d.comb += [a.payload_in.valid.eq(self.a_in.valid), a.payload_in.payload.eq(self.a_in.payload),
                         self.a_in.ready.eq(a.payload_in.ready)]
        wiring.connect(m, wiring.flipped(self.b_in), b.payload_in)
        wiring.connect(m, a.payload_out, wiring.flipped(self.a_out))
        # B's output goes to cocotb and is watched by the checker; the checker is always
        # ready, so in generator mode B never stalls.
        m.d.comb += [self.b_out.valid.eq(b.payload_out.valid), self.b_out.payload.eq(b.payload_out.payload),
                     b.payload_out.ready.eq(self.b_out.ready | self.use_generator),
                     chk.inp.valid.eq(b.payload_out.valid & b.payload_out.ready & self.use_generator),
                     chk.inp.payload.eq(b.payload_out.payload)]
        return m
