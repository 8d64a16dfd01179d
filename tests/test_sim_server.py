"""The simulation server (``epochlink sim``): a Verilator cluster of NICs behind TCP ports.

The host driver connects to simulated nodes unchanged, through ``socket://`` URLs. One
2-node line design is built (cached by content; the first build takes about half a minute)
and shared by every test here.
"""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from epochlink.hdl.epoch_format import Role
from epochlink.hdl.frame import LinkState
from epochlink.host.node import Node
from epochlink.host.protocol import EpochRefused, ErrorResponse
from epochlink.hostproto import Status
from epochlink.registers import MAGIC
from epochlink.sim.server import SimServer, SimServerError, sim_main

TIMEOUT = 2.0          # driver timeout per request (wall-clock; the simulation is slow)
CLK_HZ = 48e6


def link_state(node: Node, port: int = 0) -> LinkState:
    return LinkState(node.read(f"PORT{port}.LINK_STATE") & 0x3)


def wait_link(nodes, state=LinkState.UP, limit_s=20.0):
    deadline = time.monotonic() + limit_s
    while True:
        states = [link_state(n) for n in nodes]
        if all(s == state for s in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"links are {[s.name for s in states]}, not all {state.name}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def sim():
    t0 = time.monotonic()
    server = SimServer(nodes=2, topology="line")
    server.build_design()
    built = time.monotonic() - t0
    server.start()
    print(f"\nbuild (or cache hit) {built:.1f} s, start {time.monotonic() - t0 - built:.1f} s")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nodes(sim):
    ns = [Node(url, timeout=TIMEOUT) for url in sim.urls]
    yield ns
    for n in ns:
        n.close()


def test_ready_info(sim):
    assert len(sim.urls) == 2 and all(u.startswith("socket://127.0.0.1:") for u in sim.urls)
    assert sim.roles(0) == [(1, Role.CHILD)] and sim.roles(1) == [(0, Role.PARENT)]
    assert sim.info["edges"] == [[0, 1]] and sim.info["divisor"] == 4
    assert sim.control_port not in sim.ports


def test_identify_scratch_links(sim, nodes):
    for i, node in enumerate(nodes):
        info = node.identify()                 # checks MAGIC
        assert info.node_id == i + 1 and info.ports == 1
        assert node.read("MAGIC") == MAGIC
    nodes[0].write("SCRATCH", 0x1234_5678)
    nodes[1].write("SCRATCH", 0xCAFE)
    assert nodes[0].read("SCRATCH") == 0x1234_5678 and nodes[1].read("SCRATCH") == 0xCAFE
    wait_link(nodes)
    assert [n.read("PORT0.PEER_ID") for n in nodes] == [2, 1]
    status = sim.status()
    assert all(p["link_up"] for n in status["nodes"] for p in n["ports"])
    assert all(n["client"] and n["framing_errors"] == 0 and n["overruns"] == 0
               for n in status["nodes"])


def test_register_read_rate(sim, nodes):
    """Pipelined reads: measured in simulated cycles (and wall-clock, for information)."""
    node = nodes[0]
    node.read_many(["SCRATCH"] * 8)                 # warm up
    batch, rounds = 64, 3
    c0, t0 = sim.cycle(), time.monotonic()
    for _ in range(rounds):
        values = node.read_many(["SCRATCH"] * batch)
        assert len(values) == batch
    wall = time.monotonic() - t0
    cycles = sim.cycle() - c0
    reads = batch * rounds
    per_read = cycles / reads
    print(f"\nregister reads (read_many x{batch}): {per_read:.0f} cycles/read = "
          f"{CLK_HZ / per_read:,.0f} reads/s simulated at {CLK_HZ / 1e6:.0f} MHz; "
          f"{reads / wall:,.0f} reads/s wall-clock; simulator {cycles / wall:,.0f} cycles/s")
    # A response is 9 bytes of 40 cycles: 360 cycles per read is the UART's floor (more when
    # a loaded host is slow to refill the request window).
    assert 360 <= per_read < 1500


def test_reset_node_driver_recovers(sim, nodes):
    nodes[1].write("SCRATCH", 0xBEEF)
    c0 = sim.cycle()
    reply = sim.reset_node(1, cycles=200)
    assert reply["ok"] and reply["cycle"] >= c0 + 200
    # The reset wiped the register bank: SCRATCH is back to its reset value.
    assert nodes[1].read("SCRATCH") == 0
    assert nodes[1].identify().node_id == 2
    assert nodes[0].read("SCRATCH") == 0x1234_5678          # the other node was not reset
    wait_link(nodes)
    # A reset while requests are in flight: the driver's read retries recover.
    t = threading.Thread(target=sim.reset_node, args=(0, 50))
    values = []
    t.start()
    values = nodes[0].read_many(["NODE_ID"] * 32)
    t.join()
    assert values == [1] * 32
    assert nodes[0].read("SCRATCH") == 0


def test_counters_in_block_ram_count_every_event(nodes):
    """The NIC's counters live in a CounterBank (block RAM): through the real host link, a
    counter moves by exactly the events that happened, and a write to it changes nothing."""
    node = nodes[1]
    domain = node.domains() - 1
    node.disable_domain(domain)
    refused0 = node.read("REFUSED")
    for epoch in range(1, 8):
        with pytest.raises(EpochRefused):
            node.persisted(domain, epoch)              # REFUSED_DISABLED, counted
    assert node.read("REFUSED") == refused0 + 7
    with pytest.raises(ErrorResponse) as refused:
        node.write("REFUSED", 0)
    assert refused.value.status == Status.READ_ONLY
    assert node.read("REFUSED") == refused0 + 7
    # HOST_FRAMES counts the requests executed; a read may or may not include its own.
    frames = [node.read("HOST_FRAMES") for _ in range(6)]
    steps = [b - a for a, b in zip(frames, frames[1:])]
    assert sum(steps) == frames[-1] - frames[0] and all(0 <= s <= 2 for s in steps)
    assert 4 <= frames[-1] - frames[0] <= 6


def test_cut_and_ber(sim, nodes):
    wait_link(nodes)
    assert sim.cut(0)["on"] is True
    sim.run_cycles(20_000)                          # beyond the link's liveness timeout
    assert link_state(nodes[0]) != LinkState.UP and link_state(nodes[1]) != LinkState.UP
    assert not any(p["link_up"] for n in sim.status()["nodes"] for p in n["ports"])
    sim.cut(0, on=False)
    wait_link(nodes)
    crc0 = nodes[1].read("PORT0.CRC_ERRORS")
    reply = sim.set_ber(1e-3)
    assert reply["edges"] == [0] and reply["threshold"] > 0
    sim.run_cycles(50_000)
    assert nodes[1].read("PORT0.CRC_ERRORS") > crc0
    sim.set_ber(0.0, edge=0)
    assert sim.status()["edges"][0] == {"edge": 0, "nodes": [0, 1], "ber": 0.0,
                                        "threshold": 0, "cut": False}


def test_new_client_replaces_old(sim, nodes):
    with Node(sim.urls[1], timeout=TIMEOUT) as other:
        assert other.read("NODE_ID") == 2
    # The original connection was replaced (closed by the server); a new one works.
    nodes[1].close()
    nodes[1] = Node(sim.urls[1], timeout=TIMEOUT)
    assert nodes[1].read("NODE_ID") == 2


@pytest.mark.parametrize("request_, error", [
    ({"cmd": "nope"}, "unknown command"),
    ({"cmd": "reset", "node": 2}, "'node' must be in 0..1"),
    ({"cmd": "reset", "node": "0"}, "'node' must be an integer"),
    ({"cmd": "reset"}, "missing 'node'"),
    ({"cmd": "reset", "node": 0, "cycles": 0}, "'cycles' must be in"),
    ({"cmd": "ber", "ber": -1}, "'ber' must be a number"),
    ({"cmd": "ber", "ber": 1e-3, "edge": 1}, "'edge' must be in 0..0"),
    ({"cmd": "cut", "edge": 0, "on": "yes"}, "'on' must be true or false"),
    ({"cmd": "cut"}, "missing 'edge'"),
    ({"cmd": "run", "cycles": -5}, "'cycles' must be in"),
    ([1, 2], "JSON object"),
])
def test_bad_control_requests(sim, request_, error):
    before = sim.status()
    reply = sim.request(request_)
    assert reply["ok"] is False and error in reply["error"]
    after = sim.status()
    assert after["edges"] == before["edges"]
    assert [n["in_reset"] for n in after["nodes"]] == [False, False]


def test_raw_control_socket(sim):
    with socket.create_connection(("127.0.0.1", sim.control_port), timeout=10) as s:
        s.sendall(b'not json\n{"cmd": "run", "cycles": 100, "id": 7}\n{"cmd": "status"}\n')
        f = s.makefile("r")
        bad, ran, status = (json.loads(f.readline()) for _ in range(3))
    assert bad["ok"] is False and "bad JSON" in bad["error"]
    assert ran["ok"] and ran["id"] == 7 and status["cycle"] >= ran["cycle"]
    with pytest.raises(SimServerError, match="unknown command"):
        sim._checked({"cmd": "frobnicate"})


def test_stop_frees_ports():
    server = SimServer(nodes=2, topology="line").start()
    ports = server.ports + [server.control_port]
    proc = server.proc
    assert server.stop() == 0 and proc.returncode == 0 and server.passed()
    assert server.stop() == 0                       # idempotent
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))             # free again
    assert not (server.run_dir / "ready.json").exists()


@pytest.mark.parametrize("argv", [
    ["--nodes", "0"], ["--nodes", "x"], ["--topology", "ring"], ["--ber", "-1"],
    ["--ber", "0.5"], ["--delay", "0"], ["--port-base", "80"], ["--seed", "0"], ["--bogus"],
])
def test_sim_main_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        sim_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: epochlink sim" in err and "Traceback" not in err


def test_sim_main_help(capsys):
    with pytest.raises(SystemExit) as exc:
        sim_main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--nodes" in out and "--topology" in out and "socket://" in out


def _free_port_base(count):
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            socks = []
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    pytest.skip("no free port range")


def test_sim_main_runs_until_stop(capsys):
    base = _free_port_base(3)
    result = []
    thread = threading.Thread(target=lambda: result.append(
        sim_main(["--nodes", "2", "--topology", "line", "--port-base", str(base)])))
    thread.start()
    deadline = time.monotonic() + 120
    while True:
        try:
            with Node(f"socket://127.0.0.1:{base + 1}", timeout=TIMEOUT) as node:
                node_id = node.read("NODE_ID")
            break
        except OSError as exc:                  # not listening yet
            if time.monotonic() > deadline or not thread.is_alive():
                raise AssertionError(f"epochlink sim did not come up: {exc}")
            time.sleep(0.2)
    assert node_id == 2
    with socket.create_connection(("127.0.0.1", base + 2), timeout=10) as s:
        s.sendall(b'{"cmd": "stop"}\n')
        assert json.loads(s.makefile("r").readline())["ok"]
    thread.join(30)
    assert result == [0]
    out = capsys.readouterr().out
    assert f"node 0: socket://127.0.0.1:{base}  (port 0: child node 1)" in out
    assert f"node 1: socket://127.0.0.1:{base + 1}  (port 0: parent node 0)" in out
    assert f"control: 127.0.0.1:{base + 2}" in out
