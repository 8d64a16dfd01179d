"""Two link engines under Verilator (cocotb), through noisy channels, cuts and resets.

One Verilator build of :class:`~epochlink.sim.link_pair.LinkPair` serves every case; the
cocotb testbench (``sim/tb_link.py``) holds the scoreboard.
"""
import json
import zlib

import pytest

from epochlink.sim import verilator
from epochlink.sim.link_pair import LinkPair

PAIR = dict(delay=16, window=8, max_payload=64)


@pytest.fixture(scope="module")
def design():
    return verilator.build("link_pair", LinkPair(**PAIR))


def run_case(design, tmp_path, testcase, name, **cfg):
    result = tmp_path / "result.json"
    verilator.run(design, "epochlink.sim.tb_link", testcase=testcase, run_name=name,
                  env={"EPOCHLINK_TB_CONFIG": json.dumps(cfg), "EPOCHLINK_TB_RESULT": str(result)})
    return json.loads(result.read_text())


BER_CASES = {
    # name: (ber, messages, min_length, max_length)
    "ber0": (0.0, 300, 4, 64),
    "ber1e-6": (1e-6, 300, 4, 64),
    "ber1e-4": (1e-4, 300, 4, 64),
    "ber1e-3": (1e-3, 200, 4, 64),
    "ber1e-2": (1e-2, 40, 4, 8),
}


@pytest.mark.parametrize("name", list(BER_CASES))
def test_stream_through_bit_errors(design, tmp_path, name):
    ber, messages, lo, hi = BER_CASES[name]
    r = run_case(design, tmp_path, "stream_integrity", name, ber=ber, messages=messages,
                 min_length=lo, max_length=hi, seed=zlib.crc32(name.encode()) & 0xFFFF, max_cycles=2_000_000)
    assert r["delivered"] == r["sent"] == messages
    if ber >= 1e-3:
        assert r["b_crc_errors"] + r["a_crc_errors"] + r["b_framing_errors"] + r["a_framing_errors"] > 0
        assert r["a_retransmits"] > 0


@pytest.mark.parametrize("ber", [1e-6, 1e-4])
def test_long_run_with_in_design_traffic(design, tmp_path, ber):
    """Millions of cycles at full Verilator speed: the in-design checker is the scoreboard."""
    r = run_case(design, tmp_path, "generator_run", f"gen{ber}", ber=ber, cycles=1_500_000,
                 min_length=16, max_length=64)
    assert r["messages"] > 10_000
    assert r["errors_sequence"] == 0 and r["errors_content"] == 0
    assert r["a_link_downs"] == 0 and r["b_link_downs"] == 0
    if ber >= 1e-6:
        assert r["b_crc_errors"] + r["b_framing_errors"] > 0, "no frame was hit by an error"


def test_stream_through_bursts(design, tmp_path):
    r = run_case(design, tmp_path, "stream_integrity", "bursts", burst_probability=2e-4,
                 burst_length=12, messages=300, seed=7)
    assert r["delivered"] == r["sent"] == 300
    assert r["a_crc_errors"] + r["b_crc_errors"] + r["a_framing_errors"] + r["b_framing_errors"] > 0


def test_bidirectional_with_backpressure(design, tmp_path):
    r = run_case(design, tmp_path, "stream_integrity", "bidir", ber=1e-3, messages=200,
                 bidirectional=True, backpressure=0.3, seed=11)
    assert r["delivered"] == 200


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cuts_at_random_times(design, tmp_path, seed):
    r = run_case(design, tmp_path, "stream_integrity", f"cuts{seed}", ber=1e-4, messages=400,
                 cuts=4, fault_cycles=60000, seed=100 + seed)
    assert r["delivered"] == r["sent"] == 400 and r["duplicated"] == 0
    assert r["a_link_downs"] + r["b_link_downs"] > 0, "no cut was long enough to take the link down"


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_resets_and_cuts_follow_the_contract(design, tmp_path, seed):
    r = run_case(design, tmp_path, "stream_integrity", f"resets{seed}", ber=1e-4, messages=400,
                 cuts=2, resets=["reset_a", "reset_b", "reset_a", "reset_b"], fault_cycles=80000,
                 seed=200 + seed)
    kinds = {e["fault"] for e in r["events"]}
    assert {"reset_a", "reset_b"} <= kinds


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20))
def test_soak_random_faults(design, tmp_path, seed):
    """`make soak`: long random runs mixing every impairment."""
    import random
    rng = random.Random(seed)
    resets = rng.choice([[], ["reset_a"], ["reset_b"], ["reset_a", "reset_b", "reset_b"]])
    r = run_case(design, tmp_path, "stream_integrity", f"soak{seed}", seed=1000 + seed,
                 ber=rng.choice([0, 1e-5, 1e-4, 1e-3]), burst_probability=rng.choice([0, 1e-4]),
                 burst_length=rng.randint(2, 20), messages=2000, cuts=rng.randint(0, 6), resets=resets,
                 fault_cycles=300_000, backpressure=rng.choice([0, 0.2]), bidirectional=rng.random() < 0.5,
                 max_cycles=5_000_000)
    assert r["delivered"] + r["lost_by_contract"] - r["duplicated"] == r["sent"]
