"""Training-node side of the epochlink demo: a small deterministic numpy trainer whose
state is split into persistence domains, checkpointed asynchronously and durably.

Pure numpy and the standard library; the NIC is reached only through callbacks.

* :class:`TrainState` -- one node's full state, split into :data:`DOMAINS` (the index of a
  domain in that tuple is its NIC domain number).
* :func:`train_epoch` -- a bit-for-bit deterministic AdamW epoch on a 2-layer MLP.
* :class:`CheckpointStore` -- atomic, fsync'ed files ``root/node{n}/{domain}/epoch{e:06d}.npy``.
* :class:`DomainWriters` -- one writer thread per domain, random delay, then ``report``.
* :func:`run_node`, :func:`recover_node`, :func:`resume_node` -- the worker process loop.
* :func:`reference_trajectory`, :func:`states_equal`, :func:`mixed_epochs`,
  :func:`format_epochs`, :func:`first_step_divergence` -- analysis for the report.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = [
    "DOMAINS", "DelaySpec", "ModelConfig", "DEFAULT_CONFIG", "TrainState", "initial_state",
    "train_epoch",
    "CheckpointStore", "DomainWriters", "NicLike", "run_node", "recover_node", "resume_node",
    "reference_trajectory", "states_equal", "mixed_epochs", "format_epochs",
    "first_step_divergence",
]

#: Persistence domains, in NIC domain-number order.
DOMAINS: tuple[str, ...] = ("params", "adam_m", "adam_v", "data_cursor", "rng")
_DTYPES = {"params": np.float64, "adam_m": np.float64, "adam_v": np.float64,
           "data_cursor": np.int64, "rng": np.uint8}


@dataclass(frozen=True)
class ModelConfig:
    """Model, data and AdamW hyper-parameters (shared by every node of a job)."""
    n_in: int = 8
    hidden: int = 24
    batch: int = 32
    n_samples: int = 512        #: rows of a node's dataset shard; the stream cycles over it
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    input_noise: float = 0.05   #: std of the Gaussian input jitter drawn from the state's RNG

    @property
    def n_params(self) -> int:
        """Length of the flat parameter vector: W1, b1, W2, b2 (241 by default)."""
        return self.n_in * self.hidden + 2 * self.hidden + 1


DEFAULT_CONFIG = ModelConfig()


@dataclass
class TrainState:
    """One node's training state.

    ``data_cursor`` is persisted as int64 ``[seed, node, position, step]``: the identity of
    the node's data stream, the next sample position in it, and the number of optimizer
    steps taken (AdamW bias correction needs it). ``rng_state`` is the
    ``bit_generator.state`` of the PCG64 generator that draws the input jitter; it is
    persisted as UTF-8 JSON in a uint8 array.
    """
    params: np.ndarray
    adam_m: np.ndarray
    adam_v: np.ndarray
    seed: int
    node: int
    position: int
    step: int
    rng_state: dict = field(repr=False)

    def to_domains(self) -> dict[str, np.ndarray]:
        """Fresh copies of every domain's array, keyed by domain name, in DOMAINS order."""
        rng = json.dumps(self.rng_state, sort_keys=True).encode()
        return {"params": self.params.copy(), "adam_m": self.adam_m.copy(),
                "adam_v": self.adam_v.copy(),
                "data_cursor": np.array([self.seed, self.node, self.position, self.step],
                                        dtype=np.int64),
                "rng": np.frombuffer(rng, dtype=np.uint8).copy()}

    @classmethod
    def from_domains(cls, arrays: Mapping[str, np.ndarray],
                     config: ModelConfig = DEFAULT_CONFIG) -> TrainState:
        """Rebuild a state from one array per domain; ValueError if any is malformed."""
        missing = [d for d in DOMAINS if d not in arrays]
        if missing:
            raise ValueError(f"missing domains {missing}")
        for name in DOMAINS:
            _check_array(name, arrays[name], config)
        seed, node, position, step = (int(x) for x in arrays["data_cursor"])
        rng_state = _decode_rng(arrays["rng"])
        return cls(arrays["params"].copy(), arrays["adam_m"].copy(), arrays["adam_v"].copy(),
                   seed, node, position, step, rng_state)

    def copy(self) -> TrainState:
        """A deep copy."""
        return TrainState(self.params.copy(), self.adam_m.copy(), self.adam_v.copy(),
                          self.seed, self.node, self.position, self.step,
                          json.loads(json.dumps(self.rng_state)))


def _decode_rng(array: np.ndarray) -> dict:
    """The PCG64 state held by an ``rng`` domain array; ValueError if it is not one."""
    try:
        rng_state = json.loads(array.tobytes().decode())
        np.random.PCG64().state = rng_state      # validates the dict
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"rng domain does not hold a PCG64 state: {exc}") from exc
    return rng_state


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def _check_array(domain: str, array: np.ndarray, config: ModelConfig = DEFAULT_CONFIG) -> None:
    _check_domain(domain)
    want = {"params": (config.n_params,), "adam_m": (config.n_params,),
            "adam_v": (config.n_params,), "data_cursor": (4,)}.get(domain)
    if not isinstance(array, np.ndarray) or array.dtype != _DTYPES[domain] or array.ndim != 1 \
            or (want is not None and array.shape != want):
        got = (getattr(array, "dtype", type(array)), getattr(array, "shape", None))
        raise ValueError(f"domain {domain!r} needs a 1-D {np.dtype(_DTYPES[domain])} array "
                         f"of shape {want or '(n,)'}, got dtype/shape {got}")


@lru_cache(maxsize=64)
def _dataset(seed: int, node: int, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """The node's shard: inputs X and targets y of a fixed random teacher (read-only)."""
    teacher = np.random.default_rng([seed, 0xDA7A])               # shared by all nodes
    w, v = teacher.normal(size=(config.n_in, 4)), teacher.normal(size=4)
    rng = np.random.default_rng([seed, node, 0xDA7A])
    x = rng.normal(size=(config.n_samples, config.n_in))
    y = (np.sin(_matmul(x, w)) * v).sum(axis=1) + 0.1 * rng.normal(size=config.n_samples)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Matrix product without BLAS (no thread- or kernel-dependent rounding)."""
    return (a[:, :, None] * b[None, :, :]).sum(axis=1)


def initial_state(node: int, seed: int, config: ModelConfig = DEFAULT_CONFIG) -> TrainState:
    """Epoch 0 of ``node``: random init from (seed, node), zero moments, cursor at 0."""
    init = np.random.default_rng([seed, node, 0x1417])
    h, n = config.hidden, config.n_in
    params = np.concatenate([init.normal(0, n ** -0.5, n * h), np.zeros(h),
                             init.normal(0, h ** -0.5, h), np.zeros(1)])
    rng_state = np.random.default_rng([seed, node, 0x5EED]).bit_generator.state
    zeros = np.zeros(config.n_params)
    return TrainState(params, zeros.copy(), zeros.copy(), seed, node, 0, 0, rng_state)


def _loss_grad(params: np.ndarray, x: np.ndarray, y: np.ndarray,
               config: ModelConfig) -> np.ndarray:
    """Gradient of the mean squared error of ``tanh(x W1 + b1) W2 + b2`` w.r.t. params."""
    n, h = config.n_in, config.hidden
    w1, b1 = params[:n * h].reshape(n, h), params[n * h:n * h + h]
    w2, b2 = params[n * h + h:n * h + 2 * h], params[-1]
    a = np.tanh(_matmul(x, w1) + b1)
    err = 2.0 * ((a * w2).sum(axis=1) + b2 - y) / len(y)          # dLoss/dprediction
    dz = err[:, None] * w2 * (1.0 - a * a)
    return np.concatenate([_matmul(x.T, dz).ravel(), dz.sum(axis=0),
                           (a * err[:, None]).sum(axis=0), [err.sum()]])


def train_epoch(state: TrainState, steps_per_epoch: int,
                config: ModelConfig = DEFAULT_CONFIG) -> TrainState:
    """Run ``steps_per_epoch`` AdamW steps; returns a new state (the input is not changed).

    Each step takes the next ``config.batch`` samples of the node's stream from the
    cursor (cycling over the shard), adds Gaussian jitter drawn from the state's RNG, and
    applies AdamW with decoupled weight decay. Pure function of its inputs: the same state
    gives a bit-identical result in any process or thread.
    """
    x_all, y_all = _dataset(state.seed, state.node, config)
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = state.rng_state
    p, m, v = state.params.copy(), state.adam_m.copy(), state.adam_v.copy()
    position, step = state.position, state.step
    for _ in range(steps_per_epoch):
        rows = (position + np.arange(config.batch)) % config.n_samples
        x = x_all[rows] + config.input_noise * rng.standard_normal((config.batch, config.n_in))
        g = _loss_grad(p, x, y_all[rows], config)
        position, step = position + config.batch, step + 1
        m = config.beta1 * m + (1.0 - config.beta1) * g
        v = config.beta2 * v + (1.0 - config.beta2) * g * g
        m_hat, v_hat = m / (1.0 - config.beta1 ** step), v / (1.0 - config.beta2 ** step)
        p = p - config.lr * (m_hat / (np.sqrt(v_hat) + config.eps) + config.weight_decay * p)
    return TrainState(p, m, v, state.seed, state.node, position, step,
                      rng.bit_generator.state)


#: Write delay in seconds: one ``(lo, hi)`` uniform range for all domains, or one per domain.
DelaySpec = tuple[float, float] | Sequence[tuple[float, float]]

_FINAL = re.compile(r"^epoch(\d{6,})\.npy$")


class CheckpointStore:
    """Durable per-domain checkpoint files of one node.

    Layout: ``root/node{n}/{domain}/epoch{e:06d}.npy`` (``np.save``, no pickle). Files are
    written to ``.epoch{e:06d}.npy.tmp-*`` in the same directory, fsync'ed, renamed, and the
    directory fsync'ed: a file under its final name is complete and durable. Readers
    ignore temp files; :meth:`cleanup_temp` deletes them.
    """

    def __init__(self, root: Path | str, node: int, config: ModelConfig = DEFAULT_CONFIG):
        self.root, self.node, self.config = Path(root), node, config
        self.dir = self.root / f"node{node}"

    def path(self, domain: str, epoch: int) -> Path:
        """Final file name of ``domain`` at ``epoch``."""
        _check_domain(domain)
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        return self.dir / domain / f"epoch{int(epoch):06d}.npy"

    def write(self, domain: str, epoch: int, array: np.ndarray) -> Path:
        """Atomically and durably write one domain's array for ``epoch`` (overwrites)."""
        final = self.path(domain, epoch)
        _check_array(domain, array, self.config)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final

    def epochs_present(self, domain: str) -> list[int]:
        """Sorted epochs of ``domain`` present under their final names."""
        _check_domain(domain)
        try:
            names = os.listdir(self.dir / domain)
        except FileNotFoundError:
            return []
        return sorted(int(m[1]) for m in map(_FINAL.match, names) if m)

    def durable_epoch(self, domain: str) -> int:
        """Highest e such that epochs 0..e of ``domain`` are all present; -1 if epoch 0 is not.

        This is the value to give the NIC: with one FIFO writer per domain, files appear in
        epoch order, so a gap only arises from outside interference and stops the count.
        """
        e = -1
        for present in self.epochs_present(domain):
            if present != e + 1:
                break
            e = present
        return e

    def load(self, domain: str, epoch: int) -> np.ndarray:
        """One domain's array. FileNotFoundError if absent, ValueError if corrupt."""
        path = self.path(domain, epoch)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint of domain {domain!r} epoch {epoch}: {path}")
        try:
            array = np.load(path, allow_pickle=False)
            _check_array(domain, array, self.config)
            if domain == "rng":
                _decode_rng(array)
        except (ValueError, EOFError, OSError) as exc:
            raise ValueError(f"corrupt checkpoint {path}: {exc}") from exc
        return array

    def load_state(self, epoch: int) -> TrainState:
        """Every domain from the same ``epoch`` (the consistent restore)."""
        try:
            return TrainState.from_domains({d: self.load(d, epoch) for d in DOMAINS}, self.config)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"checkpoint epoch {epoch} under {self.dir}: {exc}") from exc

    def load_latest_per_domain(self) -> tuple[TrainState, dict[str, int]]:
        """The usual "latest file per domain" restore; may mix epochs. Returns the epochs."""
        epochs = {}
        for d in DOMAINS:
            present = self.epochs_present(d)
            if not present:
                raise FileNotFoundError(f"no checkpoint of domain {d!r} under {self.dir / d}")
            epochs[d] = present[-1]
        arrays = {d: self.load(d, e) for d, e in epochs.items()}
        return TrainState.from_domains(arrays, self.config), epochs

    def cleanup_temp(self) -> int:
        """Delete temp files left by interrupted writes; returns how many were removed."""
        removed = 0
        for d in DOMAINS:
            for tmp in (self.dir / d).glob(".epoch*.npy.tmp-*"):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed


    def discard_after(self, epoch: int) -> int:
        """Delete every file of an epoch above ``epoch`` (the rollback to a committed epoch:
        those epochs were never committed and a resumed run writes them anew); the directory
        is fsync'ed. Returns how many files were removed."""
        removed = 0
        for d in DOMAINS:
            for e in self.epochs_present(d):
                if e > epoch:
                    self.path(d, e).unlink()
                    removed += 1
            if (self.dir / d).is_dir():
                fd = os.open(self.dir / d, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return removed


class DomainWriters:
    """One writer thread per domain: FIFO queue, random delay, durable write, ``report``.

    ``report(domain_index, epoch)`` is called after the file is durable, holding
    :attr:`report_lock` (one call at a time, so a non-thread-safe NIC driver is fine if
    every other user of it takes the lock too). FIFO order per domain means a
    reported epoch implies all earlier submitted epochs of that domain are durable.
    ``delay_s`` is ``(lo, hi)`` for every domain or one ``(lo, hi)`` per domain; delays come
    from a private ``random.Random`` per domain, derived from ``seed``. :meth:`submit`
    blocks while ``max_pending`` submitted epochs are not yet written by every domain
    (bounded run-ahead). After any writer fails, nothing more is written or reported (by
    any domain); the first error is re-raised by :meth:`submit`, :meth:`drain` and
    :meth:`close`.
    """

    def __init__(self, store: CheckpointStore, report: Callable[[int, int], None],
                 delay_s: DelaySpec = (0.0, 0.0), seed: int = 0, max_pending: int = 2):
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        shape = np.shape(delay_s)
        ranges = [tuple(delay_s)] * len(DOMAINS) if shape == (2,) else [tuple(r) for r in delay_s]
        if np.shape(ranges) != (len(DOMAINS), 2) or any(not 0 <= lo <= hi for lo, hi in ranges):
            raise ValueError(f"delay_s must be (lo, hi) with 0 <= lo <= hi, or one such pair "
                             f"per domain; got {delay_s!r}")
        self.store, self.report, self.max_pending = store, report, max_pending
        self.report_lock = threading.Lock()
        self._cond = threading.Condition()
        self._remaining: dict[int, int] = {}     # epoch -> domains not yet done
        self._error: BaseException | None = None
        self._queues: list[queue.Queue] = [queue.Queue() for _ in DOMAINS]
        self._threads = [
            threading.Thread(target=self._run, name=f"writer-{d}", daemon=True,
                             args=(i, d, random.Random(seed * 1_000_003 + i), ranges[i]))
            for i, d in enumerate(DOMAINS)]
        for t in self._threads:
            t.start()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, epoch: int, state: TrainState) -> None:
        """Snapshot ``state`` and queue every domain's array of ``epoch`` for writing."""
        arrays = state.to_domains()
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None
                                or len(self._remaining) < self.max_pending)
            self._raise_error()
            self._remaining[epoch] = self._remaining.get(epoch, 0) + len(DOMAINS)
        for i, d in enumerate(DOMAINS):
            self._queues[i].put((epoch, arrays[d]))

    def _run(self, index: int, domain: str, rnd: random.Random,
             delay: tuple[float, float]) -> None:
        while (item := self._queues[index].get()) is not None:
            epoch, array = item
            try:
                if self._error is None:
                    time.sleep(rnd.uniform(*delay))
                    self.store.write(domain, epoch, array)
                    with self.report_lock:
                        self.report(index, epoch)
            except BaseException as exc:   # noqa: BLE001 - surfaced on submit/drain/close
                with self._cond:
                    self._error = self._error or exc
            finally:
                with self._cond:
                    self._remaining[epoch] -= 1
                    if not self._remaining[epoch]:
                        del self._remaining[epoch]
                    self._cond.notify_all()
                self._queues[index].task_done()

    def drain(self) -> None:
        """Wait until every queued write is done (or abandoned after an error); re-raise."""
        for q in self._queues:
            q.join()
        self._raise_error()

    def close(self) -> None:
        """Drain, stop the threads, re-raise any writer error."""
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        self._raise_error()

    def __enter__(self) -> DomainWriters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NicLike(Protocol):
    """What the worker loop needs from a node's NIC (the demo passes a host driver)."""
    def persisted(self, domain: int, epoch: int) -> None:
        """Report that ``domain`` (index into DOMAINS) is durable up to ``epoch``."""

    def committed(self) -> int:
        """The cluster-wide COMMITTED epoch."""

    def enable_domain(self, domain: int, durable_epoch: int) -> None:
        """Count ``domain`` in the node's meet, starting at ``durable_epoch``."""

    def set_online(self, on: bool) -> None:
        """Join (or leave) the epoch protocol."""


def _train_and_write(store: CheckpointStore, state: TrainState, first: int, last: int,
                     nic: NicLike, steps_per_epoch: int, delay_s: DelaySpec, seed: int,
                     max_pending: int,
                     on_epoch: Callable[[int, TrainState], None] | None) -> TrainState:
    delay_seed = (seed * 7919 + store.node) * 100_003 + first
    with DomainWriters(store, nic.persisted, delay_s, delay_seed, max_pending) as writers:
        for epoch in range(first + 1, last + 1):
            state = train_epoch(state, steps_per_epoch, store.config)
            writers.submit(epoch, state)
            if on_epoch is not None:
                with writers.report_lock:        # the callback may use the NIC too
                    on_epoch(epoch, state)
    return state


def run_node(node: int, root: Path | str, first_epoch: int, last_epoch: int, nic: NicLike, *,
             steps_per_epoch: int = 20, delay_s: DelaySpec = (0.0, 0.02), seed: int = 0,
             on_epoch: Callable[[int, TrainState], None] | None = None,
             max_pending: int = 2) -> TrainState:
    """Train epochs ``first_epoch+1 .. last_epoch`` and checkpoint each asynchronously.

    With ``first_epoch == 0`` the initial state is written synchronously as epoch 0 of
    every domain, every domain is enabled on the NIC at 0, and the NIC is set online.
    Otherwise this is :func:`resume_node` (state loaded from ``first_epoch``). Training
    runs ahead of the writers by at most ``max_pending`` epochs. ``on_epoch(epoch, state)``
    is called after each epoch is submitted, holding the writers' report lock (so it may
    call the NIC safely). Returns the final state once every write is reported.
    """
    if first_epoch != 0:
        return resume_node(node, root, first_epoch, last_epoch, nic,
                           steps_per_epoch=steps_per_epoch, delay_s=delay_s, seed=seed,
                           on_epoch=on_epoch, max_pending=max_pending)
    store = CheckpointStore(root, node)
    state = initial_state(node, seed, store.config)
    for d, array in state.to_domains().items():
        store.write(d, 0, array)
    for i in range(len(DOMAINS)):
        nic.enable_domain(i, 0)
    nic.set_online(True)
    return _train_and_write(store, state, 0, last_epoch, nic, steps_per_epoch, delay_s, seed,
                            max_pending, on_epoch)


def recover_node(node: int, root: Path | str, nic: NicLike, *, seed: int = 0) -> dict[str, int]:
    """After a restart: remove temp files, re-enable each domain at its durable epoch, go online.

    A domain without epoch 0 (crash during start-up) gets epoch 0 rewritten first.
    Returns ``{domain: durable_epoch}``. The caller then picks the restore epoch (the NIC's
    COMMITTED) and calls :func:`resume_node`.
    """
    store = CheckpointStore(root, node)
    store.cleanup_temp()
    initial = initial_state(node, seed, store.config).to_domains()
    durable = {}
    for i, d in enumerate(DOMAINS):
        if store.durable_epoch(d) < 0:
            store.write(d, 0, initial[d])
        durable[d] = store.durable_epoch(d)
        nic.enable_domain(i, durable[d])
    nic.set_online(True)
    return durable


def resume_node(node: int, root: Path | str, restore_epoch: int, last_epoch: int, nic: NicLike,
                *, steps_per_epoch: int = 20, delay_s: DelaySpec = (0.0, 0.02), seed: int = 0,
                on_epoch: Callable[[int, TrainState], None] | None = None,
                max_pending: int = 2) -> TrainState:
    """Load every domain from ``restore_epoch`` and continue as :func:`run_node` does.

    Epochs after ``restore_epoch`` are written again through the normal atomic path (same
    bytes, since training is deterministic) and reported again.
    """
    store = CheckpointStore(root, node)
    state = store.load_state(restore_epoch)
    if (state.node, state.seed) != (node, seed):
        raise ValueError(f"checkpoint {store.dir} epoch {restore_epoch} belongs to node "
                         f"{state.node} seed {state.seed}, not node {node} seed {seed}")
    return _train_and_write(store, state, restore_epoch, last_epoch, nic, steps_per_epoch,
                            delay_s, seed, max_pending, on_epoch)


def reference_trajectory(node: int, epochs: int, steps_per_epoch: int = 20,
                         seed: int = 0) -> list[TrainState]:
    """Uninterrupted states of ``node`` at epoch boundaries 0..epochs (``epochs + 1`` items)."""
    states = [initial_state(node, seed)]
    for _ in range(epochs):
        states.append(train_epoch(states[-1], steps_per_epoch))
    return states


def states_equal(a: TrainState, b: TrainState) -> bool:
    """True when every domain of ``a`` and ``b`` is bit-identical."""
    da, db = a.to_domains(), b.to_domains()
    return all(da[d].dtype == db[d].dtype and da[d].tobytes() == db[d].tobytes()
               for d in DOMAINS)


def mixed_epochs(epochs_by_domain: Mapping[str, int]) -> bool:
    """True when the domains do not all come from the same epoch."""
    return len(set(epochs_by_domain.values())) > 1


def format_epochs(epochs_by_domain: Mapping[str, int]) -> str:
    """One line such as ``params=7 adam_m=6 ... -> MIXED`` or ``... -> consistent @7``."""
    parts = " ".join(f"{d}={e}" for d, e in epochs_by_domain.items())
    if mixed_epochs(epochs_by_domain):
        return f"{parts} -> MIXED"
    return f"{parts} -> consistent @{next(iter(epochs_by_domain.values()), '?')}"


def first_step_divergence(state: TrainState, trajectory: Sequence[TrainState],
                          steps: int = 1) -> tuple[int, float]:
    """How far ``steps`` optimizer steps from ``state`` land from any true trajectory.

    For every k, distance = ||p - p_k||_2 / ||p_k||_2, where p are the params after
    ``steps`` steps from ``state`` and p_k after ``steps`` steps from ``trajectory[k]``.
    Returns ``(k, distance)`` with the smallest distance (the first k on ties). A consistent
    state of epoch k gives exactly 0.0; a mixed-epoch state gives > 0.
    """
    if not trajectory:
        raise ValueError("empty trajectory")
    p = train_epoch(state, steps).params
    best = (-1, float("inf"))
    for k, ref in enumerate(trajectory):
        p_k = train_epoch(ref, steps).params
        dist = float(np.linalg.norm(p - p_k) / np.linalg.norm(p_k))
        if dist < best[1]:
            best = (k, dist)
    return best
