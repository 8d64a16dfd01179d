"""An epochlink node (NIC) over its host link: checkpoint epochs, versions, links, registers.

A training loop reports each persistence domain's durable epoch and restores from the
epoch the cluster has committed::

    from epochlink.host import Node, Role

    with Node("socket://127.0.0.1:5000") as nic:            # or "/dev/ttyUSB1"
        # After power-up or a NIC reset: domains at their durable epochs, port roles, online.
        nic.bring_up(durable={0: 0, 1: 0}, roles=[Role.PARENT])
        for epoch in range(1, 100):
            train_one_epoch()
            for domain in (0, 1):
                save_durably(domain, epoch)                  # write + fsync
                nic.persisted(domain, epoch)                 # only after it is durable
        safe = nic.committed()                               # every domain of every node has it
        nic.wait_committed(99, timeout=5.0)

    # Recovery: restore every domain of every node from ``nic.committed()``, never from
    # "the newest file" (which mixes epochs).

Raw register access is there too::

    nic.write("SCRATCH", 0x1234)
    nic.regs.SCRATCH.read()
    nic.read_many(["PORT0.FRAMES_TX", "PORT0.FRAMES_RX"])

Requests are pipelined: up to ``window`` requests are in flight at a time (the node
queues up to :data:`~epochlink.hostproto.MAX_OUTSTANDING` answers). Every request has its
own deadline. A request the node refused at the link layer (bad checksum, truncated,
unknown opcode: it was *not* executed) is resent, reads and writes alike. A request that
times out is resent only if it is a read: a write that timed out may or may not have been
executed, so it raises :class:`Timeout` (unless ``retry_writes=True``, acceptable for
registers where writing the same value twice is harmless).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence

from epochlink.hdl.epoch_format import FenceMode, Role
from epochlink.hdl.frame import LINK_COUNTERS, LinkState
from epochlink.hostproto import MAX_OUTSTANDING, Opcode, Status
from epochlink.registers import (MAGIC, MAX_DOMAINS, MAX_PORTS, Access, RegisterInstance,
                                 RegisterMap, register_map)

from .protocol import (BadResponseChecksum, ConnectionLost, EpochlinkError, EpochRefused, ErrorResponse,
                       GarbageBytes, ProtocolError, Response, ResponseParser, Timeout,
                       encode_read, encode_write, error_response)
from .transport import DEFAULT_BAUDRATE, SerialTransport, Transport

__all__ = ["Node", "NodeInfo", "EpochStatus", "Versions", "PortStatus", "LinkStats",
           "RegisterHandle", "Registers", "Role", "LinkState", "FenceMode",
           "EpochlinkError", "ProtocolError", "ErrorResponse", "EpochRefused", "ConnectionLost",
           "Timeout"]


@dataclass
class LinkStats:
    """What the host side of the link has seen (for diagnostics and tests)."""
    requests: int = 0
    responses: int = 0
    retries: int = 0
    timeouts: int = 0
    link_errors: int = 0        # BAD_CHECKSUM / TRUNCATED / BAD_OPCODE answers
    garbage_bytes: int = 0
    bad_checksums: int = 0
    unexpected: int = 0


@dataclass(frozen=True)
class NodeInfo:
    """Identity registers of a node."""
    node_id: int
    version: tuple[int, int, int]
    ports: int
    map_version: int
    proto_version: int


@dataclass(frozen=True)
class Versions:
    """Protocol (firmware) versions of a node and of the cluster."""
    active: int           #: this node's ACTIVE version
    subtree: int          #: minimum ACTIVE over this node's subtree
    converged: int        #: cluster-wide converged version (min ACTIVE); 0 = not known yet
    supported: tuple[int, int]   #: link protocol versions this build speaks (min, max)


@dataclass(frozen=True)
class EpochStatus:
    """The epoch engine's view: this node's part in Conv(P,e)."""
    online: bool
    local: int | None     #: meet of PERSISTED over enabled domains (None: no domain enabled)
    report: int | None    #: subtree meet (None until every child has reported)
    report_sent: int      #: last REPORT sent to the parent
    committed: int        #: COMMITTED: the cluster-wide certificate
    versions: Versions
    refused: int          #: epoch commands refused so far
    malformed: int
    misrouted: int


@dataclass(frozen=True)
class PortStatus:
    """One link port: link state, peer, commit-tree role and counters."""
    port: int
    state: LinkState
    version: int          #: link protocol version agreed with the peer (valid when UP)
    peer_id: int
    role: Role
    heard: bool           #: the neighbour has reported (CHILD) or committed (PARENT)
    child_report: int
    counters: dict[str, int]

    @property
    def up(self) -> bool:
        return self.state == LinkState.UP


@dataclass
class _Op:
    index: int
    opcode: Opcode
    addr: int
    value: int = 0
    attempts: int = 0
    tag: int = -1
    deadline: float = 0.0


class Node:
    """A node reached through a byte :class:`~epochlink.host.transport.Transport`.

    Parameters
    ----------
    port :
        A pyserial URL (``"/dev/ttyUSB1"``, ``"socket://host:port"``) or a transport object.
    baudrate :
        UART speed when ``port`` is a URL.
    timeout :
        Seconds to wait for each response.
    retries :
        How many times a request may be resent (see the module docstring for which).
    window :
        Requests in flight at most (<= ``MAX_OUTSTANDING``).
    retry_writes :
        Also resend writes that timed out.
    regmap :
        The register map for name lookups and :attr:`regs` (default: every port and domain
        the map has room for; the node answers ``BAD_ADDRESS`` for those it lacks).

    A :class:`Node` is not thread-safe: share it between threads under a lock.
    """

    def __init__(self, port: str | Transport, *, baudrate: int = DEFAULT_BAUDRATE,
                 timeout: float = 0.25, retries: int = 2, window: int = 8,
                 retry_writes: bool = False, regmap: RegisterMap | None = None) -> None:
        if not 1 <= window <= MAX_OUTSTANDING:
            raise ValueError(f"window must be 1..{MAX_OUTSTANDING}")
        self.transport: Transport = SerialTransport(port, baudrate) if isinstance(port, str) else port
        self.timeout = timeout
        self.retries = retries
        self.window = window
        self.retry_writes = retry_writes
        self.regmap = regmap or register_map(MAX_PORTS, MAX_DOMAINS)
        self.parser = ResponseParser()
        self.stats = LinkStats()
        self._next_tag = 0
        self.regs = Registers(self)

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- single and pipelined accesses ------------------------------------------------------

    def address(self, reg: int | str) -> int:
        """Word address of ``reg`` (an address, or a register name like ``"PORT0.CONTROL"``)."""
        if isinstance(reg, str):
            return self.regmap.address(reg)
        if not 0 <= reg <= 0xFFFF:
            raise ValueError(f"address {reg:#x} is not 16 bits")
        return reg

    def read(self, reg: int | str) -> int:
        """Read one register."""
        return self.read_many([reg])[0]

    def write(self, reg: int | str, value: int) -> int:
        """Write one register; returns its value after the write."""
        return self.write_many([(reg, value)])[0]

    def read_many(self, regs: Iterable[int | str]) -> list[int]:
        """Read registers with pipelined requests; values in the order asked."""
        return self._execute([(Opcode.READ, self.address(r), 0) for r in regs])

    def write_many(self, items: Iterable[tuple[int | str, int]]) -> list[int]:
        """Write registers in order with pipelined requests; values after each write."""
        ops = []
        for reg, value in items:
            if not 0 <= value <= 0xFFFF_FFFF:
                raise ValueError(f"value {value:#x} is not 32 bits")
            ops.append((Opcode.WRITE, self.address(reg), value))
        return self._execute(ops)

    def identify(self) -> NodeInfo:
        """Read the identity registers; raises :class:`ProtocolError` if MAGIC is wrong."""
        magic, version, node_id, caps = self.read_many(["MAGIC", "VERSION", "NODE_ID", "CAPS"])
        if magic != MAGIC:
            raise ProtocolError(f"not an epochlink node (MAGIC reads {magic:#010x})")
        v = self.regmap["VERSION"].register.decode(version)
        c = self.regmap["CAPS"].register.decode(caps)
        return NodeInfo(node_id, (v["major"], v["minor"], v["patch"]), c["ports"],
                        c["map_version"], c["proto_version"])

    # -- checkpoint epochs -----------------------------------------------------------------

    def domains(self) -> int:
        """Number of persistence domains of this node (``EPOCH.CONFIG``)."""
        return self.regs.CONFIG.read_fields()["domains"]

    def persisted(self, domain: int, epoch: int) -> int:
        """Report that ``domain``'s data for ``epoch`` is durable (call only after fsync).

        Returns PERSISTED after the write. Raises :class:`EpochRefused` if ``epoch`` is below
        what the domain already reported (``REFUSED_LOWER``) or the domain is disabled
        (``REFUSED_DISABLED``); reporting the same epoch again is fine.
        """
        return self.write(self._domain(domain, "PERSISTED"), self._epoch(epoch))

    def persisted_epoch(self, domain: int) -> int:
        """PERSISTED of ``domain`` as the NIC holds it (0 while disabled)."""
        return self.read(self._domain(domain, "PERSISTED"))

    def enable_domain(self, domain: int, durable_epoch: int) -> None:
        """Let ``domain`` take part, at its current durable epoch (after a reset: the epoch
        found durable on storage). Refused (:class:`EpochRefused`) below the node's floor."""
        self.write(self._domain(domain, "ENABLE"), self._epoch(durable_epoch))

    def disable_domain(self, domain: int) -> None:
        """Take ``domain`` out of the node's meet."""
        self.write(self._domain(domain, "DISABLE"), 1)

    def domain_enabled(self, domain: int) -> bool:
        return bool(self.read(self._domain(domain, "ENABLE")))

    def committed(self) -> int:
        """COMMITTED: the epoch every enabled domain of every node has made durable (the
        cluster's Conv(P,e) certificate). Restore this epoch, everywhere."""
        return self.read("COMMITTED")

    def wait_committed(self, epoch: int, timeout: float, *, poll: float = 0.005) -> int:
        """Wait until COMMITTED >= ``epoch``; returns it. Raises :class:`Timeout` after
        ``timeout`` seconds with the last value seen."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.committed()
            if value >= epoch:
                return value
            if time.monotonic() >= deadline:
                raise Timeout(f"COMMITTED is {value}, not >= {epoch}, after {timeout} s")
            time.sleep(poll)

    def set_role(self, port: int, role: Role) -> None:
        """Set ``port``'s role in the commit tree (OFF, PARENT or CHILD; one PARENT at most)."""
        self.write(self._port_reg(port, "EPOCH_PORT", "ROLE"), int(Role(role)))

    def set_online(self, online: bool = True) -> None:
        """Start (or stop) taking part: reporting, and committing as the root."""
        self.write("ONLINE", int(bool(online)))

    def set_active_version(self, version: int) -> None:
        """Set this node's ACTIVE protocol (firmware) version, 1..255 (rolling upgrade/rollback)."""
        if not 1 <= version <= 255:
            raise ValueError(f"version must be 1..255, not {version}")
        self.write("ACTIVE", version)

    def set_fence(self, mode: FenceMode) -> None:
        """What the epoch fence does with payload from another epoch."""
        self.write("FENCE_MODE", int(FenceMode(mode)))

    def bring_up(self, durable: dict[int, int], roles: Sequence[Role] = (), *,
                 active: int | None = None) -> None:
        """Restore the epoch engine after power-up or a reset, in the order its safety needs:
        enable each domain at its ``durable`` epoch (``{domain: epoch}``), set the port
        ``roles`` (port 0, 1, ...), the ACTIVE version, and only then go online."""
        self.write_many([(self._domain(d, "ENABLE"), self._epoch(e)) for d, e in sorted(durable.items())])
        self.write_many([(self._port_reg(p, "EPOCH_PORT", "ROLE"), int(Role(r)))
                         for p, r in enumerate(roles)])
        if active is not None:
            self.set_active_version(active)
        self.set_online(True)

    def reset_epoch_engine(self) -> None:
        """Reset the NIC's epoch engine as at power-up (links stay up): PERSISTED, COMMITTED,
        roles and ONLINE are lost. Part of the cluster-wide rollback to a committed epoch,
        where every node does it while every node is offline (see docs/epoch.md)."""
        self.write("RESET", 1)

    def versions(self) -> Versions:
        versions, supported = self.read_many(["VERSIONS", "SUPPORTED"])
        v = self.regmap["VERSIONS"].register.decode(versions)
        s = self.regmap["SUPPORTED"].register.decode(supported)
        return Versions(v["active"], v["subtree"], v["converged"], (s["min"], s["max"]))

    def epoch_status(self) -> EpochStatus:
        names = ["STATUS", "LOCAL", "REPORT", "REPORT_SENT", "COMMITTED", "VERSIONS",
                 "SUPPORTED", "REFUSED", "MALFORMED", "MISROUTED"]
        raw = dict(zip(names, self.read_many(names)))
        st = self.regmap["STATUS"].register.decode(raw["STATUS"])
        v = self.regmap["VERSIONS"].register.decode(raw["VERSIONS"])
        s = self.regmap["SUPPORTED"].register.decode(raw["SUPPORTED"])
        return EpochStatus(
            online=bool(st["online"]),
            local=raw["LOCAL"] if st["local_valid"] else None,
            report=raw["REPORT"] if st["report_valid"] else None,
            report_sent=raw["REPORT_SENT"], committed=raw["COMMITTED"],
            versions=Versions(v["active"], v["subtree"], v["converged"], (s["min"], s["max"])),
            refused=raw["REFUSED"], malformed=raw["MALFORMED"], misrouted=raw["MISROUTED"])

    def port_status(self, port: int) -> PortStatus:
        """Link state, peer, role and counters of link ``port``."""
        link = [self._port_reg(port, "PORT", n) for n in ("LINK_STATE", "PEER_ID")]
        epoch = [self._port_reg(port, "EPOCH_PORT", n) for n in ("ROLE", "NEIGHBOUR", "CHILD_REPORT")]
        counters = [self._port_reg(port, "PORT", n.upper()) for n in LINK_COUNTERS]
        values = self.read_many(link + epoch + counters)
        state = self.regmap["PORT0.LINK_STATE"].register.decode(values[0])
        heard = self.regmap["EPOCH_PORT0.NEIGHBOUR"].register.decode(values[3])
        return PortStatus(port, LinkState(state["state"]), state["version"], values[1],
                          Role(values[2]), bool(heard["heard"]), values[4],
                          dict(zip(LINK_COUNTERS, values[5:])))

    def ports(self) -> list[PortStatus]:
        """:meth:`port_status` of every port of the node."""
        return [self.port_status(p) for p in range(self.identify().ports)]

    # -- helpers ---------------------------------------------------------------------------

    def _domain(self, domain: int, name: str) -> str:
        if not isinstance(domain, int) or not 0 <= domain < MAX_DOMAINS:
            raise ValueError(f"domain must be 0..{MAX_DOMAINS - 1}, not {domain!r}")
        return f"DOMAIN{domain}.{name}"

    def _port_reg(self, port: int, block: str, name: str) -> str:
        if not isinstance(port, int) or not 0 <= port < MAX_PORTS:
            raise ValueError(f"port must be 0..{MAX_PORTS - 1}, not {port!r}")
        return f"{block}{port}.{name}"

    @staticmethod
    def _epoch(epoch: int) -> int:
        if not isinstance(epoch, int) or not 0 <= epoch <= 0xFFFF_FFFF:
            raise ValueError(f"epoch must be a 32-bit unsigned integer, not {epoch!r}")
        return epoch

    def _error(self, event: Response, op: "_Op") -> ErrorResponse:
        inst = self.regmap.at(op.addr)
        return error_response(event.status, op.addr, event.tag, event.value,
                              inst.name if inst else None)

    # -- the engine ----------------------------------------------------------------------

    def _alloc_tag(self, busy: dict[int, _Op]) -> int:
        while True:
            tag = self._next_tag
            self._next_tag = (self._next_tag + 1) & 0xFF
            if tag not in busy:
                return tag

    @staticmethod
    def _may_resend(op: _Op, sent: dict[int, int]) -> bool:
        # Resending a write after a later write to the same register went out would
        # reorder the two.
        return op.opcode == Opcode.READ or sent.get(op.addr, -1) <= op.index

    def _execute(self, requests: Sequence[tuple[Opcode, int, int]]) -> list[int]:
        results: list[int | None] = [None] * len(requests)
        todo: deque[_Op] = deque(_Op(i, op, addr, value) for i, (op, addr, value) in enumerate(requests))
        inflight: dict[int, _Op] = {}
        sent: dict[int, int] = {}   # address -> highest index of a write sent to it
        error: EpochlinkError | None = None

        while inflight or (todo and error is None):
            # Fill the window with one write to the transport.
            if error is None and todo and len(inflight) < self.window:
                out = bytearray()
                now = time.monotonic()
                while todo and len(inflight) < self.window:
                    op = todo.popleft()
                    op.tag = self._alloc_tag(inflight)
                    op.attempts += 1
                    op.deadline = now + self.timeout
                    inflight[op.tag] = op
                    if op.opcode == Opcode.READ:
                        out += encode_read(op.tag, op.addr)
                    else:
                        out += encode_write(op.tag, op.addr, op.value)
                        sent[op.addr] = max(sent.get(op.addr, -1), op.index)
                    self.stats.requests += 1
                self.transport.write(bytes(out))

            wait = min(op.deadline for op in inflight.values()) - time.monotonic()
            data = self.transport.read(max(wait, 0.0))
            for event in self.parser.feed(data):
                if isinstance(event, Response):
                    op = inflight.pop(event.tag, None)
                    if op is None:
                        self.stats.unexpected += 1
                        continue
                    self.stats.responses += 1
                    if event.status == Status.OK:
                        results[op.index] = event.value
                    elif isinstance(event.status, Status) and event.status.is_link_error:
                        # Not executed by the node: always safe to resend.
                        self.stats.link_errors += 1
                        if op.attempts <= self.retries and error is None and self._may_resend(op, sent):
                            self.stats.retries += 1
                            todo.appendleft(op)
                        elif error is None:
                            error = self._error(event, op)
                    elif error is None:
                        error = self._error(event, op)
                elif isinstance(event, GarbageBytes):
                    self.stats.garbage_bytes += len(event.data)
                elif isinstance(event, BadResponseChecksum):
                    self.stats.bad_checksums += 1

            now = time.monotonic()
            for tag, op in list(inflight.items()):
                if op.deadline <= now:
                    del inflight[tag]
                    self.stats.timeouts += 1
                    retryable = op.opcode == Opcode.READ or self.retry_writes
                    if (retryable and op.attempts <= self.retries and error is None
                            and self._may_resend(op, sent)):
                        self.stats.retries += 1
                        todo.appendleft(op)
                    elif error is None:
                        kind = "read" if op.opcode == Opcode.READ else "write"
                        error = Timeout(f"{kind} of {op.addr:#06x}: no response after "
                                        f"{op.attempts} attempt(s)")
            # Keep requests in their original order when some are resent.
            if len(todo) > 1:
                todo = deque(sorted(todo, key=lambda o: o.index))

        if error is not None:
            raise error
        return [r for r in results]  # type: ignore[misc]


class RegisterHandle:
    """One register of a node: ``read()``, ``write(value)``, field helpers."""

    def __init__(self, node: Node, inst: RegisterInstance) -> None:
        self._node = node
        self.instance = inst
        self.name = inst.name
        self.address = inst.address
        self.register = inst.register

    def read(self) -> int:
        return self._node.read(self.address)

    def write(self, value: int) -> int:
        return self._node.write(self.address, value)

    def read_fields(self) -> dict[str, int]:
        """The register's fields, decoded."""
        return self.register.decode(self.read())

    def write_fields(self, **fields: int) -> int:
        """Write a value built from fields (fields not given are 0)."""
        return self.write(self.register.encode(**fields))

    def update(self, **fields: int) -> int:
        """Read-modify-write of some fields of a RW register."""
        if self.register.access is not Access.RW:
            raise ValueError(f"{self.name} is not RW")
        value = self.read()
        for name, v in fields.items():
            value = self.register.field(name).insert(value, v)
        return self.write(value)

    def __repr__(self) -> str:
        return f"<{self.name} @ {self.address:#06x} {self.register.access.value}>"


class _BlockHandle:
    def __init__(self, node: Node, prefix: str) -> None:
        self._node = node
        self._prefix = prefix

    def __getattr__(self, name: str) -> RegisterHandle:
        full = self._prefix + name
        if name.startswith("_") or full not in self._node.regmap:
            raise AttributeError(name)
        return RegisterHandle(self._node, self._node.regmap[full])


class Registers(_BlockHandle):
    """Registers by name: ``regs.SCRATCH``, ``regs.port[1].FRAMES_TX``."""

    def __init__(self, node: Node) -> None:
        super().__init__(node, "")
        ports = node.regmap.ports if node.regmap.ports is not None else MAX_PORTS
        self.port = [_BlockHandle(node, f"PORT{p}.") for p in range(ports)]

    def __dir__(self) -> list[str]:
        return [i.name for i in self._node.regmap if "." not in i.name] + ["port"]
