"""The simulation server: a Verilator cluster of NICs whose host UARTs are TCP ports.

>>> from epochlink.sim.server import SimServer
>>> from epochlink.host.node import Node
>>> with SimServer(nodes=3, topology="line") as sim:
...     with Node(sim.urls[0], timeout=2.0) as node:
...         node.identify()
...     sim.cut(0)                      # edge 0 (node 0 - node 1) cut
...     sim.run_cycles(100_000)         # simulated time, independent of wall-clock time

:class:`SimServer` builds a :class:`~epochlink.sim.nic_cluster.NICCluster` with Verilator
(cached by content: the first build of a design takes a minute or two, later starts take
seconds), runs the :mod:`epochlink.sim.tb_server` testbench in the background, and exposes
one ``socket://127.0.0.1:PORT`` URL per node for :class:`~epochlink.host.node.Node` plus a
control connection (JSON lines; see :mod:`epochlink.sim.tb_server`). :func:`sim_main` is the
``epochlink sim`` command.

Timing: the NICs are built for a 48 MHz clock with their host UART at 12 Mbaud (4 cycles per
bit, 40 cycles per byte); one register read takes about 16 byte times of simulated time, but
wall-clock time depends on the simulator's speed, so give the driver generous timeouts
(``Node(url, timeout=2.0)``).
"""
from __future__ import annotations

import argparse
import atexit
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import verilator
from .cluster import Topology
from .nic_cluster import NICCluster, SIM_BAUD, SIM_CLK_HZ

__all__ = ["SimServer", "SimServerError", "sim_main", "TOPOLOGIES"]

#: Topology names accepted by :class:`SimServer` and ``epochlink sim``.
TOPOLOGIES = ("line", "star", "tree")

TESTBENCH = "epochlink.sim.tb_server"
_run_numbers = itertools.count()


def _prune_runs(runs: Path, keep: int = 8) -> None:
    """Delete the run directories of finished servers but the ``keep`` most recent."""
    finished = []
    for d in runs.glob("server-*-*"):
        try:
            pid = int(d.name.split("-")[1])
        except ValueError:
            continue
        alive = True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            pass
        if not alive:
            finished.append(d)
    finished.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    for d in finished[keep:]:
        shutil.rmtree(d, ignore_errors=True)


class SimServerError(RuntimeError):
    """The simulation could not be started, died, or refused a control request."""


def _topology(topology, nodes) -> Topology:
    if isinstance(topology, Topology):
        return topology
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; choose from {', '.join(TOPOLOGIES)}")
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ValueError(f"nodes must be a positive integer, not {nodes!r}")
    return Topology.named(topology, nodes)


class SimServer:
    """A running simulated cluster, reachable over TCP on 127.0.0.1.

    Parameters
    ----------
    nodes : int
        Number of NICs (ignored when ``topology`` is a :class:`Topology`).
    topology : str or Topology
        ``"line"``, ``"star"``, ``"tree"`` (binary) or any :class:`Topology`.
    ber : float
        Initial bit error rate of every edge (both directions): per bit of a byte on the
        byte-level channel models, per bit time of the line with ``phy_divisor``.
    delay : int
        Wire latency in cycles (byte-level wires only).
    seed : int
        Channel-model seed (>= 1; part of the design: each seed is its own cached build).
    core : callable or None
        NIC core factory (default: :class:`NICCluster`'s default core).
    core_args : dict or None
        More keyword arguments for the core factory.
    port_base : int
        0: every port is a free port picked by the system. Otherwise node ``i`` listens on
        ``port_base + i`` and the control connection on ``port_base + nodes``.
    clk_hz, baud : float, int
        Clock the NICs are built for, and their host UART rate.
    chunk, idle_sleep :
        Server pacing (see :mod:`epochlink.sim.tb_server`); None: its defaults.
    start_timeout : float
        Seconds to wait for the simulator to listen (the build is not included).
    phy_divisor : int or None
        None: byte-level wires. ``N``: every edge is wired as two boards are, through serial
        PHYs at ``N`` cycles per bit and noisy serial lines
        (:class:`~epochlink.sim.nic_cluster.NICCluster`); ``ber``/``set_ber`` then set the
        error rate per bit time on the wire and ``cut`` holds the lines idle. ``5`` is the
        iCEBreaker's 48 MHz / 9.6 Mbit/s. A serial byte takes ``10 N`` cycles instead of one,
        so everything on the links is about ``11 N`` times slower in simulated time.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. :meth:`stop` also
    runs at interpreter exit.
    """

    def __init__(self, nodes: int = 4, topology: str | Topology = "line", *, ber: float = 0.0,
                 delay: int = 8, seed: int = 1, core=None, core_args: dict | None = None,
                 port_base: int = 0, clk_hz: float = SIM_CLK_HZ, baud: int = SIM_BAUD,
                 chunk: int | None = None, idle_sleep: float | None = None,
                 start_timeout: float = 60.0, phy_divisor: int | None = None):
        self.topology = _topology(topology, nodes)
        if not (isinstance(ber, (int, float)) and 0 <= ber <= 1):
            raise ValueError(f"ber must be in 0..1, not {ber!r}")
        if not isinstance(port_base, int) or not (port_base == 0 or
                                                  1 <= port_base <= 65535 - self.topology.nodes):
            raise ValueError(f"port_base must be 0 or 1..{65535 - self.topology.nodes}, not {port_base!r}")
        self.ber = float(ber)
        self.port_base = port_base
        self.chunk = chunk
        self.idle_sleep = idle_sleep
        self.start_timeout = start_timeout
        kwargs = {} if core is None else {"core": core}
        self.design = NICCluster(self.topology, clk_hz=clk_hz, baud=baud, delay=delay, seed=seed,
                                 core_args=core_args, phy_divisor=phy_divisor, **kwargs)
        self.build: verilator.DesignBuild | None = None
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self._control: socket.socket | None = None
        self._control_buffer = bytearray()
        self._lock = threading.Lock()

    # -- life cycle --------------------------------------------------------------------

    @property
    def name(self) -> str:
        phy = "" if self.design.phy_divisor is None else f"_phy{self.design.phy_divisor}"
        return f"nic_cluster_{self.topology.name}{self.topology.nodes}{phy}"

    def build_design(self) -> verilator.DesignBuild:
        """Build (or find the cached build of) the design; returns it."""
        if self.build is None:
            self.build = verilator.build(self.name, self.design)
        return self.build

    def start(self) -> "SimServer":
        """Build if needed, start the simulator and wait until it listens. Idempotent."""
        if self.proc is not None:
            return self
        design = self.build_design()
        _prune_runs(design.build_dir / "runs")
        run_name = f"server-{os.getpid()}-{next(_run_numbers)}"
        run_dir = design.build_dir / "runs" / run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        ready = run_dir / "ready.json"
        ready.unlink(missing_ok=True)
        n = self.topology.nodes
        cfg = {
            "topology": self.topology.name,
            "nodes": n,
            "edges": [list(e) for e in self.topology.edges],
            "clk_hz": self.design.clk_hz,
            "baud": self.design.baud,
            "ber": self.ber,
            "phy_divisor": self.design.phy_divisor,
            "node_ports": [self.port_base + i if self.port_base else 0 for i in range(n)],
            "control_port": self.port_base + n if self.port_base else 0,
            "ready_file": str(ready),
        }
        if self.chunk is not None:
            cfg["chunk"] = int(self.chunk)
        if self.idle_sleep is not None:
            cfg["idle_sleep"] = float(self.idle_sleep)
        self.proc = verilator.start(design, TESTBENCH, run_name=run_name,
                                    env={"EPOCHLINK_SERVER_CONFIG": json.dumps(cfg)})
        atexit.register(self.stop)
        try:
            self.info = self._wait_ready(ready)
            self._control = socket.create_connection(("127.0.0.1", self.info["control_port"]),
                                                     timeout=10)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, ready: Path) -> dict:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if ready.exists():
                info = json.loads(ready.read_text())
                if "error" in info:
                    raise SimServerError(f"the simulation server could not start: {info['error']}")
                return info
            if self.proc.poll() is not None:
                raise SimServerError(f"the simulator exited with {self.proc.returncode} before it "
                                     f"was ready (log: {self.log_path})\n{self._log_excerpt()}")
            if time.monotonic() > deadline:
                raise SimServerError(f"the simulator was not ready after {self.start_timeout:.0f} s "
                                     f"(log: {self.log_path})\n{self._log_excerpt()}")
            time.sleep(0.05)

    def _log_excerpt(self) -> str:
        log = self.log_path
        return verilator._failure_excerpt(log) if log is not None else ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the simulation (``stop`` request, then SIGTERM, then SIGKILL); returns the
        simulator's exit code (0 when it stopped cleanly). Idempotent."""
        atexit.unregister(self.stop)
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None and self.info:
            try:
                self._request({"cmd": "stop"}, timeout, lock_timeout=timeout)
            except (SimServerError, ValueError):
                pass
        if self._control is not None:
            self._control.close()
            self._control = None
        if not self.info and proc.poll() is None:        # never got ready: no clean stop
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def __enter__(self) -> "SimServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait until the simulation ends (None if still running after ``timeout``)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def passed(self) -> bool:
        """The simulation ended and its cocotb test passed."""
        if self.proc is None or self.proc.poll() is None:
            return False
        total, failed = verilator.results_of(self.proc)
        return self.proc.returncode == 0 and total > 0 and not failed

    # -- where things are --------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """One pyserial URL per node (``socket://127.0.0.1:PORT``)."""
        return list(self.info["urls"])

    @property
    def ports(self) -> list[int]:
        return list(self.info["node_ports"])

    @property
    def control_port(self) -> int:
        return self.info["control_port"]

    @property
    def log_path(self) -> Path | None:
        return None if self.proc is None else self.proc.log_path

    @property
    def run_dir(self) -> Path | None:
        return None if self.proc is None else self.proc.run_dir

    def roles(self, i: int) -> list:
        """Node ``i``'s link ports in order: ``[(peer, Role), ...]`` (parent first)."""
        return self.topology.ports(i)

    # -- control -----------------------------------------------------------------------

    def request(self, cmd: dict, timeout: float | None = 30.0) -> dict:
        """Send one control request; returns the reply (``ok`` may be false). ``timeout``:
        seconds to wait for the reply (None: no limit)."""
        if self.proc is None or self.proc.poll() is not None:
            raise SimServerError("the simulation server is not running")
        return self._request(cmd, timeout)

    def _request(self, cmd: dict, timeout: float | None, lock_timeout: float = -1) -> dict:
        if not self._lock.acquire(timeout=lock_timeout):
            raise SimServerError("another control request is still running")
        try:
            if self._control is None:          # (re)connect
                self._control = socket.create_connection(("127.0.0.1", self.control_port),
                                                         timeout=10)
                self._control_buffer.clear()
            self._control.settimeout(timeout)
            self._control.sendall((json.dumps(cmd) + "\n").encode())
            while b"\n" not in self._control_buffer:
                data = self._control.recv(65536)
                if not data:
                    raise ConnectionError("connection closed")
                self._control_buffer += data
            end = self._control_buffer.index(b"\n")
            line = bytes(self._control_buffer[:end])
            del self._control_buffer[:end + 1]
        except OSError as exc:
            # A reply may still come: never reuse this connection.
            if self._control is not None:
                self._control.close()
                self._control = None
            what = "no reply in time" if isinstance(exc, socket.timeout) else exc
            raise SimServerError(f"{cmd.get('cmd')}: {what} (log: {self.log_path})") from None
        finally:
            self._lock.release()
        return json.loads(line)

    def _checked(self, cmd: dict, timeout: float | None = 30.0) -> dict:
        reply = self.request(cmd, timeout)
        if not reply.get("ok"):
            raise SimServerError(f"{cmd.get('cmd')}: {reply.get('error', 'refused')}")
        return reply

    def status(self) -> dict:
        """Cycle count, per node link state and bridge counters, per edge settings."""
        return self._checked({"cmd": "status"})

    def cycle(self) -> int:
        """Cycles simulated since the cluster's reset."""
        return self.status()["cycle"]

    def reset_node(self, i: int, cycles: int = 16) -> dict:
        """Hold node ``i`` in reset for ``cycles`` cycles; returns after the release.

        Only the NIC core is reset, not the node's host byte bridge (as on a board, where the
        USB UART keeps going): requests in flight are lost or garbled, and the driver's read
        retries (or a repeated write) recover."""
        return self._checked({"cmd": "reset", "node": i, "cycles": cycles}, timeout=None)

    def set_ber(self, ber: float, edge: int | None = None) -> dict:
        """Bit error rate on edge ``edge`` (both directions), or on every edge. With
        ``phy_divisor``: error events per bit time on the serial wires."""
        return self._checked({"cmd": "ber", "ber": ber, "edge": edge})

    def cut(self, edge: int, on: bool = True) -> dict:
        """Cut (``on``) or restore edge ``edge`` (both directions). With ``phy_divisor`` the
        lines are held high (idle), as an open wire into a pulled-up input reads."""
        return self._checked({"cmd": "cut", "edge": edge, "on": on})

    def run_cycles(self, n: int) -> int:
        """Let ``n`` more cycles pass; returns the cycle count then."""
        return self._checked({"cmd": "run", "cycles": n}, timeout=None)["cycle"]


# -- the `epochlink sim` command ------------------------------------------------------------

def _describe_ports(topology: Topology, i: int) -> str:
    ports = topology.ports(i)
    if not ports:
        return "no links"
    return ", ".join(f"port {p}: {role.name.lower()} node {peer}"
                     for p, (peer, role) in enumerate(ports))


def _integer(lo: int, hi: int | None = None, *, zero_ok: bool = False, why: str = ""):
    """An argparse type: an integer in ``lo..hi`` (or 0 when ``zero_ok``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not (zero_ok and value == 0) and not (lo <= value and (hi is None or value <= hi)):
            allowed = f"{lo}..{hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(
                f"must be {'0 (any free ports) or ' if zero_ok else ''}{allowed}{why}, not {value}")
        return value
    return parse


_positive_int = _integer(1)
_port_base = _integer(1024, 65535, zero_ok=True)
_phy_divisor = _integer(3, why=" (samples per bit)")


def _ber(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 0.125:
        raise argparse.ArgumentTypeError(f"must be in 0..0.125 (0.125: an error in every byte), not {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epochlink sim",
        description="Simulate a cluster of epochlink NICs (Verilator) and serve each node's host "
                    "interface on a TCP port of 127.0.0.1, so the host library connects to it "
                    "as to a board: Node('socket://127.0.0.1:PORT'). The first run of a design "
                    "builds it (a minute or two); later runs start in seconds.",
        epilog="Control port: send JSON lines, one reply line each, e.g. "
               '{"cmd": "status"}, {"cmd": "reset", "node": 1, "cycles": 100}, '
               '{"cmd": "ber", "ber": 1e-4, "edge": null}, {"cmd": "cut", "edge": 0, "on": true}, '
               '{"cmd": "run", "cycles": 100000}, {"cmd": "stop"}. '
               "Try: printf '{\"cmd\": \"status\"}\\n' | nc -q1 127.0.0.1 CONTROL_PORT. "
               "Ctrl-C stops the simulation.")
    parser.add_argument("--nodes", type=_positive_int, default=2, metavar="N",
                        help="number of NICs (default: 2)")
    parser.add_argument("--topology", choices=TOPOLOGIES, default="line",
                        help="line: 0-1-2-...; star: node 0 in the middle; tree: binary tree "
                             "rooted at node 0 (default: line)")
    parser.add_argument("--ber", type=_ber, default=0.0, metavar="X",
                        help="bit error rate on every link, e.g. 1e-5 (default: 0)")
    parser.add_argument("--delay", type=_positive_int, default=8, metavar="C",
                        help="wire latency in clock cycles (default: 8)")
    parser.add_argument("--port-base", type=_port_base, default=0, metavar="P",
                        help="node i listens on P+i, the control port is P+N "
                             "(default: 0, any free ports)")
    parser.add_argument("--seed", type=_positive_int, default=1, metavar="S",
                        help="seed of the bit-error generators (default: 1; another seed is "
                             "another build)")
    parser.add_argument("--phy-divisor", type=_phy_divisor, default=None, metavar="N",
                        help="wire the links as two boards are: a serial PHY per port at N "
                             "cycles per bit and noisy serial lines (--ber is then per bit time "
                             "on the wire; 5 = the iCEBreaker's 9.6 Mbit/s at 48 MHz). "
                             "Default: byte-wide wires")
    return parser


def sim_main(argv: list[str] | None = None) -> int:
    """``epochlink sim``: run a simulated cluster until Ctrl-C or a ``stop`` request."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        server = SimServer(args.nodes, args.topology, ber=args.ber, delay=args.delay,
                           seed=args.seed, port_base=args.port_base,
                           phy_divisor=args.phy_divisor)
    except ValueError as exc:
        parser.error(str(exc))
    topology = server.topology
    if args.phy_divisor is None:
        wires = f"wire delay {args.delay} cycles"
    else:
        wires = (f"serial PHYs at {args.phy_divisor} cycles per bit "
                 f"({server.design.clk_hz / args.phy_divisor / 1e6:g} Mbit/s), BER per bit time")
    print(f"epochlink sim: {topology.nodes} node(s), {topology.name}, BER {args.ber:g}, "
          f"{wires}", flush=True)
    print("building the simulation (the first build of a design takes a minute or two; "
          "later runs reuse it)...", flush=True)
    # While building, Ctrl-C (or SIGTERM) interrupts at once. Once the simulator runs, the
    # signals only set a flag: an exception raised inside Popen.wait() could leave its
    # internal lock held and make the clean stop hang. (A plain flag: a signal handler must
    # not take locks the interrupted code may hold.)
    interrupted = []

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    def flag(signum, frame):
        interrupted.append(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if main_thread:
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        signal.signal(signal.SIGTERM, interrupt)
    code = None
    try:
        t0 = time.monotonic()
        server.build_design()
        print(f"built in {time.monotonic() - t0:.1f} s; starting the simulator...", flush=True)
        if main_thread:
            signal.signal(signal.SIGTERM, flag)
            if previous[signal.SIGINT] is not signal.SIG_IGN:
                signal.signal(signal.SIGINT, flag)
        server.start()
        for i, url in enumerate(server.urls):
            print(f"node {i}: {url}  ({_describe_ports(topology, i)})", flush=True)
        print(f"control: 127.0.0.1:{server.control_port}  (JSON lines; see --help)", flush=True)
        print(f"simulator log: {server.log_path}", flush=True)
        print("running; Ctrl-C stops it.", flush=True)
        while not interrupted and server.running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        interrupted.append(signal.SIGINT)
    except (SimServerError, RuntimeError, OSError) as exc:
        print(f"epochlink sim: {exc}", file=sys.stderr, flush=True)
        server.stop()
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stopping = bool(interrupted)
        if stopping:
            print("\nstopping...", flush=True)
        code = server.stop()
    if stopping:
        print("stopped.", flush=True)
        return 0
    if server.passed():
        print("the simulation ended (stop request).", flush=True)
        return 0
    print(f"the simulation ended with exit code {code} (log: {server.log_path})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(sim_main())
