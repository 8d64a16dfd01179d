"""Epochlink clusters under Verilator: Conv(P,e) in the NICs, under faults.

Each topology is one Verilator build (cached by content). The cocotb testbench
(``sim/tb_cluster.py``) checks safety continuously and liveness after the faults stop.
"""
import json

import pytest

from epochlink.sim import verilator
from epochlink.sim.cluster import Cluster, Topology

DOMAINS = 4


def build(topology):
    return verilator.build(f"cluster_{topology.name}{topology.nodes}", Cluster(topology, domains=DOMAINS))


@pytest.fixture(scope="module")
def line3():
    topology = Topology.line(3)
    return topology, build(topology)


@pytest.fixture(scope="module")
def tree7():
    topology = Topology.tree(7)
    return topology, build(topology)


def run(fixture, testcase, name, tmp_path, **cfg):
    topology, design = fixture
    result = tmp_path / "result.json"
    cfg = {"edges": [list(e) for e in topology.edges], "domains": DOMAINS, **cfg}
    verilator.run(design, "epochlink.sim.tb_cluster", testcase=testcase, run_name=name,
                  env={"EPOCHLINK_TB_CONFIG": json.dumps(cfg), "EPOCHLINK_TB_RESULT": str(result)})
    return json.loads(result.read_text())


@pytest.mark.parametrize("seed", [1, 2])
def test_line_random_faults(line3, tmp_path, seed):
    r = run(line3, "random_faults", f"faults{seed}", tmp_path, seed=seed, ber=1e-4, epochs=6)
    assert r["committed"] == [6] * 3 and r["safety_samples"] > 100
    assert r["resets"] + r["cuts"] > 0


def test_tree_random_faults(tree7, tmp_path):
    r = run(tree7, "random_faults", "faults", tmp_path, seed=3, ber=1e-4, epochs=5)
    assert r["committed"] == [5] * 7
    assert r["resets"] > 0 and r["cuts"] > 0


def test_tree_converges_without_faults(tree7, tmp_path):
    r = run(tree7, "random_faults", "clean", tmp_path, seed=4, epochs=4, faults=False)
    assert r["committed"] == [4] * 7 and r["resets"] == 0


def test_versions_mixed_upgrade_rollback(line3, tmp_path):
    run(line3, "versions", "versions", tmp_path)


def test_incompatible_link_stays_down(line3, tmp_path):
    run(line3, "incompatible_link", "incompatible", tmp_path,
        ver_min={"2": 3}, ver_max={"2": 3})


def test_bad_commands_refused(line3, tmp_path):
    run(line3, "bad_commands", "bad", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("shape,nodes", [("star", 5), ("tree", 16), ("line", 8)])
@pytest.mark.parametrize("seed", [1, 2])
def test_soak_clusters(tmp_path, shape, nodes, seed):
    topology = Topology.named(shape, nodes)
    r = run((topology, build(topology)), "random_faults", f"soak{seed}", tmp_path, seed=seed,
            ber=1e-4, epochs=8)
    assert r["committed"] == [8] * nodes
