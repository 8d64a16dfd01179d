"""The register bank: the register map of :mod:`epochlink.registers` as gateware.

A :class:`RegisterBank` answers a simple register bus (:func:`bus_signature`) and gives
the rest of the gateware one port per register:

* RO (driven by hardware): an input the hardware drives with the current value;
* RO (constant): no port, the value is built in;
* RW: an output holding the host's value, plus ``<name>_wstb``, a one-cycle strobe
  asserted together with the new value after every accepted write (also when the value
  written equals the old one);
* W1C: an output holding the sticky bits, plus ``<name>_set``, an input: every bit
  driven 1 on it (for one cycle or more) sets the bit; a host write of 1 clears it
  (a set in the same cycle wins).

Ports of single-instance blocks live under the lowercase block name (``bank.node.scratch``),
those of multi-instance blocks in an array (``bank.port[1].frames_tx``). A register with a
single field at bit 0 has a plain unsigned port; one with several fields has a
:class:`~amaranth.lib.data.FlexibleLayout` port whose fields are named like the map's
fields (``bank.port[0].control.enable``).
"""

from amaranth import Cat, Const, Module, Mux, Signal, Value, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from epochlink.hostproto import Status
from epochlink.registers import Access, Block, Register, RegisterInstance, RegisterMap

__all__ = ["BusStatus", "BusRequest", "BusResponse", "bus_signature", "register_shape",
           "block_signature", "RegisterBank"]


class BusStatus(enum.Enum, shape=3):
    """Status of a register bus access (same codes as :class:`epochlink.hostproto.Status`)."""
    OK = int(Status.OK)
    BAD_ADDRESS = int(Status.BAD_ADDRESS)
    READ_ONLY = int(Status.READ_ONLY)
    ILLEGAL_VALUE = int(Status.ILLEGAL_VALUE)
    REFUSED_DISABLED = int(Status.REFUSED_DISABLED)
    REFUSED_LOWER = int(Status.REFUSED_LOWER)


class BusRequest(data.Struct):
    """A register access: read, or write of ``wdata``, at word address ``addr``."""
    addr: 16
    write: 1
    wdata: 32


class BusResponse(data.Struct):
    """The answer to one :class:`BusRequest`: the register value and a status.

    A read returns the value; a write returns the value after the write (unchanged when
    refused; 0 for ``BAD_ADDRESS``).
    """
    rdata: 32
    status: BusStatus


def bus_signature() -> wiring.Signature:
    """The register bus, seen from the requester.

    ``req`` carries requests (valid/ready). ``rsp`` returns exactly one response per
    accepted request, in order; it cannot be stalled, so the requester must be able to take
    it. The :class:`RegisterBank` answers three cycles after accepting a request; other
    responders (:class:`~epochlink.hdl.epoch_regs.EpochRegisters`) take longer, so a
    requester waits for the response before its next request.
    """
    return wiring.Signature({
        "req": Out(stream.Signature(BusRequest)),
        "rsp": In(stream.Signature(BusResponse, always_ready=True)),
    })


def register_shape(reg: Register):
    """The shape of a register's hardware port."""
    if reg.is_plain:
        return unsigned(reg.width)
    return data.FlexibleLayout(reg.width, {
        f.name: data.Field(unsigned(f.width), f.lsb) for f in reg.fields})


def _port_init(reg: Register, value: int):
    return value if reg.is_plain else reg.decode(value)


def _served(reg: Register, serve_counters: bool) -> bool:
    """Whether a :class:`RegisterBank` serves ``reg`` (command registers never, counters
    unless a :class:`~epochlink.hdl.counters.CounterBank` does)."""
    return reg.command is None and (serve_counters or not reg.counter)


def block_signature(block: Block, serve_counters: bool = True) -> wiring.Signature | None:
    """Hardware-facing ports of one instance of ``block`` (seen from the bank)."""
    members = {}
    for reg in block.registers:
        if not _served(reg, serve_counters):
            continue
        name = reg.name.lower()
        shape = register_shape(reg)
        if reg.access is Access.RO:
            if not reg.constant:
                members[name] = In(shape)
        elif reg.access is Access.RW:
            members[name] = Out(shape, init=_port_init(reg, reg.reset))
            members[f"{name}_wstb"] = Out(1)
        elif reg.access is Access.W1C:
            members[name] = Out(shape, init=_port_init(reg, reg.reset))
            members[f"{name}_set"] = In(shape)
    return wiring.Signature(members) if members else None


class RegisterBank(wiring.Component):
    """Register bank built from a :class:`~epochlink.registers.RegisterMap`.

    Accepts one request per cycle (``bus.req.ready`` is always 1) and answers it three cycles
    later on ``bus.rsp`` (the request is registered, decoded, then executed). Command registers
    (``Register.command``) are not in the bank: they answer ``BAD_ADDRESS`` here, and a NIC
    routes them to the epoch engine instead. With ``serve_counters=False`` the same holds for
    counter registers (``Register.counter``), which a NIC keeps in a
    :class:`~epochlink.hdl.counters.CounterBank`. Refused accesses (``BAD_ADDRESS``, ``READ_ONLY``,
    ``ILLEGAL_VALUE``) change nothing and raise no strobe. The validation rule of an RW
    register (no bits outside its fields, fields within their ``max``) is checked in
    hardware.

    Parameters
    ----------
    regmap : RegisterMap
        The registers to serve.
    serve_counters : bool
        Serve counter registers from hardware ports (default). False leaves them to a
        :class:`~epochlink.hdl.counters.CounterBank`.

    Members
    -------
    bus : In(bus_signature())
        The register bus.
    <block> : Out(block_signature(block))
        Per-register hardware ports of a single-instance block (e.g. ``node``).
    <block> : Out(block_signature(block)).array(n)
        The same for each instance of a multi-instance block (e.g. ``port[p]``).
    """

    def __init__(self, regmap: RegisterMap, *, serve_counters: bool = True) -> None:
        self.regmap = regmap
        self.serve_counters = serve_counters
        members: dict[str, object] = {"bus": In(bus_signature())}
        for block in regmap.blocks:
            sig = block_signature(block, serve_counters)
            count = len({i.index for i in regmap if i.block is block})
            if sig is None or count == 0:
                continue
            if block.count > 1:
                members[block.name.lower()] = Out(sig).array(count)
            else:
                members[block.name.lower()] = Out(sig)
        super().__init__(members)

    def _block_ports(self, inst: RegisterInstance):
        ports = getattr(self, inst.block.name.lower())
        return ports if inst.index is None else ports[inst.index]

    def hw_port(self, name: str):
        """The hardware port of register ``name`` (e.g. ``"PORT1.FRAMES_TX"``)."""
        inst = self.regmap[name]
        if inst.register.constant:
            raise ValueError(f"{name} is a constant and has no port")
        return getattr(self._block_ports(inst), inst.register.name.lower())

    def hw_strobe(self, name: str):
        """The write strobe of RW register ``name``."""
        inst = self.regmap[name]
        if inst.access is not Access.RW:
            raise ValueError(f"{name} is not RW")
        return getattr(self._block_ports(inst), inst.register.name.lower() + "_wstb")

    def hw_set(self, name: str):
        """The set input of W1C register ``name``."""
        inst = self.regmap[name]
        if inst.access is not Access.W1C:
            raise ValueError(f"{name} is not W1C")
        return getattr(self._block_ports(inst), inst.register.name.lower() + "_set")

    def elaborate(self, platform) -> Module:
        m = Module()
        req, rsp = self.bus.req, self.bus.rsp
        # The request is registered before it is decoded: the read multiplexer spans every
        # register of the design, and the path from the requester through the address
        # decode into it was the longest of a 4-port NIC.
        taken = Signal()
        request = Signal(BusRequest)
        m.d.sync += taken.eq(req.valid)
        with m.If(req.valid):
            m.d.sync += request.eq(req.payload)
        addr, write, wdata = request.addr, request.write, request.wdata

        m.d.comb += req.ready.eq(1)
        # ... and decoded into a one-hot selection in the next cycle; the cycle after that
        # (`decoded`) reads the selected register (an AND-OR tree) and applies a write.
        served = [inst for inst in self.regmap if _served(inst.register, self.serve_counters)]
        decoded = Signal()
        select = Signal(len(served))
        m.d.sync += [decoded.eq(taken), rsp.valid.eq(decoded)]
        write_d, wdata_d = Signal(), Signal(32)
        with m.If(taken):
            m.d.sync += [select.eq(Cat(addr == inst.address for inst in served)),
                         write_d.eq(write), wdata_d.eq(wdata)]

        # Hardware-side behaviour that happens regardless of the bus.
        for inst in served:
            reg = inst.register
            if reg.access is Access.RW:
                m.d.sync += self.hw_strobe(inst.name).eq(0)
            elif reg.access is Access.W1C:
                value = Value.cast(self.hw_port(inst.name))
                m.d.sync += value.eq(value | self._set_bits(inst))

        # Every register works out on its own what a selected read answers and whether a
        # write to it is refused or takes the written value as its answer; the one-hot
        # selection then combines them in AND-OR trees. (Writes applied one after another in
        # `If`s made the answer a chain of multiplexers as long as the register map.)
        reads = Const(0, 32)
        refused = {BusStatus.READ_ONLY: Const(0), BusStatus.ILLEGAL_VALUE: Const(0)}
        echoed = Const(0)       # the write was taken as it is: it is the answer
        for selected, inst in zip(select, served):
            read, refusal, echo = self._answer(m, inst, decoded & write_d & selected, wdata_d,
                                               taken, wdata)
            reads = reads | Mux(selected, read, 0)
            if refusal is not None:
                status, value = refusal
                refused[status] = refused[status] | (selected & value)
            echoed = echoed | (selected & echo)
        with m.If(decoded):
            m.d.sync += [
                rsp.payload.rdata.eq(Mux(write_d & echoed, wdata_d, reads)),
                rsp.payload.status.eq(Mux(~select.any(), BusStatus.BAD_ADDRESS,
                                      Mux(write_d & refused[BusStatus.READ_ONLY], BusStatus.READ_ONLY,
                                      Mux(write_d & refused[BusStatus.ILLEGAL_VALUE], BusStatus.ILLEGAL_VALUE,
                                          BusStatus.OK)))),
            ]
        return m

    def _set_bits(self, inst: RegisterInstance) -> Value:
        """The bits of W1C register ``inst`` that the hardware sets in this cycle."""
        return Value.cast(self.hw_set(inst.name)) & inst.register.mask

    def _answer(self, m: Module, inst: RegisterInstance, write: Value, wdata: Value,
                taken: Value, request_wdata: Value):
        """Applies a write to ``inst`` (``write``: it is selected and the request writes).
        Returns what the response carries if ``inst`` is selected (unless the write is echoed),
        ``(status, refused)`` for a register whose writes can be refused (else ``None``), and
        whether a write to it is echoed (its answer is the written word). ``taken`` and
        ``request_wdata`` are the request being decoded, the cycle before: a write's legality is
        checked then."""
        reg = inst.register
        current = (Value.cast(self.regmap.reset(inst)) if reg.constant
                   else Value.cast(self.hw_port(inst.name)) & reg.mask)
        if reg.access is Access.RO:
            return current, (BusStatus.READ_ONLY, Const(1)), Const(0)
        if reg.access is Access.RW:
            # (checked as the request is decoded, beside the selection, and kept with
            # `wdata`: the check's comparisons stay out of the answer's cycle)
            illegal = (request_wdata & (0xFFFF_FFFF & ~reg.mask)) != 0
            for f in reg.fields:
                if f.max is not None:
                    illegal |= request_wdata[f.lsb:f.lsb + f.width] > f.max
            illegal_bit = Signal(name=f"{inst.name.lower()}_illegal")
            with m.If(taken):
                m.d.sync += illegal_bit.eq(illegal)
            with m.If(write & ~illegal_bit):
                m.d.sync += [Value.cast(self.hw_port(inst.name)).eq(wdata[:reg.width]),
                             self.hw_strobe(inst.name).eq(1)]
            return current, (BusStatus.ILLEGAL_VALUE, illegal_bit), ~illegal_bit
        if reg.access is Access.W1C:
            value = Value.cast(self.hw_port(inst.name))
            new = (value & ~wdata[:reg.width]) | self._set_bits(inst)
            with m.If(write):
                m.d.sync += value.eq(new)
            return Mux(write, new & reg.mask, current), None, Const(0)
        raise AssertionError(reg.access)
