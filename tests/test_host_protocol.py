"""Host library: the sans-I/O protocol core, and Node over a real pyserial socket:// port
talking to the reference model of the node (with fault injection)."""
from __future__ import annotations

import random
import socket
import threading

import pytest
from amaranth.lib import crc

from epochlink.host.node import Node
from epochlink.host.protocol import (BadResponseChecksum, ErrorResponse, GarbageBytes,
                                     ProtocolError, Response, ResponseParser, Timeout,
                                     encode_read, encode_write)
from epochlink.hostmodel import HostLinkModel, RegisterBankModel
from epochlink.hostproto import (CRC16_PARAMETERS, MAX_OUTSTANDING, SOF_RESPONSE, Status,
                                 build_response, crc16)
from epochlink.registers import MAGIC, Access, register_map


# -- sans-I/O core -------------------------------------------------------------------------

def test_crc16_matches_gateware_algorithm():
    params = crc.Algorithm(**CRC16_PARAMETERS)(data_width=8)
    assert crc16(b"123456789") == 0x4B37 == params.compute(b"123456789")   # CRC-16/MODBUS
    rng = random.Random(3)
    for _ in range(50):
        data = rng.randbytes(rng.randrange(0, 20))
        assert crc16(data) == params.compute(data)
        assert crc16(data + crc16(data).to_bytes(2, "little")) == 0     # residue


def test_encode_golden():
    assert encode_read(0x12, 0x0104) == bytes.fromhex("a5 12 01 04 01") + \
        crc16(bytes.fromhex("12 01 04 01")).to_bytes(2, "little")
    frame = encode_write(0x7F, 0x0004, 0xDEADBEEF)
    assert frame[:9] == bytes.fromhex("a5 7f 02 04 00 ef be ad de")
    assert len(frame) == 11 and crc16(frame[1:]) == 0
    with pytest.raises(ValueError):
        encode_read(256, 0)
    with pytest.raises(ValueError):
        encode_read(0, 0x10000)
    with pytest.raises(ValueError):
        encode_write(0, 0, 1 << 32)


def test_parser_any_split():
    stream = build_response(1, 0, 0x11223344) + build_response(2, 3, 7) + build_response(3, 0x42, 9)
    for cut in range(len(stream) + 1):
        for cut2 in (cut, min(len(stream), cut + 5)):
            p = ResponseParser()
            events = p.feed(stream[:cut]) + p.feed(stream[cut:cut2]) + p.feed(stream[cut2:])
            assert events == [Response(1, Status.OK, 0x11223344),
                              Response(2, Status.ILLEGAL_VALUE, 7), Response(3, 0x42, 9)]
            assert p.buffered == 0


def test_parser_garbage_and_bad_checksum():
    p = ResponseParser()
    good = build_response(9, 0, 1)
    bad = bytearray(build_response(8, 0, 2))
    bad[4] ^= 1
    events = p.feed(b"\x00\x01" + bytes(bad) + good)
    assert isinstance(events[0], GarbageBytes) and events[0].data == b"\x00\x01"
    assert isinstance(events[1], BadResponseChecksum) and events[1].frame == bytes(bad)
    assert isinstance(events[2], GarbageBytes)          # the rest of the bad frame
    assert events[3] == Response(9, Status.OK, 1)
    assert all(isinstance(e, ProtocolError) for e in events[:3])
    # A spurious SOF in noise right before a real frame does not hide it.
    p = ResponseParser()
    events = p.feed(bytes([SOF_RESPONSE, 0x01]) + good)
    assert events[-1] == Response(9, Status.OK, 1)
    # Partial frames wait for more bytes.
    p = ResponseParser()
    assert p.feed(good[:5]) == [] and p.buffered == 5
    assert p.feed(good[5:]) == [Response(9, Status.OK, 1)]


# -- a node behind a TCP socket ------------------------------------------------------------

HARDWARE = {"NODE_ID": 0x0042, "PORT0.FRAMES_TX": 1234, "PORT1.LINK_STATE": 0x0102}


class ModelServer:
    """The reference model of a node (2 ports) on a localhost TCP port.

    ``request_fault(data) -> data`` may alter each received chunk; ``response_fault(n,
    frame) -> frame | None`` may alter or drop the n-th response. A pause of ``gap``
    seconds inside a frame is the node's inter-byte timeout.
    """

    def __init__(self, request_fault=None, response_fault=None, gap: float = 0.05) -> None:
        def hardware(inst):
            counters = {"HOST_FRAMES": self.model.frames_ok, "HOST_ERRORS": self.model.frame_errors,
                        "HOST_DISCARDED": self.model.discarded}
            return counters.get(inst.name, HARDWARE.get(inst.name, 0))

        self.model = HostLinkModel(RegisterBankModel(register_map(2), hardware))
        self.request_fault = request_fault
        self.response_fault = response_fault
        self.gap = gap
        self.responses = 0
        self.max_outstanding = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self._listener.settimeout(5)
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        conn.settimeout(self.gap)
        started = 0          # request frames begun (for the window check)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(4096)
                    if not data:
                        return
                except socket.timeout:
                    out = self.model.timeout()
                else:
                    if self.request_fault:
                        data = self.request_fault(data)
                    out = []
                    for byte in data:
                        if self.model.idle and byte == 0xA5:
                            started += 1
                            self.max_outstanding = max(self.max_outstanding,
                                                       started - self.responses)
                        out += self.model.feed_byte(byte)
                for frame in out:
                    self.responses += 1
                    if self.response_fault:
                        frame = self.response_fault(self.responses, frame)
                    if frame:
                        conn.sendall(frame)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=2)


@pytest.fixture
def server():
    servers = []

    def make(**kwargs) -> ModelServer:
        s = ModelServer(**kwargs)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def connect(server: ModelServer, **kwargs) -> Node:
    kwargs.setdefault("timeout", 0.3)
    return Node(server.url, regmap=register_map(2), **kwargs)


def test_node_basic_access(server):
    srv = server()
    with connect(srv) as node:
        info = node.identify()
        assert (info.node_id, info.ports) == (0x42, 2)
        assert node.read("MAGIC") == MAGIC
        assert node.write("SCRATCH", 0xA5A55A5A) == 0xA5A55A5A      # SOF values in the data
        assert node.read(node.address("SCRATCH")) == 0xA5A55A5A
        assert node.regs.SCRATCH.read() == 0xA5A55A5A
        assert node.regs.port[0].FRAMES_TX.read() == 1234
        assert node.regs.port[1].LINK_STATE.read_fields() == {"state": 2, "version": 1}
        node.regs.port[1].CONTROL.update(loopback=1)
        assert node.regs.port[1].CONTROL.read_fields() == {"enable": 1, "loopback": 1}
        names = [i.name for i in node.regmap                    # (HOST_ counters move; commands
                 if not i.name.startswith("HOST_") and i.register.command is None]  # are not in a bank)
        values = node.read_many(names)
        assert values == [srv.model.bank.value(node.regmap[n]) for n in names]
        assert node.stats.timeouts == 0 and node.stats.garbage_bytes == 0


def test_node_pipelines_within_window(server):
    srv = server()
    with connect(srv, window=MAX_OUTSTANDING) as node:
        values = list(range(1, 201))
        assert node.write_many([("SCRATCH", v) for v in values]) == values
        assert node.read("SCRATCH") == 200                             # order kept
        assert node.read_many(["SCRATCH"] * 300) == [200] * 300
    assert 1 < srv.max_outstanding <= MAX_OUTSTANDING


def test_node_error_responses(server):
    srv = server()
    with connect(srv) as node:
        node.write("SCRATCH", 5)
        for reg, value, status in [("MAGIC", 0, Status.READ_ONLY),
                                   (0x0FFF, 1, Status.BAD_ADDRESS),
                                   ("PORT0.CONTROL", 0x4, Status.ILLEGAL_VALUE),
                                   ("PORT0.FRAMES_TX", 1, Status.READ_ONLY)]:
            with pytest.raises(ErrorResponse) as info:
                node.write(reg, value)
            assert info.value.status is status and info.value.code == int(status)
        with pytest.raises(ErrorResponse) as info:
            node.read(0x08F0)
        assert info.value.status is Status.BAD_ADDRESS and info.value.addr == 0x08F0
        # An error in the middle of a batch: the rest still drains, the link stays usable.
        with pytest.raises(ErrorResponse):
            node.read_many(["SCRATCH", 0x0FFF, "SCRATCH", "MAGIC"])
        assert node.read("SCRATCH") == 5
        assert node.stats.unexpected == 0
        assert node.regs.port[0].CONTROL.read() == 1                  # refused write: unchanged


def test_node_retries_lost_read_response(server):
    srv = server(response_fault=lambda n, frame: None if n == 2 else frame)
    with connect(srv, timeout=0.1) as node:
        assert node.read("MAGIC") == MAGIC
        assert node.read("MAGIC") == MAGIC          # first answer lost, resent
        assert (node.stats.timeouts, node.stats.retries) == (1, 1)


def test_node_write_timeout_not_retried(server):
    srv = server(response_fault=lambda n, frame: None if n == 1 else frame)
    with connect(srv, timeout=0.1) as node:
        with pytest.raises(Timeout):
            node.write("SCRATCH", 9)
        assert node.read("SCRATCH") == 9            # it was executed, only the answer was lost
    srv2 = server(response_fault=lambda n, frame: None if n == 1 else frame)
    with connect(srv2, timeout=0.1, retry_writes=True) as node:
        assert node.write("SCRATCH", 10) == 10


def test_node_resends_after_link_error(server):
    """A request corrupted on the way gets BAD_CHECKSUM: it was not executed, so it is
    resent (writes too)."""
    state = {"done": False}

    def corrupt_first_write(data: bytes) -> bytes:
        if not state["done"] and len(data) >= 11 and data[2] == 2:
            state["done"] = True
            data = bytearray(data)
            data[6] ^= 0x01
            return bytes(data)
        return data

    srv = server(request_fault=corrupt_first_write)
    with connect(srv) as node:
        assert node.write("SCRATCH", 0x1111) == 0x1111
        assert node.stats.link_errors == 1 and node.stats.retries == 1
        assert node.read("SCRATCH") == 0x1111
        assert node.read("HOST_ERRORS") == 1


def test_node_survives_damaged_responses(server):
    def damage(n, frame):
        if n == 1:
            return b"\x00\x13" + frame                 # line noise before a good frame
        if n == 2:
            return frame[:-1] + bytes([frame[-1] ^ 0xFF])   # bad checksum
        return frame

    srv = server(response_fault=damage)
    with connect(srv, timeout=0.1) as node:
        assert node.read("MAGIC") == MAGIC
        assert node.read("NODE_ID") == 0x42
        assert node.stats.garbage_bytes >= 2 and node.stats.bad_checksums == 1
        assert node.stats.retries == 1


def test_node_gives_up(server):
    srv = server(response_fault=lambda n, frame: None)
    with connect(srv, timeout=0.05, retries=2) as node:
        with pytest.raises(Timeout):
            node.read("MAGIC")
        assert node.stats.requests == 3 and node.stats.timeouts == 3


def test_node_rejects_bad_arguments(server):
    srv = server()
    with connect(srv) as node:
        with pytest.raises(ValueError):
            node.write("SCRATCH", -1)
        with pytest.raises(KeyError):
            node.read("NOPE")
        with pytest.raises(AttributeError):
            node.regs.NOPE
        assert node.regs.port[1].CHAN_CUT.register.access is Access.RW


def test_transport_refuses_a_socket_connected_to_itself():
    # What connecting to a local port nobody listens on can give: the kernel picks that same
    # port for the connection's own end (forced here by binding it first).
    from epochlink.host.transport import _refuse_self_connection

    class Port:
        closed = False

        def __init__(self, sock):
            self._socket = sock

        def close(self):
            self.closed = True
            self._socket.close()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.connect(sock.getsockname())
    port = Port(sock)
    with pytest.raises(ConnectionRefusedError, match="connected to itself"):
        _refuse_self_connection(port, "socket://127.0.0.1:1")
    assert port.closed

    with socket.create_server(("127.0.0.1", 0)) as server:
        other = socket.create_connection(server.getsockname())
        port = Port(other)
        _refuse_self_connection(port, "socket://127.0.0.1:1")    # a real peer: kept
        assert not port.closed
        other.close()
