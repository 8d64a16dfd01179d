"""The epoch engine's command registers on the register bus.

Registers whose write is an epoch engine command (``Register.command`` in
:mod:`epochlink.registers`: ``ONLINE``, ``ACTIVE``, ``EPOCH_PORTp.ROLE``,
``DOMAINd.PERSISTED/ENABLE/DISABLE``) are not storage: the engine decides, and may refuse.
:class:`EpochRegisters` turns bus accesses to them into :class:`~epochlink.hdl.epoch.EpochCommand`
s and the engine's :class:`~epochlink.hdl.epoch.EpochResponse` back into a bus response.
:func:`command_addresses` tells a NIC which addresses to route here; everything else goes to
the :class:`~epochlink.hdl.regbank.RegisterBank`.

=======================  ===============================  ======================================
register                 read                             write v
=======================  ===============================  ======================================
``ONLINE``               engine ``online``                ``ONLINE v`` (v <= 1)
``ACTIVE``               engine ``active``                ``ACTIVE v`` (v <= 255; 0 refused)
``EPOCH_PORTp.ROLE``     role of port p                   ``ROLE p v`` (v <= 2)
``DOMAINd.PERSISTED``    ``READ d``: PERSISTED            ``PERSIST d v``; answers PERSISTED after
``DOMAINd.ENABLE``       ``READ d``: enabled bit          ``ENABLE d v``; answers the enabled bit
``DOMAINd.DISABLE``      0                                v = 1: ``DISABLE d``; v = 0: nothing
=======================  ===============================  ======================================

A value outside the register's range is refused with ``ILLEGAL_VALUE`` before it reaches the
engine. Engine statuses map onto bus statuses: ``LOWER`` -> ``REFUSED_LOWER``, ``DISABLED`` ->
``REFUSED_DISABLED``, ``ILLEGAL`` -> ``ILLEGAL_VALUE``, ``BAD_INDEX`` -> ``BAD_ADDRESS``. A
refused write answers the register's unchanged value.
"""
from amaranth import Module, Signal
from amaranth.lib import enum, stream, wiring
from amaranth.lib.wiring import In, Out

from epochlink.registers import RegisterMap

from .epoch import EpochCommand, EpochResponse
from .epoch_format import CmdStatus, Op
from .regbank import BusStatus, bus_signature

__all__ = ["command_addresses", "EpochRegisters"]


def command_addresses(regmap: RegisterMap) -> list[int]:
    """Addresses of the command registers of ``regmap`` (the ones :class:`EpochRegisters` serves)."""
    return [inst.address for inst in regmap if inst.register.command is not None]


class _Kind(enum.Enum, shape=3):
    ONLINE = 0
    ACTIVE = 1
    ROLE = 2
    PERSISTED = 3
    ENABLE = 4
    DISABLE = 5


_KIND_OF = {"ONLINE": _Kind.ONLINE, "ACTIVE": _Kind.ACTIVE, "ROLE": _Kind.ROLE,
            "PERSISTED": _Kind.PERSISTED, "ENABLE": _Kind.ENABLE, "DISABLE": _Kind.DISABLE}
#: Largest value a write may carry, per kind (checked before the engine sees it).
_WRITE_MAX = {_Kind.ONLINE: 1, _Kind.ACTIVE: 255, _Kind.ROLE: 2, _Kind.DISABLE: 1}
_WRITE_OP = {_Kind.ONLINE: Op.ONLINE, _Kind.ACTIVE: Op.ACTIVE, _Kind.ROLE: Op.ROLE,
             _Kind.PERSISTED: Op.PERSIST, _Kind.ENABLE: Op.ENABLE, _Kind.DISABLE: Op.DISABLE}
_BUS_STATUS = {CmdStatus.OK: BusStatus.OK, CmdStatus.BAD_INDEX: BusStatus.BAD_ADDRESS,
               CmdStatus.DISABLED: BusStatus.REFUSED_DISABLED,
               CmdStatus.LOWER: BusStatus.REFUSED_LOWER, CmdStatus.ILLEGAL: BusStatus.ILLEGAL_VALUE}


class EpochRegisters(wiring.Component):
    """Bus responder for the epoch engine's command registers (see the module docstring).

    Takes one request at a time (``bus.req.ready`` is low while one is executing) and answers
    it after the engine has (3 cycles plus the engine's response time); accesses that need
    no command take 2 cycles. Addresses that are not command registers of ``regmap`` answer
    ``BAD_ADDRESS``.

    Members
    -------
    bus : In(bus_signature())
    cmd : Out(stream.Signature(EpochCommand)), rsp : In(stream.Signature(EpochResponse))
        To the :class:`~epochlink.hdl.epoch.EpochEngine`.
    online, active : In
        The engine's ``status.online`` and ``status.active``.
    role : In(2).array(ports)
        The engine's ``status.port[p].role``.
    """

    def __init__(self, regmap: RegisterMap) -> None:
        self.regmap = regmap
        self.ports = regmap.ports or 0
        super().__init__({
            "bus": In(bus_signature()),
            "cmd": Out(stream.Signature(EpochCommand)),
            "rsp": In(stream.Signature(EpochResponse)),
            "online": In(1),
            "active": In(8),
            "role": In(2).array(max(1, self.ports)),
        })

    def elaborate(self, platform) -> Module:
        m = Module()
        req, rsp = self.bus.req, self.bus.rsp

        hit, kind, index = Signal(), Signal(_Kind), Signal(8)
        with m.Switch(req.payload.addr):
            for inst in self.regmap:
                if inst.register.command is None:
                    continue
                with m.Case(inst.address):
                    m.d.comb += [hit.eq(1), kind.eq(_KIND_OF[inst.register.name]),
                                 index.eq(inst.index or 0)]

        r_hit, r_kind, r_index = Signal(), Signal(_Kind), Signal(8)
        r_write, r_wdata = Signal(), Signal(32)
        r_status, r_rdata = Signal(BusStatus), Signal(32)

        role_now = Signal(2)
        with m.Switch(r_index):
            for p in range(len(self.role)):
                with m.Case(p):
                    m.d.comb += role_now.eq(self.role[p])
        current = Signal(32)       # the readable value that needs no command
        with m.Switch(r_kind):
            with m.Case(_Kind.ONLINE):
                m.d.comb += current.eq(self.online)
            with m.Case(_Kind.ACTIVE):
                m.d.comb += current.eq(self.active)
            with m.Case(_Kind.ROLE):
                m.d.comb += current.eq(role_now)

        too_big = Signal()
        with m.Switch(r_kind):
            for k, limit in _WRITE_MAX.items():
                with m.Case(k):
                    m.d.comb += too_big.eq(r_wdata > limit)

        domain_kind = (r_kind == _Kind.PERSISTED) | (r_kind == _Kind.ENABLE)
        # The command for the engine, decided in DECIDE and held in flip-flops (`cmd` is
        # driven from registers only: the engine decodes it in the same cycle).
        op = Signal(Op)
        with m.If(~r_write):
            m.d.comb += op.eq(Op.READ)
        with m.Else():
            with m.Switch(r_kind):
                for k, write_op in _WRITE_OP.items():
                    with m.Case(k):
                        m.d.comb += op.eq(write_op)
        r_op = Signal(Op)
        commanding = Signal()
        m.d.sync += r_op.eq(op)
        m.d.comb += [
            self.cmd.valid.eq(commanding),
            self.cmd.payload.op.eq(r_op),
            self.cmd.payload.index.eq(r_index),
            self.cmd.payload.value.eq(r_wdata),
        ]
        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += req.ready.eq(1)
                with m.If(req.valid):
                    m.d.sync += [r_hit.eq(hit), r_kind.eq(kind), r_index.eq(index),
                                 r_write.eq(req.payload.write), r_wdata.eq(req.payload.wdata)]
                    m.next = "DECIDE"

            with m.State("DECIDE"):
                m.d.sync += [r_status.eq(BusStatus.OK), r_rdata.eq(current)]
                with m.If(~r_hit):
                    m.d.sync += [r_status.eq(BusStatus.BAD_ADDRESS), r_rdata.eq(0)]
                    m.next = "RESPOND"
                with m.Elif(~r_write):
                    m.next = "RESPOND"
                    with m.If(domain_kind):         # PERSISTED and ENABLE live in the engine
                        m.d.sync += commanding.eq(1)
                        m.next = "COMMAND"
                with m.Elif(too_big):
                    m.d.sync += r_status.eq(BusStatus.ILLEGAL_VALUE)
                    m.next = "RESPOND"
                with m.Elif((r_kind == _Kind.DISABLE) & (r_wdata == 0)):
                    m.next = "RESPOND"
                with m.Else():
                    m.d.sync += commanding.eq(1)
                    m.next = "COMMAND"

            with m.State("COMMAND"):
                m.d.comb += self.rsp.ready.eq(1)
                with m.If(self.rsp.valid):
                    m.d.sync += commanding.eq(0)
                    status = self.rsp.payload.status
                    with m.Switch(status):
                        for cmd_status, bus_status in _BUS_STATUS.items():
                            with m.Case(cmd_status):
                                m.d.sync += r_status.eq(bus_status)
                        with m.Default():
                            m.d.sync += r_status.eq(BusStatus.ILLEGAL_VALUE)
                    ok = status == CmdStatus.OK
                    with m.Switch(r_kind):
                        with m.Case(_Kind.PERSISTED):
                            m.d.sync += r_rdata.eq(self.rsp.payload.value)
                        with m.Case(_Kind.ENABLE):
                            m.d.sync += r_rdata.eq(self.rsp.payload.enabled)
                        with m.Case(_Kind.DISABLE):
                            m.d.sync += r_rdata.eq(0)
                        with m.Default():       # ONLINE, ACTIVE, ROLE: the value now in force
                            with m.If(ok):
                                m.d.sync += r_rdata.eq(r_wdata)
                    m.next = "RESPOND"

            with m.State("RESPOND"):
                m.d.comb += [rsp.valid.eq(1), rsp.payload.status.eq(r_status),
                             rsp.payload.rdata.eq(r_rdata)]
                m.next = "IDLE"
        return m
