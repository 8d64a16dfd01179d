"""A register stage for a stream: cuts the combinational path from a producer's ``valid`` and
``payload`` to the consumer's logic, at full throughput."""
from amaranth import *
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["PipelineRegister"]


class PipelineRegister(wiring.Component):
    """A register stage between two streams of ``shape``, registered in both directions.

    ``o.valid`` and ``o.payload`` come straight from flip-flops, and so does ``i.ready``:
    nothing the producer computes reaches the consumer in the same cycle, and nothing the
    consumer computes reaches the producer. A transfer can pass in every cycle (one cycle of
    latency); when ``o`` stalls, the transfer that was already offered waits in a second
    ("skid") register, and ``i.ready`` falls a cycle later.

    Attributes
    ----------
    i : In(stream.Signature(shape))
    o : Out(stream.Signature(shape))
    """

    def __init__(self, shape):
        self._shape = shape
        super().__init__({
            "i": In(stream.Signature(shape)),
            "o": Out(stream.Signature(shape)),
        })

    def elaborate(self, platform):
        m = Module()
        skid_valid = Signal()
        skid = Signal(self._shape)
        m.d.comb += self.i.ready.eq(~skid_valid)
        with m.If(~self.o.valid | self.o.ready):
            with m.If(skid_valid):
                m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(skid), skid_valid.eq(0)]
            with m.Else():
                m.d.sync += [self.o.valid.eq(self.i.valid), self.o.payload.eq(self.i.payload)]
        with m.Elif(self.i.valid & ~skid_valid):
            m.d.sync += [skid_valid.eq(1), skid.eq(self.i.payload)]
        return m
