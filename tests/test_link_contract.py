"""The contract table of docs/link.md, checked cell by cell on the real engines (Verilator).

``sim/tb_contract.py`` holds one transfer of each class (payload, control) in each phase by cutting a channel at the moment
the engines' cursors show the phase was reached, injects each fault, and records how often
the message came out of the receiver. Here each recorded outcome is compared with
:data:`epochlink.hdl.contract.PHASES`.
"""
import json

import pytest

from epochlink.hdl import contract
from epochlink.sim import verilator

from .test_link_sim import design  # noqa: F401  (the same cached two-node build)


@pytest.fixture(scope="module")
def outcomes(design, tmp_path_factory):  # noqa: F811
    result = tmp_path_factory.mktemp("contract") / "cells.json"
    try:
        verilator.run(design, "epochlink.sim.tb_contract", run_name="contract",
                      env={"EPOCHLINK_TB_RESULT": str(result)})
    except verilator.SimulationFailed as failure:
        print(failure)   # each cell below reports its own outcome
    return json.loads(result.read_text()) if result.exists() else {}


@pytest.mark.parametrize("phase", [p.name for p in contract.PHASES])
@pytest.mark.parametrize("fault", contract.FAULTS)
@pytest.mark.parametrize("klass", contract.CLASSES)
def test_contract_cell(outcomes, klass, phase, fault):
    cell = f"{phase}/{fault}" if klass == "payload" else f"{klass}:{phase}/{fault}"
    assert cell in outcomes, f"{cell}: the transfer could not be held in this phase (see the cocotb log)"
    expected = next(p for p in contract.PHASES if p.name == phase).outcomes(klass)[fault]
    assert outcomes[cell]["outcome"] == expected, (cell, outcomes[cell])


def test_docs_show_the_contract_table():
    text = (verilator.PROJECT_ROOT / "docs" / "link.md").read_text()
    assert contract.render_markdown() in text, "docs/link.md is out of date: paste `python -m epochlink.hdl.contract`"
