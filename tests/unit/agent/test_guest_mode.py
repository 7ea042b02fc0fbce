"""Guest-mode paths that are safe on a host: real users and the identity checks.

An agent started without ``--host-mode`` looks users up in the passwd database and switches
to them in the child. The test uses ``nobody`` (present on any Debian) and never sends a
Refresh, which in guest mode would change the machine's clock and hostname.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import PtySize, Sandbox

from cube.guest.agent.identity import set_hostname, set_machine_id
from tests.unit.agent.conftest import connect_options
from tests.unit.agent.harness import Agent, free_port, run_agent


@pytest.fixture(scope="module")
def guest_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    if os.getuid() != 0:
        pytest.skip("switching users needs root")
    with run_agent(tmp_path_factory.mktemp("guest"), free_port(), host_mode=False) as running:
        yield running


def test_commands_run_as_the_selected_user(guest_agent: Agent, responder: str) -> None:
    nobody = pwd.getpwnam("nobody")
    sandbox = Sandbox.create(**connect_options(guest_agent, responder))
    result = sandbox.commands.run("id -u; id -g; echo $USER $HOME", user="nobody", cwd="/")  # type: ignore[arg-type]
    assert result.stdout == f"{nobody.pw_uid}\n{nobody.pw_gid}\nnobody {nobody.pw_dir}\n"
    assert sandbox.commands.run("id -u", user="root", cwd="/").stdout == "0\n"


def test_pty_runs_as_the_selected_user(guest_agent: Agent, responder: str) -> None:
    sandbox = Sandbox.create(**connect_options(guest_agent, responder))
    handle = sandbox.pty.create(PtySize(rows=10, cols=40), user="nobody", cwd="/")  # type: ignore[arg-type]
    sandbox.pty.send_stdin(handle.pid, b"id -un; exit\n")
    output = bytearray()
    handle.wait(on_pty=output.extend)
    assert b"nobody" in output


def test_uploads_are_owned_by_the_user(guest_agent: Agent, responder: str, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    sandbox = Sandbox.create(**connect_options(guest_agent, responder))
    info = sandbox.files.write(f"{tmp_path}/sub/f.txt", "x", user="nobody")  # type: ignore[arg-type]
    nobody = pwd.getpwnam("nobody")
    for path in (info.path, f"{tmp_path}/sub"):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert sandbox.files.get_info(info.path, user="nobody").owner == "nobody"  # type: ignore[arg-type]


def test_identity_values_are_validated_before_use() -> None:
    with pytest.raises(ValueError):
        set_hostname("bad host/name")
    with pytest.raises(ValueError):
        set_machine_id("not-hex")
