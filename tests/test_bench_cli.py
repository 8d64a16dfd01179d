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


def test_fpga_table_names_the_seeds_without_a_result():
    point = {"board": "ulx3s-85f", "core": "nic", "ports": 4, "cells_used": 18000,
             "cells_total": 83640, "cells_type": "TRELLIS_COMB", "ram_used": 13, "ram_total": 208,
             "fmax_mhz": 105.8, "target_mhz": 125, "fmax_seeds": {"1": 105.8, "2": 113.1, "3": None},
             "fmax_min_mhz": 105.8, "fmax_max_mhz": 113.1, "fmax_mean_mhz": 109.46}
    nothing = {**point, "fmax_mhz": None, "fmax_seeds": {"1": None, "2": None},
               "fmax_min_mhz": None, "fmax_max_mhz": None, "fmax_mean_mhz": None}
    rows = bench.fpga_table({"points": [point, nothing]}).splitlines()
    assert "| 105.8 (seeds 1-3: 105.8 to 113.1, mean 109.5; no result for seed 3) | 125 |" in rows[2]
    assert "| not placed (seeds 1-2: none placed; no result for seed 1, 2) | 125 |" in rows[3]


def test_blocks_table_shows_every_seed_and_the_critical_path():
    path = {"from": "isolated.block.tx_buf.0.0", "to": "isolated.block.ser.staged",
            "delay_ns": 8.21, "logic_ns": 6.07, "route_ns": 2.14, "logic_levels": 1}
    placed = {"board": "ulx3s-85f", "block": "link", "ports": 4, "cells_used": 2887,
              "cells_total": 83640, "cells_type": "TRELLIS_COMB", "ram_used": 4, "ram_total": 208,
              "fits": True, "target_mhz": 125.0, "fmax_seeds": {"1": 121.82, "2": 120.0},
              "fmax_mean_mhz": 120.91, "fmax_min_mhz": 120.0, "fmax_max_mhz": 121.82,
              "critical_paths": {"1": path, "2": None}, "error": None}
    unplaced = {**placed, "board": "icebreaker", "block": "node", "ports": 2, "fits": False,
                "fmax_seeds": {"1": None}, "fmax_mean_mhz": None, "fmax_min_mhz": None,
                "fmax_max_mhz": None, "critical_paths": {"1": None},
                "error": "icebreaker: DOES NOT FIT"}
    rows = bench.blocks_table({"points": [placed, unplaced]}).splitlines()
    assert rows[2].startswith("| ulx3s-85f | link (4) | 2,887 TRELLIS_COMB | 4 | 121.8 / 120.0 | 120.9 | 125 |")
    assert "`tx_buf.0.0` to `ser.staged`, 8.21 ns (2.14 route, LUT levels: 1)" in rows[2]
    assert "not placed (icebreaker: DOES NOT FIT)" in rows[3] and rows[3].endswith("| - |")


def test_time_limit_stops_the_processes_started_below_it():
    import subprocess
    import time

    started = time.monotonic()
    with bench.TimeLimit(0.5) as limit:
        # a grandchild (the shell's sleep) too, as a build script's tool is
        result = subprocess.run(["sh", "-c", "sleep 30; true"])
    assert limit.expired
    assert result.returncode != 0
    assert time.monotonic() - started < 10


def test_time_limit_leaves_work_that_ends_in_time_alone():
    import subprocess

    with bench.TimeLimit(30) as limit:
        result = subprocess.run(["sh", "-c", "exit 0"])
    assert not limit.expired and result.returncode == 0


def test_a_placement_past_the_time_limit_counts_as_not_placed(monkeypatch, tmp_path, capsys):
    import subprocess

    from epochlink.boards import __main__ as boards_cli

    def stalled_build(board, *, build_dir, **_):
        build_dir.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["sleep", "30"], check=True)     # a router that does not finish
        except subprocess.CalledProcessError as exc:
            raise boards_cli.BoardError(f"{board}: BUILD FAILED ({exc.returncode})") from exc

    monkeypatch.setattr(boards_cli, "build", stalled_build)
    assert bench._place_seed("ulx3s-85f", "nic", 4, tmp_path / "seed5", 5, time_limit=0.5) is None
    assert "seed 5: stopped after" in capsys.readouterr().err
