"""The host driver's checkpoint-epoch API against the real NIC gateware under Verilator.

Two NICs in a line (node 0 the root), each reached through the simulation server's TCP
bridge exactly as a training node would reach a board's UART.
"""
import threading
import time

import pytest

from epochlink.hdl.epoch_format import Role
from epochlink.host import ConnectionLost, EpochRefused, FenceMode, ErrorResponse, LinkState, Node, Timeout
from epochlink.hostproto import Status
from epochlink.registers import MAGIC
from epochlink.sim.server import SimServer

DOMAINS = 3


@pytest.fixture(scope="module")
def cluster():
    with SimServer(nodes=2, topology="line") as sim:
        nodes = [Node(url, timeout=3.0) for url in sim.urls]
        yield sim, nodes
        for node in nodes:
            node.close()


def wait(predicate, what, limit_s=30.0):
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def bring_up(sim, nodes, at=0):
    for i, node in enumerate(nodes):
        node.bring_up({d: at for d in range(DOMAINS)}, [r for _, r in sim.topology.ports(i)])


def test_commit_through_the_nics(cluster):
    sim, (root, leaf) = cluster
    wait(lambda: root.port_status(0).up and leaf.port_status(0).up, "links up")
    assert root.domains() == 8
    bring_up(sim, (root, leaf))
    status = leaf.epoch_status()
    assert status.online and status.local == 0
    assert leaf.port_status(0).role is Role.PARENT and root.port_status(0).role is Role.CHILD

    for d in range(DOMAINS):
        assert root.persisted(d, 4) == 4
    assert root.epoch_status().local == 4
    # The leaf has not persisted anything yet: nothing can be committed beyond 0.
    with pytest.raises(Timeout):
        root.wait_committed(1, timeout=0.5)
    for d in range(DOMAINS - 1):
        leaf.persisted(d, 5)
    assert leaf.epoch_status().local == 0            # domain 2 still at 0
    leaf.persisted(DOMAINS - 1, 3)
    assert root.wait_committed(3, timeout=20) == 3   # the meet: min(4, 5, 5, 3)
    assert leaf.wait_committed(3, timeout=20) == 3
    assert root.persisted_epoch(0) == 4 and leaf.persisted_epoch(2) == 3

    # Refusals: epochs only rise; a disabled domain takes no report; nothing changes.
    with pytest.raises(EpochRefused) as info:
        leaf.persisted(0, 2)
    assert info.value.status is Status.REFUSED_LOWER and "DOMAIN0.PERSISTED" in str(info.value)
    leaf.disable_domain(1)
    assert not leaf.domain_enabled(1)
    with pytest.raises(EpochRefused) as info:
        leaf.persisted(1, 9)
    assert info.value.status is Status.REFUSED_DISABLED
    with pytest.raises(EpochRefused):
        leaf.enable_domain(1, 2)                     # below what is committed
    leaf.enable_domain(1, 5)
    assert leaf.persisted_epoch(0) == 5 and leaf.committed() == 3
    assert leaf.epoch_status().refused == 3


def test_bad_register_accesses_change_nothing(cluster):
    sim, (root, leaf) = cluster
    before = leaf.epoch_status()
    with pytest.raises(ErrorResponse) as info:
        leaf.persisted(8, 1)                         # domain 8 is absent (8 domains)
    assert info.value.status is Status.BAD_ADDRESS
    with pytest.raises(ErrorResponse) as info:
        leaf.write("ACTIVE", 0)
    assert info.value.status is Status.ILLEGAL_VALUE
    with pytest.raises(ErrorResponse) as info:
        leaf.set_role(0, Role.OFF) or leaf.set_role(1, Role.PARENT)   # port 1 is absent
    assert info.value.status is Status.BAD_ADDRESS
    leaf.set_role(0, Role.PARENT)
    with pytest.raises(ErrorResponse) as info:
        leaf.write("COMMITTED", 99)
    assert info.value.status is Status.READ_ONLY
    with pytest.raises(ValueError):
        leaf.persisted(0, -1)
    with pytest.raises(ValueError):
        leaf.set_active_version(300)
    after = leaf.epoch_status()
    assert (after.committed, after.local) == (before.committed, before.local)


def test_identity_ports_and_fence(cluster):
    sim, (root, leaf) = cluster
    info = leaf.identify()
    assert (info.node_id, info.ports) == (2, 1)
    ports = leaf.ports()
    assert len(ports) == 1 and ports[0].peer_id == 1 and ports[0].counters["frames_rx"] > 0
    for mode in (FenceMode.DROP, FenceMode.PASS):
        leaf.set_fence(mode)
        assert leaf.read("FENCE_MODE") == mode
    with pytest.raises(ValueError):
        leaf.set_fence(7)


def test_versions_converge_to_the_minimum(cluster):
    sim, (root, leaf) = cluster
    assert root.versions().supported == (1, 1)
    leaf.set_active_version(3)
    root.set_active_version(2)
    wait(lambda: leaf.versions().converged == 2 and root.versions().converged == 2, "version 2")
    assert root.versions().subtree == 2 and leaf.versions().active == 3
    root.set_active_version(4)                        # rolling upgrade: the leaf is at 3
    wait(lambda: root.versions().converged == 3, "version 3")


def test_node_reset_and_rollback(cluster):
    sim, (root, leaf) = cluster
    committed = root.wait_committed(3, timeout=20)
    # A NIC loses power: its host restores the domains from storage; COMMITTED is relearned.
    sim.reset_node(1)
    wait(lambda: leaf.port_status(0).state == LinkState.UP, "link back up")
    assert leaf.committed() in (0, committed)
    leaf.bring_up({d: 5 for d in range(DOMAINS)}, [Role.PARENT])
    assert leaf.wait_committed(committed, timeout=20) >= committed

    # The epoch engine reset used by the cluster-wide rollback: links stay up.
    frames = leaf.port_status(0).counters["frames_rx"]
    leaf.reset_epoch_engine()
    status = leaf.epoch_status()
    assert (status.online, status.committed, status.local) == (False, 0, None)
    assert leaf.port_status(0).up and leaf.port_status(0).counters["frames_rx"] >= frames


def test_write_without_an_answer_times_out(cluster):
    sim, (root, leaf) = cluster
    held = threading.Thread(target=sim.reset_node, args=(1,), kwargs={"cycles": 300_000})
    held.start()                     # the NIC is held in reset for a while
    saved = leaf.timeout, leaf.retries
    try:
        time.sleep(0.3)
        leaf.timeout, leaf.retries = 0.3, 0
        timeouts = leaf.stats.timeouts
        with pytest.raises(Timeout):
            leaf.write("SCRATCH", 1)
        assert leaf.stats.timeouts == timeouts + 1
    finally:
        leaf.timeout, leaf.retries = saved
        held.join()
    time.sleep(0.2)                  # a late answer may still arrive; it is counted, not used
    assert leaf.read("SCRATCH") == 0                 # answered again after the reset


def test_lost_connection_is_a_clear_error(cluster):
    sim, (root, leaf) = cluster
    with Node(sim.urls[0], timeout=3.0) as other:    # a new client takes node 0's port
        assert other.read("MAGIC") == MAGIC
        with pytest.raises(ConnectionLost):
            for _ in range(50):
                root.read("MAGIC")
                time.sleep(0.02)


def test_cli_against_a_nic(cluster, capsys):
    from epochlink.cli import main
    sim, (root, leaf) = cluster
    url = sim.urls[0]
    assert main(["status", "--port", url]) == 0
    out = capsys.readouterr().out
    assert "node 1:" in out and "COMMITTED" in out and "port 0: UP" in out
    assert main(["status", "--port", url, "--json"]) == 0
    assert '"committed"' in capsys.readouterr().out
    assert main(["committed", "--port", url]) == 0
    committed = int(capsys.readouterr().out)
    assert committed >= 3
    assert main(["wait", "--port", url, str(committed), "--timeout", "5"]) == 0
    assert main(["persist", "--port", url, "0", "0"]) == 1          # lower than PERSISTED
    assert "REFUSED_LOWER" in capsys.readouterr().err
    assert main(["wait", "--port", url, str(committed + 1000), "--timeout", "0.2"]) == 1
    assert "not >=" in capsys.readouterr().err
