"""Run E2B's own SDK test suites against a running `cube serve`: the external conformance suite.

The tests are upstream's (`e2b-dev/E2B` python-sdk, `e2b-dev/code-interpreter` python), taken
from a local git mirror at the tag of the SDK version they were written for and unpacked into a
temporary folder: nothing of theirs is copied into this repository. They run in their own
virtualenv (under the cache, keyed by the SDK versions) with the matching SDK releases from PyPI,
because a suite only means something against the SDK it was written for.

Only the subsets that apply to a sandbox server are run (`SUBSETS`); tests inside them that
cannot apply here are reported as skipped with the reason (`NOT_APPLICABLE`), so the counts
show them instead of hiding them. Per subset the runner prints passed/failed/skipped and keeps
the JUnit XML under ``<cache>/upstream-suite/runs/<time>/``.

Not part of `make test`: it needs PyPI for the virtualenv and a mirror of the upstream repos.
Stdlib only, so any Python 3.11 can run it; it never imports Cube.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import venv
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

E2B_VERSION = "2.45.1"  # the python-sdk the E2B mirror's tests were written for
CI_VERSION = "2.9.1"  # the newest code-interpreter-python tag; its `e2b = ^2.39.1` admits 2.45.1
# What users install today (PyPI, 2026-12): the same tests driven by these show the SDK's drift.
E2B_CURRENT, CI_CURRENT = "2.63.0", "2.11.5"
# Test tooling the suites' own dev dependencies name (ranges from their pyproject files).
PLUGINS = (
    "pytest>=9.0.3,<10",
    "pytest-asyncio>=1.3.0,<2",
    "pytest-xdist>=3.3.1,<4",
    "pytest-timeout>=2.4.0,<3",
    "pytest-dotenv>=0.5.2,<0.6",
    "python-dotenv>=1.0.0,<2",
)
SKIP_PLUGIN = "cube_upstream_skips"  # the module name of the generated pytest plugin

# A key matches its node id exactly, a parametrized case of it, or what a file or folder holds.
SKIP_PLUGIN_SOURCE = """\
import pytest

SKIPS = {skips!r}


def pytest_collection_modifyitems(items):
    for item in items:
        for key, reason in SKIPS.items():
            if item.nodeid == key or item.nodeid.startswith((key + "[", key + "::", key + "/")):
                item.add_marker(pytest.mark.skip(reason="not for Cube: " + reason))
"""


@dataclass(frozen=True)
class Suite:
    """One upstream repository: where its python tests live and the tag they are taken at."""

    tag: str
    root: str  # the folder holding pytest.ini and tests/, relative to the repository


SUITES = {
    "e2b": Suite(tag=f"@e2b/python-sdk@{E2B_VERSION}", root="packages/python-sdk"),
    "ci": Suite(tag=f"@e2b/code-interpreter-python@{CI_VERSION}", root="python"),
}

# subset name -> (suite, test paths relative to the suite's root). Sync tests only: the async
# ones exercise the same server calls through the SDK's other client.
SUBSETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "commands": ("e2b", ("tests/sync/sandbox_sync/commands",)),
    "files": ("e2b", ("tests/sync/sandbox_sync/files",)),
    "pty": ("e2b", ("tests/sync/sandbox_sync/pty",)),
    "lifecycle": (
        "e2b",
        tuple(
            f"tests/sync/sandbox_sync/test_{name}.py"
            for name in ("create", "kill", "timeout", "connect", "metrics", "secure")
        ),
    ),
    "snapshot-fork": (
        "e2b",
        tuple(
            f"tests/sync/sandbox_sync/test_{name}.py"
            for name in ("snapshot", "snapshot_api", "snapshot_filesystem_only", "fork")
        ),
    ),
    "api": ("e2b", ("tests/sync/api_sync",)),
    "code-interpreter": ("ci", ("tests/sync",)),
    # Upstream has these only in async form; they check chart and image extraction.
    "ci-charts-images": ("ci", ("tests/charts", "tests/images")),
}

_GET_HOST = "https to <port>-<id>.<domain> needs wildcard DNS and TLS (see e2b-protocol.md 2.1)"
_NO_KERNEL = "Cube's interpreter has no {} kernel (refused with a clear error, by design)"
_SANDBOX = "tests/sync/sandbox_sync"
# Test node ids, files or folders (relative to the suite's root) -> why they cannot apply.
NOT_APPLICABLE: dict[str, str] = {
    f"{_SANDBOX}/test_create.py::test_auto_resume_wakes_on_http_request": _GET_HOST,
    "tests/sync/env_vars/test_r.py": _NO_KERNEL.format("R"),
    "tests/sync/env_vars/test_java.py": _NO_KERNEL.format("Java"),
    "tests/sync/test_cwd.py::test_cwd_r": _NO_KERNEL.format("R"),
    "tests/sync/test_cwd.py::test_cwd_java": _NO_KERNEL.format("Java"),
    "tests/sync/test_default_kernels.py::test_r_kernel": _NO_KERNEL.format("R"),
    "tests/sync/test_default_kernels.py::test_java_kernel": _NO_KERNEL.format("Java"),
}

_HOST_PATHS = "the user's home is a host folder, so paths come back as host paths"
# What the process backend cannot do (README: no isolation, the agent runs on the host); these
# tests pass against microVMs, so they are skipped only with --backend process.
NOT_IN_PROCESS_BACKEND: dict[str, str] = {
    **{
        f"{_SANDBOX}/files/{test}": _HOST_PATHS
        for test in (
            "test_files_list.py::test_list_directory",
            "test_files_list.py::test_file_entry_details",
            "test_files_list.py::test_directory_entry_details",
            "test_files_list.py::test_mixed_entries",
            "test_content_encoding.py::test_write_and_read_with_gzip",
            "test_rename.py::test_rename_file",
            "test_watch.py::test_watch_directory_changes_with_entry_info",
            "test_write.py::test_write_text_file",
            "test_write.py::test_write_binary_file",
            "test_write.py::test_write_multiple_files",
            "test_write.py::test_write_io_with_octet_stream",
        )
    },
    "tests/sync/test_bash.py::test_bash": _HOST_PATHS,
    **{
        f"tests/sync/test_cwd.py::test_cwd_{language}": _HOST_PATHS
        for language in ("python", "bash", "javascript", "typescript")
    },
    **{
        f"{_SANDBOX}/files/test_info.py::{test}": "files belong to the daemon's user, not `user`"
        for test in ("test_get_info_of_file", "test_get_info_of_directory")
    },
    f"{_SANDBOX}/commands/test_env_vars.py::test_bash_command_scoped_env_vars": (
        "commands run on the host as the daemon's user, without the template's sudo"
    ),
    f"{_SANDBOX}/test_fork.py::test_fork": "absolute paths are the host's, shared by sandboxes",
    f"{_SANDBOX}/test_snapshot_api.py::test_create_multiple_sandboxes_from_snapshot": (
        "absolute paths are the host's, shared by sandboxes"
    ),
    f"{_SANDBOX}/test_create.py::test_auto_pause_filesystem_only_reboots": (
        "no kernel to reboot: a filesystem-only resume keeps the host's boot_id"
    ),
    f"{_SANDBOX}/test_snapshot_filesystem_only.py::test_pause_filesystem_only": (
        "no kernel to reboot: a filesystem-only resume keeps the host's boot_id"
    ),
    "tests/sync/test_systemd.py": (
        "guest ports are host ports, so port 49999 is not this sandbox's interpreter"
    ),
}


def cache_dir() -> Path:
    """Cube's cache (`cube.paths.cache_dir`, restated: this script does not import Cube)."""
    env = os.environ.get("CUBE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cube"


def ensure_venv(root: Path, e2b_sdk: str, ci_sdk: str) -> Path:
    """The suite's virtualenv (made once per SDK versions), returning its python."""
    folder = root / f"venv-e2b{e2b_sdk}-ci{ci_sdk}"
    python = folder / "bin" / "python"
    stamp = folder / ".complete"
    if stamp.is_file():
        return python
    shutil.rmtree(folder, ignore_errors=True)
    venv.create(folder, with_pip=True)
    pins = [f"e2b=={e2b_sdk}", f"e2b-code-interpreter=={ci_sdk}", *PLUGINS]
    subprocess.run([python, "-m", "pip", "install", "-q", *pins], check=True)
    stamp.touch()
    return python


def checkout(git_dir: Path, suite: Suite, into: Path) -> Path:
    """Unpack the suite's tests at its tag into ``into``; returns the suite's root there."""
    paths = [f"{suite.root}/tests", f"{suite.root}/pytest.ini"]
    archive = subprocess.run(
        ["git", f"--git-dir={git_dir}", "archive", suite.tag, *paths],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into / suite.root


def write_skip_plugin(folder: Path, skips: dict[str, str]) -> None:
    """A pytest plugin that marks the tests in ``skips`` skipped, with their reasons."""
    (folder / f"{SKIP_PLUGIN}.py").write_text(SKIP_PLUGIN_SOURCE.format(skips=skips))


def count(junit: Path) -> dict[str, int]:
    """passed/failed/skipped from a JUnit report (errors count as failures)."""
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    if not junit.is_file():
        return totals
    for case in ET.parse(junit).iter("testcase"):
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            totals["failed"] += 1
        elif "skipped" in kinds:
            totals["skipped"] += 1
        else:
            totals["passed"] += 1
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="cube serve's base URL")
    parser.add_argument("--api-key", default=os.environ.get("E2B_API_KEY"), help="E2B_API_KEY")
    parser.add_argument("--e2b-git", type=Path, required=True, help="git dir of e2b-dev/E2B")
    parser.add_argument(
        "--ci-git", type=Path, required=True, help="git dir of e2b-dev/code-interpreter"
    )
    parser.add_argument(
        "--backend",
        choices=("vmm", "process"),
        default="vmm",
        help="the server's backend: `process` also skips what host processes cannot do",
    )
    parser.add_argument(
        "--sdk",
        choices=("tagged", "current"),
        default="tagged",
        help=f"the SDK releases that drive the tests (always taken at the tags): `tagged` is "
        f"e2b {E2B_VERSION} / e2b-code-interpreter {CI_VERSION}, `current` is {E2B_CURRENT} / "
        f"{CI_CURRENT}",
    )
    parser.add_argument("--subset", action="append", choices=SUBSETS, help="default: all")
    parser.add_argument("--timeout", type=float, default=30, help="seconds per test (pytest)")
    parser.add_argument("-n", "--workers", type=int, default=2, help="pytest-xdist workers")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args()
    if not args.api_key:
        parser.error("--api-key or E2B_API_KEY is required (`cube apikey create`)")

    root = cache_dir() / "upstream-suite"
    sdk = (E2B_VERSION, CI_VERSION) if args.sdk == "tagged" else (E2B_CURRENT, CI_CURRENT)
    python = ensure_venv(root, *sdk)
    run_dir = root / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-e2b{sdk[0]}-ci{sdk[1]}"
    run_dir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    env.update(E2B_API_URL=args.url, E2B_SANDBOX_URL=args.url, E2B_API_KEY=args.api_key)
    results: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="cube-upstream-") as tmp:
        roots = {
            "e2b": checkout(args.e2b_git, SUITES["e2b"], Path(tmp)),
            "ci": checkout(args.ci_git, SUITES["ci"], Path(tmp)),
        }
        skips = dict(NOT_APPLICABLE)
        if args.backend == "process":
            skips |= {k: f"process backend: {v}" for k, v in NOT_IN_PROCESS_BACKEND.items()}
        write_skip_plugin(Path(tmp), skips)
        env["PYTHONPATH"] = tmp
        for name in args.subset or SUBSETS:
            suite, paths = SUBSETS[name]
            junit = run_dir / f"{name}.xml"
            print(f"== {name}", flush=True)
            command = [
                python,
                "-m",
                "pytest",
                "-p",
                SKIP_PLUGIN,
                f"--numprocesses={args.workers}",
                f"--timeout={args.timeout}",
                f"--junitxml={junit}",
                "-q",
                "-rfEs",
                *paths,
                *args.pytest_args,
            ]
            subprocess.run(command, cwd=roots[suite], env=env, check=False)
            results[name] = count(junit)

    print(f"\n{'subset':20} {'passed':>7} {'failed':>7} {'skipped':>8}")
    for name, totals in results.items():
        print(f"{name:20} {totals['passed']:7} {totals['failed']:7} {totals['skipped']:8}")
    total = {k: sum(r[k] for r in results.values()) for k in ("passed", "failed", "skipped")}
    print(f"{'total':20} {total['passed']:7} {total['failed']:7} {total['skipped']:8}")
    print(f"SDK: e2b {sdk[0]}, e2b-code-interpreter {sdk[1]}; JUnit XML: {run_dir}")
    return 1 if total["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
