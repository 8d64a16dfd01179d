"""The demo's claims on a smaller run: two training nodes, their NICs under Verilator."""
from epochlink.demo import DemoConfig, run_demo


def test_nic_committed_recovery_is_consistent_latest_file_is_not(tmp_path):
    result = run_demo(DemoConfig(nodes=2, epochs=8, crash_after=4, crashed_nics=(1,),
                                 workdir=tmp_path, verbose=False))
    c = result["committed_after_crash"]
    assert c >= result["committed_before_crash"]
    for node in result["nic"]:
        # Every domain of every node from epoch c, exactly the uninterrupted state there,
        # and the resumed run ends bit-identical to an uninterrupted one.
        assert node["consistent"] and node["divergence"] == 0.0 and node["bit_identical"]
    assert result["final_committed"] == [8, 8]
    # "Latest file per domain" mixes epochs; a mixed state is off every true trajectory.
    assert any(b["mixed"] for b in result["latest"]), result["latest"]
    for b in result["latest"]:
        if b["mixed"]:
            assert b["divergence"] > 0.0
    assert result["ok"]
    assert (tmp_path / "checkpoints").is_dir() and (tmp_path / "logs").is_dir()
