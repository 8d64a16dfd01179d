"""Event counters in block RAM, served on the register bus.

A NIC has a few dozen 32-bit event counters (per port: frames, CRC errors, retransmits,
fence decisions; per node: host-link and epoch-engine events). As flip-flops each costs a
register, an incrementer and a share of the register bank's read multiplexer: on an
iCE40UP5K about 40 logic cells apiece. A :class:`CounterBank` keeps them in one RAM
instead and adds events to them with a single adder::

    events ──► pending[i] ──► scanner ──► RAM[i] += pending[i] ──► bus read port

Every counter has a small *pending* accumulator that takes its events every cycle. A
scanner visits the counters in turn: it reads counter ``i``, moves ``pending[i]`` into the
addition (the accumulator restarts from the events of that cycle, so nothing is lost), and
writes the sum back two cycles later (the RAM's output goes into a flip-flop before the
adder: a block RAM's data arrives late in its cycle). The register bus borrows the RAM's
read port for one cycle per access; the scanner then waits a cycle.

Reads therefore lag: a counter read returns the count as it was at most
``2 * len(counters) + 4`` cycles earlier (a few microseconds; a host read over the UART
takes far longer). Counts are never lost and never go backwards. After a reset the scanner
first sweeps the RAM to zero (reads during the sweep can return the old counts).
"""
from amaranth import Array, Module, Mux, Signal, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In

from epochlink.registers import RegisterMap

from .common import refuse
from .regbank import BusStatus, bus_signature

__all__ = ["CounterBank", "counter_field"]


def counter_field(register_name: str) -> str:
    """The ``events`` field of a counter register: ``"PORT1.FRAMES_TX"`` -> ``"port1_frames_tx"``."""
    return register_name.lower().replace(".", "_")


class CounterBank(wiring.Component):
    """Wrapping event counters in block RAM, answering register-bus reads.

    Accepts a request only when none is in flight (the bus protocol has requesters wait for
    each response anyway) and answers it three cycles later, the counter read from a
    flip-flop. A read returns the counter; a write
    changes nothing and answers ``READ_ONLY`` with the counter's value; an address that is
    not one of the counters answers ``BAD_ADDRESS``.

    Parameters
    ----------
    counters : sequence of (name, address, increment_width)
        The counters: the ``events`` field name, the bus address, and the width of the
        amount that may be added in one cycle (1 for a plain event strobe).
    width : int
        Counter width in bits (1..32); counters wrap at ``2**width``.

    Members
    -------
    bus : In(bus_signature())
        The register bus.
    events : In(StructLayout)
        One field per counter: the amount to add in this cycle (0 most of the time).
    """

    def __init__(self, counters, *, width: int = 32):
        counters = [(str(name), int(address), int(inc)) for name, address, inc in counters]
        if not counters:
            refuse(self, "a counter bank needs at least one counter")
        if not 1 <= width <= 32:
            refuse(self, f"counter width must be 1..32, not {width}")
        for kind, values in (("names", [c[0] for c in counters]),
                             ("addresses", [c[1] for c in counters])):
            if len(set(values)) != len(values):
                refuse(self, f"counter {kind} must be unique")
        if any(inc < 1 for _, _, inc in counters):
            refuse(self, "increment widths must be at least 1")
        self.counters = counters
        self.width = width
        #: Upper bound on the cycles between two visits of the scanner to one counter.
        self.scan_period = 2 * max(len(counters), 3) + 2
        #: Upper bound on how many cycles a counter read lags the events.
        self.read_lag = self.scan_period + 2
        super().__init__({
            "bus": In(bus_signature()),
            "events": In(data.StructLayout({name: inc for name, _, inc in counters})),
        })

    @classmethod
    def for_map(cls, regmap: RegisterMap, *, width: int = 32, increments: dict | None = None):
        """A bank for every counter register of ``regmap``; ``increments`` maps register
        names to increment widths other than 1."""
        increments = dict(increments or {})
        counters = []
        for inst in regmap:
            if inst.register.counter:
                counters.append((counter_field(inst.name), inst.address,
                                 increments.pop(inst.name, 1)))
        if increments:
            raise ValueError(f"not counter registers of this map: {', '.join(increments)}")
        return cls(counters, width=width)

    def elaborate(self, platform):
        m = Module()
        depth = max(len(self.counters), 3)   # the scanner never reads a word it is about to write
        m.submodules.ram = ram = Memory(shape=unsigned(self.width), depth=depth, init=[])
        rd = ram.read_port()
        wr = ram.write_port()

        # ---- bus: one request at a time; the cycle after acceptance it owns the read port,
        # the next one the data is registered, and the one after that it is answered.
        req, rsp = self.bus.req, self.bus.rsp
        taken = Signal()
        fetched = Signal()
        request = Signal.like(req.payload)
        m.d.comb += req.ready.eq(~taken & ~fetched & ~rsp.valid)
        m.d.sync += [taken.eq(req.valid & req.ready), fetched.eq(taken), rsp.valid.eq(fetched)]
        with m.If(req.valid & req.ready):
            m.d.sync += request.eq(req.payload)

        # The address is decoded as the request is accepted: the cycle that owns the read
        # port only selects the registered index.
        hit = Signal()
        index = Signal(range(depth))
        with m.Switch(req.payload.addr):
            for i, (_, address, _) in enumerate(self.counters):
                with m.Case(address):
                    m.d.comb += [hit.eq(1), index.eq(i)]
        hit_r = Signal()
        index_r = Signal.like(index)
        with m.If(req.valid & req.ready):
            m.d.sync += [hit_r.eq(hit), index_r.eq(index)]
        # The word read goes into a flip-flop as it is (a block RAM's data comes late in the
        # cycle), and the answer's data is selected behind it.
        word = Signal(self.width)
        with m.If(fetched):
            m.d.sync += [
                rsp.payload.status.eq(Mux(~hit_r, BusStatus.BAD_ADDRESS,
                                          Mux(request.write, BusStatus.READ_ONLY, BusStatus.OK))),
                word.eq(rd.data),
            ]
        m.d.comb += rsp.payload.rdata.eq(Mux(hit_r, word, 0))

        # ---- scanner: read counter `scan` (unless the bus has the port), add its pending
        # amount and write the sum back two cycles later.
        scan = Signal(range(depth))
        step = Signal()
        m.d.comb += [step.eq(~taken), rd.addr.eq(Mux(taken, index_r, scan))]
        with m.If(step):
            m.d.sync += scan.eq(Mux(scan == depth - 1, 0, scan + 1))

        # `visiting` is `scan` one-hot: each accumulator sees its turn in one flip-flop
        # rather than an address comparator.
        visiting = Signal(depth, init=1)
        with m.If(step):
            m.d.sync += visiting.eq(visiting.rotate_left(1))
        pending = []
        # Events are registered on entry: no logic of their sources reaches the accumulators.
        events = Signal.like(self.events)
        m.d.sync += events.eq(self.events)
        for i, (name, _, inc) in enumerate(self.counters):
            acc = Signal(range(self.scan_period * ((1 << inc) - 1) + 1), name=f"pending_{name}")
            event = events[name]
            with m.If(step & visiting[i]):
                m.d.sync += acc.eq(event)
            with m.Elif(event != 0):
                m.d.sync += acc.eq(acc + event)
            pending.append(acc)
        while len(pending) < depth:
            pending.append(Signal())

        clearing = Signal(init=1)       # the first sweep after reset writes zeros
        with m.If(step & (scan == depth - 1)):
            m.d.sync += clearing.eq(0)
        s_valid = Signal()
        s_index = Signal(range(depth))
        s_amount = Signal(max(len(p) for p in pending))
        s_clear = Signal()
        visited = 0
        for i, acc in enumerate(pending):
            visited |= Mux(visiting[i], acc, 0)
        m.d.sync += [s_valid.eq(step), s_index.eq(scan), s_amount.eq(visited),
                     s_clear.eq(clearing)]
        # one more stage: the counter read into a flip-flop, then the addition and the write
        w_valid = Signal()
        w_index = Signal.like(s_index)
        w_amount = Signal.like(s_amount)
        w_count = Signal(self.width)
        m.d.sync += [w_valid.eq(s_valid), w_index.eq(s_index), w_amount.eq(s_amount),
                     w_count.eq(Mux(s_clear, 0, rd.data))]
        m.d.comb += [
            wr.en.eq(w_valid),
            wr.addr.eq(w_index),
            wr.data.eq(w_count + w_amount),
        ]
        return m
