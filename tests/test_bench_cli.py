"""The benchmark runner's command line refuses bad arguments before running anything."""
import pytest

from epochlink import bench


@pytest.mark.parametrize("argv", [["nosuchsection"], ["--max-nodes", "1", "epoch"]])
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err
