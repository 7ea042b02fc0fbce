"""Tier selection shared by every test folder.

Lab tests only make sense inside the nested lab's L1 guest (hardware-style KVM, the real guest
kernel); the lab's init sets CUBE_LAB=1, and everywhere else they are skipped with a reason
rather than failing, so `pytest` on a laptop runs what it can.
"""

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CUBE_LAB") == "1":
        return
    skip_lab = pytest.mark.skip(reason="lab tier: run via `make test-lab` (inside the L1 guest)")
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip_lab)
