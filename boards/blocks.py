"""One block of the NIC placed alone on a board's FPGA: its own area and fmax.

The fmax of a whole board build mixes two things: how deep each block's logic is, and how far
apart placement puts the blocks' parts on one chip. A block build tells them apart. It takes
one block (:data:`BLOCKS`: a link engine, all the node's link engines side by side, the epoch
engine, or the node of both) with exactly the parameters of the board's ``nic`` build, and
wraps it (:class:`IsolatedBlock`) so that:

* every input bit comes from a flip-flop of one long shift register, fed by one pin;
* every output bit goes into a flip-flop, and a registered tree of XORs folds them into one
  pin.

So synthesis can trim nothing (every output reaches a pin), no path of the block touches a pin
or another block, and the clock, placer and router are those of the board build
(:class:`BlockTop` uses the board's PLL and one link port's two pins). Usage::

    python -m epochlink.boards block ulx3s-85f link --ports 4 --seed 2

writes ``build/blocks/<board>-<block>-<ports>/report.json`` (the board report's fields, with
``block`` in place of ``core``). Unlike ``build`` it does not fail when timing is missed: the
fmax is the measurement. docs/timing.md has what these builds found.
"""
from amaranth import Cat, Const, Elaboratable, Module, Signal, Value
from amaranth.lib import io, wiring
from amaranth.lib.wiring import Out

from ..hdl.epoch import EpochEngine
from ..hdl.link import LinkEngine
from ..hdl.nic import NICCore
from ..hdl.node import NICNode
from ..hdl.serdes import divisor_for
from .top import LINK_BIT_RATE

__all__ = ["BLOCKS", "IsolatedBlock", "BlockTop", "LinkEngines", "board_node_args", "make_block"]


def board_node_args(board_top_class, ports):
    """The :class:`~epochlink.hdl.node.NICNode` arguments of ``board_top_class``'s ``nic``
    build with ``ports`` ports at the default line rate (window, payload size, timers, store
    and forward...), as :class:`~epochlink.hdl.nic.NICCore` works them out."""
    if not isinstance(ports, int) or not 1 <= ports <= board_top_class.max_ports:
        raise ValueError(f"{board_top_class.__name__} supports 1..{board_top_class.max_ports} "
                         f"ports, not {ports!r}")
    divisor = divisor_for(board_top_class.clk_hz, LINK_BIT_RATE)
    core = NICCore(ports=ports, clk_hz=board_top_class.clk_hz,
                   **board_top_class.core_arguments("nic", divisor))
    _parameters_only(core)
    return core.node_args


def _parameters_only(elaboratable):
    # Built only to read its parameters (it builds its parts in `elaborate`, not before), so
    # Amaranth must not warn that it was created but never used.
    elaboratable._MustUse__silence = True
    return elaboratable


def _link(node_args):
    node = _parameters_only(NICNode(**node_args))
    # Without cut-through the node ties the link's message-length hint to 0.
    ties = {} if node.cut_through else {("ctrl_len",): 0}
    return LinkEngine(**node.link_args), ties


class LinkEngines(wiring.Component):
    """A node's link engines side by side, as one component, without the epoch engine between
    them: member ``link<i>`` is ``engines[i]``'s interface, passed through as it is."""

    def __init__(self, engines):
        self.engines = list(engines)
        super().__init__({f"link{i}": Out(engine.signature) for i, engine in enumerate(self.engines)})

    def elaborate(self, platform):
        m = Module()
        for i, engine in enumerate(self.engines):
            m.submodules[f"link{i}"] = engine
            outer = getattr(self, f"link{i}")
            for path, member, value in engine.signature.flatten(engine):
                mine = _member(outer, path)
                target, source = (value, mine) if member.flow == wiring.In else (mine, value)
                if not isinstance(target, Const):      # (an always-ready stream's `ready`)
                    m.d.comb += target.eq(source)
        return m


def _member(interface, path):
    """The member of ``interface`` at ``path`` (as yielded by ``signature.flatten``)."""
    for step in path:
        interface = interface[step] if isinstance(step, int) else getattr(interface, step)
    return interface


def _links(node_args):
    engines, ties = zip(*(_link(node_args) for _ in range(node_args["ports"])))
    return LinkEngines(engines), {(f"link{i}", *path): value for i, engine_ties in enumerate(ties)
                                  for path, value in engine_ties.items()}


def _epoch(node_args):
    node = _parameters_only(NICNode(**node_args))
    return EpochEngine(**node.epoch_args), {}


def _node(node_args):
    return NICNode(**node_args), {}


#: Block name -> ``factory(node_args)`` returning the component and the inputs its NIC ties to
#: constants (``{path: value}``, paths as in ``signature.flatten``).
BLOCKS = {"link": _link, "links": _links, "epoch": _epoch, "node": _node}


def make_block(name, node_args):
    """The block ``name`` of a node built with ``node_args``, and its tied inputs."""
    if name not in BLOCKS:
        raise ValueError(f"unknown block {name!r}; valid blocks: {', '.join(BLOCKS)}")
    return BLOCKS[name](node_args)


class IsolatedBlock(Elaboratable):
    """``block`` with every input fed from a shift register and every output folded into one
    bit through registers.

    Parameters
    ----------
    block : wiring.Component
        The component to measure.
    ties : dict
        Inputs that the block's real surroundings tie to a constant, ``{path: value}`` with
        paths as yielded by ``block.signature.flatten(block)``; they are not driven from the
        shift register, so synthesis simplifies them as it does in the real build.

    Attributes
    ----------
    din : Signal
        Shifted into the input register (one bit a cycle).
    dout : Signal
        The XOR of all outputs, registered at each level of the tree.
    input_bits, output_bits : int
        Widths of the block's driven inputs and of its outputs.
    """

    def __init__(self, block, ties=None):
        self.block = block
        self.ties = dict(ties or {})
        self.din = Signal()
        self.dout = Signal()
        self._inputs, self._outputs, tied = [], [], set()
        for path, member, value in block.signature.flatten(block):
            if path in self.ties:
                tied.add(path)
            elif member.flow == wiring.In:
                self._inputs.append(Value.cast(value))
            else:
                self._outputs.append(Value.cast(value))
        if tied != set(self.ties):
            missing = ", ".join(".".join(map(str, p)) for p in set(self.ties) - tied)
            block._MustUse__silence = True
            self._MustUse__silence = True
            raise ValueError(f"not members of the block: {missing}")
        self.input_bits = sum(len(v) for v in self._inputs)
        self.output_bits = sum(len(v) for v in self._outputs)

    def elaborate(self, platform):
        m = Module()
        m.submodules.block = block = self.block
        for path, member, value in block.signature.flatten(block):
            if path in self.ties:
                m.d.comb += value.eq(self.ties[path])

        chain = Signal(max(self.input_bits, 1))
        m.d.sync += chain.eq(Cat(self.din, chain[:-1]))
        position = 0
        for value in self._inputs:
            m.d.comb += value.eq(chain[position:position + len(value)])
            position += len(value)

        level = Signal(max(self.output_bits, 1))
        m.d.sync += level.eq(Cat(*self._outputs))
        while len(level) > 1:                     # four bits per LUT and level
            folded = Signal((len(level) + 3) // 4)
            m.d.sync += folded.eq(Cat(level[i:i + 4].xor() for i in range(0, len(level), 4)))
            level = folded
        m.d.comb += self.dout.eq(level)
        return m


class BlockTop(Elaboratable):
    """A board's ``sync`` clock (its PLL at ``clk_hz``) and link port 0's two pins around an
    :class:`IsolatedBlock`: ``rx`` feeds ``din``, ``tx`` shows ``dout``."""

    def __init__(self, board_top_class, isolated, clk_hz=None):
        self.board_top_class = board_top_class
        self.isolated = isolated
        self.clk_hz = clk_hz or board_top_class.clk_hz

    def elaborate(self, platform):
        m = Module()
        self.board_top_class.make_sync_domain(m, platform, self.clk_hz)
        m.submodules.isolated = isolated = self.isolated
        pins = platform.request("link", 0, dir="-")
        m.submodules.din = din = io.Buffer("i", pins.rx)
        m.submodules.dout = dout = io.Buffer("o", pins.tx)
        m.d.comb += [isolated.din.eq(din.i), dout.o.eq(isolated.dout)]
        return m
