"""Tests of epochlink.training: determinism, durable store, async writers, crash recovery."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from epochlink.training import (
    DOMAINS, CheckpointStore, DomainWriters, TrainState, first_step_divergence, format_epochs,
    initial_state, mixed_epochs, recover_node, reference_trajectory, resume_node, run_node,
    states_equal, train_epoch,
)

SEED, STEPS = 7, 10


class RecordingNic:
    """Stands in for a NIC: records calls; optionally appends them to a log file (O_APPEND,
    so lines written before a SIGKILL survive it)."""

    def __init__(self, log: Path | None = None):
        self.persisted_calls: list[tuple[int, int]] = []
        self.enabled: dict[int, int] = {}
        self.online = False
        self._fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if log else None

    def persisted(self, domain: int, epoch: int) -> None:
        self.persisted_calls.append((domain, epoch))
        if self._fd is not None:
            os.write(self._fd, f"{domain} {epoch}\n".encode())

    def committed(self) -> int:
        return min(self.reported().values())

    def enable_domain(self, domain: int, durable_epoch: int) -> None:
        self.enabled[domain] = durable_epoch

    def set_online(self, on: bool) -> None:
        self.online = on

    def reported(self) -> dict[int, int]:
        """Highest reported epoch per domain (enable counts as a report)."""
        best = dict(self.enabled)
        for d, e in self.persisted_calls:
            best[d] = max(best.get(d, -1), e)
        return best


def _read_log(log: Path) -> list[tuple[int, int]]:
    if not log.exists():
        return []
    lines = log.read_text().splitlines()
    return [(int(d), int(e)) for d, e in (ln.split() for ln in lines if ln.count(" ") == 1)]


# Params are slow to write, the rng is fast: at most instants the latest files are mixed.
UNEVEN = [(0.04, 0.06), (0.02, 0.03), (0.0, 0.01), (0.0, 0.005), (0.0, 0.002)]
LAST = 30


def _child(root: str, log: str) -> None:
    run_node(0, Path(root), 0, LAST, RecordingNic(Path(log)), steps_per_epoch=STEPS,
             delay_s=UNEVEN, seed=SEED)


@pytest.fixture(scope="module")
def trajectory() -> list[TrainState]:
    return reference_trajectory(0, LAST, STEPS, SEED)


def test_training_is_deterministic(trajectory):
    again = reference_trajectory(0, LAST, STEPS, SEED)
    assert all(states_equal(a, b) for a, b in zip(trajectory, again))
    assert not states_equal(trajectory[3], trajectory[4])
    s = trajectory[5].copy()
    train_epoch(s, STEPS)                                   # input is not modified
    assert states_equal(s, trajectory[5])
    assert s.step == 5 * STEPS and s.position == 5 * STEPS * 32
    assert len(s.params) == 241 and s.params.dtype == np.float64
    # the training RNG is really used: a different rng state changes the next epoch
    other = s.copy()
    other.rng_state = trajectory[4].rng_state
    assert not np.array_equal(train_epoch(other, 1).params, train_epoch(s, 1).params)
    assert not states_equal(initial_state(1, SEED), initial_state(0, SEED))


def test_store_roundtrip_and_durable_epoch(tmp_path, trajectory):
    store = CheckpointStore(tmp_path, 3)
    assert store.durable_epoch("params") == -1 and store.epochs_present("params") == []
    for e in (0, 1, 2, 4):
        for d, a in trajectory[e].to_domains().items():
            assert store.write(d, e, a) == tmp_path / "node3" / d / f"epoch{e:06d}.npy"
    (tmp_path / "node3" / "params" / ".epoch000003.npy.tmp-1-2").write_bytes(b"partial")
    assert store.epochs_present("params") == [0, 1, 2, 4]
    assert store.durable_epoch("params") == 2                  # gap at 3 stops the count
    assert states_equal(store.load_state(4), trajectory[4])
    state, epochs = store.load_latest_per_domain()
    assert epochs == {d: 4 for d in DOMAINS} and states_equal(state, trajectory[4])
    assert store.cleanup_temp() == 1 and store.cleanup_temp() == 0


def test_writers_fifo_durable_and_bounded(tmp_path, trajectory):
    store, reports, lag = CheckpointStore(tmp_path, 0), [], []

    def report(domain: int, epoch: int) -> None:
        assert store.path(DOMAINS[domain], epoch).is_file()      # durable before reported
        reports.append((domain, epoch))

    with DomainWriters(store, report, UNEVEN[::-1], seed=1, max_pending=2) as writers:
        for e in range(1, 7):
            writers.submit(e, trajectory[e])
            done = [max((x for d, x in reports if d == i), default=0) for i in range(5)]
            lag.append(e - min(done))
        writers.drain()
        assert len(reports) == 6 * len(DOMAINS)
    for i in range(len(DOMAINS)):
        assert [e for d, e in reports if d == i] == list(range(1, 7))    # FIFO per domain
    assert max(lag) <= 2                                                 # bounded run-ahead
    assert all(states_equal(store.load_state(e), trajectory[e]) for e in range(1, 7))


def test_writer_error_surfaces(tmp_path, trajectory):
    reports = []

    def report(domain: int, epoch: int) -> None:
        if epoch == 2 and domain == 1:
            raise RuntimeError("NIC unreachable")
        reports.append((domain, epoch))

    writers = DomainWriters(CheckpointStore(tmp_path, 0), report)
    for e in range(1, 4):
        try:
            writers.submit(e, trajectory[e])
        except RuntimeError:
            break
    with pytest.raises(RuntimeError, match="NIC unreachable"):
        writers.drain()
    with pytest.raises(RuntimeError, match="NIC unreachable"):
        writers.close()
    assert [e for d, e in reports if d == 1] == [1]      # nothing after the failed report


def _crash_run(tmp_path: Path) -> tuple[Path, dict[int, int]]:
    """Run a node in a child process and SIGKILL it while its latest reports are mixed."""
    log = tmp_path / "reports.log"
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(str(tmp_path), str(log)))
    proc.start()
    deadline = time.monotonic() + 10
    try:
        while True:
            assert proc.is_alive() and time.monotonic() < deadline, "child ended before the kill"
            best: dict[int, int] = {}
            for d, e in _read_log(log):
                best[d] = max(best.get(d, -1), e)
            if len(best) == len(DOMAINS) and best[0] >= 3 and len(set(best.values())) > 1:
                break
            time.sleep(0.001)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    assert proc.exitcode == -signal.SIGKILL
    reported: dict[int, int] = {}
    for d, e in _read_log(log):
        reported[d] = max(reported.get(d, -1), e)
    return log, reported


def test_sigkill_crash_and_committed_recovery(tmp_path, trajectory):
    for _attempt in range(3):       # the kill instant is a race; the mixed case is almost sure
        root = tmp_path / f"run{_attempt}"
        root.mkdir()
        log, reported = _crash_run(root)
        store = CheckpointStore(root, 0)
        latest, epochs = store.load_latest_per_domain()
        if mixed_epochs(epochs):
            break
    else:
        pytest.fail("latest files never mixed at the kill")

    for i, d in enumerate(DOMAINS):
        present = store.epochs_present(d)
        assert present == list(range(len(present)))                     # contiguous from 0
        assert store.durable_epoch(d) == present[-1] >= reported[i]
        for e in present:                                                # complete, loadable
            assert np.array_equal(store.load(d, e), trajectory[e].to_domains()[d])
    assert all(store.path(DOMAINS[d], e).is_file() for d, e in _read_log(log))

    # the usual recovery mixes epochs: its first step lands on no true trajectory
    assert "MIXED" in format_epochs(epochs)
    _, dist = first_step_divergence(latest, trajectory)
    assert dist > 0.0
    # the NIC's commit (the meet of the reported epochs) is consistent
    committed = min(reported.values())
    assert first_step_divergence(store.load_state(committed), trajectory) == (committed, 0.0)

    nic = RecordingNic()
    durable = recover_node(0, root, nic, seed=SEED)
    assert nic.online and nic.enabled == {i: durable[d] for i, d in enumerate(DOMAINS)}
    assert store.cleanup_temp() == 0
    final = resume_node(0, root, committed, LAST, nic, steps_per_epoch=STEPS,
                        delay_s=(0.0, 0.001), seed=SEED)
    assert states_equal(final, trajectory[LAST])
    assert nic.committed() == LAST
    assert all(states_equal(store.load_state(e), trajectory[e]) for e in range(LAST + 1))


def test_run_node_uninterrupted(tmp_path, trajectory):
    nic, seen = RecordingNic(), []
    final = run_node(0, tmp_path, 0, 5, nic, steps_per_epoch=STEPS, delay_s=(0.0, 0.002),
                     seed=SEED, on_epoch=lambda e, s: seen.append(e))
    assert seen == [1, 2, 3, 4, 5] and nic.online
    assert nic.enabled == {i: 0 for i in range(len(DOMAINS))} and nic.committed() == 5
    assert states_equal(final, trajectory[5])
    assert not mixed_epochs(CheckpointStore(tmp_path, 0).load_latest_per_domain()[1])


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_input_raises_and_changes_nothing(tmp_path, trajectory):
    store = CheckpointStore(tmp_path, 0)
    for e in (1, 2):
        for d, a in trajectory[e].to_domains().items():
            store.write(d, e, a)
    params_path = store.path("params", 1)
    params_path.write_bytes(params_path.read_bytes()[:100])             # truncated file
    np.save(store.path("rng", 1), np.frombuffer(b"{not json", np.uint8))  # valid npy, bad rng
    other = CheckpointStore(tmp_path, 1)
    for d, a in trajectory[0].to_domains().items():
        other.write(d, 0, a)
    other.path("adam_v", 0).write_bytes(b"")                             # empty file
    before = _snapshot(tmp_path)

    with pytest.raises(ValueError, match="unknown domain"):
        store.write("momentum", 3, trajectory[3].params)
    with pytest.raises(ValueError, match="unknown domain"):
        store.load("momentum", 1)
    with pytest.raises(ValueError, match="unknown domain"):
        store.durable_epoch("momentum")
    with pytest.raises(ValueError, match="float64"):
        store.write("params", 3, trajectory[3].params.astype(np.float32))
    with pytest.raises(ValueError, match="epoch must be"):
        store.write("params", -1, trajectory[2].params)
    with pytest.raises(FileNotFoundError, match=str(store.path("adam_m", 9))):
        store.load("adam_m", 9)
    with pytest.raises(ValueError, match=f"corrupt checkpoint {params_path}"):
        store.load("params", 1)
    with pytest.raises(ValueError, match="PCG64"):
        store.load("rng", 1)
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        store.load_state(1)
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        other.load_latest_per_domain()
    with pytest.raises(FileNotFoundError):
        CheckpointStore(tmp_path, 5).load_latest_per_domain()
    with pytest.raises(ValueError, match="delay_s"):
        DomainWriters(store, lambda d, e: None, delay_s=(0.2, 0.1))
    with pytest.raises(ValueError, match="belongs to node 0 seed"):
        resume_node(0, tmp_path, 2, 3, RecordingNic(), seed=SEED + 1)
    assert _snapshot(tmp_path) == before
    assert threading.active_count() == 1
