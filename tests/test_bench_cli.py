"""The benchmark runner's command line refuses bad arguments before running anything, and its
FPGA table shows what was measured."""
import pytest

from epochlink import bench


@pytest.mark.parametrize("argv", [["nosuchsection"], ["--max-nodes", "1", "epoch"],
                                  ["--seeds", "0", "fpga"]])
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_fpga_table_shows_seed_spread_and_goal_from_seed_one():
    point = {"board": "ulx3s-85f", "core": "nic", "ports": 4, "cells_used": 18000,
             "cells_total": 83640, "cells_type": "TRELLIS_COMB", "ram_used": 17, "ram_total": 208,
             "fmax_mhz": 113.6, "target_mhz": 125, "goal": {"cells_fraction": 1.0, "fmax_mhz": 125.0},
             "goal_met": False, "fmax_seeds": {"1": 113.6, "2": 106.0, "3": 112.8},
             "fmax_min_mhz": 106.0, "fmax_max_mhz": 113.6, "fmax_mean_mhz": 110.8}
    single = {**{k: v for k, v in point.items() if not k.startswith("fmax_") or k == "fmax_mhz"},
              "ports": 1, "goal_met": True, "fmax_mhz": 130.2}
    rows = bench.fpga_table({"points": [point, single]}).splitlines()
    assert "| 113.6 (seeds 1-3: 106.0 to 113.6, mean 110.8) | 125 |" in rows[2]
    assert rows[2].endswith("**missed** |")
    assert "| 130.2 | 125 |" in rows[3] and rows[3].endswith(": met |")
