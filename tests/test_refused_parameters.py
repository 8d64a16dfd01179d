"""Every component refuses bad parameters with an exception and leaves nothing behind.

Amaranth warns ("created but never used") when an elaboratable is collected without having
been elaborated. A component whose constructor refused its parameters was never meant to be
built, so it must not warn: the test collects it and fails on any such warning.
"""
import gc
import warnings

import pytest
from amaranth.hdl import Fragment, Module, UnusedElaboratable

from epochlink.boards.icebreaker import ICEBreakerTop
from epochlink.boards.top import PRBSGenerator
from epochlink.hdl.channel import ChannelModel
from epochlink.hdl.counters import CounterBank
from epochlink.hdl.epoch import EpochEngine
from epochlink.hdl.fence import EpochFence
from epochlink.hdl.hostlink import HostLink, UARTHostLink
from epochlink.hdl.line_noise import LineNoise
from epochlink.hdl.link import LinkEngine
from epochlink.hdl.nic import NICCore
from epochlink.hdl.node import NICNode
from epochlink.hdl.serdes import SerialPHY, SerialReceiver, SerialTransmitter
from epochlink.hdl.uart import UARTReceiver, UARTTransmitter
from epochlink.sim.cluster import Topology
from epochlink.sim.nic_cluster import NICCluster

REFUSED = {
    "ChannelModel": lambda: ChannelModel(delay=0),
    "CounterBank": lambda: CounterBank([("a", 0, 1)], width=33),
    "EpochEngine": lambda: EpochEngine(domains=0),
    "EpochFence": lambda: EpochFence(counter_width=33),
    "HostLink": lambda: HostLink(timeout=1),
    "UARTHostLink": lambda: UARTHostLink(divisor=4, timeout=10),
    "LinkEngine": lambda: LinkEngine(window=3),
    "NICCore": lambda: NICCore(ports=1, clk_hz=48e6, channel="none"),
    "NICCore (link window)": lambda: NICCore(ports=1, clk_hz=48e6, window=3),
    "NICNode (link window)": lambda: NICNode(ports=1, window=3),
    "SerialTransmitter": lambda: SerialTransmitter(8, resync_interval=-1),
    "SerialReceiver": lambda: SerialReceiver(4, majority=True),
    "SerialPHY": lambda: SerialPHY(2),
    "LineNoise": lambda: LineNoise(8, cut_level=2),
    "UARTReceiver": lambda: UARTReceiver(divisor=1),
    "UARTTransmitter": lambda: UARTTransmitter(divisor=1),
    "PRBSGenerator": lambda: PRBSGenerator(seed=1),
    "ICEBreakerTop": lambda: ICEBreakerTop(ports=0),
    "NICCluster (topology)": lambda: NICCluster("line"),
    "NICCluster (seed)": lambda: NICCluster(Topology.named("line", 2), seed=0),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_component_raises_and_does_not_warn(name):
    # Amaranth arms the warning once a process has elaborated something (before that, an
    # unused elaboratable means the program crashed): arm it, as any build or simulation does.
    Fragment.get(Module(), None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises((ValueError, TypeError)):
            REFUSED[name]()
        gc.collect()
    unused = [str(w.message) for w in caught if issubclass(w.category, UnusedElaboratable)]
    assert not unused, unused


BAD_LINK_PARAMETERS = [
    {"window": 3}, {"window": 128}, {"max_payload": 0}, {"max_payload": 256},
    {"dead_cycles": 10}, {"hello_cycles": 10_000},
]


@pytest.mark.parametrize("kwargs", BAD_LINK_PARAMETERS, ids=lambda kwargs: str(kwargs))
@pytest.mark.parametrize("build", [
    lambda **kwargs: NICNode(ports=2, **kwargs),
    lambda **kwargs: NICCore(ports=2, clk_hz=48e6, **kwargs),
], ids=["NICNode", "NICCore"])
def test_nic_refuses_link_parameters_as_the_link_engine_does(build, kwargs):
    """The NIC builds its link engines only when elaborated; it refuses their parameters in its
    constructor, with the link engine's own message."""
    with pytest.raises(ValueError) as by_link:
        LinkEngine(**kwargs)
    with pytest.raises(ValueError) as by_nic:
        build(**kwargs)
    assert str(by_nic.value) == str(by_link.value)


def test_nic_refuses_an_unknown_link_parameter():
    with pytest.raises(TypeError, match="windw"):
        NICCore(ports=1, clk_hz=48e6, windw=4)
