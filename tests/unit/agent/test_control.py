"""The control port of a running agent: ping, refresh, metrics, logs, prepare, bad input."""

from __future__ import annotations

import json
import os
import socket
import stat
import urllib.request

from e2b import Sandbox

from cube.guest import wire
from cube.guest.agent import ENVD_VERSION
from tests.unit.agent.harness import Agent, envs_file


def test_ping_reports_the_envd_version(agent: Agent) -> None:
    (reply,) = agent.control(wire.Ping())
    assert reply.ok and reply.envd_version == ENVD_VERSION


def test_refresh_sets_env_vars_everywhere(agent: Agent, sandbox: Sandbox) -> None:
    try:
        reply = agent.refresh(env_vars={"CUBE_TEST": "1"}, default_workdir="/tmp")
        assert reply.ok, reply.error
        assert envs_file(agent) == {"CUBE_TEST": "1"}
        mode = os.stat(agent.state_dir / "envs.json").st_mode
        assert stat.S_IMODE(mode) == 0o600
        with urllib.request.urlopen(f"{agent.url}/envs") as response:
            assert json.load(response) == {"CUBE_TEST": "1"}
        assert sandbox.commands.run("echo $CUBE_TEST; pwd").stdout == "1\n/tmp\n"
    finally:
        assert agent.refresh().ok
    assert envs_file(agent) == {}
    assert sandbox.commands.run("echo ${CUBE_TEST:-unset}").stdout == "unset\n"


def test_refresh_in_host_mode_leaves_the_host_alone(agent: Agent) -> None:
    hostname = socket.gethostname()
    assert agent.refresh().ok
    assert socket.gethostname() == hostname


def test_metrics_logs_prepare_in_one_connection(agent: Agent) -> None:
    metrics, logs, prepared = agent.control(
        wire.GetMetrics(), wire.GetLogs(limit=5), wire.Prepare()
    )
    assert metrics.ok and metrics.metrics is not None
    assert metrics.metrics.mem_total > 0 and metrics.metrics.cpu_count >= 1
    assert logs.ok and logs.logs and len(logs.logs) <= 5
    assert prepared.ok


def test_metrics_route(agent: Agent) -> None:
    with urllib.request.urlopen(f"{agent.url}/metrics") as response:
        body = json.load(response)
    assert {"ts", "cpu_count", "cpu_used_pct", "mem_total", "mem_used", "disk_total"} <= set(body)


def test_bad_control_line_gets_an_error_reply(agent: Agent) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(agent.control_socket)
        s.sendall(b'{"type":"nope"}\nnot json\n' + wire.control_encoder.encode(wire.Ping()) + b"\n")
        data = b""
        while data.count(b"\n") < 3:
            data += s.recv(4096)
    replies = [wire.reply_decoder.decode(line) for line in data.splitlines()]
    assert [r.ok for r in replies] == [False, False, True]
