"""Stream layouts, signatures and helpers shared by every epochlink component.

One source of truth: the link engine, the channel model, the serial PHY, the epoch
engine and the board tops all build their ports from these definitions, count their events
with :func:`count_events` and refuse bad parameters with :func:`refuse`.
"""
from typing import NoReturn

from amaranth import Signal
from amaranth.lib import data, stream

__all__ = ["MessageByte", "message_signature", "phy_tx_signature", "phy_rx_signature",
           "forward_status", "event_layout", "count_events", "refuse"]


class MessageByte(data.Struct):
    """One byte of a variable-length message; ``last`` marks its final byte."""
    data: 8
    last: 1


def message_signature():
    """A stream of messages, one byte per transfer, with backpressure."""
    return stream.Signature(MessageByte)


def phy_tx_signature():
    """Bytes towards the wire. The PHY may stall the link engine with ``ready``."""
    return stream.Signature(8)


def phy_rx_signature():
    """Bytes from the wire. A wire cannot be stalled, so this stream is always ready."""
    return stream.Signature(8, always_ready=True)


def forward_status(m, source, target):
    """Drive every signal of the output interface ``target`` from ``source`` (same signature).

    For status bundles passed up through a hierarchy; unlike ``wiring.connect`` it accepts
    two outputs and nested arrays.
    """
    pairs = zip(source.signature.flatten(source), target.signature.flatten(target))
    for (_, _, src), (_, _, dst) in pairs:
        m.d.comb += dst.eq(src)


def event_layout(names, wide=None) -> data.StructLayout:
    """Event strobes of a component, one field per counter it keeps.

    A field holds the amount its counter goes up by in this cycle: 1 bit for most, the
    width given in ``wide`` (``{name: bits}``) for events that may come several at once.
    A NIC counts these in a :class:`~epochlink.hdl.counters.CounterBank`; a component built
    with ``counter_width`` > 0 also counts them itself (:func:`count_events`).
    """
    wide = dict(wide or {})
    return data.StructLayout({name: wide.get(name, 1) for name in names})


def count_events(m, events, outputs, width: int) -> None:
    """Drive ``outputs.<name>`` with a wrapping ``width``-bit counter of each field of
    ``events`` (adding the field's amount every cycle). With ``width`` 0 nothing is built:
    the outputs are 0 bits wide and the events are counted elsewhere."""
    if not width:
        return
    for name in events.shape().members:
        counter = Signal(width, name=f"count_{name}")
        amount = events[name]
        with m.If(amount != 0):
            m.d.sync += counter.eq(counter + amount)
        m.d.comb += getattr(outputs, name).eq(counter)


def refuse(component, message: str, error: type[Exception] = ValueError) -> NoReturn:
    """Raise ``error(message)`` from ``component``'s constructor.

    A component that refuses its parameters is never built; without this, Amaranth would
    warn when the half-made object is collected that it was "created but never used".
    """
    component._MustUse__silence = True
    raise error(message) from None
