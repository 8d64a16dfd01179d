"""Pure-Python reference model of the epoch engine, and a cluster of such nodes.

:class:`Node` has the registers, host commands and message handling of
:class:`epochlink.hdl.epoch.EpochEngine`, without its timing: every event (command, message,
link change) is applied at once, including the rescans the gateware does over the next few
cycles. Whatever state the gateware reaches once it is quiescent, the model reaches too.

:class:`Cluster` connects nodes by a tree: each edge is a link with an in-order, loss-free
queue per direction (the link engine's contract while the link stays up), link resets that may
drop or repeat in-flight messages, node resets, and a host per node that keeps the durable
epochs and restores the node after a reset. :meth:`Cluster.check` checks the safety
invariants; it is used as the scoreboard of the gateware tests.

This module does not depend on Amaranth.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from ..hdl.epoch_format import (CmdStatus, Message, MessageError, MsgType, Op, Role, decode,
                                encode)

__all__ = ["Node", "HostState", "Cluster", "InvariantError", "assign_ports"]


class Node:
    """One node's epoch engine: registers, commands, messages (see ``hdl/epoch.py``)."""

    def __init__(self, domains: int = 8, ports: int = 2, epoch_width: int = 32) -> None:
        self.domains, self.ports, self.epoch_width = domains, ports, epoch_width
        self.incarnation = 0
        self.link_up = [False] * ports     # an input: not changed by a reset
        self.reset()

    def reset(self) -> None:
        """Power-on or node reset: every register is lost."""
        D, P = self.domains, self.ports
        self.incarnation += 1
        self.online = False
        self.enabled = [False] * D
        self.persisted = [0] * D
        self.local = 0
        self.local_valid = False
        self.report = 0
        self.report_valid = False
        self.sent = 0
        self.committed = 0
        self.active = 1
        self.ver_report = 0
        self.ver_conv = 0
        self.role = [Role.OFF] * P
        self.heard = [False] * P
        self.child_rep = [0] * P
        self.child_ver = [0] * P
        self.pending = [False] * P
        self.refused = self.malformed = self.misrouted = 0

    # ---- derived ---------------------------------------------------------------------------
    @property
    def parent_port(self) -> int | None:
        for p, r in enumerate(self.role):
            if r == Role.PARENT:
                return p
        return None

    @property
    def child_ports(self) -> list[int]:
        return [p for p, r in enumerate(self.role) if r == Role.CHILD]

    @property
    def is_root(self) -> bool:
        return self.parent_port is None

    @property
    def floor(self) -> int:
        """ENABLE refuses epochs below this: what the node has vouched for."""
        return max(self.committed, self.sent)

    def _pend_children(self) -> None:
        for p in self.child_ports:
            self.pending[p] = True

    def _update(self) -> None:
        """LSCAN, RSCAN, RDONE and (at the root) COMMIT of the gateware."""
        values = [v for v, en in zip(self.persisted, self.enabled) if en]
        self.local_valid = bool(values)
        if values:
            self.local = min(values)
        acc, ok, vacc = self.local, self.local_valid, self.active
        for p in self.child_ports:
            if not self.heard[p]:
                ok = False
            else:
                acc = min(acc, self.child_rep[p])
                vacc = min(vacc, self.child_ver[p])
        acc = max(acc, self.sent)       # never below a REPORT already sent
        changed = not self.report_valid or acc != self.report or vacc != self.ver_report
        if self.online and ok and changed and not self.is_root:
            self.pending[self.parent_port] = True
        self.report, self.report_valid, self.ver_report = acc, ok, vacc
        if self.online and ok and self.is_root:
            if acc > self.committed:
                self.committed = acc
                self._pend_children()
            if self.ver_conv != self.ver_report:
                self.ver_conv = self.ver_report
                self._pend_children()

    # ---- host commands ---------------------------------------------------------------------
    def command(self, op: int, index: int = 0, value: int = 0) -> tuple[CmdStatus, int, bool]:
        """Execute a host command; returns (status, value, enabled) like ``rsp``."""
        status = self._command(op, index, value)
        if status != CmdStatus.OK:
            self.refused += 1
        if op in (Op.PERSIST, Op.ENABLE, Op.READ, Op.DISABLE) and 0 <= index < self.domains:
            en = self.enabled[index] and op != Op.DISABLE
            return status, (self.persisted[index] if en else 0), en
        return status, 0, False

    def _command(self, op: int, d: int, value: int) -> CmdStatus:
        fits = 0 <= value < (1 << self.epoch_width)
        if op in (Op.PERSIST, Op.ENABLE, Op.DISABLE, Op.READ):
            if not 0 <= d < self.domains:
                return CmdStatus.BAD_INDEX
            if op == Op.PERSIST:
                if not self.enabled[d]:
                    return CmdStatus.DISABLED
                if not fits:
                    return CmdStatus.ILLEGAL
                if value < self.persisted[d]:
                    return CmdStatus.LOWER
                self.persisted[d] = value
            elif op == Op.ENABLE:
                if not fits:
                    return CmdStatus.ILLEGAL
                if self.enabled[d] and value < self.persisted[d]:
                    return CmdStatus.LOWER
                if value < self.floor:
                    return CmdStatus.LOWER
                self.persisted[d] = value
                self.enabled[d] = True
                self.report_valid = False
            elif op == Op.DISABLE:
                self.enabled[d] = False
            self._update()
            return CmdStatus.OK
        if op == Op.ROLE:
            if not 0 <= d < self.ports:
                return CmdStatus.BAD_INDEX
            if value not in tuple(Role):
                return CmdStatus.ILLEGAL
            if value == Role.PARENT and any(r == Role.PARENT for p, r in enumerate(self.role)
                                            if p != d):
                return CmdStatus.ILLEGAL
            self.role[d] = Role(value)
            self.heard[d] = False
            self.pending[d] = value != Role.OFF
            self._update()
            return CmdStatus.OK
        if op == Op.ACTIVE:
            if not 1 <= value <= 255:
                return CmdStatus.ILLEGAL
            self.active = value
            self._update()
            return CmdStatus.OK
        if op == Op.ONLINE:
            if value not in (0, 1):
                return CmdStatus.ILLEGAL
            self.online = bool(value)
            self.report_valid = False
            self._update()
            return CmdStatus.OK
        return CmdStatus.ILLEGAL

    # ---- links -----------------------------------------------------------------------------
    def set_link(self, port: int, up: bool) -> None:
        """The link engine's status of ``port``: a rising edge resends this port's state."""
        if up and not self.link_up[port] and self.role[port] != Role.OFF:
            self.pending[port] = True
        self.link_up[port] = up

    def can_send(self, port: int) -> bool:
        if not (self.pending[port] and self.link_up[port]):
            return False
        r = self.role[port]
        return r == Role.CHILD or (r == Role.PARENT and self.online and self.report_valid)

    def poll(self, port: int) -> bytes | None:
        """The message ``port`` sends now, if any (the gateware's snapshot load)."""
        if not self.can_send(port):
            return None
        self.pending[port] = False
        solicit = not self.heard[port]
        if self.role[port] == Role.PARENT:
            self.sent = self.report
            msg = Message(MsgType.REPORT, self.report, self.committed, self.ver_report, solicit)
        else:
            msg = Message.commit(self.committed, self.ver_conv, solicit)
        return encode(msg)

    def receive(self, port: int, data: bytes) -> None:
        """A message delivered by the link on ``port``."""
        try:
            msg = decode(data, self.epoch_width)
        except MessageError:
            self.malformed += 1
            return
        r = self.role[port]
        if r == Role.CHILD and msg.type == MsgType.REPORT:
            if not self.heard[port] or msg.epoch >= self.child_rep[port]:
                self.child_rep[port] = msg.epoch
            self.heard[port] = True
            self.child_ver[port] = msg.version
        elif r == Role.PARENT and msg.type == MsgType.COMMIT:
            self.heard[port] = True
            if msg.version != self.ver_conv:
                self.ver_conv = msg.version
                self._pend_children()
        else:
            self.misrouted += 1
            return
        if msg.solicit:
            self.pending[port] = True
        if msg.committed > self.committed:
            self.committed = msg.committed
            self._pend_children()
        self._update()

    def snapshot(self) -> dict:
        """Registers the gateware exposes on ``status`` (for comparisons)."""
        return {
            "online": self.online, "enabled": list(self.enabled),
            "local": self.local if self.local_valid else None,
            "report": self.report if self.report_valid else None,
            "committed": self.committed, "active": self.active,
            "version_report": self.ver_report, "version_converged": self.ver_conv,
            "role": [int(r) for r in self.role], "heard": list(self.heard),
            "refused": self.refused,
        }


# ---- clusters --------------------------------------------------------------------------------

class InvariantError(AssertionError):
    """A safety or monotonicity invariant failed."""


def assign_ports(n: int, edges: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """Port numbers: ``ports[(a, b)]`` is a's port towards b, in the order edges are listed."""
    used = [0] * n
    ports = {}
    for a, b in edges:
        for x, y in ((a, b), (b, a)):
            ports[(x, y)] = used[x]
            used[x] += 1
    return ports


@dataclass
class HostState:
    """What a node's host keeps on durable storage: survives node resets."""
    durable: dict[int, int] = field(default_factory=dict)   # enabled domain -> epoch
    active: int = 1


class Cluster:
    """Nodes connected by a tree of links, with hosts, faults and invariant checks.

    ``edges`` are (parent, child) pairs; the node that is nobody's child is the root.
    """

    def __init__(self, n: int, edges: list[tuple[int, int]], *, domains: int = 8,
                 ports: int | None = None, epoch_width: int = 32) -> None:
        children = [c for _, c in edges]
        if len(edges) != n - 1 or len(set(children)) != n - 1:
            raise ValueError("edges must form a tree over the n nodes")
        self.n, self.edges = n, list(edges)
        self.port = assign_ports(n, edges)
        degree = max([sum(1 for e in edges if i in e) for i in range(n)] + [1])
        self.ports = ports or degree
        if self.ports < degree:
            raise ValueError(f"a node has {degree} links, more than ports={self.ports}")
        self.parent = {c: p for p, c in edges}
        self.root = next(i for i in range(n) if i not in self.parent)
        self.nodes = [Node(domains, self.ports, epoch_width) for _ in range(n)]
        self.hosts = [HostState() for _ in range(n)]
        self.queues = {(a, b): deque() for a, b in self.port}
        self.up = {frozenset(e): False for e in edges}
        self.restored = [False] * n
        self.sent_log: list[tuple[int, int, int, bytes]] = []   # (from, to, incarnation, msg)
        self._last_committed = [(0, 0)] * n
        self._last_report: dict[tuple[int, int], int] = {}

    # ---- host ------------------------------------------------------------------------------
    def neighbours(self, i: int) -> list[int]:
        return [b for a, b in self.port if a == i]

    def subtree(self, i: int) -> list[int]:
        out, todo = [], [i]
        while todo:
            x = todo.pop()
            out.append(x)
            todo += [c for p, c in self.edges if p == x]
        return out

    def host_commands(self, i: int) -> list[tuple[Op, int, int]]:
        """The commands node i's host writes to (re)configure its node, ONLINE last."""
        cmds = [(Op.ENABLE, d, e) for d, e in sorted(self.hosts[i].durable.items())]
        for j in self.neighbours(i):
            role = Role.PARENT if self.parent.get(i) == j else Role.CHILD
            cmds.append((Op.ROLE, self.port[(i, j)], role))
        cmds.append((Op.ACTIVE, 0, self.hosts[i].active))
        cmds.append((Op.ONLINE, 0, 1))
        return cmds

    def restore(self, i: int) -> None:
        """Node i's host configures it from its durable state (after power-on or a reset)."""
        for op, index, value in self.host_commands(i):
            status, _, _ = self.nodes[i].command(op, index, value)
            if status != CmdStatus.OK:
                raise InvariantError(f"node {i}: restore command {op.name} {index} {value} "
                                     f"refused: {status.name}")
        self.restored[i] = True
        self.check()

    def persist(self, i: int, domain: int, epoch: int) -> CmdStatus | None:
        """Node i's host makes ``domain`` durable at ``epoch``, then tells the node."""
        host = self.hosts[i]
        if epoch < host.durable[domain]:
            raise ValueError("durable epochs only rise")
        host.durable[domain] = epoch
        if not self.restored[i]:
            return None
        status, _, _ = self.nodes[i].command(Op.PERSIST, domain, epoch)
        self.check()
        return status

    def set_active(self, i: int, version: int) -> CmdStatus | None:
        self.hosts[i].active = version
        if not self.restored[i]:
            return None
        status, _, _ = self.nodes[i].command(Op.ACTIVE, 0, version)
        return status

    # ---- links and faults --------------------------------------------------------------------
    def _set_up(self, a: int, b: int, up: bool) -> None:
        self.up[frozenset((a, b))] = up
        self.nodes[a].set_link(self.port[(a, b)], up)
        self.nodes[b].set_link(self.port[(b, a)], up)

    def link_up(self, a: int, b: int) -> None:
        self._set_up(a, b, True)

    def link_down(self, a: int, b: int, rng: random.Random | None = None,
                  p_drop: float = 0.3, p_dup: float = 0.3) -> None:
        """The link goes down; with ``rng``, each in-flight message is dropped (``p_drop``) or
        delivered twice in a row (``p_dup``). Nothing is delivered while a link is down."""
        self._set_up(a, b, False)
        if rng is None:
            return
        for key in ((a, b), (b, a)):
            out = deque()
            for msg in self.queues[key]:
                x = rng.random()
                if x < p_drop:
                    continue
                out.append(msg)
                if x < p_drop + p_dup:
                    out.append(msg)
            self.queues[key] = out

    def reset_node(self, i: int, rng: random.Random | None = None, **kw) -> None:
        """Node i loses its registers; its links go down (messages may be lost/repeated)."""
        for j in self.neighbours(i):
            self.link_down(i, j, rng, **kw)
        self.nodes[i].reset()
        self.restored[i] = False

    # ---- running ---------------------------------------------------------------------------
    def actions(self) -> list[tuple[str, int, int]]:
        acts = []
        for (a, b), p in self.port.items():
            if not self.up[frozenset((a, b))]:
                continue
            if self.nodes[a].can_send(p):
                acts.append(("send", a, b))
            if self.queues[(a, b)]:
                acts.append(("deliver", a, b))
        return acts

    def do(self, action: tuple[str, int, int]) -> None:
        kind, a, b = action
        if kind == "send":
            msg = self.nodes[a].poll(self.port[(a, b)])
            self.queues[(a, b)].append(msg)
            self.sent_log.append((a, b, self.nodes[a].incarnation, msg))
            self._check_message(a, b, msg)
        else:
            self.nodes[b].receive(self.port[(b, a)], self.queues[(a, b)].popleft())
        self.check()

    def step(self, rng: random.Random) -> bool:
        """Take one random enabled action; False when quiescent."""
        acts = self.actions()
        if not acts:
            return False
        self.do(rng.choice(acts))
        return True

    def run(self, rng: random.Random, max_steps: int = 100_000) -> int:
        """Run until quiescent; returns the number of steps."""
        for steps in range(max_steps):
            if not self.step(rng):
                return steps
        raise InvariantError(f"not quiescent after {max_steps} steps")

    def settle(self, rng: random.Random) -> int:
        """Faults stop: every node restored, every link up; run to quiescence."""
        for i in range(self.n):
            if not self.restored[i]:
                self.restore(i)
        for a, b in self.edges:
            if not self.up[frozenset((a, b))]:
                self.link_up(a, b)
        return self.run(rng)

    # ---- invariants --------------------------------------------------------------------------
    def durable_meet(self, nodes=None) -> int | None:
        """min over the hosts' durable epochs of their enabled domains (None: none enabled)."""
        values = [e for i in (range(self.n) if nodes is None else nodes)
                  for e in self.hosts[i].durable.values()]
        return min(values) if values else None

    def converged_version(self) -> int:
        return min(h.active for h in self.hosts)

    def _check_message(self, a: int, b: int, data: bytes) -> None:
        msg = decode(data)
        if msg.type != MsgType.REPORT:
            return
        # a REPORT never claims more than its subtree has made durable ...
        meet = self.durable_meet(self.subtree(a))
        if meet is None or msg.epoch > meet:
            raise InvariantError(f"node {a} reported {msg.epoch}, subtree durable meet {meet}")
        # ... and the reports of one incarnation only rise
        key = (a, self.nodes[a].incarnation)
        if msg.epoch < self._last_report.get(key, 0):
            raise InvariantError(f"node {a} report fell: {self._last_report[key]} -> {msg.epoch}")
        self._last_report[key] = msg.epoch

    def check(self) -> None:
        """Safety: every COMMITTED <= every enabled durable epoch and every enabled PERSISTED
        anywhere; COMMITTED never decreases (within a node incarnation)."""
        meet = self.durable_meet()
        registers = [v for node in self.nodes for v, en in zip(node.persisted, node.enabled)
                     if en]
        bound = min(registers) if registers else None
        for i, node in enumerate(self.nodes):
            c = node.committed
            if meet is not None and c > meet:
                raise InvariantError(f"node {i}: COMMITTED {c} > durable meet {meet}")
            if bound is not None and c > bound:
                raise InvariantError(f"node {i}: COMMITTED {c} > an enabled PERSISTED {bound}")
            inc, last = self._last_committed[i]
            if inc == node.incarnation and c < last:
                raise InvariantError(f"node {i}: COMMITTED fell {last} -> {c}")
            self._last_committed[i] = (node.incarnation, c)

    def check_converged(self) -> None:
        """Liveness, once quiescent after the faults stopped: all on the meet and version."""
        meet, version = self.durable_meet(), self.converged_version()
        for i, node in enumerate(self.nodes):
            if node.committed != meet:
                raise InvariantError(f"node {i}: COMMITTED {node.committed}, meet {meet}")
            if node.ver_conv != version:
                raise InvariantError(f"node {i}: version {node.ver_conv}, expected {version}")
