"""The CPL0 speed probe on this host's /dev/kvm.

The development and CI machines are PVM guests (no vmx/svm in /proc/cpuinfo), where CPL0 code
is emulated; a host that does show vmx/svm must measure as hardware instead.
"""

from __future__ import annotations

import time

import pytest

from cube import doctor
from cube.vmm.probe import (
    HARDWARE_MIN_RATE,
    classify,
    cpu_virt_extension,
    flavour,
    measure_cpl0_rate,
    pvm_loaded,
)

pytestmark = pytest.mark.kvm


def test_fixed_iterations_run_to_hlt() -> None:
    result = measure_cpl0_rate(1000)
    assert result.iterations == 1000
    assert result.instructions == 2002
    assert result.seconds > 0


def test_probe_classifies_this_host() -> None:
    start = time.perf_counter()
    result = measure_cpl0_rate()
    elapsed = time.perf_counter() - start
    print(f"CPL0 loop: {result.rate / 1e6:.1f} M instr/s over {result.seconds * 1e3:.0f} ms")

    if cpu_virt_extension() is None:
        assert classify(result.rate) == "emulated"
        assert result.rate < HARDWARE_MIN_RATE
        assert flavour(result.rate) == ("pvm" if pvm_loaded() else "emulated")
    else:
        assert flavour(result.rate) == "hardware"
    # Adaptive sizing keeps the probe cheap even under emulation (~0.2 s; bound kept loose).
    assert elapsed < 2.0


def test_doctor_kvm_checks_agree_with_the_probe() -> None:
    flavour, checks = doctor.kvm_checks()
    by_name = {c.name: c for c in checks}
    assert by_name["/dev/kvm"].status == "ok"
    assert by_name["KVM API"].status == "ok"
    expected = "hardware" if cpu_virt_extension() else ("pvm" if pvm_loaded() else "emulated")
    assert flavour == expected
    assert by_name["KVM flavour"].status == ("ok" if flavour == "hardware" else "fail")
