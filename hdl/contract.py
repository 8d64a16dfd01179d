"""The transfer contract: what each side knows in each phase, and what a fault leaves.

One source of truth: ``docs/link.md`` shows this table (``python -m epochlink.hdl.contract``
renders it) and ``tests/test_link_contract.py`` drives a real pair of engines under
Verilator into every phase, injects every fault, and checks every cell.

Outcomes are counted at the far side's output (B's ``payload_out``) after the fault and
the link's recovery: ``ONCE`` (delivered exactly once), ``NEVER`` (both sides agree the
transfer never happened; only A's host, whose NIC lost it, can offer it again), ``TWICE``
(the receiver's previous incarnation delivered it and the sender, which never learned so,
delivers it again to the new incarnation: at-least-once across a receiver reset).

Two transfer classes share the phases. *Payload* (``payload_in`` -> ``payload_out``) is
delivered at the commit (after the third one-way trip), so every fault leaves both sides
agreeing. *Control* (``ctrl_in`` -> ``ctrl_out``, the epoch engine's REPORT/COMMIT
messages, lattice facts) is delivered at its first intact arrival (good FCS, the current
link incarnation, sequence number in the receive window), in sequence order, and at most
once per sequence number while neither end restarts: its column counts B's ``ctrl_out``.
A sender reset no longer undoes what B already took (``ONCE`` where payload says
``NEVER``), and a receiver reset after the arrival gives the new incarnation a second copy
(``TWICE``): at-least-once across resets, at-most-once otherwise, never out of order.
"""
from dataclasses import dataclass

__all__ = ["Phase", "PHASES", "FAULTS", "CLASSES", "ONCE", "NEVER", "TWICE", "render_markdown"]

ONCE, NEVER, TWICE = "once", "never", "twice"
FAULTS = ("cut", "reset_a", "reset_b")
CLASSES = ("payload", "ctrl")


@dataclass(frozen=True)
class Phase:
    name: str
    reached_by: str        #: the last one-way trip that happened
    a_knows: str
    b_knows: str
    responsible: str       #: who must see the transfer through
    outcome: dict          #: fault -> ONCE / NEVER / TWICE (payload class)
    ctrl_b_knows: str      #: what B knows of a control-class transfer
    ctrl_outcome: dict     #: fault -> ONCE / NEVER / TWICE (control class)

    def outcomes(self, klass):
        return self.outcome if klass == "payload" else self.ctrl_outcome


PHASES = (
    Phase("SENT", "DATA in flight or lost",
          "holds the message; nothing from B", "nothing", "A",
          {"cut": ONCE, "reset_a": NEVER, "reset_b": ONCE},
          "nothing",
          {"cut": ONCE, "reset_a": NEVER, "reset_b": ONCE}),
    Phase("TENTATIVE", "DATA arrived (REFLECT lost or in flight)",
          "holds the message; no matching REFLECT", "holds it tentatively; must not deliver", "A",
          {"cut": ONCE, "reset_a": NEVER, "reset_b": ONCE},
          "delivered it at this first intact arrival",
          {"cut": ONCE, "reset_a": ONCE, "reset_b": TWICE}),
    Phase("REFLECTED", "REFLECT arrived, digest matched (commit in flight)",
          "B holds an intact copy", "holds it; does not know A knows", "A",
          {"cut": ONCE, "reset_a": NEVER, "reset_b": ONCE},
          "delivered it (at its arrival)",
          {"cut": ONCE, "reset_a": ONCE, "reset_b": TWICE}),
    Phase("DELIVERED", "commit cursor arrived at B (delivery cursor in flight)",
          "B holds an intact copy; not yet that B delivered", "A knows B has it: delivered", "B (A keeps a copy)",
          {"cut": ONCE, "reset_a": ONCE, "reset_b": TWICE},
          "delivered it (at its arrival); A knows B has it",
          {"cut": ONCE, "reset_a": ONCE, "reset_b": TWICE}),
    Phase("FREED", "delivery cursor arrived at A",
          "B delivered; copy freed", "delivered", "nobody: done",
          {"cut": ONCE, "reset_a": ONCE, "reset_b": ONCE},
          "delivered",
          {"cut": ONCE, "reset_a": ONCE, "reset_b": ONCE}),
)

_FAULT_TEXT = {"cut": "link cut (both sides go DOWN, then re-init)",
               "reset_a": "sender A reset", "reset_b": "receiver B reset"}
_OUTCOME_TEXT = {ONCE: "delivered once", NEVER: "never happened (both agree)",
                 TWICE: "delivered again to B's new incarnation"}


def render_markdown() -> str:
    """The payload table, then the control-class table (one Markdown block)."""
    lines = ["| phase | reached by | A (sender) knows | B (receiver) knows | responsible | "
             + " | ".join(_FAULT_TEXT[f] for f in FAULTS) + " |",
             "|" + "---|" * (5 + len(FAULTS))]
    for p in PHASES:
        lines.append(f"| {p.name} | {p.reached_by} | {p.a_knows} | {p.b_knows} | {p.responsible} | "
                     + " | ".join(_OUTCOME_TEXT[p.outcome[f]] for f in FAULTS) + " |")
    lines += ["", "Control class (`ctrl_in` -> `ctrl_out`), counted at B's `ctrl_out`:", "",
              "| phase | B (receiver) knows | " + " | ".join(_FAULT_TEXT[f] for f in FAULTS) + " |",
              "|" + "---|" * (2 + len(FAULTS))]
    for p in PHASES:
        lines.append(f"| {p.name} | {p.ctrl_b_knows} | "
                     + " | ".join(_OUTCOME_TEXT[p.ctrl_outcome[f]] for f in FAULTS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
