"""One epochlink NIC: an epoch engine on top of one link engine per port.

::

     host ──cmd/rsp──► EpochEngine ──ctrl_out[p]──► LinkEngine[p] ──phy_tx[p]──► wire
                        ▲  (LOCAL, REPORT,  ◄─ctrl_in[p]──  (bilateral   ◄─phy_rx[p]──
                        │   COMMITTED)      ◄─link_up[p]──   transfers)
     host ──payload──► EpochTagger ──────────────────────► payload_in[p]
     host ◄─payload─── EpochFence ◄──────────────────────  payload_out[p]

The epoch engine's REPORT and COMMIT messages travel as control-class transfers: priority
over payload, delivered in order at their first intact arrival (one one-way trip, not three),
at most once while neither end restarts; they are lattice facts, so a copy or a repeat across
a reset is harmless. Payload messages are tagged with this node's COMMITTED epoch and protocol version
and fenced at the far side (see :mod:`epochlink.hdl.fence`).
"""
from amaranth import *
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .common import (MessageByte, forward_status, message_signature, phy_rx_signature, phy_tx_signature,
                     refuse)
from .epoch import EpochCommand, EpochEngine, EpochResponse, EpochStatusSignature
from .fence import FENCE_EVENTS, EpochFence, EpochTagger
from .frame import LinkState
from .link import CtrlByte, LinkEngine, LinkStatusSignature, link_parameters
from .pipeline import PipelineRegister

__all__ = ["NICNode", "COPY_PREFIX"]


#: Registers named with this prefix are copies of one register, each placed next to what it
#: drives; board builds mark them ``keep`` (``boards/__main__.py``), or synthesis would merge
#: them back into one flip-flop.
COPY_PREFIX = "copy_"


def _register_copy(m, value, name):
    """``value`` registered in a flip-flop of its own (``COPY_PREFIX + name``)."""
    reg = Signal(name=COPY_PREFIX + name)
    m.d.sync += reg.eq(value)
    return reg


class NICNode(wiring.Component):
    """An epochlink NIC with ``ports`` link ports and ``domains`` persistence domains.

    Attributes
    ----------
    cmd, rsp : the epoch engine's host command interface.
    phy_tx, phy_rx : arrays of per-port byte streams to and from the wires.
    payload_in, payload_out : arrays of per-port payload message streams (epoch-tagged).
    node_id, ver_min, ver_max : identity and supported link protocol versions.
    link_enable : per-port enable of the link engines.
    fence_mode : :class:`~epochlink.hdl.fence.FenceMode` for every port.
    epoch_reset : resets the epoch engine alone (as at power-up), a cycle later; the links
        stay up.
    epoch : epoch engine status; link : per-port link status; fence counters per port.

    ``cut_through`` (default True) builds the epoch engine with its cut-through
    (:class:`~epochlink.hdl.epoch.EpochEngine`) and gives each link the length of the
    engine's outgoing message, so its DATA frame starts as the message is taken in. False:
    store and forward on both sides (less logic, shorter paths; for serial PHYs, whose byte
    time dwarfs the few cycles saved).
    """

    def __init__(self, *, ports=2, domains=8, epoch_width=32, counter_width=32, cut_through=True,
                 **link_args):
        try:
            link_parameters(**link_args)  # refused here, not when the link engines are built
        except (TypeError, ValueError) as error:
            refuse(self, str(error), type(error))
        self.ports = ports
        self.domains = domains
        self.cut_through = cut_through
        self.link_args = dict(link_args, counter_width=counter_width)
        self.epoch_args = dict(domains=domains, ports=ports, epoch_width=epoch_width,
                               counter_width=counter_width, cut_through=cut_through)
        super().__init__({
            "cmd": In(stream.Signature(EpochCommand)),
            "rsp": Out(stream.Signature(EpochResponse)),
            "phy_tx": Out(phy_tx_signature()).array(ports),
            "phy_rx": In(phy_rx_signature()).array(ports),
            "payload_in": In(message_signature()).array(ports),
            "payload_out": Out(message_signature()).array(ports),
            "node_id": In(16),
            "ver_min": In(8, init=1),
            "ver_max": In(8, init=1),
            "link_enable": In(1, init=1).array(ports),
            "fence_mode": In(2),
            "epoch_reset": In(1),
            "epoch": Out(EpochStatusSignature(domains, ports, epoch_width, counter_width)),
            "link": Out(LinkStatusSignature(counter_width)).array(ports),
            "fence_older": Out(counter_width).array(ports),
            "fence_newer": Out(counter_width).array(ports),
            "fence_dropped": Out(counter_width).array(ports),
            "fence_events": Out(FENCE_EVENTS).array(ports),
        })

    def elaborate(self, platform):
        m = Module()
        engine = EpochEngine(**self.epoch_args)
        # `epoch_reset` is registered here, once for the engine and once per port, so that each
        # copy can sit next to what it resets (the engine; a link's ingest and its message
        # stages) instead of one flip-flop fanning out across the chip.
        engine_reset = _register_copy(m, self.epoch_reset, "epoch_reset_engine")
        port_reset = [_register_copy(m, self.epoch_reset, f"epoch_reset_port{p}")
                      for p in range(self.ports)]
        m.submodules.epoch = ResetInserter(engine_reset)(engine)
        wiring.connect(m, wiring.flipped(self.cmd), engine.cmd)
        wiring.connect(m, engine.rsp, wiring.flipped(self.rsp))
        forward_status(m, engine.status, self.epoch)
        for p in range(self.ports):
            link = LinkEngine(**self.link_args)
            m.submodules[f"link{p}"] = link
            m.d.comb += [
                link.node_id.eq(self.node_id), link.ver_min.eq(self.ver_min),
                link.ver_max.eq(self.ver_max), link.enable.eq(self.link_enable[p]),
                # an engine reset inside a message must not splice it with the next one
                link.ctrl_abort.eq(port_reset[p]),
                # the message length lets the link put a message on the wire as it comes
                # (without cut-through: no hint, so the link's cut-through logic drops out)
                link.ctrl_len.eq(engine.ctrl_out_len[p] if self.cut_through else 0),
            ]
            if self.cut_through:
                # (the link's cut-through paces the message byte by byte with the engine)
                wiring.connect(m, engine.ctrl_out[p], link.ctrl_in)
            else:
                # Store and forward: two register stages between the engine's message sender
                # and the link's ingest too, one for each end (their handshake crossed the
                # chip on the 4-port ECP5 build; with one stage, whichever end it is placed
                # away from still sees the other end's logic through the long route). They
                # are reset with the engine, so no byte of an aborted message waits in them
                # when `ctrl_abort` has dropped the rest.
                source = engine.ctrl_out[p]
                for end in ("engine", "link"):
                    stage = ResetInserter(port_reset[p])(PipelineRegister(MessageByte))
                    m.submodules[f"msg_reg{p}_{end}"] = stage
                    wiring.connect(m, source, stage.i)
                    source = stage.o
                wiring.connect(m, source, link.ctrl_in)
            # Register stages on what leaves a link engine: its transmit buffer read ends in
            # flip-flops, not in the PHY, and in the store-and-forward build (the boards) so
            # do its receive decisions, not in the epoch engine. The cut-through build skips
            # that stage: it would cost every hop of a convergence a cycle that the
            # minimal-frame round trip does not show.
            if self.cut_through:
                wiring.connect(m, link.ctrl_out, engine.ctrl_in[p])
            else:
                m.submodules[f"ctrl_reg{p}"] = ctrl_reg = PipelineRegister(CtrlByte)
                wiring.connect(m, link.ctrl_out, ctrl_reg.i)
                wiring.connect(m, ctrl_reg.o, engine.ctrl_in[p])
            m.submodules[f"tx_reg{p}"] = tx_reg = PipelineRegister(8)
            wiring.connect(m, link.phy_tx, tx_reg.i)
            wiring.connect(m, tx_reg.o, wiring.flipped(self.phy_tx[p]))
            # Received bytes are registered too: the frame decoder starts from flip-flops. In
            # the store-and-forward build (the boards) they pass two registers, so that the
            # last one can sit next to the decoder it fans out to however far away the PHY is.
            rx_valid, rx_payload = self.phy_rx[p].valid, self.phy_rx[p].payload
            if not self.cut_through:
                rx_valid_r, rx_payload_r = Signal(name=f"phy_rx{p}_valid"), Signal(8, name=f"phy_rx{p}_payload")
                m.d.sync += [rx_valid_r.eq(rx_valid), rx_payload_r.eq(rx_payload)]
                rx_valid, rx_payload = rx_valid_r, rx_payload_r
            m.d.sync += [link.phy_rx.valid.eq(rx_valid), link.phy_rx.payload.eq(rx_payload)]
            forward_status(m, link.status, self.link[p])
            # The engine sees a link come up or go down a cycle late, from a flip-flop next to
            # the link (it fed the engine's send decisions across the chip on the 4-port ECP5
            # build). That is as if the link had changed a cycle later: a message loaded as
            # the link goes down is one the engine could have loaded a cycle earlier.
            link_up = Signal(name=f"link_up{p}")
            m.d.sync += link_up.eq(link.status.state == LinkState.UP)
            m.d.comb += engine.link_up[p].eq(link_up)

            m.submodules[f"tagger{p}"] = tagger = EpochTagger()
            m.submodules[f"fence{p}"] = fence = EpochFence(self.link_args["counter_width"])
            m.d.comb += [tagger.epoch.eq(engine.status.committed), tagger.version.eq(engine.status.active),
                         fence.epoch.eq(engine.status.committed), fence.mode.eq(self.fence_mode),
                         self.fence_older[p].eq(fence.older), self.fence_newer[p].eq(fence.newer),
                         self.fence_dropped[p].eq(fence.dropped),
                         self.fence_events[p].eq(fence.events)]
            wiring.connect(m, wiring.flipped(self.payload_in[p]), tagger.i)
            wiring.connect(m, tagger.o, link.payload_in)
            m.submodules[f"payload_reg{p}"] = payload_reg = PipelineRegister(MessageByte)
            wiring.connect(m, link.payload_out, payload_reg.i)
            wiring.connect(m, payload_reg.o, fence.i)
            wiring.connect(m, fence.o, wiring.flipped(self.payload_out[p]))
        return m
