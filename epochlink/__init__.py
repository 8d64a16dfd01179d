"""epochlink: link-level atomic checkpoint commit for AI/ML training clusters.

The distribution maps the repository folders onto one namespace:
``hdl/`` -> :mod:`epochlink.hdl` (Amaranth gateware), ``sim/`` -> :mod:`epochlink.sim`
(Verilator/cocotb infrastructure), ``host/`` -> :mod:`epochlink.host` (driver library),
``boards/`` -> :mod:`epochlink.boards` (FPGA platforms and board tops).
"""

__version__ = "0.1.0"
