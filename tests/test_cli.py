"""The ``epochlink`` command line: help and usage errors (no simulator needed)."""
import pytest

from epochlink.cli import main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("sim", "status", "persist", "committed", "wait", "bring-up", "bench"):
        assert command in out


@pytest.mark.parametrize("argv", [
    ["persist", "--port", "socket://127.0.0.1:1", "x", "1"],
    ["persist", "--port", "socket://127.0.0.1:1", "0", "-1"],
    ["persist", "--port", "socket://127.0.0.1:1", "300", "1"],
    ["wait", "--port", "socket://127.0.0.1:1"],
    ["bring-up", "--port", "socket://127.0.0.1:1", "--roles", "boss"],
    ["frobnicate"],
])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


def test_no_port_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.delenv("EPOCHLINK_PORT", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["committed"])
    assert info.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_missing_nic_is_a_clear_error(capsys):
    assert main(["committed", "--port", "socket://127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("epochlink committed: cannot open socket://127.0.0.1:1")
    assert main(["status", "--port", "/dev/ttyUSB-epochlink-missing"]) == 1
    assert "cannot open" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().out
