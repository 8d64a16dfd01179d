"""Unit tests of the epoch engine (``hdl/epoch.py``) in Amaranth's simulator.

Single engines are driven through their command port and message streams; small trees of
engines are connected through FIFOs (no link engines), with node and link resets. Every
command's response is also checked against the reference model (``sim/epoch_model.py``).
"""
import pytest
from amaranth import Cat, Elaboratable, Module, ResetInserter, Signal
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.sim import Simulator

from epochlink.hdl.epoch import EpochEngine
from epochlink.hdl.epoch_format import CmdStatus, Message, Op, Role, decode, encode
from epochlink.sim.epoch_model import Cluster, InvariantError, Node, assign_ports

OK, BAD_INDEX, DISABLED, LOWER, ILLEGAL = (CmdStatus.OK, CmdStatus.BAD_INDEX,
                                            CmdStatus.DISABLED, CmdStatus.LOWER,
                                            CmdStatus.ILLEGAL)


# ---- harness -----------------------------------------------------------------------------

CUT_THROUGH = True


@pytest.fixture(autouse=True, params=[True, False], ids=["cut_through", "store_and_forward"])
def engine_mode(request):
    """Every test runs against both builds of the engine (``EpochEngine.cut_through``)."""
    global CUT_THROUGH
    CUT_THROUGH = request.param
    yield request.param
    CUT_THROUGH = True


def new_engine(**kwargs):
    """An :class:`EpochEngine` of the build under test."""
    return EpochEngine(cut_through=CUT_THROUGH, **kwargs)


class EngineTree(Elaboratable):
    """Epoch engines connected by a tree of FIFOs, one per direction of each link.

    ``node_rst[i]`` resets node i, ``link_rst[edge]`` empties both FIFOs of a link and
    ``link_up[edge]`` drives both ends' ``link_up``. Ports follow
    :func:`~epochlink.sim.epoch_model.assign_ports`, as in the model's :class:`Cluster`.
    """

    def __init__(self, n, edges, *, domains=4, ports=2, fifo_depth=12):
        self.n, self.edges = n, list(edges)
        self.port = assign_ports(n, edges)
        self.engines = [new_engine(domains=domains, ports=ports) for _ in range(n)]
        self.node_rst = [Signal(name=f"node_rst{i}") for i in range(n)]
        self.link_rst = {frozenset(e): Signal(name=f"link_rst{e[0]}_{e[1]}") for e in edges}
        self.link_up = {frozenset(e): Signal(name=f"link_up{e[0]}_{e[1]}") for e in edges}
        self.fifo_depth = fifo_depth

    def elaborate(self, platform):
        m = Module()
        for i, engine in enumerate(self.engines):
            m.submodules[f"node{i}"] = ResetInserter(self.node_rst[i])(engine)
        for (a, b), p in self.port.items():
            key = frozenset((a, b))
            fifo = SyncFIFOBuffered(width=9, depth=self.fifo_depth)
            m.submodules[f"fifo{a}_{b}"] = ResetInserter(self.link_rst[key])(fifo)
            src = self.engines[a].ctrl_out[p]
            dst = self.engines[b].ctrl_in[self.port[(b, a)]]
            m.d.comb += [
                fifo.w_data.eq(Cat(src.payload.data, src.payload.last)),
                fifo.w_en.eq(src.valid),
                src.ready.eq(fifo.w_rdy),
                dst.valid.eq(fifo.r_rdy),
                dst.payload.eq(fifo.r_data),
                fifo.r_en.eq(dst.ready),
                self.engines[a].link_up[p].eq(self.link_up[key]),
            ]
        return m


async def command(ctx, engine, op, index=0, value=0, limit=1000):
    """One host command; returns (status, value, enabled) of its response."""
    ctx.set(engine.cmd.payload.op, op)
    ctx.set(engine.cmd.payload.index, index)
    ctx.set(engine.cmd.payload.value, value)
    ctx.set(engine.cmd.valid, 1)
    ctx.set(engine.rsp.ready, 1)
    rsp = engine.rsp
    for _ in range(limit):
        _, _, valid, status, rvalue, enabled = await ctx.tick().sample(
            rsp.valid, rsp.payload.status, rsp.payload.value, rsp.payload.enabled)
        if valid:
            break
    else:
        raise AssertionError(f"no response to {Op(op).name} in {limit} cycles")
    ctx.set(engine.cmd.valid, 0)
    ctx.set(engine.rsp.ready, 0)
    return CmdStatus(status), rvalue, bool(enabled)


async def wait_until(ctx, predicate, limit=5000, what="condition"):
    """Tick until ``predicate()`` holds (a liveness guard, not a timing requirement)."""
    for _ in range(limit):
        if predicate():
            return
        await ctx.tick()
    raise AssertionError(f"{what} not reached in {limit} cycles")


def streams_idle(ctx, tree):
    return not any(ctx.get(s.valid) for e in tree.engines for s in (*e.ctrl_in, *e.ctrl_out))


async def quiesce(ctx, tree, idle=64, limit=20000):
    """Tick until no message byte has moved for ``idle`` cycles."""
    quiet = 0
    for _ in range(limit):
        quiet = quiet + 1 if streams_idle(ctx, tree) else 0
        if quiet >= idle:
            return
        await ctx.tick()
    raise AssertionError(f"messages still moving after {limit} cycles")


class TreeHost:
    """The hosts of an :class:`EngineTree`, mirrored on a model :class:`Cluster`.

    Every command goes to the gateware node and to the model node; their responses must
    agree. Link and reset operations are applied to both.
    """

    def __init__(self, ctx, tree, cluster):
        self.ctx, self.tree, self.cl = ctx, tree, cluster

    async def cmd(self, i, op, index=0, value=0, expect=None):
        got = await command(self.ctx, self.tree.engines[i], op, index, value)
        want = self.cl.nodes[i].command(op, index, value)
        assert got == want, f"node {i} {Op(op).name} {index} {value}: gateware {got}, model {want}"
        if expect is not None:
            assert got[0] == expect, f"node {i} {Op(op).name} {index} {value}: {got[0].name}"
        return got

    async def restore(self, i):
        for op, index, value in self.cl.host_commands(i):
            await self.cmd(i, op, index, value, expect=OK)
        self.cl.restored[i] = True

    async def persist(self, i, domain, epoch):
        self.cl.hosts[i].durable[domain] = epoch
        await self.cmd(i, Op.PERSIST, domain, epoch, expect=OK)

    def link(self, a, b, up):
        self.ctx.set(self.tree.link_up[frozenset((a, b))], up)
        if up:
            self.cl.link_up(a, b)
        else:
            self.cl.link_down(a, b)

    async def reset_node(self, i):
        """Reset node i and the FIFOs of its links (in-flight messages are lost)."""
        ctx, tree = self.ctx, self.tree
        for j in self.cl.neighbours(i):
            self.link(i, j, False)
            ctx.set(tree.link_rst[frozenset((i, j))], 1)
            for key in ((i, j), (j, i)):
                self.cl.queues[key].clear()
        ctx.set(tree.node_rst[i], 1)
        await ctx.tick()
        ctx.set(tree.node_rst[i], 0)
        for j in self.cl.neighbours(i):
            ctx.set(tree.link_rst[frozenset((i, j))], 0)
        self.cl.nodes[i].reset()
        self.cl.restored[i] = False

    def status(self, i, name):
        return self.ctx.get(getattr(self.tree.engines[i].status, name))

    def compare(self):
        """Gateware registers against the model (call at quiescence)."""
        for i, engine in enumerate(self.tree.engines):
            st, model = engine.status, self.cl.nodes[i]
            got = {
                "committed": self.ctx.get(st.committed),
                "version_converged": self.ctx.get(st.version_converged),
                "version_report": self.ctx.get(st.version_report),
                "report_valid": bool(self.ctx.get(st.report_valid)),
                "local_valid": bool(self.ctx.get(st.local_valid)),
                "refused": self.ctx.get(st.refused),
            }
            want = {
                "committed": model.committed, "version_converged": model.ver_conv,
                "version_report": model.ver_report, "report_valid": model.report_valid,
                "local_valid": model.local_valid, "refused": model.refused,
            }
            if model.report_valid:
                got["report"], want["report"] = self.ctx.get(st.report), model.report
            if model.local_valid:
                got["local"], want["local"] = self.ctx.get(st.local), model.local
            assert got == want, f"node {i}: gateware {got}, model {want}"


def safety_monitor(tree, cluster, violations):
    """A background testbench: every cycle, every COMMITTED <= the hosts' durable meet, and
    no COMMITTED falls except across its node's reset."""
    async def monitor(ctx):
        last = [0] * tree.n
        watched = [e.status.committed for e in tree.engines] + tree.node_rst
        async for _, _, *values in ctx.tick().sample(*watched):
            committed, reset = values[:tree.n], values[tree.n:]
            meet = cluster.durable_meet()
            for i, c in enumerate(committed):
                if meet is not None and c > meet:
                    violations.append(f"node {i}: COMMITTED {c} > durable meet {meet}")
                if c < last[i]:
                    violations.append(f"node {i}: COMMITTED fell {last[i]} -> {c}")
                last[i] = 0 if reset[i] else c     # a reset at this edge clears it
    return monitor


def run(dut, testbench, *background):
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    for bench in background:
        sim.add_testbench(bench, background=True)
    sim.add_testbench(testbench)
    sim.run()


# ---- single engine: host commands --------------------------------------------------------

def test_persist_enable_disable_rules():
    dut = new_engine(domains=4, ports=2)
    model = Node(domains=4, ports=2)

    async def bench(ctx):
        async def cmd(op, index, value, expect, expect_value=None):
            got = await command(ctx, dut, op, index, value)
            assert got == model.command(op, index, value)
            assert got[0] == expect, (Op(op).name, index, value, got)
            if expect_value is not None:
                assert got[1] == expect_value
            return got

        def local():
            return ctx.get(dut.status.local_valid), ctx.get(dut.status.local)

        assert local() == (0, 0)
        await cmd(Op.PERSIST, 0, 5, DISABLED)           # not enabled yet
        await cmd(Op.ENABLE, 0, 5, OK, 5)
        await wait_until(ctx, lambda: local() == (1, 5))
        await cmd(Op.PERSIST, 0, 4, LOWER, 5)           # epochs only rise
        await cmd(Op.PERSIST, 0, 5, OK, 5)              # the same epoch again is fine
        await cmd(Op.PERSIST, 0, 9, OK, 9)
        await cmd(Op.ENABLE, 0, 8, LOWER, 9)            # ENABLE of an enabled domain: a PERSIST
        await cmd(Op.PERSIST, 1, 7, DISABLED, 0)
        await cmd(Op.PERSIST, 4, 7, BAD_INDEX, 0)       # absent domain
        await cmd(Op.ENABLE, 200, 7, BAD_INDEX, 0)
        await cmd(Op.READ, 9, 0, BAD_INDEX, 0)
        await cmd(Op.DISABLE, 4, 0, BAD_INDEX, 0)
        await cmd(Op.READ, 1, 0, OK, 0)
        assert ctx.get(dut.status.refused) == 8
        await wait_until(ctx, lambda: local() == (1, 9))
        # LOCAL is the minimum over the enabled domains only
        await cmd(Op.ENABLE, 2, 3, OK, 3)
        await cmd(Op.ENABLE, 3, 12, OK, 12)
        await wait_until(ctx, lambda: local() == (1, 3))
        await cmd(Op.PERSIST, 2, 10, OK)
        await wait_until(ctx, lambda: local() == (1, 9))
        await cmd(Op.DISABLE, 0, 0, OK, 0)
        await wait_until(ctx, lambda: local() == (1, 10))
        status, value, enabled = await cmd(Op.READ, 0, 0, OK)
        assert (value, enabled) == (0, False)           # PERSISTED reads 0 while disabled
        status, value, enabled = await cmd(Op.READ, 3, 0, OK)
        assert (value, enabled) == (12, True)
        assert ctx.get(dut.status.enabled) == 0b1100
        for d in (2, 3):
            await cmd(Op.DISABLE, d, 0, OK)
        await wait_until(ctx, lambda: local()[0] == 0)  # no enabled domain: LOCAL is "none"
        assert ctx.get(dut.status.refused) == 8
        assert ctx.get(dut.status.committed) == 0       # offline: never committed anything
        await cmd(Op.PERSIST, 0, 0xFFFF_FFFF, DISABLED)
        assert ctx.get(dut.status.refused) == 9

    run(dut, bench)


def test_roles_versions_online_refusals():
    dut = new_engine(domains=2, ports=3)
    model = Node(domains=2, ports=3)

    async def bench(ctx):
        async def cmd(op, index, value, expect):
            got = await command(ctx, dut, op, index, value)
            assert got == model.command(op, index, value)
            assert got[0] == expect, (Op(op).name, index, value, got)

        def roles():
            return [ctx.get(dut.status.port[p].role) for p in range(3)]

        await cmd(Op.ROLE, 0, Role.CHILD, OK)
        await cmd(Op.ROLE, 1, Role.PARENT, OK)
        await cmd(Op.ROLE, 3, Role.CHILD, BAD_INDEX)     # absent port
        await cmd(Op.ROLE, 2, 3, ILLEGAL)                # not a role
        await cmd(Op.ROLE, 2, 0x10001, ILLEGAL)          # not a role in the low bits either
        await cmd(Op.ROLE, 2, Role.PARENT, ILLEGAL)      # a second parent
        await cmd(Op.ROLE, 1, Role.PARENT, OK)           # the same parent again
        assert roles() == [Role.CHILD, Role.PARENT, Role.OFF]
        await cmd(Op.ACTIVE, 0, 0, ILLEGAL)
        await cmd(Op.ACTIVE, 0, 256, ILLEGAL)
        await cmd(Op.ACTIVE, 0, 7, OK)
        await cmd(Op.ONLINE, 0, 2, ILLEGAL)
        await cmd(7, 0, 0, ILLEGAL)                      # unknown op
        assert ctx.get(dut.status.active) == 7
        assert ctx.get(dut.status.online) == 0
        assert ctx.get(dut.status.refused) == 8
        await cmd(Op.ROLE, 1, Role.OFF, OK)
        await cmd(Op.ROLE, 2, Role.PARENT, OK)           # the parent port moved
        assert roles() == [Role.CHILD, Role.OFF, Role.PARENT]

    run(dut, bench)


# ---- single engine: messages -------------------------------------------------------------

async def send_bytes(ctx, dut, port, data, last_at=None):
    """Write bytes into ``ctrl_in[port]``; ``last`` on the final byte (and at ``last_at``)."""
    stream = dut.ctrl_in[port]
    for i, byte in enumerate(data):
        ctx.set(stream.payload.data, byte)
        ctx.set(stream.payload.last, i in (len(data) - 1, last_at))
        ctx.set(stream.valid, 1)
        await ctx.tick().until(stream.ready)
    ctx.set(stream.valid, 0)


def collector(dut, port, out):
    """A background testbench taking every message from ``ctrl_out[port]``."""
    async def collect(ctx):
        stream = dut.ctrl_out[port]
        ctx.set(stream.ready, 1)
        buf = bytearray()
        async for _, _, valid, data, last in ctx.tick().sample(
                stream.valid, stream.payload.data, stream.payload.last):
            if valid:
                buf.append(data)
                if last:
                    out.append(bytes(buf))
                    buf.clear()
    return collect


def test_report_floor_and_solicit():
    """A node with a parent reports, answers a solicit, and refuses ENABLE below its report."""
    dut = new_engine(domains=2, ports=2)
    sent = []

    async def bench(ctx):
        ctx.set(dut.link_up[0], 1)
        for op, index, value in ((Op.ROLE, 0, Role.PARENT), (Op.ENABLE, 0, 8)):
            assert (await command(ctx, dut, op, index, value))[0] == OK
        await quiesce_single(ctx, dut)
        # ROLE set while the link was up: the port's pending state waits for ONLINE
        assert sent == []
        assert (await command(ctx, dut, Op.ONLINE, 0, 1))[0] == OK
        await wait_until(ctx, lambda: len(sent) == 1)
        msg = decode(sent[0])
        assert msg == Message.report(8, 0, 1, solicit=True)
        assert ctx.get(dut.status.report_sent) == 8
        # ENABLE below what was reported is refused, at or above it is fine
        assert (await command(ctx, dut, Op.ENABLE, 1, 7))[0] == LOWER
        assert (await command(ctx, dut, Op.ENABLE, 1, 8))[0] == OK
        await quiesce_single(ctx, dut)
        assert {decode(m) for m in sent} == {Message.report(8, 0, 1, solicit=True)}
        # the parent answers with COMMIT (the certificate) and asks for our state
        count = len(sent)
        await send_bytes(ctx, dut, 0, encode(Message.commit(6, 3, solicit=True)))
        await wait_until(ctx, lambda: len(sent) == count + 1)
        assert decode(sent[-1]) == Message.report(8, 6, 1, solicit=False)
        assert ctx.get(dut.status.committed) == 6
        assert ctx.get(dut.status.version_converged) == 3
        assert ctx.get(dut.status.port[0].heard) == 1
        # a lower COMMITTED changes nothing; COMMITTED is a floor for ENABLE too
        await send_bytes(ctx, dut, 0, encode(Message.commit(2, 3)))
        await quiesce_single(ctx, dut)
        assert ctx.get(dut.status.committed) == 6
        assert len(sent) == count + 1
        assert (await command(ctx, dut, Op.DISABLE, 1, 0))[0] == OK
        assert (await command(ctx, dut, Op.PERSIST, 0, 20))[0] == OK
        await wait_until(ctx, lambda: len(sent) == count + 2)
        assert decode(sent[-1]) == Message.report(20, 6, 1)
        assert (await command(ctx, dut, Op.ENABLE, 1, 19))[0] == LOWER
        await quiesce_single(ctx, dut)
        assert len(sent) == count + 2

    run(dut, bench, collector(dut, 0, sent))


def test_root_waits_for_online_and_keeps_its_floor():
    dut = new_engine(domains=2, ports=1)

    async def bench(ctx):
        assert (await command(ctx, dut, Op.ENABLE, 0, 10))[0] == OK
        await ctx.tick().repeat(50)
        assert ctx.get(dut.status.local) == 10
        assert ctx.get(dut.status.committed) == 0        # offline: a half-restored node waits
        assert (await command(ctx, dut, Op.ONLINE, 0, 1))[0] == OK
        await wait_until(ctx, lambda: ctx.get(dut.status.committed) == 10)
        assert (await command(ctx, dut, Op.DISABLE, 0))[0] == OK
        assert (await command(ctx, dut, Op.ENABLE, 1, 9))[0] == LOWER   # below COMMITTED
        assert (await command(ctx, dut, Op.ENABLE, 1, 10))[0] == OK
        assert ctx.get(dut.status.refused) == 1

    run(dut, bench)


@pytest.mark.parametrize("delay", range(8))
def test_enable_lowers_report_before_it_can_be_sent(delay):
    """A REPORT computed before an ENABLE of a lower domain is never sent afterwards, whatever
    the cycle the link comes up at: either it went out first (and the ENABLE is refused as
    below it), or only the lowered REPORT goes out."""
    dut = new_engine(domains=2, ports=1)
    sent = []

    async def bench(ctx):
        for op, index, value in ((Op.ROLE, 0, Role.PARENT), (Op.ENABLE, 0, 50),
                                 (Op.ONLINE, 0, 1)):
            assert (await command(ctx, dut, op, index, value))[0] == OK
        await wait_until(ctx, lambda: ctx.get(dut.status.report_valid))
        assert ctx.get(dut.status.report) == 50           # pending: the link is down

        # ENABLE by hand, raising link_up `delay` cycles into the command
        ctx.set(dut.cmd.payload.op, Op.ENABLE)
        ctx.set(dut.cmd.payload.index, 1)
        ctx.set(dut.cmd.payload.value, 10)
        ctx.set(dut.cmd.valid, 1)
        ctx.set(dut.rsp.ready, 1)
        for cycle in range(100):
            if cycle == delay:
                ctx.set(dut.link_up[0], 1)
            _, _, done, status = await ctx.tick().sample(dut.rsp.valid, dut.rsp.payload.status)
            if done:
                break
        ctx.set(dut.cmd.valid, 0)
        ctx.set(dut.link_up[0], 1)
        await wait_until(ctx, lambda: sent)
        await quiesce_single(ctx, dut)
        epochs = [decode(m).epoch for m in sent]
        assert (status, epochs) in ((OK, [10]), (LOWER, [50])), (status, epochs)

    run(dut, bench, collector(dut, 0, sent))


async def quiesce_single(ctx, dut, idle=40, limit=5000):
    """Tick until no message byte has moved for ``idle`` cycles."""
    quiet = 0
    for _ in range(limit):
        busy = any(ctx.get(s.valid) for s in (*dut.ctrl_in, *dut.ctrl_out))
        quiet = 0 if busy else quiet + 1
        if quiet >= idle:
            return
        await ctx.tick()
    raise AssertionError(f"messages still moving after {limit} cycles")


def test_malformed_and_misrouted_messages():
    dut = new_engine(domains=2, ports=3)
    sent, to_child = [], []

    async def bench(ctx):
        for p in range(3):
            ctx.set(dut.link_up[p], 1)
        for op, index, value in ((Op.ROLE, 0, Role.CHILD), (Op.ROLE, 1, Role.PARENT),
                                 (Op.ENABLE, 0, 50), (Op.ONLINE, 0, 1)):
            assert (await command(ctx, dut, op, index, value))[0] == OK
        good = encode(Message.report(30, 4, 2))
        bad = [
            good[:-1],                                   # too short
            good + b"\x00",                              # too long
            bytes([3]) + good[1:],                       # unknown type
            bytes([0x80]) + good[1:],                    # SOLICIT alone is no type
        ]
        for data in bad:
            await send_bytes(ctx, dut, 0, data)
        await send_bytes(ctx, dut, 0, good, last_at=1)  # `last` in the middle: two fragments
        await quiesce_single(ctx, dut)
        assert ctx.get(dut.status.malformed) == 6
        assert ctx.get(dut.status.port[0].heard) == 0
        assert ctx.get(dut.status.committed) == 0
        await send_bytes(ctx, dut, 1, good)              # a REPORT from the parent
        await send_bytes(ctx, dut, 0, encode(Message.commit(9, 1)))  # a COMMIT from a child
        await send_bytes(ctx, dut, 2, encode(Message.commit(9, 1)))  # anything on an OFF port
        await quiesce_single(ctx, dut)
        assert ctx.get(dut.status.misrouted) == 3
        assert ctx.get(dut.status.malformed) == 6
        assert ctx.get(dut.status.committed) == 0
        assert ctx.get(dut.status.report_valid) == 0     # the child has not reported
        await send_bytes(ctx, dut, 0, good)
        await wait_until(ctx, lambda: ctx.get(dut.status.report_valid))
        assert ctx.get(dut.status.port[0].heard) == 1
        assert ctx.get(dut.status.port[0].child_report) == 30
        assert ctx.get(dut.status.port[0].child_version) == 2
        assert ctx.get(dut.status.report) == 30          # min(LOCAL 50, child 30)
        assert ctx.get(dut.status.version_report) == 1   # min(ACTIVE 1, child 2)
        assert ctx.get(dut.status.committed) == 4        # the child's certificate
        # reports are max-merged: a stale lower one changes nothing
        await send_bytes(ctx, dut, 0, encode(Message.report(20, 0, 2)))
        await quiesce_single(ctx, dut)
        assert ctx.get(dut.status.port[0].child_report) == 30
        assert ctx.get(dut.status.misrouted) == 3
        assert ctx.get(dut.status.malformed) == 6
        # the child got COMMIT on ROLE (asking for its report), and then the certificate
        assert [decode(m) for m in to_child] == [Message.commit(0, 0, solicit=True),
                                                 Message.commit(4, 0)]
        assert [decode(m) for m in sent] == [Message.report(30, 4, 1, solicit=True)]

    run(dut, bench, collector(dut, 0, to_child), collector(dut, 1, sent))


def test_partial_message_dropped_on_link_down():
    """A message cut short by its link going down neither blocks the engine nor spoils the
    next one (a link engine never delivers part of a message; a reset FIFO does)."""
    dut = new_engine(domains=2, ports=2)

    async def bench(ctx):
        ctx.set(dut.link_up[0], 1)
        for op, index, value in ((Op.ROLE, 0, Role.CHILD), (Op.ENABLE, 0, 50)):
            assert (await command(ctx, dut, op, index, value))[0] == OK
        good = encode(Message.report(30, 4, 2))
        stream = dut.ctrl_in[0]
        for byte in good[:2]:
            ctx.set(stream.payload.data, byte)
            ctx.set(stream.valid, 1)
            await ctx.tick().until(stream.ready)
        ctx.set(stream.valid, 0)
        await ctx.tick().repeat(5)
        ctx.set(dut.link_up[0], 0)
        await ctx.tick().repeat(5)
        assert (await command(ctx, dut, Op.READ, 0))[:2] == (OK, 50)
        ctx.set(dut.link_up[0], 1)
        await send_bytes(ctx, dut, 0, good)
        await wait_until(ctx, lambda: ctx.get(dut.status.port[0].heard))
        assert ctx.get(dut.status.port[0].child_report) == 30
        assert ctx.get(dut.status.malformed) == 0

    run(dut, bench, collector(dut, 0, []))


def test_narrow_epochs():
    """epoch_width 16, one port: values that do not fit are refused or malformed."""
    dut = new_engine(domains=1, ports=1, epoch_width=16)
    model = Node(domains=1, ports=1, epoch_width=16)

    async def bench(ctx):
        ctx.set(dut.link_up[0], 1)
        for op, index, value, expect in (
                (Op.ENABLE, 0, 0x1_0000, ILLEGAL), (Op.ENABLE, 0, 0xFFFF, OK),
                (Op.PERSIST, 0, 0x1_FFFF, ILLEGAL), (Op.ROLE, 0, Role.CHILD, OK),
                (Op.ONLINE, 0, 1, OK)):
            got = await command(ctx, dut, op, index, value)
            assert got == model.command(op, index, value)
            assert got[0] == expect
        await send_bytes(ctx, dut, 0, encode(Message.report(0x1_0000, 0, 1)))
        await send_bytes(ctx, dut, 0, encode(Message.report(5, 0x1_0000, 1)))
        await quiesce_single(ctx, dut)
        assert ctx.get(dut.status.malformed) == 2
        await send_bytes(ctx, dut, 0, encode(Message.report(0xFFF0, 0, 1)))
        await wait_until(ctx, lambda: ctx.get(dut.status.committed) == 0xFFF0)

    run(dut, bench, collector(dut, 0, []))


# ---- trees of engines --------------------------------------------------------------------

def configure(cluster, durable, active=None):
    for i, epochs in enumerate(durable):
        cluster.hosts[i].durable = dict(epochs)
        cluster.hosts[i].active = (active or [1] * len(durable))[i]


async def bring_up(host):
    for a, b in host.cl.edges:
        host.link(a, b, True)
    for i in range(host.cl.n):
        await host.restore(i)


async def converge(host, what="convergence"):
    """Wait until every node has the durable meet and the min ACTIVE, then quiesce."""
    meet, version = host.cl.durable_meet(), host.cl.converged_version()

    def done():
        return all(host.status(i, "committed") == meet and
                   host.status(i, "version_converged") == version for i in range(host.cl.n))
    await wait_until(host.ctx, done, limit=20000, what=what)
    await quiesce(host.ctx, host.tree)
    host.cl.settle(_RNG)
    host.cl.check_converged()
    host.compare()


class _FixedRng:
    """Deterministic choice for the model's scheduler (the order does not matter)."""
    def choice(self, seq):
        return seq[0]


_RNG = _FixedRng()


def test_chain_converges_to_meet():
    edges = [(0, 1), (1, 2)]
    tree = EngineTree(3, edges)
    cluster = Cluster(3, edges, domains=4, ports=2)
    configure(cluster, [{0: 5, 1: 7}, {0: 6}, {2: 9, 3: 4}])
    violations = []

    async def bench(ctx):
        host = TreeHost(ctx, tree, cluster)
        await bring_up(host)
        await converge(host)
        assert [host.status(i, "committed") for i in range(3)] == [4, 4, 4]
        assert [host.status(i, "report") for i in range(3)] == [4, 4, 4]
        assert [host.status(i, "local") for i in range(3)] == [5, 6, 4]
        # the leaf's slow domain catches up; the meet moves to the next slowest
        await host.persist(2, 3, 8)
        await converge(host)
        assert host.status(0, "committed") == 5
        for i, epochs in enumerate(([10, 10], [10], [10, 10])):
            for d, e in zip(cluster.hosts[i].durable, epochs):
                await host.persist(i, d, e)
        await converge(host)
        assert [host.status(i, "committed") for i in range(3)] == [10, 10, 10]

    run(tree, bench, safety_monitor(tree, cluster, violations))
    assert violations == []


def test_node_reset_keeps_safety_and_converges():
    """Node 1 (inner) is reset while new epochs are being persisted; its host restores it
    after its links came back. COMMITTED stays below every durable epoch all along."""
    edges = [(0, 1), (0, 2), (1, 3)]
    tree = EngineTree(4, edges)
    cluster = Cluster(4, edges, domains=4, ports=2)
    configure(cluster, [{0: 3}, {0: 3, 1: 3}, {0: 3}, {0: 3, 2: 3}])
    violations = []

    async def bench(ctx):
        host = TreeHost(ctx, tree, cluster)
        await bring_up(host)
        await converge(host)
        assert host.status(3, "committed") == 3
        # epoch 4 goes durable everywhere except node 3's domain 2
        for i in range(4):
            for d in cluster.hosts[i].durable:
                if (i, d) != (3, 2):
                    await host.persist(i, d, 4)
        await host.reset_node(1)
        await ctx.tick().repeat(50)
        assert host.status(1, "committed") == 0         # registers lost
        host.link(0, 1, True)
        host.link(1, 3, True)
        await ctx.tick().repeat(200)                    # the parent re-sent COMMIT: dropped
        assert host.status(1, "committed") == 0         # (ports OFF until the host restores)
        await host.persist(2, 0, 5)
        await host.restore(1)
        await converge(host, "convergence after the reset")
        assert [host.status(i, "committed") for i in range(4)] == [3] * 4
        # node 3's last domain: the meet is 4 now that the restored node reports again
        await host.persist(3, 2, 4)
        await converge(host)
        assert [host.status(i, "committed") for i in range(4)] == [4] * 4
        # the root is reset: it relearns COMMITTED from its children's reports
        await host.reset_node(0)
        await host.restore(0)
        for j in cluster.neighbours(0):
            host.link(0, j, True)
        await converge(host, "convergence after a root reset")
        assert host.status(0, "committed") == 4

    run(tree, bench, safety_monitor(tree, cluster, violations))
    assert violations == []


def test_link_flap_tears_a_message_then_recovers():
    """A REPORT torn by a link reset (its tail lost with the FIFO) is dropped by the parent;
    the child sends its state again when the link comes back up."""
    edges = [(0, 1)]
    tree = EngineTree(2, edges)
    cluster = Cluster(2, edges, domains=4, ports=2)
    configure(cluster, [{0: 1}, {0: 1}])
    violations = []

    async def bench(ctx):
        host = TreeHost(ctx, tree, cluster)
        await bring_up(host)
        await converge(host)
        child_out = tree.engines[1].ctrl_out[cluster.port[(1, 0)]]
        await host.persist(1, 0, 2)
        await host.persist(0, 0, 2)
        await wait_until(ctx, lambda: ctx.get(child_out.valid), what="the REPORT")
        await ctx.tick().repeat(2)     # part of it is in the FIFO (messages are 2..10 bytes)
        host.link(0, 1, False)
        ctx.set(tree.link_rst[frozenset((0, 1))], 1)
        await ctx.tick()
        ctx.set(tree.link_rst[frozenset((0, 1))], 0)
        await ctx.tick().repeat(100)
        assert host.status(0, "committed") == 1
        assert ctx.get(tree.engines[0].status.port[0].child_report) == 1
        host.link(0, 1, True)
        await converge(host)
        assert host.status(1, "committed") == 2
        # the sender finished the message into the emptied FIFO: its tail is malformed
        assert ctx.get(tree.engines[0].status.malformed) == 1

    run(tree, bench, safety_monitor(tree, cluster, violations))
    assert violations == []


def test_versions_converge_to_min_active():
    edges = [(0, 1), (1, 2)]
    tree = EngineTree(3, edges)
    cluster = Cluster(3, edges, domains=4, ports=2)
    configure(cluster, [{0: 1}, {0: 1}, {0: 1}], active=[3, 2, 4])

    async def bench(ctx):
        host = TreeHost(ctx, tree, cluster)
        await bring_up(host)
        await converge(host)
        assert [host.status(i, "version_converged") for i in range(3)] == [2, 2, 2]
        assert [host.status(i, "version_report") for i in range(3)] == [2, 2, 4]
        # rolling upgrade to 5, one node at a time: converged when the last one moves
        for i, version in ((2, 5), (0, 5)):
            cluster.hosts[i].active = version
            await host.cmd(i, Op.ACTIVE, 0, version, expect=OK)
            await converge(host)
            assert host.status(0, "version_converged") == 2
        cluster.hosts[1].active = 5
        await host.cmd(1, Op.ACTIVE, 0, 5, expect=OK)
        await converge(host)
        assert [host.status(i, "version_converged") for i in range(3)] == [5, 5, 5]
        # rollback of one node: the cluster version goes down with it
        cluster.hosts[2].active = 3
        await host.cmd(2, Op.ACTIVE, 0, 3, expect=OK)
        await converge(host)
        assert [host.status(i, "version_converged") for i in range(3)] == [3, 3, 3]

    run(tree, bench)


def test_model_flags_unsafe_commit():
    """The safety checker catches a root that commits before its children report."""
    class EagerNode(Node):
        @property
        def child_ports(self):
            return [p for p in super().child_ports if self.heard[p]]

    cluster = Cluster(2, [(0, 1)], domains=2)
    cluster.nodes = [EagerNode(2, 1), Node(2, 1)]
    configure(cluster, [{0: 9}, {0: 2}])
    with pytest.raises(InvariantError, match="COMMITTED 9"):
        cluster.restore(0)


def test_turnaround_child_report_to_parent_report():
    """A child's REPORT produces this node's REPORT in the cycle after its last byte."""
    P = 3
    dut = new_engine(domains=2, ports=P)
    result = {}
    cycle = Signal(32)
    m = Module()
    m.submodules.dut = dut
    m.d.sync += cycle.eq(cycle + 1)

    async def bench(ctx):
        ctx.set(dut.link_up[0], 1)
        ctx.set(dut.ctrl_out[0].ready, 1)
        for op, index, value in ((Op.ROLE, 0, Role.PARENT), (Op.ROLE, 1, Role.CHILD),
                                 (Op.ROLE, 2, Role.CHILD), (Op.ENABLE, 0, 5), (Op.ENABLE, 1, 5),
                                 (Op.ONLINE, 0, 1)):
            assert (await command(ctx, dut, op, index, value))[0] == OK
        await send_bytes(ctx, dut, 1, encode(Message.report(4, 0, 1)))
        for _ in range(40):
            await ctx.tick()
        assert not ctx.get(dut.ctrl_out[0].valid), "reported before every child did"
        started = ctx.get(cycle)
        await send_bytes(ctx, dut, 2, encode(Message.report(3, 0, 1)))
        result["whole"] = ctx.get(cycle) - started
        cycles = 0
        while not ctx.get(dut.ctrl_out[0].valid):
            await ctx.tick()
            cycles += 1
            assert cycles < 100
        result["cycles"] = cycles
        result["announced"] = ctx.get(dut.ctrl_out_len[0])
        buf = bytearray()
        while ctx.get(dut.ctrl_out[0].valid):
            buf.append(ctx.get(dut.ctrl_out[0].payload.data))
            await ctx.tick()
        result["msg"] = decode(bytes(buf))
        result["len"] = len(buf)

    run(m, bench)
    assert result["msg"].epoch == 3
    assert result["len"] == 3, "epoch 3 takes one byte, COMMITTED 0 none"
    assert result["announced"] == 3, "ctrl_out_len announces the length with the first byte"
    # RX (with the certificate), the REPORT rescan over P ports, RDONE, load: no detour through IDLE
    # The new REPORT is worked out while the child's message arrives and goes out the cycle
    # after its last byte is taken; the last byte waits for that at most: the scan of the
    # P ports, the merge, the fold and the floor (bytes back to back here, as from a buffer).
    if CUT_THROUGH:
        assert result["cycles"] == 0, result["cycles"]
        assert result["whole"] <= P + 5, result["whole"]
    else:
        # RX (the cycle after the last byte), RSCAN (a cycle to read port 0's operands, then
        # one per port), RFLOOR, RDONE, the load
        assert result["cycles"] == 1 + (1 + P) + 2 + 1, result["cycles"]


async def send_transfers(ctx, dut, port, transfers):
    """Write ``(data, last, drop)`` transfers into ``ctrl_in[port]``, a cycle apart at most."""
    stream = dut.ctrl_in[port]
    for data, last, drop in transfers:
        ctx.set(stream.payload, {"data": data, "last": last, "drop": drop})
        ctx.set(stream.valid, 1)
        await ctx.tick().until(stream.ready)
    ctx.set(stream.valid, 0)
    ctx.set(stream.payload.drop, 0)


@pytest.mark.parametrize("kind", ["report", "commit", "root_report"])
def test_withdrawn_message_changes_nothing(kind):
    """A message its link withdraws (``drop`` after some of its bytes: its frame failed its
    FCS) changes no state and sends nothing, also after the engine has worked out what it
    would do with it; the intact copy then applies as usual."""
    P = 3
    dut = new_engine(domains=2, ports=P)
    seen = {p: [] for p in range(P)}

    async def bench(ctx):
        for p in range(P):
            ctx.set(dut.link_up[p], 1)
        root = kind == "root_report"
        roles = [(Op.ROLE, 1, Role.CHILD), (Op.ROLE, 2, Role.CHILD)]
        if not root:
            roles.insert(0, (Op.ROLE, 0, Role.PARENT))
        for op, index, value in (*roles, (Op.ENABLE, 0, 9), (Op.ONLINE, 0, 1)):
            assert (await command(ctx, dut, op, index, value))[0] == OK
        # both children report 3 (the node's REPORT: 3; at the root, COMMITTED 3)
        for p in (1, 2):
            await send_bytes(ctx, dut, p, encode(Message.report(3, 0, 1)))
        await quiesce_single(ctx, dut)
        if not root:
            await send_bytes(ctx, dut, 0, encode(Message.commit(2, 1)))
            await quiesce_single(ctx, dut)

        def state():
            st = dut.status
            return (ctx.get(st.report), ctx.get(st.report_valid), ctx.get(st.committed),
                    ctx.get(st.version_report), ctx.get(st.version_converged),
                    [(ctx.get(st.port[p].heard), ctx.get(st.port[p].child_report),
                      ctx.get(st.port[p].child_version)) for p in range(P)])
        before = state()
        counts = {p: len(seen[p]) for p in range(P)}
        if kind == "commit":
            msg, port = encode(Message.commit(7, 2)), 0
        else:
            msg, port = encode(Message.report(8, 6, 2)), 1
        # every byte but the last, a pause (the FCS is being checked), then the drop
        await send_transfers(ctx, dut, port, [(b, 0, 0) for b in msg[:-1]])
        for _ in range(12):
            await ctx.tick()
        await send_transfers(ctx, dut, port, [(0, 1, 1)])
        await quiesce_single(ctx, dut)
        assert state() == before
        assert {p: len(seen[p]) for p in range(P)} == counts, "a withdrawn message sent something"
        assert ctx.get(dut.status.malformed) == 0
        # a lone drop (nothing of its message was taken) is ignored
        await send_transfers(ctx, dut, port, [(0, 1, 1)])
        await quiesce_single(ctx, dut)
        assert state() == before and ctx.get(dut.status.malformed) == 0
        # the intact copy applies
        await send_bytes(ctx, dut, port, msg)
        await quiesce_single(ctx, dut)
        after = state()
        if kind == "commit":
            assert after[2] == 7 and after[4] == 2
        else:
            assert after[5][1][1] == 8 and after[2] == 6, after
            if root:
                assert after[2] == 6          # min(LOCAL 9, 8, 3) = 3 < the certificate 6

    run(dut, bench, *(collector(dut, p, seen[p]) for p in range(P)))
