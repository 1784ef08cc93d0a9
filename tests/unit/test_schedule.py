"""The suite's own schedule (tests/kit/schedule.py): the work units xdist hands out and
their order, longest first; and a table that names only tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.kit import schedule

ROOT = Path(__file__).parents[2]


def test_units_group_the_vm_tier_and_each_rados_module() -> None:
    assert schedule.scope("tests/integration/test_vm_restart.py::test_x") == "vm"
    assert schedule.scope("tests/rados/test_pool.py::test_x[1]") == "tests/rados/test_pool.py"
    assert schedule.scope("tests/unit/test_a.py::test_b[2]") == "tests/unit/test_a.py::test_b[2]"


def test_longest_unit_first_ties_in_collection_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schedule, "SECONDS", {
        "vm": {"*": 70}, "tests/rados/test_pool.py": {"*": 20},
        "tests/crash/test_crash.py": {"test_crash_states_recover_last_flush": 10}})
    queue = {
        "tests/unit/test_a.py::test_one": {"tests/unit/test_a.py::test_one": False},
        "tests/rados/test_pool.py": {f"tests/rados/test_pool.py::test_{i}": False
                                     for i in range(3)},
        "tests/unit/test_a.py::test_two": {"tests/unit/test_a.py::test_two": False},
        "tests/crash/test_crash.py::test_crash_states_recover_last_flush[1-plain]": {
            "tests/crash/test_crash.py::test_crash_states_recover_last_flush[1-plain]": False},
        "vm": {"tests/integration/test_vm_a.py::test_x": False},
    }
    order = schedule.longest_first(queue)
    assert order[:3] == ["vm", "tests/rados/test_pool.py",
                         "tests/crash/test_crash.py::test_crash_states_recover_last_flush[1-plain]"]
    assert order[3:] == ["tests/unit/test_a.py::test_one", "tests/unit/test_a.py::test_two"]
    assert schedule.cost("x", ["tests/unit/test_a.py::test_one"] * 4) == 4 * schedule.DEFAULT


def test_the_table_names_modules_and_tests_that_exist() -> None:
    for module, tests in schedule.SECONDS.items():
        if module == "vm":
            assert list(tests) == ["*"]
            continue
        text = (ROOT / module).read_text()
        for name in tests:
            if name == "*":
                continue
            func = name.split("::")[0]
            assert re.search(rf"def {re.escape(func)}\b|^{re.escape(func)} = ", text,
                             re.MULTILINE), f"{module}::{name} is not in the suite"
