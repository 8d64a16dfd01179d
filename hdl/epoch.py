"""The epoch engine: per-node epoch registers and Conv(P,e) over a tree of links.

Each node keeps, per persistence domain, the epoch its host has made durable (PERSISTED) and
an enable bit; LOCAL is the lattice meet (minimum) over the enabled domains. Over a tree of
links, set up by the host through port roles, every node reports the meet of its subtree to
its parent; the root turns the meet of the whole tree into COMMITTED and every node passes
COMMITTED down to its children. Reports combine as a min and COMMITTED spreads as a max, both
monotone, so lost, repeated or stale messages are harmless. The message format and the
command/role/status encodings live in :mod:`epochlink.hdl.epoch_format`; the pure-Python
reference model is :mod:`epochlink.sim.epoch_model`.

Why it is safe (fixed tree, hosts restoring as described in :class:`EpochEngine`): every REPORT
a node sends is at most the durable epoch of every enabled domain in its subtree, because LOCAL
is a min over its domains, a child's stored report was such a bound when it was sent, durable
epochs only rise, and ENABLE refuses to bring in a domain below what the node has already
reported or learned as committed (its floor). The root's COMMITTED is a REPORT of the whole
tree, so it is a bound for every domain of every node; a COMMITTED copied from a neighbour is
one the root issued earlier, hence still a bound (a certificate). Nothing is ever lowered.
"""
from amaranth import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .common import message_signature, event_layout, count_events, refuse
from .link import ctrl_out_signature
from .epoch_format import (CMD_VALUE_BITS, COMMITTED_CODE_SHIFT, EPOCH_CODE_SHIFT, FLAG_SOLICIT,
                           MSG_LEN, RESERVED_BIT, TYPE_MASK, VERSION_BITS, CmdStatus,
                           MsgType, Op, Role)

__all__ = ["EpochCommand", "EpochResponse", "EpochPortStatusSignature", "EpochStatusSignature",
           "EpochEngine"]


class EpochCommand(data.Struct):
    """A host command (:class:`~epochlink.hdl.epoch_format.Op`) on a domain or a port."""
    op: 3
    index: 8
    value: CMD_VALUE_BITS


class EpochResponse(data.Struct):
    """The answer to one :class:`EpochCommand`.

    For PERSIST, ENABLE and READ, ``value`` is the domain's PERSISTED after the command and
    ``enabled`` its enable bit (0 and 0 while the domain is disabled or absent); for the other
    commands both are 0 (their state is on ``status``).
    """
    status: 3      #: :class:`~epochlink.hdl.epoch_format.CmdStatus`
    enabled: 1
    value: CMD_VALUE_BITS


class EpochPortStatusSignature(wiring.Signature):
    """Status of one link port of an epoch engine."""
    def __init__(self, epoch_width=32):
        super().__init__({
            "role": Out(2),                     #: :class:`~epochlink.hdl.epoch_format.Role`
            "heard": Out(1),                    #: CHILD: has reported; PARENT: sent a COMMIT
            "child_report": Out(epoch_width),   #: highest REPORT received (valid if heard)
            "child_version": Out(VERSION_BITS),  #: version in the latest REPORT
        })


#: The epoch engine's counters, as event strobes.
EPOCH_EVENTS = event_layout(("refused", "malformed", "misrouted"))


class EpochStatusSignature(wiring.Signature):
    """Status of an epoch engine, ready for a register bank.

    ``events`` (:data:`EPOCH_EVENTS`) strobes in the cycle a counter moves; with
    ``counter_width`` 0 only the strobes are built.
    """
    def __init__(self, domains=8, ports=2, epoch_width=32, counter_width=32):
        W = epoch_width
        super().__init__({
            "online": Out(1),
            "enabled": Out(domains),
            "local": Out(W),
            "local_valid": Out(1),          #: 0: no enabled domain ("none")
            "report": Out(W),
            "report_valid": Out(1),         #: LOCAL valid and every CHILD port has reported
            "report_sent": Out(W),          #: last REPORT sent to the parent (0: none yet)
            "committed": Out(W),
            "active": Out(VERSION_BITS),
            "version_report": Out(VERSION_BITS),     #: min ACTIVE of the subtree
            "version_converged": Out(VERSION_BITS),  #: cluster min ACTIVE (0: not known yet)
            "refused": Out(counter_width),
            "malformed": Out(counter_width),
            "misrouted": Out(counter_width),
            "events": Out(EPOCH_EVENTS),
            "port": Out(EpochPortStatusSignature(W)).array(ports),
        })


def _port_signals(name, count, shape, **kwargs):
    return Array(Signal(shape, name=f"{name}{i}", **kwargs) for i in range(count))


class EpochEngine(wiring.Component):
    """Epoch registers of one node and the report/commit protocol on its link ports.

    Parameters
    ----------
    domains : int
        Persistence domains D (1..256).
    ports : int
        Link ports P (1..16).
    epoch_width : int
        Width of epochs (1..32). Messages always carry 32-bit fields; a received epoch that
        does not fit is malformed, a command value that does not fit is ILLEGAL.
    counter_width : int
        Width of the ``refused``, ``malformed`` and ``misrouted`` counters (wrapping).
    cut_through : bool
        True (default): a child's REPORT is worked out while its bytes arrive and, like the
        parent's COMMIT, applied in the cycle of its last byte, with the ports loading their
        next messages in that same cycle. That saves about P + 4 cycles per hop, which
        matters on byte-wide links, but puts the link's frame verdict, the apply and the
        next message's load in one combinational path. False: every message is applied one
        cycle after its last byte (state RX) and REPORT rescanned as after a command; a
        shorter critical path and less logic, for links whose frame time dwarfs the saving
        (a serial PHY: a 10-byte message takes 110 bit times). Same protocol either way.

    Attributes
    ----------
    cmd : In(stream.Signature(EpochCommand))
        Host commands, one at a time; each gets exactly one response on ``rsp``. Semantics
        (statuses from :class:`~epochlink.hdl.epoch_format.CmdStatus`; any status but OK
        changes nothing and increments ``status.refused``):

        * ``PERSIST d e``: BAD_INDEX if d >= D, DISABLED if d is disabled, LOWER if
          e < PERSISTED[d], else PERSISTED[d] := e (equal: OK, no change).
        * ``ENABLE d e``: LOWER if d is enabled and e < PERSISTED[d], or if e < the node's
          floor = max(COMMITTED, last REPORT sent); else PERSISTED[d] := e, enabled.
        * ``DISABLE d``, ``READ d``: BAD_INDEX if d >= D; else OK.
        * ``ROLE p r``: BAD_INDEX if p >= P; ILLEGAL if r is not a
          :class:`~epochlink.hdl.epoch_format.Role` or r = PARENT while another port is
          PARENT; else the port forgets what it heard and (if not OFF) sends its state.
        * ``ACTIVE v``: ILLEGAL unless 1 <= v <= 255. ``ONLINE b``: ILLEGAL unless b <= 1.
        * other ops: ILLEGAL.
    rsp : Out(stream.Signature(EpochResponse))
        The command stays on ``cmd`` (``ready`` low) until its response is taken: a command
        is complete when ``rsp.valid & rsp.ready``. The engine does nothing else meanwhile,
        so ``rsp`` must be taken promptly. LOCAL and REPORT on ``status`` follow a command
        once the engine has rescanned (about D + P + 4 cycles after the last command).
    rsp : Out(stream.Signature(EpochResponse))
    ctrl_in : array of P :func:`~epochlink.hdl.link.ctrl_out_signature` streams
        From the link engine of each port (its ``ctrl_out``). Received messages are taken one
        at a time; a message is applied only at its last byte (the link offers it once the
        frame has passed its checks), and a ``drop`` transfer withdraws the bytes taken so far:
        nothing of such a message is applied. The engine waits in a message while its source
        pauses (a link engine only pauses inside a frame that is still arriving).
    ctrl_out : array of P :func:`~epochlink.hdl.common.message_signature` streams
        To the link engine of each port (its ``ctrl_in``).
    ctrl_out_len : array of P outputs
        The length of the message on ``ctrl_out[p]`` (for the link's cut-through); while no
        message is offered, nonzero announces one being worked out for that port (the link
        then keeps its serializer free for it).
    link_up : array of P inputs
        1 while the port's link is UP. Messages start only while it is 1; a rising edge
        resends the port's state; a message that stops arriving while it is 0 is dropped.
    status : Out(EpochStatusSignature)

    Protocol
    --------
    LOCAL is "none" (``local_valid`` = 0) while no domain is enabled; then the node's REPORT is
    invalid, it sends no REPORT and its parent (or, at the root, the commit) waits: a node
    without enabled domains blocks the cluster rather than letting COMMITTED pass anything.
    REPORT = min(LOCAL, highest REPORT received on each CHILD port), version_report =
    min(ACTIVE, latest version of each CHILD port); REPORT is valid once LOCAL is valid and
    every CHILD port has reported since this node's reset or the port's last ROLE write.

    * An ``online`` node with a PARENT port sends REPORT there when it changes (in a fixed
      tree it only rises), when the link comes up and when the parent solicits it.
    * An ``online`` node without a PARENT port is the root: COMMITTED := max(COMMITTED,
      REPORT) and version_converged := version_report whenever REPORT is valid.
    * Every node adopts COMMITTED := max(COMMITTED, c) for the COMMITTED field c of every
      accepted message (a certificate), takes version_converged from its parent's COMMIT,
      and sends COMMIT to its CHILD ports when either changes, on link-up and on solicit.
    * A message carries SOLICIT while its port has not heard from the neighbour; the
      neighbour answers with its state. So roles set after a link came up still converge.

    Out of reset a node is offline with every port OFF. Its host restores it: ENABLE every
    domain at its durable epoch, ROLE every port, ACTIVE, then ONLINE, so a half-restored node
    never reports or commits. Safety rests on two host duties the engine cannot check across a
    reset: a domain enabled after a reset was enabled before (or comes in at an epoch no
    lower than anything the node reported), and roles describe a fixed tree (a subtree that
    joins an existing tree must not hold a domain below the cluster's COMMITTED). Turning the
    PARENT port OFF makes the node the root of its own subtree.
    """

    def __init__(self, *, domains=8, ports=2, epoch_width=32, counter_width=32, cut_through=True):
        if not 1 <= domains <= 256:
            refuse(self, f"domains must be 1..256, not {domains}")
        if not 1 <= ports <= 16:
            refuse(self, f"ports must be 1..16, not {ports}")
        if not 1 <= epoch_width <= 32:
            refuse(self, f"epoch_width must be 1..32, not {epoch_width}")
        self.domains = domains
        self.ports = ports
        self.epoch_width = epoch_width
        self.counter_width = counter_width
        self.cut_through = bool(cut_through)
        super().__init__({
            "cmd": In(stream.Signature(EpochCommand)),
            "rsp": Out(stream.Signature(EpochResponse)),
            "ctrl_in": In(ctrl_out_signature()).array(ports),
            "ctrl_out": Out(message_signature()).array(ports),
            "ctrl_out_len": Out(8).array(ports),
            "link_up": In(1).array(ports),
            "status": Out(EpochStatusSignature(domains, ports, epoch_width, counter_width)),
        })

    def elaborate(self, platform):
        m = Module()
        D, P, W = self.domains, self.ports, self.epoch_width
        V = VERSION_BITS

        # PERSISTED lives in a memory; LOCAL is kept up to date by a sequential scan.
        m.submodules.persisted = mem = Memory(shape=W, depth=D, init=[])
        wr = mem.write_port()
        rd = mem.read_port()

        # ---- node state ----------------------------------------------------------------
        online = Signal()
        enabled = Signal(D)
        local = Signal(W)
        local_valid = Signal()
        report = Signal(W)
        report_valid = Signal()
        sent = Signal(W)            # last REPORT sent (REPORT never falls below it)
        committed = Signal(W)
        active = Signal(V, init=1)
        ver_report = Signal(V)
        ver_conv = Signal(V)
        role = _port_signals("role", P, 2)
        heard = Signal(P)
        child_rep = _port_signals("child_rep", P, W)
        child_ver = _port_signals("child_ver", P, V)
        events = self.status.events
        count_events(m, events, self.status, self.counter_width)

        need_local = Signal()       # LOCAL must be rescanned
        need_report = Signal()      # REPORT must be recomputed (always after LOCAL)
        pend_set = Signal(P)        # comb: ports that must send their state
        pend_kids = Signal()        # comb: every CHILD port must (COMMITTED changed)
        pend_up = Signal()          # comb: the PARENT port must (REPORT changed)
        pend_clr = Signal(P)        # comb: ports that must not (role set to OFF)
        hold = Signal()             # comb: an ENABLE is checking the floor: no REPORT starts

        is_parent = Cat(r == Role.PARENT for r in role)
        is_child = Cat(r == Role.CHILD for r in role)
        has_parent = is_parent.any()
        up = Cat(self.link_up)
        up_prev = Signal(P)
        m.d.sync += up_prev.eq(up)

        # ---- the central sequencer -----------------------------------------------------
        # Commands, received messages and the two scans take turns. Each operand pair has a
        # comparator of its own (``lt = a < b``; where ties do not matter, ``~lt`` serves as
        # ``b <= a``): one comparator shared behind operand multiplexers was the longest path
        # of the ECP5 build (state, multiplexers, carry chain, state).

        # A command stays on ``cmd`` (ready low) until its response is taken.
        c = self.cmd.payload
        r_status = Signal(3)
        c_en_now = (enabled >> c.index)[0]

        def checked(name, value):
            """A check of the command, registered: the command is held on ``cmd`` from IDLE
            into CMD, and only a command changes what the checks read besides it."""
            reg = Signal(name=f"cmd_{name}")
            m.d.sync += reg.eq(value)
            return reg
        dom_ok = checked("dom_ok", c.index < D)
        port_ok = checked("port_ok", c.index < P)
        c_en = checked("enabled", c_en_now)
        c_fits = checked("fits", (c.value >> W) == 0 if W < CMD_VALUE_BITS else Const(1))
        c_small = checked("small", c.value[2:] == 0)        # 0..3
        c_version_ok = checked("version_ok", (c.value != 0) & (c.value[V:] == 0))
        other_parent = checked("other_parent", (is_parent & ~(Const(1, P) << c.index)[:P]).any())

        # ``idx``: the port whose message is received, or the scan position.
        idx = Signal(range(max(D, P)))
        primed = Signal()           # LSCAN, RSCAN: the first operand has been read
        idx_rep = Array(child_rep)[idx]
        idx_ver = Array(child_ver)[idx]
        idx_role = Array(role)[idx]
        # RSCAN's operands, read a cycle ahead into registers: the port index selecting a
        # child's report, the 32-bit comparison and the accumulator in one cycle were the
        # longest path of the 4-port ECP5 build. (Roles, reports and ``heard`` change only in
        # CMD, RECV and RX, never during a scan.)
        scan_child, scan_reported, scan_last = Signal(), Signal(), Signal()
        scan_rep, scan_ver = Signal(W), Signal(V)
        m.d.sync += [scan_child.eq(is_child.bit_select(idx, 1)), scan_reported.eq(heard.bit_select(idx, 1)),
                     scan_rep.eq(idx_rep), scan_ver.eq(idx_ver), scan_last.eq(idx == P - 1)]

        # The message being received, fields in arrival order.
        rx_cnt = Signal(range(MSG_LEN + 1))
        rx_bad = Signal()
        rx_report = Signal()
        rx_solicit = Signal()
        rx_elen = Signal(3)         # bytes of the EPOCH field (0, 1, 2, 4)
        rx_clen = Signal(3)         # bytes of the COMMITTED field
        rx_fields_end = Signal(4)   # rx_elen + rx_clen: the VERSION byte comes after it
        rx_at_ver = Signal()        # rx_cnt is where the VERSION byte belongs (kept a byte ahead)
        m_epoch = Signal(32)
        m_com = Signal(32)
        m_ver = Signal(8)
        rx_valid = Cat(s.valid for s in self.ctrl_in)
        rx_last = Cat(s.payload.last for s in self.ctrl_in).bit_select(idx, 1)
        rx_drop = Cat(s.payload.drop for s in self.ctrl_in).bit_select(idx, 1)
        byte = Array(s.payload.data for s in self.ctrl_in)[idx]

        def field_bytes(code):
            return Mux(code == 3, 4, code)

        def type_ok(kind_byte):
            t = kind_byte & TYPE_MASK
            return ((t == MsgType.REPORT) | (t == MsgType.COMMIT)) & ~(kind_byte & RESERVED_BIT).any()

        m_above = Signal()          # COMMITTED < the message's COMMITTED field, a cycle old
        m.d.sync += m_above.eq(committed < m_com)
        m_below = Signal()          # the message's EPOCH field < port idx's report, a cycle old
        m.d.sync += m_below.eq(m_epoch < idx_rep)
        acc = Signal(W)
        acc_ok = Signal()
        vacc = Signal(V)

        def respond(status):
            m.d.sync += r_status.eq(status)
            if status is not CmdStatus.OK:
                m.d.comb += events.refused.eq(1)
            m.next = "RESP"

        def scan_step(child, reported, rep, ver):
            """One step of the REPORT scan: fold a CHILD port's report ``rep`` into ``acc``
            (min) and its version ``ver`` into ``vacc``; a CHILD that has not reported yet
            (``~reported``) makes the scan invalid (``acc_ok``)."""
            lt = acc < rep
            with m.If(child):
                with m.If(~reported):
                    m.d.sync += acc_ok.eq(0)
                with m.Else():
                    with m.If(~lt):
                        m.d.sync += acc.eq(rep)
                    with m.If(ver < vacc):
                        m.d.sync += vacc.eq(ver)

        def adopt(reg, next_value, value, when):
            """In the cycle a fast-path message is applied: take ``value`` into ``reg`` if
            ``when``, show it on ``next_value`` (the ports load from it in this same cycle)
            and have the CHILD ports told."""
            with m.If(when):
                m.d.sync += reg.eq(value)
                m.d.comb += [pend_kids.eq(1), next_value.eq(value)]

        def for_port(index, *, domains=False):
            """Decode ``index`` for per-port (per-domain) assignments."""
            for i in range(D if domains else P):
                with m.If(index == i):
                    yield i

        m.d.comb += [wr.addr.eq(c.index), wr.data.eq(c.value), rd.addr.eq(c.index)]

        # A child's REPORT is taken fast: while its bytes arrive (its link streams them before
        # the frame's FCS is checked and offers the last byte only once the frame is accepted)
        # the engine works out, in scratch registers only, what the REPORT becomes with it:
        # ``pre`` steps through a scan of LOCAL and the other CHILD ports, the merge of the new
        # report, the floor (last REPORT sent) and, at the root, the comparisons for COMMITTED.
        # Nothing is applied before the last byte; at the last byte everything is applied in
        # one cycle. A withdrawn message (``drop``) leaves nothing behind.
        PRE_SCAN, PRE_MERGE, PRE_FOLD, PRE_FLOOR, PRE_ROOT, PRE_CERT, PRE_DONE = range(7)
        pre = Signal(range(7))
        fast = Signal()             # the message in RECV is a child's REPORT taken fast
        sidx = Signal(range(P))     # pre-scan position
        s_merged = Signal(W)        # the port's report with this message merged (a max)
        s_report = Signal(W)        # the new REPORT (never below the last one sent)
        r_ge = Signal()             # REPORT (before the floor) >= COMMITTED
        a_ge_m = Signal()           # REPORT (before the floor) >= the message's COMMITTED
        sidx_rep = Array(child_rep)[sidx]
        sidx_ver = Array(child_ver)[sidx]
        # In the cycle a message is applied (``now``) the ports load their messages with the
        # state it produces (``n_*``: the registers' next values), not a cycle later.
        now = Signal()
        n_report, n_committed = Signal(W), Signal(W)
        n_report_valid = Signal()
        n_ver_report, n_ver_conv = Signal(V), Signal(V)
        n_heard = Signal(P)
        m.d.comb += [n_report.eq(report), n_committed.eq(committed), n_report_valid.eq(report_valid),
                     n_ver_report.eq(ver_report), n_ver_conv.eq(ver_conv), n_heard.eq(heard)]

        with m.FSM() as fsm:
            with m.State("IDLE"):
                # Scans before messages: a REPORT goes out before the next message is taken.
                with m.If(self.cmd.valid):
                    m.next = "CMD_READ"
                with m.Elif(need_local):
                    m.d.sync += [need_local.eq(0), idx.eq(0), acc_ok.eq(0), primed.eq(0)]
                    m.next = "LSCAN"
                with m.Elif(need_report):
                    m.d.sync += [
                        need_report.eq(0), idx.eq(0), primed.eq(0),
                        acc.eq(local), acc_ok.eq(local_valid), vacc.eq(active),
                    ]
                    m.next = "RSCAN"
                with m.Elif(rx_valid.any()):
                    # Take the first byte of the lowest port's message right away.
                    first = Signal(range(P), name="rx_first")
                    for p in reversed(range(P)):   # lowest port first
                        with m.If(rx_valid[p]):
                            m.d.comb += first.eq(p)
                    first_byte = Array(s.payload.data for s in self.ctrl_in)[first]
                    elen = field_bytes(first_byte[EPOCH_CODE_SHIFT:EPOCH_CODE_SHIFT + 2])
                    clen = field_bytes(first_byte[COMMITTED_CODE_SHIFT:COMMITTED_CODE_SHIFT + 2])
                    for p in range(P):
                        m.d.comb += self.ctrl_in[p].ready.eq(first == p)
                    m.d.sync += [
                        idx.eq(first), rx_cnt.eq(1),
                        rx_bad.eq(~type_ok(first_byte)),
                        rx_report.eq((first_byte & TYPE_MASK) == MsgType.REPORT),
                        rx_elen.eq(elen), rx_clen.eq(clen),
                        rx_fields_end.eq(elen + clen), rx_at_ver.eq((elen == 0) & (clen == 0)),
                        m_epoch.eq(0), m_com.eq(0),
                        rx_solicit.eq(first_byte[7]),
                        # a child's REPORT (LOCAL up to date): pre-compute the new REPORT
                        fast.eq(((first_byte & TYPE_MASK) == MsgType.REPORT) &
                                (Array(role)[first] == Role.CHILD) & ~need_local &
                                self.cut_through),
                        pre.eq(PRE_SCAN), sidx.eq(0),
                        acc.eq(local), acc_ok.eq(local_valid), vacc.eq(active),
                    ]
                    with m.If(Cat(s.payload.drop for s in self.ctrl_in).bit_select(first, 1)):
                        pass    # a message withdrawn by its link (none of it was taken here)
                    with m.Elif(Cat(s.payload.last for s in self.ctrl_in).bit_select(first, 1)):
                        m.d.comb += events.malformed.eq(1)   # a 1-byte message
                    with m.Else():
                        m.next = "RECV"

            # -- host commands (the memory returns PERSISTED[index] from here on) ----------
            # (CMD_READ compares the value with it: CMD decides from registers only)
            c_lower = Signal()          # c.value < PERSISTED[index]
            with m.State("CMD_READ"):
                m.d.sync += c_lower.eq(c.value < rd.data)
                m.next = "CMD"
            with m.State("CMD"):
                lt = c_lower
                with m.Switch(c.op):
                    with m.Case(Op.PERSIST):
                        with m.If(~dom_ok):
                            respond(CmdStatus.BAD_INDEX)
                        with m.Elif(~c_en):
                            respond(CmdStatus.DISABLED)
                        with m.Elif(~c_fits):
                            respond(CmdStatus.ILLEGAL)
                        with m.Elif(lt):
                            respond(CmdStatus.LOWER)
                        with m.Else():
                            m.d.comb += wr.en.eq(1)
                            m.d.sync += need_local.eq(1)
                            m.next = "WRITTEN"
                    with m.Case(Op.ENABLE):
                        with m.If(~dom_ok):
                            respond(CmdStatus.BAD_INDEX)
                        with m.Elif(~c_fits):
                            respond(CmdStatus.ILLEGAL)
                        with m.Elif(c_en & lt):
                            respond(CmdStatus.LOWER)
                        with m.Else():
                            m.next = "FLOOR"
                    with m.Case(Op.DISABLE):
                        with m.If(~dom_ok):
                            respond(CmdStatus.BAD_INDEX)
                        with m.Else():
                            for d in for_port(c.index, domains=True):
                                m.d.sync += enabled[d].eq(0)
                            m.d.sync += need_local.eq(1)
                            respond(CmdStatus.OK)
                    with m.Case(Op.READ):
                        with m.If(~dom_ok):
                            respond(CmdStatus.BAD_INDEX)
                        with m.Else():
                            respond(CmdStatus.OK)
                    with m.Case(Op.ROLE):
                        with m.If(~port_ok):
                            respond(CmdStatus.BAD_INDEX)
                        with m.Elif(~c_small | (c.value[:2] > max(Role)) |
                                    ((c.value[:2] == Role.PARENT) & other_parent)):
                            respond(CmdStatus.ILLEGAL)
                        with m.Else():
                            for p in for_port(c.index):
                                m.d.sync += [role[p].eq(c.value), heard[p].eq(0)]
                                with m.If(c.value[:2] == Role.OFF):
                                    m.d.comb += pend_clr[p].eq(1)
                                with m.Else():
                                    m.d.comb += pend_set[p].eq(1)
                            m.d.sync += need_report.eq(1)
                            respond(CmdStatus.OK)
                    with m.Case(Op.ACTIVE):
                        with m.If(~c_version_ok):
                            respond(CmdStatus.ILLEGAL)
                        with m.Else():
                            m.d.sync += [active.eq(c.value), need_report.eq(1)]
                            respond(CmdStatus.OK)
                    with m.Case(Op.ONLINE):
                        with m.If(~c_small | c.value[1]):
                            respond(CmdStatus.ILLEGAL)
                        with m.Else():
                            # report_valid := 0 makes the next REPORT count as changed: sent
                            m.d.sync += [online.eq(c.value[0]), report_valid.eq(0),
                                         need_report.eq(1)]
                            respond(CmdStatus.OK)
                    with m.Default():
                        respond(CmdStatus.ILLEGAL)

            # ENABLE: a domain must not come in below anything this node has vouched for.
            with m.State("FLOOR"):
                m.d.comb += hold.eq(1)
                lt = c.value < committed
                with m.If(lt):
                    respond(CmdStatus.LOWER)
                with m.Else():
                    m.next = "FLOOR_SENT"
            with m.State("FLOOR_SENT"):
                m.d.comb += hold.eq(1)
                lt = c.value < sent
                with m.If(lt):
                    respond(CmdStatus.LOWER)
                with m.Else():
                    # The stored REPORT may now be above the new domain: invalid until the
                    # rescan (LOCAL is only used after the rescan, which comes first).
                    m.d.comb += wr.en.eq(1)
                    m.d.sync += [report_valid.eq(0), need_local.eq(1)]
                    for d in for_port(c.index, domains=True):
                        m.d.sync += enabled[d].eq(1)
                    m.next = "WRITTEN"
            with m.State("WRITTEN"):
                # one cycle for the memory to read back the new PERSISTED
                respond(CmdStatus.OK)

            with m.State("RESP"):
                domain_op = (c.op == Op.PERSIST) | (c.op == Op.ENABLE) | (c.op == Op.READ)
                m.d.comb += [
                    self.rsp.valid.eq(1),
                    self.rsp.payload.status.eq(r_status),
                    self.rsp.payload.enabled.eq(domain_op & c_en_now),
                    self.rsp.payload.value.eq(Mux(domain_op & c_en_now, rd.data, 0)),
                ]
                with m.If(self.rsp.ready):
                    m.d.comb += self.cmd.ready.eq(1)
                    m.next = "IDLE"

            # -- receive one message from port ``idx`` -----------------------------------
            with m.State("RECV"):
                # (the last byte of a child's REPORT waits until the pre-computation is done)
                # (only a last byte where the VERSION belongs: every field is in by then)
                last_wait = fast & rx_last & ~rx_drop & rx_at_ver & (pre != PRE_DONE)
                for p in range(P):
                    m.d.comb += self.ctrl_in[p].ready.eq((idx == p) & ~last_wait)
                # no REPORT load until it is applied: the floor must not move meanwhile
                m.d.comb += hold.eq(fast & ~now)
                with m.If(fast):            # (never set without cut-through)
                    with m.Switch(pre):
                        with m.Case(PRE_SCAN):
                            # REPORT of LOCAL and the other CHILD ports (as RSCAN)
                            scan_step(is_child.bit_select(sidx, 1) & (sidx != idx),
                                      heard.bit_select(sidx, 1), sidx_rep, sidx_ver)
                            m.d.sync += sidx.eq(sidx + 1)
                            with m.If(sidx == P - 1):
                                m.d.sync += pre.eq(PRE_MERGE)
                        with m.Case(PRE_MERGE):
                            # (once the EPOCH field is in) max-merge with the port's report
                            lt = m_epoch < idx_rep
                            with m.If(rx_cnt > rx_elen):
                                m.d.sync += [s_merged.eq(Mux(~heard.bit_select(idx, 1) | ~lt, m_epoch, idx_rep)),
                                             pre.eq(PRE_FOLD)]
                        with m.Case(PRE_FOLD):
                            lt = acc < s_merged
                            with m.If(~lt):
                                m.d.sync += acc.eq(s_merged)
                            m.d.sync += pre.eq(PRE_FLOOR)
                        with m.Case(PRE_FLOOR):
                            # never below a REPORT already sent (as RDONE)
                            lt = acc < sent
                            m.d.sync += [s_report.eq(Mux(lt, sent, acc)),
                                         pre.eq(Mux(has_parent, PRE_DONE, PRE_ROOT))]
                        with m.Case(PRE_ROOT):
                            lt = acc < committed
                            m.d.sync += [r_ge.eq(~lt), pre.eq(PRE_CERT)]
                        with m.Case(PRE_CERT):
                            # (once the COMMITTED field is in)
                            lt = acc < m_com
                            with m.If(rx_cnt > rx_fields_end):
                                m.d.sync += [a_ge_m.eq(~lt), pre.eq(PRE_DONE)]
                with m.If(rx_valid.bit_select(idx, 1) & rx_drop):
                    # its frame failed: the link withdraws it (nothing of it was applied)
                    m.next = "IDLE"
                with m.Elif(rx_valid.bit_select(idx, 1) & ~last_wait):
                    # (the TYPE byte was taken in IDLE: rx_cnt >= 1 here)
                    for k in range(4):
                        with m.If((rx_cnt == k + 1) & (k < rx_elen)):
                            m.d.sync += m_epoch[8 * k:8 * k + 8].eq(byte)
                        with m.If((rx_cnt == rx_elen + k + 1) & (k < rx_clen)):
                            m.d.sync += m_com[8 * k:8 * k + 8].eq(byte)
                    with m.If(rx_at_ver):
                        m.d.sync += m_ver.eq(byte)
                    with m.If(rx_cnt != MSG_LEN):
                        m.d.sync += rx_cnt.eq(rx_cnt + 1)
                    # (rx_fields_end < MSG_LEN - 1: a saturated count is never there)
                    m.d.sync += rx_at_ver.eq(rx_cnt == rx_fields_end)
                    with m.If(rx_last):
                        fits = ((m_epoch | m_com) >> W) == 0 if W < 32 else Const(1)
                        # a neighbour's COMMITTED is a certificate
                        m_gt = ~(m_com < committed) & (m_com != committed)
                        with m.If(~rx_at_ver | rx_bad):
                            m.d.comb += events.malformed.eq(1)
                            m.next = "IDLE"
                        with m.Elif(fast & fits):
                            # -- a child's REPORT: apply it and the new REPORT at once --
                            vnew = Mux(byte < vacc, byte, vacc)
                            for p in for_port(idx):
                                m.d.sync += [child_rep[p].eq(s_merged), heard[p].eq(1), child_ver[p].eq(byte)]
                                m.d.comb += n_heard[p].eq(1)
                            changed = ~report_valid | (s_report != report) | (vnew != ver_report)
                            with m.If(online & acc_ok & changed):
                                m.d.comb += pend_up.eq(1)
                            m.d.comb += [now.eq(1), n_report.eq(s_report), n_report_valid.eq(acc_ok),
                                         n_ver_report.eq(vnew)]
                            m.d.sync += [report.eq(s_report), report_valid.eq(acc_ok), ver_report.eq(vnew),
                                         need_report.eq(0)]
                            # COMMITTED := max(COMMITTED, the certificate, and at the root REPORT)
                            root = online & acc_ok & ~has_parent
                            take_acc = root & Mux(m_gt, a_ge_m, r_ge)
                            new_com = Mux(take_acc, acc, Mux(m_gt, m_com, committed))
                            adopt(committed, n_committed, new_com, new_com != committed)
                            adopt(ver_conv, n_ver_conv, vnew, root & (ver_conv != vnew))
                            with m.If(rx_solicit):
                                for p in for_port(idx):
                                    m.d.comb += pend_set[p].eq(1)
                            m.next = "IDLE"
                        with m.Elif(fits & (idx_role == Role.PARENT) & ~rx_report &
                                    self.cut_through):
                            # -- the parent's COMMIT: applied at once (as RX does) --
                            for p in for_port(idx):
                                m.d.sync += heard[p].eq(1)
                                m.d.comb += n_heard[p].eq(1)
                            m.d.comb += now.eq(1)
                            adopt(ver_conv, n_ver_conv, byte, byte != ver_conv)
                            adopt(committed, n_committed, m_com, m_gt)
                            with m.If(rx_solicit):
                                for p in for_port(idx):
                                    m.d.comb += pend_set[p].eq(1)
                            m.next = "IDLE"
                        with m.Else():
                            m.next = "RX"
                with m.Elif(~rx_valid.bit_select(idx, 1) & ~up.bit_select(idx, 1)):
                    # The rest of the message went with the link (a link engine withdraws it
                    # with a drop): don't wait forever on anything else.
                    m.next = "IDLE"
            with m.State("RX"):
                # (`m_above` and `m_below` are a cycle old: they compared the complete message
                # with COMMITTED and the port's report as the message's last byte came, and
                # only RX writes those after that)
                # max-merge: a repeated or stale REPORT changes nothing
                fits = ((m_epoch | m_com) >> W) == 0 if W < 32 else Const(1)
                from_child = (idx_role == Role.CHILD) & rx_report
                from_parent = (idx_role == Role.PARENT) & ~rx_report
                m.next = "IDLE"
                with m.If(~fits):
                    m.d.comb += events.malformed.eq(1)
                with m.Elif(from_child):
                    for p in for_port(idx):
                        with m.If(~heard[p] | ~m_below):
                            m.d.sync += child_rep[p].eq(m_epoch)
                        m.d.sync += [heard[p].eq(1), child_ver[p].eq(m_ver)]
                    m.d.sync += need_report.eq(1)
                with m.Elif(from_parent):
                    for p in for_port(idx):
                        m.d.sync += heard[p].eq(1)
                    with m.If(m_ver != ver_conv):
                        m.d.sync += ver_conv.eq(m_ver)
                        m.d.comb += pend_kids.eq(1)
                with m.Else():
                    m.d.comb += events.misrouted.eq(1)
                with m.If(fits & (from_child | from_parent)):
                    # a neighbour's COMMITTED is a certificate: adopt it
                    with m.If(m_above):
                        m.d.sync += committed.eq(m_com)
                        m.d.comb += pend_kids.eq(1)
                    with m.If(rx_solicit):
                        # answer with the state this message has just updated
                        for p in for_port(idx):
                            m.d.comb += pend_set[p].eq(1)
                with m.If(fits & from_child & ~self.cmd.valid):
                    # a child's REPORT: recompute REPORT at once (what IDLE would do next;
                    # LOCAL is rescanned first if it is due)
                    m.d.sync += [idx.eq(0), acc_ok.eq(0), primed.eq(0)]
                    with m.If(need_local):
                        m.d.sync += need_local.eq(0)
                        m.next = "LSCAN"
                    with m.Else():
                        m.d.sync += [need_report.eq(0), acc.eq(local), acc_ok.eq(local_valid),
                                     vacc.eq(active)]
                        m.next = "RSCAN"

            # -- LOCAL = min over enabled domains (memory read one cycle ahead) ------------
            # (its first cycle reads domain 0: the read address comes from registers, never
            # from the decision to start the scan)
            with m.State("LSCAN"):
                with m.If(~primed):
                    m.d.comb += rd.addr.eq(0)
                    m.d.sync += primed.eq(1)
                with m.Else():
                    take = Signal()
                    lt = acc < rd.data
                    m.d.comb += [
                        take.eq((enabled >> idx)[0] & (~acc_ok | ~lt)),
                        rd.addr.eq(idx + 1),
                    ]
                    with m.If(take):
                        m.d.sync += [acc.eq(rd.data), acc_ok.eq(1)]
                    m.d.sync += idx.eq(idx + 1)
                    with m.If(idx == D - 1):
                        m.d.sync += [
                            local.eq(Mux(take, rd.data, acc)),
                            local_valid.eq(take | acc_ok),
                            need_report.eq(1),
                        ]
                        m.next = "IDLE"

            # -- REPORT = min(LOCAL, reports of CHILD ports) -------------------------------
            # Without cut-through the floor and root comparisons get a cycle of their own
            # (RFLOOR, RROOT): a comparison then never feeds the ports' pending flags in the
            # same cycle, once the longest path of that build.
            below_floor = Signal()      # RFLOOR: acc < sent
            below_committed = Signal()  # RROOT: acc < COMMITTED
            at_committed = Signal()     # RROOT: acc == COMMITTED
            acc_new = Signal()          # RFLOOR: acc != REPORT
            sent_new = Signal()         # RFLOOR: sent != REPORT
            with m.State("RSCAN"):
                # (its first cycle reads port 0's operands; each later one folds in the port
                # read the cycle before)
                m.d.sync += [primed.eq(1), idx.eq(idx + 1)]
                with m.If(primed):
                    scan_step(scan_child, scan_reported, scan_rep, scan_ver)
                    with m.If(scan_last):
                        m.next = "RDONE" if self.cut_through else "RFLOOR"
            if not self.cut_through:
                with m.State("RFLOOR"):
                    # (no REPORT load meanwhile: ``sent`` stays what was compared)
                    m.d.comb += hold.eq(1)
                    lt = acc < sent
                    m.d.sync += [below_floor.eq(lt), acc_new.eq(acc != report), sent_new.eq(sent != report)]
                    m.next = "RDONE"
            with m.State("RDONE"):
                # Never below a REPORT already sent: that one is still a valid bound, and the
                # floor for ENABLE must not fall (only a ROLE rewrite could make REPORT drop).
                if self.cut_through:
                    lt = acc < sent
                    m.d.comb += below_floor.eq(lt)
                new_report = Mux(below_floor, sent, acc)
                if self.cut_through:
                    report_new = new_report != report
                else:
                    report_new = Mux(below_floor, sent_new, acc_new)
                changed = ~report_valid | report_new | (vacc != ver_report)
                with m.If(online & acc_ok & changed):
                    m.d.comb += pend_up.eq(1)
                m.d.sync += [report.eq(new_report), report_valid.eq(acc_ok),
                             ver_report.eq(vacc)]
                with m.If(online & acc_ok & ~has_parent):
                    m.next = "COMMIT" if self.cut_through else "RROOT"
                with m.Else():
                    m.next = "IDLE"
            if not self.cut_through:
                with m.State("RROOT"):
                    lt = acc < committed
                    m.d.sync += [below_committed.eq(lt), at_committed.eq(acc == committed)]
                    m.next = "COMMIT"
            with m.State("COMMIT"):
                # the root: its subtree is the whole tree (acc still holds REPORT)
                if self.cut_through:
                    m.d.comb += [below_committed.eq(acc < committed), at_committed.eq(acc == committed)]
                with m.If(~below_committed & ~at_committed):
                    m.d.sync += committed.eq(acc)
                    m.d.comb += pend_kids.eq(1)
                with m.If(ver_conv != ver_report):
                    m.d.sync += ver_conv.eq(ver_report)
                    m.d.comb += pend_kids.eq(1)
                m.next = "IDLE"

        # ---- send: a snapshot per port, so that no message is ever torn --------------------
        receiving = fsm.ongoing("RECV") | fsm.ongoing("RX")
        scanning = (fsm.ongoing("LSCAN") | fsm.ongoing("RSCAN") | fsm.ongoing("RDONE") |
                    fsm.ongoing("COMMIT"))
        if not self.cut_through:
            scanning |= fsm.ongoing("RFLOOR") | fsm.ongoing("RROOT")
        pending = Signal(P)
        report_load = Signal(P)     # the parent port takes a REPORT snapshot
        with m.If(report_load.any()):
            m.d.sync += sent.eq(n_report)
        def field_code(value):
            """The shortest length code for an epoch field (see epoch_format)."""
            return Mux(value == 0, 0, Mux((value >> 8) == 0, 1, Mux((value >> 16) == 0, 2, 3)))
        report_code = Signal(2)
        committed_code = Signal(2)
        m.d.comb += [report_code.eq(field_code(n_report)), committed_code.eq(field_code(n_committed))]
        for p in range(P):
            cout = self.ctrl_out[p]
            busy = Signal(name=f"tx_busy{p}")
            cnt = Signal(range(MSG_LEN), name=f"tx_cnt{p}")
            t_epoch = Signal(W, name=f"tx_epoch{p}")
            t_com = Signal(W, name=f"tx_com{p}")
            t_ver = Signal(V, name=f"tx_ver{p}")
            t_elen = Signal(3, name=f"tx_elen{p}")
            t_len = Signal(range(MSG_LEN + 1), name=f"tx_len{p}")
            epoch32 = Cat(t_epoch, Const(0, 32 - W))
            com32 = Cat(t_com, Const(0, 32 - W))
            # The byte on offer and its `last` are flip-flops, loaded as the byte before is
            # taken: nothing of the field arithmetic reaches the link's ingest.
            out_byte = Signal(8, name=f"tx_byte{p}")
            out_last = Signal(name=f"tx_last{p}")
            k = (cnt + 1)[:len(cnt)]
            m.d.comb += [
                cout.valid.eq(busy),
                cout.payload.data.eq(out_byte),
                cout.payload.last.eq(out_last),
            ]
            with m.If(cout.valid & cout.ready):
                with m.If(out_last):
                    m.d.sync += [busy.eq(0), cnt.eq(0)]
                with m.Else():
                    m.d.sync += [
                        cnt.eq(k),
                        out_byte.eq(Mux(k <= t_elen, epoch32.word_select((k - 1)[:2], 8),
                                    Mux(k != t_len - 1, com32.word_select((k - 1 - t_elen)[:2], 8),
                                        t_ver))),
                        out_last.eq(k == t_len - 1),
                    ]
            parent = is_parent[p]
            load = Signal(name=f"tx_load{p}")
            # (a message applied this cycle that must go this way goes at once)
            due = pending[p] | (now & ((pend_up & parent) | (pend_kids & is_child[p])))
            m.d.comb += load.eq(~busy & due & up[p] &
                                (is_child[p] | (parent & online & n_report_valid & ~hold)))
            with m.If(load):
                e_code = Mux(parent, report_code, 0)
                m.d.sync += [
                    busy.eq(1),
                    pending[p].eq(0),
                    out_byte.eq(Mux(parent, MsgType.REPORT, MsgType.COMMIT) |
                                Mux(n_heard[p], 0, FLAG_SOLICIT) |
                                (e_code << EPOCH_CODE_SHIFT) | (committed_code << COMMITTED_CODE_SHIFT)),
                    out_last.eq(0),
                    t_elen.eq(field_bytes(e_code)),
                    t_len.eq(field_bytes(e_code) + field_bytes(committed_code) + 2),
                    t_epoch.eq(Mux(parent, n_report, 0)),
                    t_com.eq(n_committed),
                    t_ver.eq(Mux(parent, n_ver_report, n_ver_conv)),
                ]
                m.d.comb += report_load[p].eq(parent)
            # The length of the message on ctrl_out (cut-through), and before it is offered a
            # nonzero announcement while one is being worked out for this port (a message is
            # being received or a scan runs whose outcome goes this way): the link then keeps
            # its serializer free for it.
            toward = Mux(has_parent, parent, is_child[p])     # where a new REPORT's effect goes
            expect = (load | (receiving & Mux(rx_report, toward, is_child[p])) | (scanning & toward))
            m.d.comb += self.ctrl_out_len[p].eq(Mux(busy, t_len, expect))
            rise = up[p] & ~up_prev[p]
            # (a load at the rising edge itself already sends the current state)
            # (a load in the cycle of `now` carries everything that cycle asks for)
            with m.If((pend_set[p] | (pend_kids & is_child[p]) | (pend_up & is_parent[p]) |
                       (rise & ~load & (is_parent[p] | is_child[p]))) & ~(load & now)):
                m.d.sync += pending[p].eq(1)
            with m.If(pend_clr[p]):
                m.d.sync += pending[p].eq(0)

        # ---- status ----------------------------------------------------------------------
        st = self.status
        m.d.comb += [
            st.online.eq(online), st.enabled.eq(enabled),
            st.local.eq(local), st.local_valid.eq(local_valid),
            st.report.eq(report), st.report_valid.eq(report_valid),
            st.report_sent.eq(sent), st.committed.eq(committed), st.active.eq(active),
            st.version_report.eq(ver_report), st.version_converged.eq(ver_conv),
        ]
        for p in range(P):
            m.d.comb += [
                st.port[p].role.eq(role[p]), st.port[p].heard.eq(heard[p]),
                st.port[p].child_report.eq(child_rep[p]),
                st.port[p].child_version.eq(child_ver[p]),
            ]
        return m
