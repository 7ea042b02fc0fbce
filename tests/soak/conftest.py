"""The soak tier: the stress tests of issue 12, in the lab, with the lab tier's daemon and hang
dumps. Not part of `make test` yet: with two L1 CPUs every run (three, 2026-12-05) ended in a
panic of L1's own kernel; with one (now the default) the cycles passed once, which is not yet
the repeated clean runs that CI needs (README, "Lab candidates and the soak"). `make soak`
runs them."""

from tests.lab.conftest import daemon, pytest_configure, pytest_unconfigure

__all__ = ["daemon", "pytest_configure", "pytest_unconfigure"]
