"""Benchmarks: ``make bench`` (``python -m epochlink.bench [section ...]``).

Each section measures the real gateware (Verilator, or Amaranth's simulator where the
point is to compare simulators), writes ``build/bench/<section>.json`` and its table into
``docs/benchmarks.md`` between markers. Goals are reported, never asserted: a benchmark
that misses its goal says so in its table and exit status stays 0.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from .hdl.channel import ber_to_threshold, threshold_to_byte_error_probability
from .hdl.frame import OVERHEAD_BYTES
from .sim import verilator

BENCH_DIR = verilator.BUILD_ROOT / "bench"
DOCS = verilator.PROJECT_ROOT / "docs" / "benchmarks.md"

LINK_DELAY = 16          # channel latency in cycles, each way
LINK_PAYLOAD = 64        # message length for the goodput sweep (bytes)
LINK_BERS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3)
LINK_WINDOWS = (4, 8, 16)
GOODPUT_GOAL = 0.95      # of the bound, at every BER up to 1e-4
LATENCY_SLACK = 32       # cycles above the 3 / 4 one-way floors


def _run(design, testcase, name, cfg) -> dict:
    result = BENCH_DIR / "runs" / f"{name}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    verilator.run(design, "epochlink.sim.tb_link", testcase=testcase, run_name=f"bench-{name}",
                  env={"EPOCHLINK_TB_CONFIG": json.dumps(cfg), "EPOCHLINK_TB_RESULT": str(result)})
    return json.loads(result.read_text())


def goodput_bound(ber: float, payload: int) -> tuple[int, float]:
    """Line rate (1 byte/cycle) x payload/frame bytes x (1 - FER), FER from the channel's
    actual per-byte error probability (the threshold it is programmed with)."""
    frame_bytes = payload + OVERHEAD_BYTES
    p_byte = threshold_to_byte_error_probability(ber_to_threshold(ber))
    fer = 1 - (1 - p_byte) ** frame_bytes
    return frame_bytes, payload / frame_bytes * (1 - fer)


def bench_link(cycles: int) -> dict:
    from .sim.link_pair import LinkPair

    points = []
    designs = {}
    for window in LINK_WINDOWS:
        designs[window] = verilator.build("link_pair", LinkPair(delay=LINK_DELAY, window=window,
                                                                 max_payload=LINK_PAYLOAD))
        for ber in LINK_BERS:
            r = _run(designs[window], "generator_run", f"goodput-w{window}-ber{ber:g}",
                     {"ber": ber, "cycles": cycles, "min_length": LINK_PAYLOAD, "max_length": LINK_PAYLOAD})
            frame_bytes, bound = goodput_bound(ber, LINK_PAYLOAD)
            points.append({"ber": ber, "window": window, "frame_bytes": frame_bytes,
                           "goodput": round(r["goodput"], 5), "bound": round(bound, 5),
                           "ratio": round(r["goodput"] / bound, 4),
                           "retransmits": r["a_retransmits"], "crc_errors": r["b_crc_errors"] + r["a_crc_errors"],
                           "cycles_per_s": round(r["cycles_per_s"])})
            print(f"  link goodput window={window:2d} ber={ber:g}: {r['goodput']:.4f} B/cycle "
                  f"= {r['goodput'] / bound:.3f} x bound", flush=True)

    lat = _run(designs[8], "idle_latency", "latency", {"length": 4, "trials": 8})
    one_way = max(lat["one_way"])
    delivery = max(s[0] for s in lat["samples"])
    release = max(s[1] for s in lat["samples"])
    latency = {"window": 8, "payload_bytes": 4, "one_way_cycles": one_way,
               "delivery_cycles": delivery, "release_cycles": release,
               "delivery_floor": 3 * one_way, "release_floor": 4 * one_way,
               "delivery_goal_met": delivery <= 3 * one_way + LATENCY_SLACK,
               "release_goal_met": release <= 4 * one_way + LATENCY_SLACK,
               "samples": lat["samples"], "one_way_samples": lat["one_way"]}

    speed = {"design": "two engines + two channels + traffic generator/checker (window 8)",
             "verilator_cycles_per_s": round(sum(p["cycles_per_s"] for p in points if p["window"] == 8)
                                             / sum(1 for p in points if p["window"] == 8)),
             "pysim_cycles_per_s": round(_pysim_speed())}
    goal_points = [p for p in points if p["ber"] <= 1e-4]
    return {"points": points, "latency": latency, "speed": speed,
            "goals": {"goodput_ratio": GOODPUT_GOAL, "latency_slack_cycles": LATENCY_SLACK,
                      "goodput_goal_met_windows": sorted({p["window"] for p in goal_points}
                                                         - {p["window"] for p in goal_points
                                                            if p["ratio"] < GOODPUT_GOAL})}}


def _pysim_speed(cycles: int = 20000) -> float:
    """The same two-node design under Amaranth's Python simulator."""
    from amaranth.sim import Simulator
    from .sim.link_pair import LinkPair

    dut = LinkPair(delay=LINK_DELAY, window=8, max_payload=LINK_PAYLOAD)
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    elapsed = {}

    async def bench(ctx):
        for node in ("a", "b"):
            ctx.set(getattr(dut, f"{node}_enable"), 1)
            ctx.set(getattr(dut, f"{node}_ver_min"), 1)
            ctx.set(getattr(dut, f"{node}_ver_max"), 1)
        ctx.set(dut.use_generator, 1)
        ctx.set(dut.gen_enable, 1)
        ctx.set(dut.gen_min_length, LINK_PAYLOAD)
        ctx.set(dut.gen_max_length, LINK_PAYLOAD)
        start = time.perf_counter()
        await ctx.tick().repeat(cycles)
        elapsed["s"] = time.perf_counter() - start
        assert ctx.get(dut.chk_received) > 0 and ctx.get(dut.chk_errors_sequence) == 0
    sim.add_testbench(bench)
    sim.run()
    return cycles / elapsed["s"]


def link_table(data: dict) -> str:
    rows = ["| BER | window | frame bytes | goodput (B/cycle) | bound | ratio | goal >= 0.95 |",
            "|---|---|---|---|---|---|---|"]
    for p in data["points"]:
        goal = ("yes" if p["ratio"] >= GOODPUT_GOAL else "**no**") if p["ber"] <= 1e-4 else "n/a"
        rows.append(f"| {p['ber']:g} | {p['window']} | {p['frame_bytes']} | {p['goodput']:.4f} | "
                    f"{p['bound']:.4f} | {p['ratio']:.3f} | {goal} |")
    lat = data["latency"]
    rows += ["", "| idle-link latency (4-byte message) | cycles | floor | goal (floor + 32) |",
             "|---|---|---|---|",
             f"| one-way delay of a minimal frame | {lat['one_way_cycles']} | | |",
             f"| delivery at the receiver | {lat['delivery_cycles']} | {lat['delivery_floor']} (3 one-way) | "
             f"{'met' if lat['delivery_goal_met'] else '**missed**'} |",
             f"| release at the sender | {lat['release_cycles']} | {lat['release_floor']} (4 one-way) | "
             f"{'met' if lat['release_goal_met'] else '**missed**'} |"]
    sp = data["speed"]
    rows += ["", "| simulator (two-node link design) | cycles/s |", "|---|---|",
             f"| Verilator (cocotb, in-design traffic) | {sp['verilator_cycles_per_s']:,} |",
             f"| Amaranth Python simulator | {sp['pysim_cycles_per_s']:,} |"]
    return "\n".join(rows) + "\n"


EPOCH_POINTS = (("line", 2), ("line", 4), ("tree", 4), ("line", 8), ("tree", 8), ("line", 16), ("tree", 16),
                ("tree", 32), ("line", 32))
CONVERGENCE_GOAL = (1.25, 64)   # cycles <= 1.25 x floor + 64


def bench_epoch(cycles: int, points_to_run=EPOCH_POINTS) -> dict:
    from .sim.cluster import Cluster, Topology

    points = []
    for shape, nodes in points_to_run:
        topology = Topology.named(shape, nodes)
        design = verilator.build(f"cluster_{topology.name}{nodes}", Cluster(topology, domains=4))
        result = BENCH_DIR / "runs" / f"epoch-{shape}{nodes}.json"
        result.parent.mkdir(parents=True, exist_ok=True)
        cfg = {"edges": [list(e) for e in topology.edges], "domains": 4, "trials": 4}
        verilator.run(design, "epochlink.sim.tb_cluster", testcase="convergence_latency",
                      run_name=f"bench-{shape}{nodes}",
                      env={"EPOCHLINK_TB_CONFIG": json.dumps(cfg), "EPOCHLINK_TB_RESULT": str(result)})
        r = json.loads(result.read_text())
        one_way = max(r["one_way"])
        floor = 2 * topology.depth * one_way
        worst = max(r["samples"])
        a, b = CONVERGENCE_GOAL
        points.append({"nodes": nodes, "topology": topology.name, "depth": topology.depth,
                       "cycles": worst, "samples": r["samples"], "one_way_cycles": one_way,
                       "floor": floor, "ratio": round(worst / floor, 3),
                       "goal_met": worst <= a * floor + b,
                       "node_cycles_per_s": round(r["cycles_per_s"] * nodes)})
        print(f"  {topology.name:6s} N={nodes:2d} depth {topology.depth}: {worst} cycles, floor {floor}, "
              f"{worst / floor:.2f} x floor", flush=True)
    return {"points": points, "goal": {"ratio": a, "plus_cycles": b}}


def epoch_table(data: dict) -> str:
    rows = ["| topology | nodes | depth | cycles (worst of 4) | floor 2 x depth x one-way | ratio | goal <= 1.25 x floor + 64 | node-cycles/s |",
            "|---|---|---|---|---|---|---|---|"]
    for p in data["points"]:
        rows.append(f"| {p['topology']} | {p['nodes']} | {p['depth']} | {p['cycles']} | {p['floor']} "
                    f"(one-way {p['one_way_cycles']}) | {p['ratio']:.2f} | {'met' if p['goal_met'] else '**missed**'} | "
                    f"{p['node_cycles_per_s']:,} |")
    return "\n".join(rows) + "\n"


HOST_GOAL = 0.8           # of the wire-time floor rate, pipelined
HOST_TRANSACTIONS = 1200  # per kind


def bench_host(_cycles: int) -> dict:
    """Register transactions over the host UART of a simulated NIC, in simulated time.

    The simulation server runs the NICs for 48 MHz with a 12 Mbaud host UART; the driver
    pipelines requests (window 16). Rates come from the server's cycle counter, so they are
    what the gateware and the UART achieve, independent of the simulator's speed, as long as
    the driver keeps its window full: the simulation does not wait for the driver, so run
    this on an otherwise idle machine. The floor is the wire time of the longer direction:
    bytes x 10 / baud per transaction.
    """
    from .hostproto import MAX_OUTSTANDING, READ_REQUEST_LENGTH, RESPONSE_LENGTH, WRITE_REQUEST_LENGTH
    from .hdl.epoch_format import Role
    from .host.node import Node
    from .sim.server import SimServer

    points = []
    with SimServer(nodes=2, topology="line") as sim:
        clk_hz, baud = sim.info["clk_hz"], sim.info["baud"]
        with Node(sim.urls[0], timeout=3.0, window=MAX_OUTSTANDING) as root, \
             Node(sim.urls[1], timeout=3.0, window=MAX_OUTSTANDING) as leaf:
            root.bring_up({0: 0}, [Role.CHILD])
            leaf.bring_up({0: 0}, [Role.PARENT])
            n = HOST_TRANSACTIONS
            kinds = [
                ("read", max(READ_REQUEST_LENGTH, RESPONSE_LENGTH),
                 lambda: root.read_many(["SCRATCH"] * n)),
                ("write", max(WRITE_REQUEST_LENGTH, RESPONSE_LENGTH),
                 lambda: root.write_many([("SCRATCH", i) for i in range(n)])),
                ("persist", max(WRITE_REQUEST_LENGTH, RESPONSE_LENGTH),
                 lambda: root.write_many([("DOMAIN0.PERSISTED", i) for i in range(1, n + 1)])),
            ]
            for kind, wire_bytes, run in kinds:
                c0, t0 = sim.cycle(), time.perf_counter()
                run()
                cycles, wall = sim.cycle() - c0, time.perf_counter() - t0
                rate = n * clk_hz / cycles
                floor = baud / (10 * wire_bytes)
                points.append({"kind": kind, "baud": baud, "transactions": n,
                               "transactions_per_s": round(rate), "floor_per_s": round(floor),
                               "ratio": round(rate / floor, 3), "goal_met": rate >= HOST_GOAL * floor,
                               "wall_transactions_per_s": round(n / wall)})
                print(f"  {kind:8s} {rate:,.0f}/s simulated, floor {floor:,.0f}/s: {rate / floor:.3f}", flush=True)

            # Commit round trip: the leaf persists epoch e (the root already has it); the
            # leaf's COMMITTED shows e after the report goes up and the commit comes down.
            trips = []
            for epoch in range(n + 1, n + 6):
                root.persisted(0, epoch)
                c0 = sim.cycle()
                leaf.persisted(0, epoch)
                leaf.wait_committed(epoch, timeout=30, poll=0.0)
                trips.append(sim.cycle() - c0)
        write_floor = 10 * (WRITE_REQUEST_LENGTH + RESPONSE_LENGTH) * clk_hz / baud
        read_floor = 10 * (READ_REQUEST_LENGTH + RESPONSE_LENGTH) * clk_hz / baud
    return {"points": points, "goal": HOST_GOAL, "clk_hz": clk_hz, "baud": baud,
            "commit_round_trip": {"cycles": trips, "median_cycles": sorted(trips)[len(trips) // 2],
                                  "uart_floor_cycles": round(write_floor + read_floor),
                                  "note": "cycles from sending the leaf's PERSIST until a COMMITTED "
                                          "read returns the epoch (includes the server's 200-cycle "
                                          "polling granularity and the two-node convergence)"}}


def host_table(data: dict) -> str:
    rows = [f"| transaction | baud | transactions/s | wire floor/s | ratio | goal >= {data['goal']} x floor |",
            "|---|---|---|---|---|---|"]
    for p in data["points"]:
        rows.append(f"| {p['kind']} | {p['baud']:,} | {p['transactions_per_s']:,} | {p['floor_per_s']:,} | "
                    f"{p['ratio']:.3f} | {'met' if p['goal_met'] else '**missed**'} |")
    trip = data["commit_round_trip"]
    rows.append("")
    rows.append(f"Commit round trip (2 nodes, {data['clk_hz'] / 1e6:.0f} MHz, host UART {data['baud'] / 1e6:g} Mbaud): "
                f"median {trip['median_cycles']} cycles ({trip['median_cycles'] / data['clk_hz'] * 1e6:.1f} us) "
                f"from sending the last PERSIST to reading the new COMMITTED; the UART alone needs "
                f"{trip['uart_floor_cycles']} cycles for that write and one read.")
    return "\n".join(rows) + "\n"


#: (board, core, ports, goal) points of the FPGA section; goals from issue #5.
FPGA_POINTS = (
    ("icebreaker", "selftest", 2, None),
    ("icebreaker", "nic", 1, None),
    ("icebreaker", "nic", 2, {"cells_fraction": 0.70, "fmax_mhz": 48.0}),
    ("ulx3s-85f", "selftest", 2, None),
    ("ulx3s-85f", "nic", 1, None),
    ("ulx3s-85f", "nic", 4, {"cells_fraction": 1.0, "fmax_mhz": 125.0}),
)
#: Placements of each goal point that fits (seeds 1 to N): from one seed to the next the same
#: netlist's fmax moves by up to 13 MHz on the 4-port ULX3S build, more than most design steps.
FPGA_SEEDS = 5


#: A placement still running after this long is stopped and counts as not placed: nextpnr's
#: router1 can stall on a 4-port ECP5 placement with its count of arcs left growing (docs/timing.md,
#: "ECP5: routers"). A 4-port placement takes 8 to 20 minutes, two at a time beside other work.
PLACE_TIME_LIMIT_S = 40 * 60


def _descendants(pid: int) -> list[int]:
    """Process ids of every process below ``pid`` (from /proc; empty where there is none)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # (the command name, in parentheses, may hold spaces: the fields follow its ")")
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue                        # the process ended while the table was read
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, ()))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, ()))
    return found


class TimeLimit:
    """Stops the processes this process started if they run past ``seconds``.

    Used around a build (``with TimeLimit(s) as limit: ...``): when the time is up, every
    process below this one gets SIGKILL, so the build's tool call fails and the build returns
    (this process itself goes on). ``limit.expired`` says whether that happened.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def _expire(self):
        self.expired = True
        for pid in _descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        return False


def _place_seed(board: str, core: str, ports: int, seed_dir: Path, seed: int,
                time_limit: float = PLACE_TIME_LIMIT_S):
    """Fmax (MHz) of one build with ``seed``, None if it was not placed (or was stopped after
    ``time_limit`` seconds)."""
    from .boards.__main__ import BoardError, build

    with TimeLimit(time_limit) as limit:
        try:
            build(board, ports=ports, core=core, build_dir=seed_dir, seed=seed)
        except BoardError:
            pass            # missed timing is still a measurement; no report: not placed
    if limit.expired:
        print(f"  {board} {core} {ports} port(s), seed {seed}: stopped after "
              f"{time_limit / 60:g} min (not placed)", file=sys.stderr, flush=True)
        return None
    report = seed_dir / "report.json"
    return json.loads(report.read_text()).get("fmax_mhz") if report.exists() else None


def _fmax_over_seeds(board: str, core: str, ports: int, build_dir: Path, seeds) -> dict:
    """Fmax of the design built again with each of ``seeds``, each in ``build_dir/seed<N>``,
    two builds at a time (in processes: Amaranth's build changes the working directory)."""
    from concurrent.futures import ProcessPoolExecutor

    seeds = list(seeds)
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = pool.map(_place_seed, [board] * len(seeds), [core] * len(seeds),
                           [ports] * len(seeds), [build_dir / f"seed{s}" for s in seeds], seeds)
        return dict(zip(seeds, results))


def _seed_spread(by_seed: dict) -> dict:
    """``fmax_seeds`` (MHz by seed, None where not placed) and the mean, least and greatest
    of the placed ones (None if none was)."""
    placed = [f for f in by_seed.values() if f is not None]
    return {"fmax_seeds": {str(seed): f for seed, f in by_seed.items()},
            "fmax_mean_mhz": round(sum(placed) / len(placed), 2) if placed else None,
            "fmax_min_mhz": min(placed, default=None), "fmax_max_mhz": max(placed, default=None)}


def bench_fpga(_cycles: int, seeds: int = FPGA_SEEDS) -> dict:
    """Synthesis, place and route of each board/core/port count with the PyPI toolchain.

    A design that does not fit or misses timing is a measurement here, not an error: its
    report (utilisation from the packer, fmax if placed) is stored with ``fits`` /
    ``timing_met`` false. ``fmax_mhz`` is seed 1's (the bitstream ``make bitstream``
    writes); a goal point that fits is also placed with seeds 2 to ``seeds``
    (``fmax_seeds`` for seeds 1 to ``seeds``, their mean and range).
    """
    from .boards.__main__ import BoardError, build

    points = []
    for board, core, ports, goal in FPGA_POINTS:
        build_dir = BENCH_DIR / "fpga" / f"{board}-{core}-{ports}"
        report_path = build_dir / "report.json"
        started = time.perf_counter()
        error = None
        with TimeLimit(PLACE_TIME_LIMIT_S) as limit:
            try:
                build(board, ports=ports, core=core, build_dir=build_dir)
            except BoardError as exc:
                error = str(exc).splitlines()[0]
        if limit.expired:
            error = f"stopped after {PLACE_TIME_LIMIT_S / 60:g} min"
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        point = {"board": board, "core": core, "ports": ports,
                 "cells_used": report.get("cells_used"), "cells_total": report.get("cells_total"),
                 "cells_type": report.get("cells_type"), "ram_used": report.get("ram_used"),
                 "ram_total": report.get("ram_total"), "fmax_mhz": report.get("fmax_mhz"),
                 "target_mhz": report.get("target_mhz"), "fits": report.get("fits"),
                 "timing_met": report.get("timing_met"), "error": error}
        if goal is not None and point["fmax_mhz"] is not None and seeds > 1:
            by_seed = {1: point["fmax_mhz"],
                       **_fmax_over_seeds(board, core, ports, build_dir, range(2, seeds + 1))}
            point.update(_seed_spread(by_seed))
        point["build_s"] = round(time.perf_counter() - started, 1)
        if goal is not None:
            point["goal"] = goal
            point["goal_met"] = bool(
                point["fits"] and point["fmax_mhz"] is not None
                and point["cells_used"] <= goal["cells_fraction"] * point["cells_total"]
                and point["fmax_mhz"] >= goal["fmax_mhz"])
        points.append(point)
        fmax = f"{point['fmax_mhz']:.1f} MHz" if point["fmax_mhz"] else "not placed"
        if "fmax_seeds" in point:
            fmax += f" (seeds 1-{seeds}: mean {point['fmax_mean_mhz']:.1f})"
        print(f"  {board:10s} {core:8s} {ports} port(s): {point['cells_used']}/{point['cells_total']} "
              f"{point['cells_type']}, {fmax} (target {point['target_mhz']})"
              + (f"  [{error}]" if error else ""), flush=True)
    return {"points": points, "seeds": seeds}


def fpga_table(data: dict) -> str:
    rows = ["| board | core | ports | logic used / available | RAM blocks | fmax (MHz) | target (MHz) | goal |",
            "|---|---|---|---|---|---|---|---|"]
    for p in data["points"]:
        used = f"{p['cells_used']:,} / {p['cells_total']:,} {p['cells_type']}" if p["cells_used"] else "-"
        pct = f" ({100 * p['cells_used'] / p['cells_total']:.0f} %)" if p["cells_used"] else ""
        fmax = f"{p['fmax_mhz']:.1f}" if p["fmax_mhz"] else "not placed"
        if "fmax_seeds" in p:
            missing = [seed for seed, f in p["fmax_seeds"].items() if f is None]
            spread = (f"{p['fmax_min_mhz']:.1f} to {p['fmax_max_mhz']:.1f}, mean {p['fmax_mean_mhz']:.1f}"
                      if p["fmax_mean_mhz"] is not None else "none placed")
            if missing:
                spread += f"; no result for seed {', '.join(missing)}"
            fmax += f" (seeds 1-{len(p['fmax_seeds'])}: {spread})"
        if "goal" in p:
            g = p["goal"]
            want = (f"<= {100 * g['cells_fraction']:.0f} % at >= {g['fmax_mhz']:g} MHz: "
                    + ("met" if p["goal_met"] else "**missed**"))
        else:
            want = "-"
        ram = f"{p['ram_used']} / {p['ram_total']}" if p["ram_used"] is not None else "-"
        rows.append(f"| {p['board']} | {p['core']} | {p['ports']} | {used}{pct} | {ram} | {fmax} | "
                    f"{p['target_mhz']:g} | {want} |")
    return "\n".join(rows) + "\n"


#: (board, ports) whose NIC's blocks the blocks section places alone: the goal points.
BLOCK_BOARDS = (("icebreaker", 2), ("ulx3s-85f", 4))
#: The blocks it places. (The node, both engines without the host side, takes about 8 minutes
#: a placement on the ECP5: `python -m epochlink.boards block ulx3s-85f node` places it.)
BENCH_BLOCKS = ("link", "epoch")


def _place_block(job: tuple) -> dict:
    """The report of one block build ``(board, block, ports, seed)``, or ``{"error": ...}``
    (and what report there is) if it was not placed."""
    from .boards.__main__ import BoardError, build_block

    board, block, ports, seed = job
    build_dir = BENCH_DIR / "blocks" / f"{board}-{block}-{ports}" / f"seed{seed}"
    with TimeLimit(PLACE_TIME_LIMIT_S) as limit:
        try:
            return build_block(board, block, ports=ports, seed=seed, build_dir=build_dir)
        except BoardError as exc:
            error = str(exc).splitlines()[0]
    if limit.expired:
        return {"error": f"stopped after {PLACE_TIME_LIMIT_S / 60:g} min"}
    report = build_dir / "report.json"
    return {**(json.loads(report.read_text()) if report.exists() else {}), "error": error}


def bench_blocks(_cycles: int, seeds: int = FPGA_SEEDS) -> dict:
    """The engines of the goal points' NICs placed alone (``epochlink.boards.blocks``): a link
    engine and the epoch engine, with the board's NIC parameters, each with seeds 1 to
    ``seeds``, two builds at a time. Tells a block's own depth from what putting
    the blocks on one chip costs (compare the fpga section)."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(board, block, ports, seed) for board, ports in BLOCK_BOARDS for block in BENCH_BLOCKS
            for seed in range(1, seeds + 1)]
    with ProcessPoolExecutor(max_workers=2) as pool:       # (processes: builds change the cwd)
        reports = list(pool.map(_place_block, jobs))
    points = []
    for board, ports in BLOCK_BOARDS:
        for block in BENCH_BLOCKS:
            runs = {seed: r for (b, k, _, seed), r in zip(jobs, reports) if (b, k) == (board, block)}
            first = runs[1]
            spread = _seed_spread({seed: r.get("fmax_mhz") for seed, r in runs.items()})
            point = {"board": board, "block": block, "ports": ports,
                     "cells_used": first.get("cells_used"), "cells_total": first.get("cells_total"),
                     "cells_type": first.get("cells_type"), "ram_used": first.get("ram_used"),
                     "ram_total": first.get("ram_total"), "fits": first.get("fits"),
                     "target_mhz": first.get("target_mhz"), **spread,
                     "critical_paths": {str(seed): r.get("critical_path")
                                        for seed, r in runs.items()},
                     "error": first.get("error") if spread["fmax_mean_mhz"] is None else None}
            points.append(point)
            print(f"  {board:10s} {block:6s} ({ports}-port NIC): {point['cells_used']} "
                  f"{point['cells_type']}, fmax {spread['fmax_seeds']} (target {point['target_mhz']})"
                  + (f"  [{point['error']}]" if point["error"] else ""), flush=True)
    return {"points": points, "seeds": seeds}


def blocks_table(data: dict) -> str:
    rows = ["| board | block (NIC ports) | logic used | RAM blocks | fmax (MHz), seeds 1-N | mean | target (MHz) | seed 1's critical path |",
            "|---|---|---|---|---|---|---|---|"]
    for p in data["points"]:
        used = f"{p['cells_used']:,} {p['cells_type']}" if p["cells_used"] else "-"
        ram = f"{p['ram_used']}" if p["ram_used"] is not None else "-"
        if p["fmax_mean_mhz"] is None:
            fmax, mean = "not placed" + (f" ({p['error']})" if p["error"] else ""), "-"
        else:
            fmax = " / ".join(f"{f:.1f}" if f else "-" for f in p["fmax_seeds"].values())
            mean = f"{p['fmax_mean_mhz']:.1f}"
        path = (p.get("critical_paths") or {}).get("1")
        where = "-"
        if path:
            short = lambda name: re.sub(r"^(isolated\.block\.|isolated\.)", "", name)
            where = (f"`{short(path['from'])}` to `{short(path['to'])}`, {path['delay_ns']:.2f} ns "
                     f"({path['route_ns']:.2f} route, LUT levels: {path['logic_levels']})")
        target = f"{p['target_mhz']:g}" if p["target_mhz"] else "-"
        rows.append(f"| {p['board']} | {p['block']} ({p['ports']}) | {used} | {ram} | {fmax} | "
                    f"{mean} | {target} | {where} |")
    return "\n".join(rows) + "\n"


SECTIONS = {"link": (bench_link, link_table), "epoch": (bench_epoch, epoch_table),
            "host": (bench_host, host_table), "fpga": (bench_fpga, fpga_table),
            "blocks": (bench_blocks, blocks_table)}


def update_docs(section: str, table: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\nWritten by `make bench`; numbers are measured on the machine that ran it.\n"
    begin, end = f"<!-- bench:{section}:begin -->", f"<!-- bench:{section}:end -->"
    block = f"{begin}\n{table}{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text += f"\n## {section}\n\n{block}\n"
    DOCS.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epochlink.bench", description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help=f"benchmarks to run: {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--cycles", type=int, default=300_000, help="measured cycles per goodput point")
    parser.add_argument("--max-nodes", type=int, default=None, metavar="N",
                        help="epoch: only clusters of at most N nodes (the 32-node Verilator "
                             "builds take most of the section's time)")
    parser.add_argument("--seeds", type=int, default=FPGA_SEEDS, metavar="N",
                        help="fpga: place each goal point that fits with seeds 1 to N; "
                             f"blocks: every block (default {FPGA_SEEDS}; 1: seed 1 only)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.max_nodes is not None and args.max_nodes < 2:
        parser.error("--max-nodes must be at least 2")
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    for section in args.sections or SECTIONS:
        run, table = SECTIONS[section]
        print(f"bench {section} ...", flush=True)
        started = time.perf_counter()
        if section == "epoch" and args.max_nodes is not None:
            data = run(args.cycles, [p for p in EPOCH_POINTS if p[1] <= args.max_nodes])
        elif section in ("fpga", "blocks"):
            data = run(args.cycles, args.seeds)
        else:
            data = run(args.cycles)
        data["wall_s"] = round(time.perf_counter() - started, 1)
        out = BENCH_DIR / f"{section}.json"
        out.write_text(json.dumps(data, indent=2) + "\n")
        update_docs(section, table(data))
        print(table(data))
        print(f"wrote {out} and the {section} table in {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
