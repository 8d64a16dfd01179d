"""The epoch engine's reference model (``sim/epoch_model.py``) on random trees with faults, and
the gateware against the model on the same random schedule (Amaranth simulator).

Safety (checked after every model action): no COMMITTED above any enabled durable epoch or
enabled PERSISTED anywhere, no COMMITTED falling within a node incarnation, no REPORT above
its subtree's durable meet, reports of one incarnation only rising. Liveness: once faults
stop, every node ends on the durable meet and on the minimum ACTIVE version.
"""
import random

import pytest

from epochlink.hdl.epoch_format import CmdStatus, Op, Role
from epochlink.sim.epoch_model import Cluster, InvariantError, Node

from .test_epoch_unit import EngineTree, TreeHost, converge, run, safety_monitor


def random_tree(rng, n, max_degree=None):
    """Edges (parent, child) of a random tree over shuffled node labels."""
    labels = list(range(n))
    rng.shuffle(labels)
    degree = [0] * n
    edges = []
    for i in range(1, n):
        choices = [j for j in range(i) if max_degree is None or degree[j] < max_degree]
        j = rng.choice(choices)
        degree[i] += 1
        degree[j] += 1
        edges.append((labels[j], labels[i]))
    return edges


def random_hosts(rng, cluster, domains):
    for host in cluster.hosts:
        chosen = rng.sample(range(domains), rng.randint(1, domains))
        host.durable = {d: rng.randint(0, 3) for d in chosen}
        host.active = rng.randint(1, 3)


# ---- model only --------------------------------------------------------------------------

def run_random_model(seed, events=300, domains=4):
    rng = random.Random(seed)
    n = rng.randint(2, 16)
    edges = random_tree(rng, n)
    cl = Cluster(n, edges, domains=domains)
    random_hosts(rng, cl, domains)
    for i in range(n):
        if rng.random() < 0.5:
            cl.restore(i)               # some hosts come before their links, some after
    for a, b in edges:
        cl.link_up(a, b)
    down = set()
    for _ in range(events):
        x = rng.random()
        if x < 0.45:
            for _ in range(rng.randint(1, 8)):
                cl.step(rng)
        elif x < 0.72:
            i = rng.randrange(n)
            d = rng.choice(list(cl.hosts[i].durable))
            status = cl.persist(i, d, cl.hosts[i].durable[d] + rng.randint(0, 3))
            assert status in (None, CmdStatus.OK)
        elif x < 0.78:
            e = rng.choice(edges)
            cl.link_down(*e, rng)
            down.add(e)
        elif x < 0.84 and down:
            e = rng.choice(sorted(down))
            cl.link_up(*e)
            down.discard(e)
        elif x < 0.87:
            i = rng.randrange(n)
            cl.reset_node(i, rng)
            down |= {e for e in edges if i in e}
        elif x < 0.94:
            dead = [i for i in range(n) if not cl.restored[i]]
            if dead:
                cl.restore(rng.choice(dead))
        else:
            assert cl.set_active(rng.randrange(n), rng.randint(1, 4)) in (None, CmdStatus.OK)
    # the last faults: every link resets once, losing or repeating what is in flight
    for e in edges:
        cl.link_down(*e, rng)
    cl.settle(rng)
    cl.check_converged()
    return cl


@pytest.mark.parametrize("block", range(4))
def test_random_trees_safety_and_liveness(block):
    for seed in range(block * 40, block * 40 + 40):
        try:
            run_random_model(seed)
        except InvariantError as e:
            raise AssertionError(f"seed {seed}: {e}") from None


def test_random_trees_commit_progress():
    """The runs above are not vacuous: COMMITTED moves during the faults, not only at the end."""
    rng = random.Random(99)
    cl = Cluster(6, random_tree(rng, 6), domains=2)
    random_hosts(rng, cl, 2)
    for i in range(6):
        cl.restore(i)
    for a, b in cl.edges:
        cl.link_up(a, b)
    seen = set()
    for step in range(400):
        i = rng.randrange(6)
        d = rng.choice(list(cl.hosts[i].durable))
        cl.persist(i, d, cl.hosts[i].durable[d] + 1)
        for _ in range(rng.randint(0, 10)):
            cl.step(rng)
        if step % 50 == 25:
            cl.reset_node(rng.randrange(6), rng)
        if step % 50 == 30:
            for j in range(6):
                if not cl.restored[j]:
                    cl.restore(j)
            for a, b in cl.edges:
                cl.link_up(a, b)
        seen.add(cl.nodes[cl.root].committed)
    assert len(seen) > 20


def test_node_rules():
    node = Node(domains=2, ports=2)
    assert node.command(Op.ENABLE, 0, 10)[0] == CmdStatus.OK
    assert node.command(Op.ONLINE, 0, 1)[0] == CmdStatus.OK
    assert node.committed == 10                       # a root alone commits its LOCAL
    assert node.command(Op.ENABLE, 1, 9)[0] == CmdStatus.LOWER   # below COMMITTED
    assert node.command(Op.DISABLE, 0)[0] == CmdStatus.OK
    assert not node.local_valid and node.committed == 10
    assert node.command(Op.ENABLE, 0, 10)[0] == CmdStatus.OK
    assert node.command(Op.ROLE, 0, Role.CHILD)[0] == CmdStatus.OK
    assert node.command(Op.PERSIST, 0, 12)[0] == CmdStatus.OK
    assert node.committed == 10                       # a child that never reported blocks
    assert node.refused == 1


def test_checker_flags_lost_resend():
    """Liveness fails (and is reported) when the resend at link-up is missing."""
    class Forgetful(Node):
        def set_link(self, port, up):
            self.link_up[port] = up

    rng = random.Random(5)
    cl = Cluster(2, [(0, 1)], domains=1)
    cl.nodes = [Forgetful(1, 1), Forgetful(1, 1)]
    cl.hosts[0].durable, cl.hosts[1].durable = {0: 1}, {0: 1}
    cl.link_up(0, 1)
    cl.restore(0)
    cl.restore(1)
    cl.run(rng)
    cl.persist(1, 0, 2)
    cl.persist(0, 0, 2)
    cl.do(("send", 1, 0))
    cl.link_down(0, 1, rng, p_drop=1.0)
    cl.link_up(0, 1)
    cl.run(rng)
    with pytest.raises(InvariantError, match="COMMITTED 1, meet 2"):
        cl.check_converged()


# ---- gateware against the model ----------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_gateware_matches_model(seed):
    """A small tree under a random schedule of persists, version changes, link cuts and a node
    reset, without waiting for convergence in between; at quiescence every register the model
    has must match, and the safety monitor must have stayed silent."""
    rng = random.Random(seed)
    n, domains = 5, 3
    edges = random_tree(rng, n, max_degree=3)
    tree = EngineTree(n, edges, domains=domains, ports=3)
    cl = Cluster(n, edges, domains=domains, ports=3)
    random_hosts(rng, cl, domains)
    violations = []

    async def bench(ctx):
        host = TreeHost(ctx, tree, cl)
        for a, b in edges:
            host.link(a, b, True)
        for i in range(n):
            await host.restore(i)
        reset_at = rng.randrange(4, 14)
        for event in range(18):
            await ctx.tick().repeat(rng.randrange(1, 60))
            x = rng.random()
            if event == reset_at:
                victim = rng.randrange(n)
                await host.reset_node(victim)
                await ctx.tick().repeat(rng.randrange(1, 100))
                if rng.random() < 0.5:
                    await host.restore(victim)
                for j in cl.neighbours(victim):
                    host.link(victim, j, True)
                if not cl.restored[victim]:
                    await ctx.tick().repeat(rng.randrange(1, 100))
                    await host.restore(victim)
            elif x < 0.7:
                i = rng.randrange(n)
                d = rng.choice(list(cl.hosts[i].durable))
                await host.persist(i, d, cl.hosts[i].durable[d] + rng.randint(0, 2))
            elif x < 0.85:
                i = rng.randrange(n)
                cl.hosts[i].active = rng.randint(1, 4)
                await host.cmd(i, Op.ACTIVE, 0, cl.hosts[i].active, expect=CmdStatus.OK)
            else:
                a, b = rng.choice(edges)
                host.link(a, b, False)
                ctx.set(tree.link_rst[frozenset((a, b))], 1)
                await ctx.tick()
                ctx.set(tree.link_rst[frozenset((a, b))], 0)
                await ctx.tick().repeat(rng.randrange(1, 40))
                host.link(a, b, True)
        await converge(host, f"convergence (seed {seed})")

    run(tree, bench, safety_monitor(tree, cl, violations))
    assert violations == []
