"""In the nested lab's L1 guest, /dev/kvm must be hardware-style: guest kernel code runs
natively, which is what booting a standard Linux guest needs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cube.vmm.probe import measure_cpl0_rate

pytestmark = pytest.mark.lab

# The same dec/jnz loop under the development hosts' PVM /dev/kvm, where CPL0 is emulated:
# "~1.8 M instr/s" (shared/docs/kvm-here.md, "The host's /dev/kvm is PVM"). The lab measured
# ~400 M instr/s there, so 100x this baseline leaves 2x headroom for a loaded TCG host.
PVM_CPL0_RATE = 1.8e6


def test_cpl0_runs_over_100x_faster_than_pvm() -> None:
    result = measure_cpl0_rate()
    print(f"lab CPL0 loop: {result.rate / 1e6:.0f} M instr/s over {result.seconds * 1e3:.0f} ms")
    assert result.rate > 100 * PVM_CPL0_RATE


def test_doctor_reports_hardware_kvm() -> None:
    # Other checks (templates, bpf, ...) may fail in L1; only the KVM verdict matters here.
    done = subprocess.run(
        [sys.executable, "-m", "cube", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(done.stdout)
    assert report["kvm"] == "hardware", done.stdout
    flavour = next(c for c in report["checks"] if c["name"] == "KVM flavour")
    assert flavour["status"] == "ok"
