"""``make demo``: four training nodes commit checkpoints through their NICs, crash, and recover.

What runs (no board needed):

* a simulated cluster: the real NIC gateware (epoch engine, link engines, host UART, register
  map) of 4 nodes under Verilator, with bit errors on every link (:mod:`epochlink.sim.server`);
* four training-node processes, each training a numpy MLP with AdamW whose state is split into
  five persistence domains (parameters, first moment, second moment, data cursor, RNG). Each
  domain of each epoch is written durably (fsync) by its own writer after a random delay and
  only then reported to the node's NIC (:mod:`epochlink.training`);
* midway every training process is killed (in-flight writes are lost) and two NICs lose power
  (reset). The nodes restart and recover.

It prints, side by side, recovery from the NICs' COMMITTED epoch against the usual "latest
file per domain" recovery, and checks the resumed run against an uninterrupted one.

Recovery protocol (what the restarted workers do, see docs/epoch.md):

1. re-enable each domain at the epoch found durable on storage, set port roles, go online;
   the NICs converge on COMMITTED = the cluster-wide meet (reset NICs relearn it);
2. once every node's NIC shows the same COMMITTED c: every node goes offline, then resets its
   epoch engine, deletes its files above c (never committed), re-enables every domain at c
   and goes online: the rollback, after which epochs rise again from c;
3. every node restores all of its domains from epoch c and trains on.
"""
from __future__ import annotations

import argparse
import json
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DemoConfig", "run_demo", "main"]

#: Per-domain write delay ranges in seconds (params is the slowest, as a large shard would be).
DELAYS = ((0.020, 0.060), (0.010, 0.040), (0.010, 0.040), (0.000, 0.010), (0.000, 0.005))


@dataclass
class DemoConfig:
    """Knobs of one demo run."""
    nodes: int = 4
    topology: str = "line"
    ber: float = 1e-4
    epochs: int = 14            #: training epochs in total
    crash_after: int = 7        #: kill once every node has trained this many epochs
    steps_per_epoch: int = 20
    seed: int = 2026
    crashed_nics: tuple = (1, 3)   #: NICs that lose power in the crash
    workdir: Path | None = None
    verbose: bool = True


@dataclass
class Worker:
    """A training-node process and what it has told the orchestrator."""
    node: int
    proc: subprocess.Popen
    events: "queue.Queue[dict]" = field(default_factory=queue.Queue)
    last: dict = field(default_factory=dict)

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()


# --------------------------------------------------------------------------------------------
# The training-node process
# --------------------------------------------------------------------------------------------

def _emit(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _commands() -> "queue.Queue[dict]":
    q: queue.Queue = queue.Queue()

    def reader():
        for line in sys.stdin:
            if line.strip():
                q.put(json.loads(line))
    threading.Thread(target=reader, daemon=True).start()
    return q


def worker_main(argv: list[str]) -> int:
    """One training node (``python -m epochlink.demo worker ...``), driven by the orchestrator."""
    from .host.node import Node, Role
    from .training import DOMAINS, CheckpointStore, recover_node, resume_node, run_node

    p = argparse.ArgumentParser(prog="epochlink.demo worker")
    p.add_argument("--node", type=int, required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--roles", required=True, help="comma-separated Role values per port")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--mode", choices=("fresh", "recover"), required=True)
    args = p.parse_args(argv)
    roles = [Role(int(r)) for r in args.roles.split(",") if r]
    train = dict(steps_per_epoch=args.steps, delay_s=DELAYS, seed=args.seed)

    # PERSIST, ENABLE, ROLE and ONLINE writes are idempotent: resending one whose answer was
    # lost is safe, so let the driver retry writes too.
    with Node(args.url, timeout=3.0, retries=3, retry_writes=True) as nic:
        def progress(epoch, state):
            _emit(event="epoch", epoch=epoch, committed=nic.committed())

        for port, role in enumerate(roles):
            nic.set_role(port, role)
        if args.mode == "fresh":
            run_node(args.node, args.root, 0, args.epochs, nic, on_epoch=progress, **train)
            _emit(event="done", committed=nic.committed())
            return 0

        durable = recover_node(args.node, args.root, nic, seed=args.seed)
        _emit(event="ready", durable=durable)
        commands = _commands()
        while True:
            try:
                cmd = commands.get(timeout=0.05)
            except queue.Empty:
                _emit(event="committed", value=nic.committed())
                continue
            if cmd["cmd"] == "offline":
                nic.set_online(False)
                _emit(event="offline")
            elif cmd["cmd"] == "rollback":
                c = cmd["epoch"]
                seen = nic.committed()
                if seen != c:
                    _emit(event="error", message=f"NIC COMMITTED is {seen}, orchestrator says {c}")
                    return 1
                nic.reset_epoch_engine()
                removed = CheckpointStore(args.root, args.node).discard_after(c)
                nic.bring_up({d: c for d in range(len(DOMAINS))}, roles)
                _emit(event="restored", epoch=c, removed=removed)
                resume_node(args.node, args.root, c, args.epochs, nic, on_epoch=progress, **train)
                _emit(event="done", committed=nic.committed())
                return 0


# --------------------------------------------------------------------------------------------
# The orchestrator (the job launcher's part)
# --------------------------------------------------------------------------------------------

class DemoFailed(RuntimeError):
    pass


def _say(cfg: DemoConfig, text: str = "") -> None:
    if cfg.verbose:
        print(text, flush=True)


def _spawn(cfg, sim, node, root, logs, mode) -> Worker:
    roles = ",".join(str(int(r)) for _, r in sim.topology.ports(node))
    cmd = [sys.executable, "-m", "epochlink.demo", "worker", "--node", str(node),
           "--url", sim.urls[node], "--root", str(root), "--roles", roles,
           "--epochs", str(cfg.epochs), "--steps", str(cfg.steps_per_epoch),
           "--seed", str(cfg.seed), "--mode", mode]
    log = open(logs / f"node{node}-{mode}.log", "w")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                            text=True, bufsize=1)
    worker = Worker(node, proc)

    def reader():
        for line in proc.stdout:
            try:
                worker.events.put(json.loads(line))
            except json.JSONDecodeError:
                log.write(line)
        worker.events.put({"event": "exit"})
    threading.Thread(target=reader, daemon=True).start()
    return worker


def _pump(workers, timeout=0.05) -> list[tuple[Worker, dict]]:
    """Events that arrived from any worker (waits up to ``timeout`` for the first)."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        for w in workers:
            while True:
                try:
                    event = w.events.get_nowait()
                except queue.Empty:
                    break
                w.last[event["event"]] = event
                got.append((w, event))
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(0.005)


def _wait_all(workers, event, timeout, what, logs) -> None:
    deadline = time.monotonic() + timeout
    while not all(event in w.last for w in workers):
        for w, e in _pump(workers):
            if e["event"] in ("error", "exit") and event not in w.last:
                raise DemoFailed(f"node {w.node} {e.get('message', 'exited')} while {what}; "
                                 f"see {logs}/node{w.node}-*.log")
        if time.monotonic() > deadline:
            missing = [w.node for w in workers if event not in w.last]
            raise DemoFailed(f"timed out {what} (nodes {missing}); see {logs}")


def _agree(workers, stable_s: float, logs, timeout: float = 300.0) -> int:
    """Wait until every worker's NIC has shown the same COMMITTED for ``stable_s`` seconds."""
    c, since, deadline = None, time.monotonic(), time.monotonic() + timeout
    for w in workers:
        w.last.pop("committed", None)
    while True:
        for w, e in _pump(workers):
            if e["event"] in ("exit", "error"):
                raise DemoFailed(f"node {w.node}: {e.get('message', 'exited')}; see {logs}")
        values = {w.last.get("committed", {}).get("value") for w in workers}
        value = values.pop() if len(values) == 1 else None
        if value != c:
            c, since = value, time.monotonic()
        elif c is not None and time.monotonic() - since > stable_s:
            return c
        if time.monotonic() > deadline:
            raise DemoFailed(f"the NICs did not agree on COMMITTED; see {logs}")


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; returns its measured results (also printed when ``cfg.verbose``)."""
    from .host.node import Node
    from .sim.server import SimServer
    from .training import (DOMAINS, CheckpointStore, first_step_divergence, format_epochs,
                           mixed_epochs, reference_trajectory, states_equal)

    started = time.monotonic()
    workdir = cfg.workdir or Path("build") / "demo" / time.strftime("run-%Y%m%d-%H%M%S")
    root, logs = workdir / "checkpoints", workdir / "logs"
    root.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    result: dict = {"workdir": str(workdir)}

    _say(cfg, f"epochlink demo: {cfg.nodes} training nodes, {cfg.topology} of NICs, "
              f"bit error rate {cfg.ber:g} on every link")
    _say(cfg, "building the NIC cluster for Verilator (cached; the first build takes 1-3 minutes) ...")
    sim = SimServer(nodes=cfg.nodes, topology=cfg.topology, ber=cfg.ber)
    sim.build_design()
    workers: list[Worker] = []
    try:
        sim.start()
        result["sim_log"] = str(sim.log_path)
        for i in range(cfg.nodes):
            _say(cfg, f"  NIC {i}: {sim.urls[i]}  ports: "
                      + ", ".join(f"{r.name.lower()} to node {peer}" for peer, r in sim.topology.ports(i)))

        # -- phase 1: train and checkpoint; every domain reported only once durable --------
        _say(cfg, f"\nphase 1: training {cfg.epochs} epochs; each of the {len(DOMAINS)} domains "
                  "is written with fsync after a random delay, then reported to the NIC")
        workers = [_spawn(cfg, sim, i, root, logs, "fresh") for i in range(cfg.nodes)]
        shown = -1
        while True:
            for w, e in _pump(workers):
                if e["event"] == "exit" and "done" not in w.last:
                    raise DemoFailed(f"node {w.node} exited early; see {logs}/node{w.node}-fresh.log")
            trained = [w.last.get("epoch", {}).get("epoch", 0) for w in workers]
            committed = [w.last.get("epoch", {}).get("committed", 0) for w in workers]
            if min(trained) > shown:
                shown = min(trained)
                _say(cfg, f"  trained: {' '.join(f'{t:2d}' for t in trained)}   "
                          f"NIC COMMITTED: {' '.join(f'{c:2d}' for c in committed)}")
            if min(trained) >= cfg.crash_after:
                break
            if time.monotonic() - started > 600:
                raise DemoFailed(f"phase 1 is too slow; see {logs}")
        result["committed_before_crash"] = max(committed)

        # -- the crash ------------------------------------------------------------------------
        time.sleep(rng.uniform(0.0, 0.05))
        for w in workers:
            w.proc.send_signal(signal.SIGKILL)
        for w in workers:
            w.proc.wait()
        for i in cfg.crashed_nics:
            sim.reset_node(i)
        _say(cfg, f"\ncrash: every training process killed (SIGKILL, in-flight writes lost); "
                  f"NICs {', '.join(map(str, cfg.crashed_nics))} lost power (reset)")

        # The usual recovery: the newest file of each domain, looked at right after the crash.
        trajectories = [reference_trajectory(i, cfg.epochs, cfg.steps_per_epoch, cfg.seed)
                        for i in range(cfg.nodes)]
        latest = []
        for i in range(cfg.nodes):
            state, epochs = CheckpointStore(root, i).load_latest_per_domain()
            k, distance = first_step_divergence(state, trajectories[i])
            latest.append({"epochs": epochs, "mixed": mixed_epochs(epochs),
                           "nearest_epoch": k, "divergence": distance})

        # -- phase 2: restart and recover from the NICs' COMMITTED -----------------------------
        _say(cfg, "\nphase 2: nodes restart; each re-enables its domains at what is durable, "
                  "the NICs converge on COMMITTED")
        workers = [_spawn(cfg, sim, i, root, logs, "recover") for i in range(cfg.nodes)]
        _wait_all(workers, "ready", 120, "re-enabling domains", logs)
        c = _agree(workers, 0.5, logs)
        _say(cfg, f"  every NIC shows COMMITTED = {c}")
        # Offline first, so COMMITTED cannot move while the nodes roll back.
        for w in workers:
            w.send(cmd="offline")
        _wait_all(workers, "offline", 60, "going offline", logs)
        c = _agree(workers, 0.3, logs)
        _say(cfg, f"  rollback to {c}: offline, epoch engines reset, files above {c} removed, "
                  f"domains re-enabled at {c}; every node restores epoch {c} and trains on")
        for w in workers:
            w.send(cmd="rollback", epoch=c)
        _wait_all(workers, "done", 600, "resuming", logs)
        for w in workers:
            w.proc.wait(timeout=30)
        result["committed_after_crash"] = c
        # -- the last epoch commits everywhere; what the links went through -----------------
        links, result["final_committed"] = [], []
        for i in range(cfg.nodes):
            with Node(sim.urls[i], timeout=3.0) as nic:
                result["final_committed"].append(nic.wait_committed(cfg.epochs, timeout=60))
                for port in range(len(sim.topology.ports(i))):
                    links.append(nic.port_status(port).counters)
        result["links"] = {k: sum(c.get(k, 0) for c in links)
                           for k in ("frames_tx", "crc_errors", "retransmits", "link_downs")}
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
        sim.stop()

    # -- verdicts ----------------------------------------------------------------------------------
    nic_side = []
    for i in range(cfg.nodes):
        store = CheckpointStore(root, i)
        restored = store.load_state(c)
        final = store.load_state(cfg.epochs)
        nic_side.append({
            "consistent": states_equal(restored, trajectories[i][c]),
            "divergence": first_step_divergence(restored, trajectories[i])[1],
            "bit_identical": states_equal(final, trajectories[i][cfg.epochs]),
        })
    result.update(nic=nic_side, latest=latest, seconds=round(time.monotonic() - started, 1))
    result["ok"] = (all(n["consistent"] and n["bit_identical"] and n["divergence"] == 0.0
                        for n in nic_side)
                    and c >= result["committed_before_crash"])
    _report(cfg, result, c, DOMAINS, format_epochs)
    return result


def _report(cfg, result, c, domains, format_epochs) -> None:
    if not cfg.verbose:
        return
    width = 44
    print("\n" + "=" * (2 * width + 10))
    print(f"{'':6}{'recovery from NIC COMMITTED':<{width}}  {'recovery from latest file per domain':<{width}}")
    print("-" * (2 * width + 10))
    for i, (n, b) in enumerate(zip(result["nic"], result["latest"])):
        left = f"every domain @ {c}: " + ("consistent" if n["consistent"] else "INCONSISTENT")
        right = " ".join(f"{d.split('_')[-1][:6]}={e}" for d, e in b["epochs"].items())
        right += "  MIXED" if b["mixed"] else "  one epoch"
        print(f"node {i} {left:<{width}}  {right:<{width}}")
        left = f"first step off every true trajectory: {n['divergence']:.1e}"
        right = f"first step off every true trajectory: {b['divergence']:.1e}"
        print(f"{'':6} {left:<{width}}  {right:<{width}}")
    cluster_epochs = sorted({e for b in result["latest"] for e in b["epochs"].values()})
    print("-" * (2 * width + 10))
    print(f"{'':6} {'one epoch on every node: ' + str(c):<{width}}  "
          f"{'epochs mixed across the cluster: ' + ', '.join(map(str, cluster_epochs)):<{width}}")
    identical = sum(n["bit_identical"] for n in result["nic"])
    print(f"{'':6} {f'resumed run bit-identical to uninterrupted: {identical}/{cfg.nodes}':<{width}}")
    print("=" * (2 * width + 10))
    links = result["links"]
    print(f"links: {links['frames_tx']} frames sent, {links['crc_errors']} corrupted frames caught by "
          f"CRC, {links['retransmits']} retransmissions, {links['link_downs']} link resets")
    print(f"COMMITTED before the crash (highest seen): {result['committed_before_crash']}; "
          f"after recovery: {c}; at the end: {max(result['final_committed'])}")
    print(f"verdict: {'PASS' if result['ok'] else 'FAIL'} in {result['seconds']} s")
    print(f"checkpoints: {result['workdir']}/checkpoints   logs: {result['workdir']}/logs   "
          f"simulator log: {result.get('sim_log')}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m epochlink.demo",
                                description="Training nodes commit checkpoints through simulated "
                                            "epochlink NICs, crash, and recover.")
    p.add_argument("--nodes", type=int, default=4, choices=range(2, 9), metavar="N",
                   help="training nodes (2..8, default 4)")
    p.add_argument("--topology", choices=("line", "star", "tree"), default="line")
    p.add_argument("--ber", type=float, default=1e-4, help="link bit error rate (default 1e-4)")
    p.add_argument("--epochs", type=int, default=14)
    p.add_argument("--crash-after", type=int, default=7)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    if not 1 <= args.crash_after < args.epochs:
        p.error("need 1 <= --crash-after < --epochs")
    if not 0 <= args.ber < 0.01:
        p.error("--ber must be in [0, 0.01)")
    crashed = tuple(i for i in (1, 3) if i < args.nodes)
    cfg = DemoConfig(nodes=args.nodes, topology=args.topology, ber=args.ber, epochs=args.epochs,
                     crash_after=args.crash_after, seed=args.seed, crashed_nics=crashed,
                     workdir=args.workdir)
    try:
        return 0 if run_demo(cfg)["ok"] else 1
    except DemoFailed as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
