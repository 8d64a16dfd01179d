"""cocotb testbench behind ``epochlink sim``: a :class:`~epochlink.sim.nic_cluster.NICCluster`
served over TCP on 127.0.0.1.

One cocotb test, ``serve``, runs until told to stop. Every node's host UART (through the
cluster's byte bridge, ``h{i}_in`` / ``h{i}_out``) is one listening TCP port: a client that
connects gets a raw byte stream to and from the node, exactly what a pyserial
``socket://127.0.0.1:PORT`` URL expects, so the host driver talks to a simulated node
unchanged. One client per node: a new connection replaces the previous one (its queued
bytes are dropped; bytes already in the bridge FIFOs still reach the node / the new client).
Bytes a node sends while no client is connected are dropped.

A **control** port speaks JSON lines, one request and one reply (``"ok": true/false``, and
``"error"`` when false; a request's ``"id"`` is echoed) per line. A bad request changes
nothing. Requests from one connection are handled in order; ``run`` and ``reset`` reply when
done, and requests behind them wait.

========================================== ===================================================
request                                    reply / effect
========================================== ===================================================
``{"cmd": "status"}``                      ``cycle``; per node: ``ports`` (peer, role,
                                           ``link_up``), ``in_reset``, ``client``, bridge
                                           ``framing_errors``/``overruns``; per edge:
                                           ``nodes``, ``ber``, ``threshold``, ``cut``
``{"cmd": "reset", "node": i,              holds node ``i``'s reset for ``cycles`` cycles
"cycles": N}``                             (default 16), replies after the release. The
                                           node's bridge is not flushed (as a board's USB
                                           UART is not): bytes in flight are lost or garbled
                                           and the driver's retries recover.
``{"cmd": "ber", "ber": x, "edge": k}``    bit error rate ``x`` on edge ``k`` (both
                                           directions), or on every edge if ``edge`` is
                                           null or absent; with ``phy_divisor``: flips per
                                           bit time on the serial wires
``{"cmd": "cut", "edge": k, "on": b}``     cut (``on`` true, the default) or restore edge
                                           ``k`` (both directions; serial wires: held high)
``{"cmd": "run", "cycles": N}``            replies ``cycle`` after ``N`` more cycles
``{"cmd": "stop"}``                        replies, then ends the test (it passes)
========================================== ===================================================

Configuration: JSON in ``EPOCHLINK_SERVER_CONFIG`` with ``nodes``, ``edges``, ``topology``
(name), ``clk_hz``, ``baud``, ``ber`` (initial, every edge), ``phy_divisor`` (null: byte-level
wires, thresholds from :func:`~epochlink.hdl.channel.ber_to_threshold`; ``N``: serial wires,
:func:`~epochlink.hdl.line_noise.ber_to_line_threshold`, and each edge's ``status`` also has
``flips``, the bit-time flips injected so far, and each node's ``phy_errors``, its PHYs'
false starts and framing errors), ``node_ports`` (one per node;
0 = any free port), ``control_port``, ``ready_file``; optional ``chunk`` (cycles per step
while bytes flow, default 200), ``idle_sleep`` (seconds to wait for a socket per step while
idle, default 0.05). When listening, the testbench writes the ready file (JSON: ``pid``, ``host``,
``node_ports``, ``urls``, ``control_port``, ``topology``, ``nodes``, ``edges``, ``roles``,
``clk_hz``, ``baud``, ``divisor``, ``phy_divisor``) and deletes it when it ends; if it cannot listen, the
ready file holds ``{"error": message}`` and the test fails. It also ends by itself if
the process that started it goes away.

Pacing: the simulation advances in steps of ``chunk`` cycles while bytes flow (and for a
short while after), in larger steps (a quarter of a bridge FIFO's worth of byte times) while
a ``run``/``reset`` is pending, and, when no byte has moved for a second, in large steps
each followed by a wait of up to ``idle_sleep`` for socket activity: an idle server uses
little CPU (simulated time keeps going, slowly) and wakes at once when a client talks.
"""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import time

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge, Timer

from epochlink.hdl.channel import ber_to_threshold
from epochlink.hdl.line_noise import ber_to_line_threshold
from epochlink.sim.cluster import Topology

CLOCK_NS = 10                 # simulated clock period as cocotb sees it (nominal)
HOST = "127.0.0.1"
BUSY_HOLD_S = 1.0             # stay in fast mode this long after the last byte moved
PENDING_MAX = 1 << 16         # stop reading a client with this many bytes still queued
LINE_MAX = 1 << 16            # longest control request
MAX_RESET_CYCLES = 1 << 32
MAX_RUN_CYCLES = 1 << 40
COMMANDS = ("status", "reset", "ber", "cut", "run", "stop")

log = logging.getLogger("cocotb.epochlink.server")   # under cocotb: goes to sim.log


class BadRequest(ValueError):
    pass


def _int_arg(req, name, lo, hi, default=None):
    value = req.get(name, default)
    if value is None:
        raise BadRequest(f"missing {name!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name!r} must be an integer, not {value!r}")
    if not lo <= value <= hi:
        raise BadRequest(f"{name!r} must be in {lo}..{hi}, not {value}")
    return value


class Bridge:
    """One node: its signals, its TCP listener and client, its byte queues."""

    def __init__(self, dut, i, port):
        self.i = i
        self.in_valid = getattr(dut, f"h{i}_in__valid")
        self.in_payload = getattr(dut, f"h{i}_in__payload")
        self.in_ready = getattr(dut, f"h{i}_in__ready")
        self.out_valid = getattr(dut, f"h{i}_out__valid")
        self.out_payload = getattr(dut, f"h{i}_out__payload")
        self.out_ready = getattr(dut, f"h{i}_out__ready")
        self.rst = getattr(dut, f"n{i}_rst")
        self.link_up = getattr(dut, f"n{i}_link_up")
        self.framing_errors = getattr(dut, f"h{i}_framing_errors")
        self.overruns = getattr(dut, f"h{i}_overruns")
        self.in_valid.value = 0
        self.in_payload.value = 0
        self.out_ready.value = 0
        self.rst.value = 0
        self.listener = _listen(port, backlog=1)
        self.port = self.listener.getsockname()[1]
        self.client: socket.socket | None = None
        self.to_node = bytearray()
        self.to_client = bytearray()
        self.pushing = self.popping = False
        self.popped = 0
        self.reset_until: int | None = None
        self.bytes_in = self.bytes_out = 0

    def accept(self):
        conn, addr = self.listener.accept()
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.client is not None:
            log.info("node %d: new client %s replaces the previous one", self.i, addr)
        self.drop_client()
        self.client = conn

    def drop_client(self):
        if self.client is not None:
            self.client.close()
        self.client = None
        self.to_node.clear()
        self.to_client.clear()

    def receive(self):
        try:
            data = self.client.recv(PENDING_MAX)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            data = b""
        if not data:
            self.drop_client()
            return 0
        self.to_node += data
        return len(data)

    def send(self):
        try:
            n = self.client.send(self.to_client)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop_client()
            return
        del self.to_client[:n]

    def close(self):
        self.drop_client()
        self.listener.close()


class Control:
    """One control connection: a line buffer and the request it is waiting on."""

    def __init__(self, conn):
        self.conn = conn
        conn.settimeout(2.0)
        self.buffer = bytearray()
        self.waiting = None        # (kind, deadline cycle, reply dict) while run/reset runs

    def reply(self, obj):
        try:
            self.conn.sendall((json.dumps(obj) + "\n").encode())
            return True
        except OSError:
            return False


def _write_json(path, obj):
    """Write ``obj`` to ``path`` atomically (readers never see half a file)."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _listen(port, backlog):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((HOST, port))
    except OSError as exc:
        s.close()
        raise OSError(exc.errno, f"cannot listen on {HOST}:{port}: {exc.strerror}") from None
    s.listen(backlog)
    s.setblocking(False)
    return s


class Server:
    def __init__(self, dut, cfg):
        self.dut = dut
        self.cfg = cfg
        self.topology = Topology(cfg.get("topology", "custom"), int(cfg["nodes"]),
                                 tuple(tuple(e) for e in cfg["edges"]))
        self.n = self.topology.nodes
        self.clk_hz = float(cfg["clk_hz"])
        self.baud = int(cfg["baud"])
        self.divisor = round(self.clk_hz / self.baud)
        self.chunk = int(cfg.get("chunk", 200))
        # Largest step: the bridge output FIFO (64 bytes) must not fill up within one step.
        self.big_chunk = max(self.chunk, 16 * 10 * self.divisor)
        self.idle_sleep = float(cfg.get("idle_sleep", 0.05))
        ports = cfg.get("node_ports") or [0] * self.n
        self.phy_divisor = cfg.get("phy_divisor")
        # Serial wires: the rate is per bit time on the line; byte-level channels: per bit of
        # a byte (an event per byte flips one of its 8 bits).
        self.threshold = ber_to_threshold if self.phy_divisor is None else ber_to_line_threshold
        self.edge_ber = [float(cfg.get("ber", 0.0))] * len(self.topology.edges)
        self.edge_cut = [False] * len(self.topology.edges)
        self.bridges = []
        self.controls: list[Control] = []
        self.control_listener = None
        self.ready_file = cfg.get("ready_file")
        try:
            for i in range(self.n):
                self.bridges.append(Bridge(dut, i, int(ports[i])))
            self.control_listener = _listen(int(cfg.get("control_port", 0)), backlog=8)
        except OSError:
            self.close()
            raise
        self.control_port = self.control_listener.getsockname()[1]
        for k in range(len(self.topology.edges)):
            getattr(dut, f"e{k}_error_threshold").value = self.threshold(self.edge_ber[k])
            getattr(dut, f"e{k}_cut").value = 0
        self.cycle = 0
        self.stopping = False
        self.busy_until = 0.0
        self.parent = os.getppid()

    # -- life cycle --------------------------------------------------------------------

    def ready_info(self):
        return {
            "pid": os.getpid(),
            "host": HOST,
            "node_ports": [b.port for b in self.bridges],
            "urls": [f"socket://{HOST}:{b.port}" for b in self.bridges],
            "control_port": self.control_port,
            "topology": self.topology.name,
            "nodes": self.n,
            "edges": [list(e) for e in self.topology.edges],
            "roles": [[{"port": p, "peer": peer, "role": role.name}
                       for p, (peer, role) in enumerate(self.topology.ports(i))]
                      for i in range(self.n)],
            "clk_hz": self.clk_hz,
            "baud": self.baud,
            "divisor": self.divisor,
            "phy_divisor": self.phy_divisor,
        }

    def write_ready(self):
        _write_json(self.ready_file, self.ready_info())

    def close(self):
        for b in self.bridges:
            b.close()
        for c in self.controls:
            c.conn.close()
        if self.control_listener is not None:
            self.control_listener.close()
        if self.ready_file:
            try:
                os.unlink(self.ready_file)
            except OSError:
                pass

    # -- sockets -----------------------------------------------------------------------

    def poll(self):
        """Accept, read and write whatever is ready, without waiting. True if bytes moved."""
        rlist = [self.control_listener] + [c.conn for c in self.controls if c.waiting is None]
        wlist = []
        for b in self.bridges:
            rlist.append(b.listener)
            if b.client is not None:
                if len(b.to_node) < PENDING_MAX:
                    rlist.append(b.client)
                if b.to_client:
                    wlist.append(b.client)
        readable, writable, _ = select.select(rlist, wlist, [], 0)
        moved = False
        readable = set(readable)
        for b in self.bridges:
            if b.client is not None and b.client in readable:
                moved |= b.receive() > 0
            if b.listener in readable:
                b.accept()
                moved = True
            if b.client is not None and b.client in writable:
                b.send()
                moved = True
        if self.control_listener in readable:
            conn, _ = self.control_listener.accept()
            self.controls.append(Control(conn))
        for c in list(self.controls):
            if c.conn in readable:
                try:
                    data = c.conn.recv(LINE_MAX)
                except OSError:
                    data = b""
                if not data:
                    self._drop_control(c)
                    continue
                c.buffer += data
            self._serve_lines(c)
        return moved

    def _drop_control(self, c):
        c.conn.close()
        if c in self.controls:
            self.controls.remove(c)

    def _serve_lines(self, c):
        while c.waiting is None and not self.stopping and c in self.controls:
            end = c.buffer.find(b"\n")
            if end < 0:
                if len(c.buffer) > LINE_MAX:
                    c.buffer.clear()
                    if not c.reply({"ok": False, "error": f"request longer than {LINE_MAX} bytes"}):
                        self._drop_control(c)
                return
            line = bytes(c.buffer[:end]).strip()
            del c.buffer[:end + 1]
            if not line:
                continue
            reply = self.request(c, line)
            if reply is not None and not c.reply(reply):
                self._drop_control(c)

    def idle_wait(self):
        """Sleep up to ``idle_sleep`` seconds, or until a socket has something for us."""
        rlist = [self.control_listener] + [c.conn for c in self.controls]
        for b in self.bridges:
            rlist.append(b.listener)
            if b.client is not None:
                rlist.append(b.client)
        select.select(rlist, [], [], self.idle_sleep)

    # -- control requests --------------------------------------------------------------

    def request(self, c, line):
        """Execute one request; the reply, or None if it comes later (run, reset)."""
        try:
            req = json.loads(line)
        except ValueError as exc:
            return {"ok": False, "error": f"bad JSON: {exc}"}
        if not isinstance(req, dict):
            return {"ok": False, "error": "a request is a JSON object like {\"cmd\": \"status\"}"}
        echo = {"id": req["id"]} if "id" in req else {}
        cmd = req.get("cmd")
        try:
            if cmd not in COMMANDS:
                raise BadRequest(f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)}")
            reply = getattr(self, f"cmd_{cmd}")(c, req, echo)
        except BadRequest as exc:
            return {"ok": False, "cmd": cmd, "error": str(exc), **echo}
        if cmd != "status":
            log.info("control: %s -> %s", line.decode(errors="replace"), reply or "(pending)")
        return reply

    def cmd_status(self, c, req, echo):
        nodes = []
        for i, b in enumerate(self.bridges):
            up = int(b.link_up.value)
            nodes.append({
                "node": i,
                "ports": [{"port": p, "peer": peer, "role": role.name, "link_up": bool(up >> p & 1)}
                          for p, (peer, role) in enumerate(self.topology.ports(i))],
                "in_reset": b.reset_until is not None,
                "client": b.client is not None,
                "framing_errors": int(b.framing_errors.value),
                "overruns": int(b.overruns.value),
                "bytes_to_node": b.bytes_in,
                "bytes_from_node": b.bytes_out,
            })
        if self.phy_divisor is not None:
            for node in nodes:
                node["phy_errors"] = int(getattr(self.dut, f"n{node['node']}_phy_errors").value)
        edges = [{"edge": k, "nodes": list(e), "ber": self.edge_ber[k],
                  "threshold": self.threshold(self.edge_ber[k]), "cut": self.edge_cut[k]}
                 for k, e in enumerate(self.topology.edges)]
        if self.phy_divisor is not None:
            for edge in edges:
                edge["flips"] = int(getattr(self.dut, f"e{edge['edge']}_flips").value)
        return {"ok": True, "cmd": "status", "cycle": self.cycle_now(), "clk_hz": self.clk_hz,
                "baud": self.baud, "nodes": nodes, "edges": edges, **echo}

    def cmd_reset(self, c, req, echo):
        i = _int_arg(req, "node", 0, self.n - 1)
        cycles = _int_arg(req, "cycles", 1, MAX_RESET_CYCLES, default=16)
        b = self.bridges[i]
        until = self.cycle + cycles
        b.reset_until = max(until, b.reset_until or 0)
        b.rst.value = 1
        c.waiting = ("reset", until, {"ok": True, "cmd": "reset", "node": i, "cycles": cycles, **echo})
        return None

    def _edge_arg(self, req, required):
        if req.get("edge") is None and not required:
            return list(range(len(self.topology.edges)))
        if not self.topology.edges:
            raise BadRequest("this cluster has no edges")
        return [_int_arg(req, "edge", 0, len(self.topology.edges) - 1)]

    def cmd_ber(self, c, req, echo):
        ber = req.get("ber")
        if isinstance(ber, bool) or not isinstance(ber, (int, float)) or not 0 <= ber <= 1:
            raise BadRequest(f"'ber' must be a number in 0..1, not {ber!r}")
        edges = self._edge_arg(req, required=False)
        threshold = self.threshold(float(ber))
        for k in edges:
            self.edge_ber[k] = float(ber)
            getattr(self.dut, f"e{k}_error_threshold").value = threshold
        return {"ok": True, "cmd": "ber", "ber": float(ber), "threshold": threshold,
                "edges": edges, **echo}

    def cmd_cut(self, c, req, echo):
        on = req.get("on", True)
        if not isinstance(on, bool):
            raise BadRequest(f"'on' must be true or false, not {on!r}")
        (k,) = self._edge_arg(req, required=True)
        self.edge_cut[k] = on
        getattr(self.dut, f"e{k}_cut").value = int(on)
        return {"ok": True, "cmd": "cut", "edge": k, "on": on, **echo}

    def cmd_run(self, c, req, echo):
        cycles = _int_arg(req, "cycles", 0, MAX_RUN_CYCLES)
        c.waiting = ("run", self.cycle + cycles, {"ok": True, "cmd": "run", "cycles": cycles, **echo})
        return None

    def cmd_stop(self, c, req, echo):
        self.stopping = True
        return {"ok": True, "cmd": "stop", "cycle": self.cycle_now(), **echo}

    def cycle_now(self):
        return int(self.dut.cycle.value)

    def deadlines(self):
        found = [b.reset_until for b in self.bridges if b.reset_until is not None]
        found += [c.waiting[1] for c in self.controls if c.waiting is not None]
        return found

    def settle(self):
        """Release resets and answer run/reset requests whose time has come."""
        for b in self.bridges:
            if b.reset_until is not None and b.reset_until <= self.cycle:
                b.rst.value = 0
                b.reset_until = None
        for c in list(self.controls):
            if c.waiting is not None and c.waiting[1] <= self.cycle:
                reply = dict(c.waiting[2], cycle=self.cycle_now())
                c.waiting = None
                if not c.reply(reply):
                    self._drop_control(c)

    # -- the byte bridge ---------------------------------------------------------------

    async def transfer(self, limit=256):
        """Move bytes between the queues and the bridge FIFOs, one byte per node per cycle,
        until nothing can move (or ``limit`` cycles). True if any byte moved."""
        moved = False
        for _ in range(limit):
            active = False
            for b in self.bridges:
                if b.to_node and int(b.in_ready.value):
                    b.in_payload.value = b.to_node[0]
                    b.in_valid.value = 1
                    b.pushing = active = True
                elif b.pushing:
                    b.in_valid.value = 0
                    b.pushing = False
                if int(b.out_valid.value):
                    b.popped = int(b.out_payload.value)
                    b.out_ready.value = 1
                    b.popping = active = True
                elif b.popping:
                    b.out_ready.value = 0
                    b.popping = False
            if not active:
                return moved
            moved = True
            await Timer(CLOCK_NS, unit="ns")      # the edge in between transfers the bytes
            self.cycle += 1
            for b in self.bridges:
                if b.pushing:
                    del b.to_node[0]
                    b.bytes_in += 1
                if b.popping:
                    b.bytes_out += 1
                    if b.client is not None:
                        b.to_client.append(b.popped)
        for b in self.bridges:
            if b.pushing:
                b.in_valid.value = 0
                b.pushing = False
            if b.popping:
                b.out_ready.value = 0
                b.popping = False
        return moved

    # -- main loop ---------------------------------------------------------------------

    async def serve(self):
        last_parent_check = time.monotonic()
        while not self.stopping:
            moved = self.poll()
            if self.stopping:
                break
            moved |= await self.transfer()
            for b in self.bridges:
                if b.client is not None and b.to_client:
                    b.send()
            now = time.monotonic()
            if moved or any(b.to_node for b in self.bridges):
                self.busy_until = now + BUSY_HOLD_S
            busy = now < self.busy_until
            deadlines = self.deadlines()
            step = self.chunk if busy else self.big_chunk
            if deadlines:
                step = max(1, min(step, min(deadlines) - self.cycle))
            await Timer(step * CLOCK_NS, unit="ns")
            self.cycle += step
            self.settle()
            if not busy and not deadlines:
                self.idle_wait()
            if now - last_parent_check > 1.0:
                last_parent_check = now
                if os.getppid() != self.parent:
                    log.warning("the process that started the simulation is gone: stopping")
                    self.stopping = True
        # Answer whatever still waits, so no client hangs.
        for c in self.controls:
            if c.waiting is not None:
                c.reply({"ok": False, "cmd": c.waiting[0], "error": "the simulation stopped",
                         **{k: v for k, v in c.waiting[2].items() if k == "id"}})
                c.waiting = None


@cocotb.test()
async def serve(dut):
    """Serve the cluster until a ``stop`` request."""
    cfg = json.loads(os.environ["EPOCHLINK_SERVER_CONFIG"])
    dut.rst.value = 1
    try:
        server = Server(dut, cfg)      # drives every other input
    except OSError as exc:             # tell the starter why (the ready file has "error")
        _write_json(cfg.get("ready_file"), {"error": str(exc.strerror or exc)})
        raise
    try:
        cocotb.start_soon(Clock(dut.clk, CLOCK_NS, unit="ns").start())
        await ClockCycles(dut.clk, 4)
        dut.rst.value = 0
        await RisingEdge(dut.clk)
        await Timer(1, unit="ns")      # from here on: 1 ns after a rising edge
        server.cycle = server.cycle_now()
        server.write_ready()
        log.info("serving %s: nodes on ports %s, control on %d", server.topology.name,
                 [b.port for b in server.bridges], server.control_port)
        await server.serve()
    finally:
        server.close()
    log.info("stopped at cycle %d", server.cycle_now())
