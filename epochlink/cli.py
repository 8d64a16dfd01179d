"""The ``epochlink`` command line: run a simulated cluster, inspect and drive NICs.

Examples (a simulated 4-node cluster in one terminal, commands in another)::

    epochlink sim --nodes 4 --topology line --ber 1e-4
    epochlink bring-up --port socket://127.0.0.1:PORT --domains 2 --roles child
    epochlink persist --port socket://127.0.0.1:PORT 0 1
    epochlink committed --port socket://127.0.0.1:PORT
    epochlink wait --port socket://127.0.0.1:PORT 1 --timeout 10
    epochlink status --port /dev/ttyUSB1              # a board, through its USB UART

``--port`` defaults to the environment variable ``EPOCHLINK_PORT``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from .hdl.epoch_format import Role

__all__ = ["main"]

EXAMPLES = (__doc__.split("::", 1)[1].replace("``", "")
            + "\nDocs: README.md (walkthrough), docs/registers.md (every register).")


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", default=os.environ.get("EPOCHLINK_PORT"),
                        help="serial port or pyserial URL of the NIC: /dev/ttyUSB1, "
                             "socket://127.0.0.1:PORT (default: $EPOCHLINK_PORT)")
    parser.add_argument("--baud", type=int, default=None,
                        help="UART baud rate for a serial port (default: 1000000)")
    parser.add_argument("--io-timeout", type=float, default=1.0, metavar="SECONDS",
                        help="time to wait for each response (default: 1.0; simulations are slow)")


def _epoch(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= 0xFFFF_FFFF:
        raise argparse.ArgumentTypeError(f"{value} is not a 32-bit unsigned epoch")
    return value


def _domain(text: str) -> int:
    value = _epoch(text)
    if value > 255:
        raise argparse.ArgumentTypeError(f"domain {value} is not 0..255")
    return value


def _roles(text: str) -> list[Role]:
    roles = []
    for name in filter(None, text.split(",")):
        try:
            roles.append(Role[name.strip().upper()])
        except KeyError:
            raise argparse.ArgumentTypeError(
                f"unknown role {name!r}; use off, parent or child, comma-separated per port") from None
    return roles


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epochlink",
        description="epochlink: link-level atomic checkpoint commit. A checkpoint epoch counts "
                    "as committed only when every persistence domain of every node has made it "
                    "durable and the NICs have converged on it (COMMITTED).",
        epilog="examples (a simulated cluster in one terminal, commands in another):" + EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("sim", add_help=False,
                   help="run a simulated cluster (Verilator) with each NIC on a TCP port "
                        "(see `epochlink sim --help`)")

    p = sub.add_parser("status", help="show a NIC: identity, epochs, versions, links")
    _add_connection(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser("persist", help="report that DOMAIN's data for EPOCH is durable")
    _add_connection(p)
    p.add_argument("domain", type=_domain, help="persistence domain number")
    p.add_argument("epoch", type=_epoch, help="epoch made durable (epochs only rise)")

    p = sub.add_parser("committed", help="print the NIC's COMMITTED epoch (restore this one)")
    _add_connection(p)

    p = sub.add_parser("wait", help="wait until COMMITTED reaches EPOCH")
    _add_connection(p)
    p.add_argument("epoch", type=_epoch)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default: 30)")

    p = sub.add_parser("bring-up", help="after power-up or reset: enable domains at their "
                                        "durable epoch, set port roles, go online")
    _add_connection(p)
    p.add_argument("--domains", type=int, default=1, help="domains 0..N-1 to enable (default: 1)")
    p.add_argument("--at", type=_epoch, default=0, metavar="EPOCH",
                   help="their durable epoch (default: 0)")
    p.add_argument("--roles", type=_roles, default=[],
                   help="port roles in port order, e.g. parent,child (default: all off)")
    p.add_argument("--active", type=int, default=None, help="ACTIVE protocol version (1..255)")

    p = sub.add_parser("bench", add_help=False,
                       help="run the benchmarks (see `epochlink bench --help`)")
    return parser


def _open(args):
    from serial import SerialException

    from .host.node import Node
    if not args.port:
        raise _UsageError("no NIC given: use --port (e.g. socket://127.0.0.1:PORT from "
                          "`epochlink sim`, or /dev/ttyUSB1) or set EPOCHLINK_PORT")
    kwargs = {"timeout": args.io_timeout}
    if args.baud:
        kwargs["baudrate"] = args.baud
    try:
        return Node(args.port, **kwargs)
    except (SerialException, OSError, ValueError) as error:
        raise _Failure(f"cannot open {args.port}: {error}") from None


class _UsageError(Exception):
    pass


class _Failure(Exception):
    pass


def _status(node, as_json: bool) -> None:
    info = node.identify()
    epoch = node.epoch_status()
    ports = [node.port_status(p) for p in range(info.ports)]
    if as_json:
        print(json.dumps({"node": asdict(info), "epoch": asdict(epoch),
                          "ports": [dict(asdict(p), state=p.state.name, role=p.role.name) for p in ports]},
                         indent=2, default=str))
        return
    v = epoch.versions
    print(f"node {info.node_id}: gateware {'.'.join(map(str, info.version))}, {info.ports} port(s)")
    print(f"  COMMITTED {epoch.committed}   LOCAL {epoch.local if epoch.local is not None else '-'}"
          f"   REPORT {epoch.report if epoch.report is not None else '-'}"
          f"   {'online' if epoch.online else 'OFFLINE'}")
    print(f"  versions: active {v.active}, subtree {v.subtree}, converged {v.converged or '-'}, "
          f"supported {v.supported[0]}..{v.supported[1]}")
    print(f"  refused commands {epoch.refused}, malformed {epoch.malformed}, misrouted {epoch.misrouted}")
    for p in ports:
        c = p.counters
        print(f"  port {p.port}: {p.state.name:<12} peer {p.peer_id:<4} role {p.role.name:<6}"
              f" frames tx {c.get('frames_tx', 0)} rx {c.get('frames_rx', 0)}"
              f" crc errors {c.get('crc_errors', 0)} retransmits {c.get('retransmits', 0)}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:
        from .sim.server import sim_main
        return sim_main(argv[1:])
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main
        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2

    from .host.protocol import EpochlinkError
    try:
        with _open(args) as node:
            if args.command == "status":
                _status(node, args.json)
            elif args.command == "persist":
                print(node.persisted(args.domain, args.epoch))
            elif args.command == "committed":
                print(node.committed())
            elif args.command == "wait":
                print(node.wait_committed(args.epoch, args.timeout))
            elif args.command == "bring-up":
                node.bring_up({d: args.at for d in range(args.domains)}, args.roles,
                              active=args.active)
                print(f"online: domains 0..{args.domains - 1} at epoch {args.at}, roles "
                      f"{','.join(r.name.lower() for r in args.roles) or 'none'}")
    except _UsageError as error:
        parser.error(str(error))
    except (_Failure, EpochlinkError) as error:
        print(f"epochlink {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
