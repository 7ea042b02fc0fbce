"""The soak tier: the stress tests of issue 12, in the lab, with the lab tier's daemon and hang
dumps. Not part of `make test`: every run of them so far (three, 2026-12-05) ended in a panic
of L1's own kernel within ten minutes of load (README, "Lab candidates and the soak"), so in CI
they would fail the lab rather than test Cube. `make soak` runs them."""

from tests.lab.conftest import daemon, pytest_configure, pytest_unconfigure

__all__ = ["daemon", "pytest_configure", "pytest_unconfigure"]
