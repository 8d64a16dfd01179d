"""ULX3S 85F (ECP5 LFE5U-85F): 125 MHz from the 25 MHz oscillator, link ports on the GPIO header.

=========  ==============================  ======================================
resource   pins                            notes
=========  ==============================  ======================================
clock      25 MHz, ball G2                 EHXPLLL -> 125 MHz ``sync``
link 0..7  GPIO header: tx GPi, rx GNi     port i: tx = GPi ("i+"), rx = GNi ("i-");
                                           rx inputs have pull-ups
host UART  FT231X (the US1 USB port)       the core's (selftest: 115200 8N1, nic:
                                           1 Mbaud)
LEDs       D0..D5                          link of ports 0-5 (on while up,
                                           blinking with traffic)
           D6 / D7                         heartbeat (~1 Hz) / fault (held ~0.2 s)
=========  ==============================  ======================================
"""
from amaranth import ClockDomain, Instance, Signal
from amaranth.build import Attrs, Pins, Resource, Subsignal
from amaranth.lib import io
from amaranth.lib.cdc import ResetSynchronizer
from amaranth_boards.ulx3s import ULX3S_85F_Platform

from .top import BoardTop

__all__ = ["ULX3STop", "ecp5_pll_parameters", "LINK_PINS"]

#: (tx pin, rx pin) on the ``gpio`` connector for each link port.
LINK_PINS = [(f"{i}+", f"{i}-") for i in range(8)]


def ecp5_pll_parameters(f_in_hz, f_out_hz):
    """Parameters of an ECP5 EHXPLLL with CLKOP feedback giving ``f_out_hz`` exactly.

    Constraints: PFD ``f_in / CLKI_DIV`` >= 3.125 MHz, ``f_out = PFD * CLKFB_DIV``,
    VCO ``f_out * CLKOP_DIV`` in 400..800 MHz (the one closest to 600 MHz is taken).
    Returns a dict with ``CLKI_DIV``, ``CLKFB_DIV``, ``CLKOP_DIV``, ``CLKOP_CPHASE`` and the
    achieved ``f_out``/``f_vco``.
    """
    best = None
    for clki_div in range(1, 129):
        f_pfd = f_in_hz / clki_div
        if not 3.125e6 <= f_pfd <= 400e6:
            continue
        for clkfb_div in range(1, 129):
            f_out = f_pfd * clkfb_div
            for clkop_div in range(1, 129):
                f_vco = f_out * clkop_div
                if not 400e6 <= f_vco <= 800e6:
                    continue
                key = (abs(f_out - f_out_hz), abs(f_vco - 600e6))
                if best is None or key < best[0]:
                    best = (key, clki_div, clkfb_div, clkop_div, f_vco, f_out)
    if best is None or best[0][0] > f_out_hz * 1e-6:
        raise ValueError(f"no ECP5 PLL setting gives {f_out_hz / 1e6:g} MHz "
                         f"from {f_in_hz / 1e6:g} MHz")
    _, clki_div, clkfb_div, clkop_div, f_vco, f_out = best
    return {"CLKI_DIV": clki_div, "CLKFB_DIV": clkfb_div, "CLKOP_DIV": clkop_div,
            "CLKOP_CPHASE": (clkop_div - 1) // 2, "f_vco": f_vco, "f_out": f_out}


class ULX3STop(BoardTop):
    """ULX3S 85F top: 125 MHz ``sync`` from the PLL, up to 8 link ports, LEDs, host UART.

    Parameters
    ----------
    ports : int
        Link ports, 1..8 (default 2).
    core, bit_rate :
        See :class:`~epochlink.boards.top.BoardTop`.
    """

    platform_class = ULX3S_85F_Platform
    clk_hz = 125e6
    osc_hz = 25e6
    max_ports = len(LINK_PINS)

    @classmethod
    def add_resources(cls, platform):
        platform.add_resources([
            Resource("link", i,
                     Subsignal("tx", Pins(tx, dir="o", conn=("gpio", 0))),
                     Subsignal("rx", Pins(rx, dir="i", conn=("gpio", 0)), Attrs(PULLMODE="UP")),
                     Attrs(IO_TYPE="LVCMOS33"))
            for i, (tx, rx) in enumerate(LINK_PINS)
        ])

    @classmethod
    def make_sync_domain(cls, m, platform, clk_hz):
        pll = ecp5_pll_parameters(cls.osc_hz, clk_hz)
        m.submodules.clk25 = clk25 = io.Buffer("i", platform.request("clk25", 0, dir="-"))
        m.domains.sync = cd_sync = ClockDomain("sync")
        locked = Signal()
        pll_clk = Signal()
        m.d.comb += cd_sync.clk.eq(pll_clk)
        m.submodules.pll = Instance(
            "EHXPLLL",
            a_FREQUENCY_PIN_CLKI=f"{cls.osc_hz / 1e6:g}",
            a_FREQUENCY_PIN_CLKOP=f"{clk_hz / 1e6:g}",
            a_ICP_CURRENT="12", a_LPF_RESISTOR="8",
            a_MFG_ENABLE_FILTEROPAMP="1", a_MFG_GMCREF_SEL="2",
            p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
            p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA",
            p_CLKOP_ENABLE="ENABLED", p_FEEDBK_PATH="CLKOP",
            p_CLKI_DIV=pll["CLKI_DIV"], p_CLKFB_DIV=pll["CLKFB_DIV"],
            p_CLKOP_DIV=pll["CLKOP_DIV"], p_CLKOP_CPHASE=pll["CLKOP_CPHASE"], p_CLKOP_FPHASE=0,
            i_CLKI=clk25.i,
            i_CLKFB=pll_clk,
            i_RST=0, i_STDBY=0,
            i_PHASESEL0=0, i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1,
            i_PLLWAKESYNC=0, i_ENCLKOP=0,
            o_CLKOP=pll_clk,
            o_LOCK=locked,
        )
        m.submodules.reset_sync = ResetSynchronizer(~locked, domain="sync")

    def elaborate_leds(self, m, platform, *, link_up, link_led, fault_led, commit_led,
                       heartbeat):
        for p in range(min(self.ports, 5)):
            self.led(m, platform, "led", p, link_led[p])
        self.led(m, platform, "led", 5, commit_led)
        self.led(m, platform, "led", 6, heartbeat)
        self.led(m, platform, "led", 7, fault_led)
