"""iCEBreaker (iCE40UP5K-SG48): 48 MHz from the 12 MHz oscillator, link ports on PMOD1A/1B.

=========  ============================  =========================================
resource   pins                          notes
=========  ============================  =========================================
clock      12 MHz, pin 35                SB_PLL40_PAD -> 48 MHz ``sync``
link 0..3  PMOD1A: tx pins 1-4, rx 7-10  port i: tx = pin i+1, rx = pin i+7
link 4..7  PMOD1B: tx pins 1-4, rx 7-10  same pattern; rx inputs have pull-ups
host UART  FT2232H channel B             the core's (selftest: 115200 8N1, nic:
                                         1 Mbaud); the second USB serial port
LEDs       onboard green / red           all ports up / fault (held ~0.2 s)
           break-off PMOD (on PMOD2)     green ``led_g`` 1-4: link of ports 0-3 (on
                                         while up, blinking with traffic); red
                                         ``led_r`` 1: any receive activity
=========  ============================  =========================================

Pin 35 is the PLL's dedicated input pad, so the oscillator feeds ``SB_PLL40_PAD`` directly.
"""
from amaranth import ClockDomain, Instance, Signal
from amaranth.build import Attrs, Pins, Resource, Subsignal
from amaranth.lib.cdc import ResetSynchronizer
from amaranth_boards.icebreaker import ICEBreakerPlatform

from .top import BoardTop

__all__ = ["ICEBreakerTop", "ice40_pll_parameters", "LINK_PINS"]

#: (connector, tx pin, rx pin) of each link port.
LINK_PINS = [(conn, tx, tx + 6) for conn in (0, 1) for tx in (1, 2, 3, 4)]


def ice40_pll_parameters(f_in_hz, f_out_hz):
    """Parameters of an iCE40 PLL in SIMPLE feedback mode giving ``f_out_hz`` exactly.

    Constraints (iCE40 sysCLOCK PLL): PFD 10..133 MHz, VCO 533..1066 MHz,
    ``f_out = f_in * (DIVF + 1) / ((DIVR + 1) * 2**DIVQ)``. Returns a dict with
    ``DIVR``, ``DIVF``, ``DIVQ``, ``FILTER_RANGE`` and the achieved ``f_out``/``f_vco``/``f_pfd``.
    """
    best = None
    for divr in range(16):
        f_pfd = f_in_hz / (divr + 1)
        if not 10e6 <= f_pfd <= 133e6:
            continue
        for divq in range(1, 7):
            for divf in range(128):
                f_vco = f_pfd * (divf + 1)
                if not 533e6 <= f_vco <= 1066e6:
                    continue
                f_out = f_vco / 2 ** divq
                error = abs(f_out - f_out_hz)
                if best is None or error < best[0]:
                    best = (error, divr, divf, divq, f_pfd, f_vco, f_out)
    if best is None or best[0] > f_out_hz * 1e-6:
        raise ValueError(f"no iCE40 PLL setting gives {f_out_hz / 1e6:g} MHz "
                         f"from {f_in_hz / 1e6:g} MHz")
    _, divr, divf, divq, f_pfd, f_vco, f_out = best
    # Loop filter setting by PFD frequency (as icepll chooses it).
    for filter_range, limit in enumerate((17e6, 26e6, 44e6, 66e6, 101e6), start=1):
        if f_pfd < limit:
            break
    else:
        filter_range = 6
    return {"DIVR": divr, "DIVF": divf, "DIVQ": divq, "FILTER_RANGE": filter_range,
            "f_pfd": f_pfd, "f_vco": f_vco, "f_out": f_out}


class ICEBreakerTop(BoardTop):
    """iCEBreaker top: 48 MHz ``sync`` from the PLL, up to 8 link ports, LEDs, host UART.

    Parameters
    ----------
    ports : int
        Link ports, 1..8 (default 2).
    core, bit_rate :
        See :class:`~epochlink.boards.top.BoardTop`.
    """

    platform_class = ICEBreakerPlatform
    clk_hz = 48e6
    #: The UP5K is small: 4 transfers in flight, 32-byte messages (epoch messages are 10),
    #: and the slim channel model.
    nic_args = dict(window=4, max_payload=32, channel="lite")
    osc_hz = 12e6
    max_ports = len(LINK_PINS)

    @classmethod
    def add_resources(cls, platform):
        platform.add_resources(platform.break_off_pmod)
        platform.add_resources([
            Resource("link", i,
                     Subsignal("tx", Pins(str(tx), dir="o", conn=("pmod", conn))),
                     Subsignal("rx", Pins(str(rx), dir="i", conn=("pmod", conn)),
                               Attrs(PULLUP=1)),
                     Attrs(IO_STANDARD="SB_LVCMOS"))
            for i, (conn, tx, rx) in enumerate(LINK_PINS)
        ])

    @classmethod
    def make_sync_domain(cls, m, platform, clk_hz):
        pll = ice40_pll_parameters(cls.osc_hz, clk_hz)
        clk12 = platform.request("clk12", dir="-")
        m.domains.sync = cd_sync = ClockDomain("sync")
        locked = Signal()
        pll_clk = Signal()
        m.d.comb += cd_sync.clk.eq(pll_clk)
        m.submodules.pll = Instance(
            "SB_PLL40_PAD",
            p_FEEDBACK_PATH="SIMPLE",
            p_DIVR=pll["DIVR"], p_DIVF=pll["DIVF"], p_DIVQ=pll["DIVQ"],
            p_FILTER_RANGE=pll["FILTER_RANGE"],
            i_PACKAGEPIN=clk12.io,
            i_RESETB=1,
            i_BYPASS=0,
            o_PLLOUTGLOBAL=pll_clk,
            o_LOCK=locked,
        )
        m.submodules.reset_sync = ResetSynchronizer(~locked, domain="sync")

    def elaborate_leds(self, m, platform, *, link_up, link_led, fault_led, commit_led,
                       heartbeat):
        self.led(m, platform, "led_g", 0, link_up.all())
        self.led(m, platform, "led_r", 0, fault_led)
        self.led(m, platform, "led_r", 1, commit_led)
        for p in range(min(self.ports, 4)):
            self.led(m, platform, "led_g", p + 1, link_led[p])
