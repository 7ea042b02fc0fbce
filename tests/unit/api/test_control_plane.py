"""The E2B control plane driven by the real SDK (and raw HTTP where the SDK hides the status)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import (
    AuthenticationException,
    RateLimitException,
    SandboxException,
    SandboxNotFoundException,
)

from cube.apikeys import ApiKeyStore
from tests.unit.api.daemon import Daemon


def api(daemon: Daemon, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=daemon.url, headers={"X-API-Key": key or daemon.api_key})


def assert_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == status and isinstance(body["message"], str) and body["message"]
    return body


def test_create_get_kill(daemon: Daemon) -> None:
    sbx = Sandbox.create(metadata={"who": "me"}, envs={"A": "1"}, timeout=120, **daemon.opts())
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id and len(sbx.sandbox_id) == 20
    assert info.sandbox_id.isalnum() and info.sandbox_id.islower()
    assert (info.template_id, info.name, info.metadata) == ("base", "base", {"who": "me"})
    assert info.state == SandboxState.RUNNING
    assert (info.cpu_count, info.memory_mb) == (2, 512)
    assert abs((info.end_at - info.started_at) - timedelta(seconds=120)) < timedelta(seconds=1)
    assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id, **daemon.opts()) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id, **daemon.opts())
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id, **daemon.opts())
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(sbx.sandbox_id, 30, **daemon.opts())


def test_create_response_shape(daemon: Daemon) -> None:
    with api(daemon) as client:
        response = client.post("/v2/sandboxes", json={"templateID": "base", "metadata": {}})
        assert response.status_code == 201
        body = response.json()
        assert {"templateID", "sandboxID", "clientID", "envdVersion", "envdAccessToken"} <= set(
            body
        )
        assert client.delete(f"/sandboxes/{body['sandboxID']}").status_code == 204
        assert_error(client.delete(f"/sandboxes/{body['sandboxID']}"), 404)


def test_create_errors(daemon: Daemon) -> None:
    with pytest.raises(SandboxException, match="404"):
        Sandbox.create("no-such-template", **daemon.opts())
    for timeout in (0, -5, 10**7):
        with pytest.raises(SandboxException, match="400"):
            Sandbox.create(timeout=timeout, **daemon.opts())
    with api(daemon) as client:
        assert_error(client.post("/v2/sandboxes", json={"templateID": 5}), 400)
        assert_error(client.post("/v2/sandboxes", json={"timeout": 5}), 400)
        assert_error(client.post("/v2/sandboxes", content=b"{not json"), 400)
        assert_error(client.post("/v2/sandboxes", content=b"x" * (2 << 20)), 413)
        assert_error(client.get("/no/such/route"), 404)


def test_auth(daemon: Daemon) -> None:
    with pytest.raises(AuthenticationException):
        Sandbox.create(**daemon.opts(api_key="e2b_" + "0" * 40))
    with httpx.Client(base_url=daemon.url) as anonymous:
        assert_error(anonymous.get("/v2/sandboxes"), 401)
    store = ApiKeyStore(daemon.data_dir)
    key, record = store.create("short-lived")
    assert Sandbox.list(**daemon.opts(api_key=key)).next_items() is not None
    store.revoke(record.key_id)
    with pytest.raises(AuthenticationException):
        Sandbox.list(**daemon.opts(api_key=key)).next_items()


def test_per_key_limit(daemon: Daemon) -> None:
    key, _ = ApiKeyStore(daemon.data_dir).create("limited", max_sandboxes=1)
    first = Sandbox.create(**daemon.opts(api_key=key))
    with pytest.raises(RateLimitException):
        Sandbox.create(**daemon.opts(api_key=key))
    first.kill()
    Sandbox.create(**daemon.opts(api_key=key)).kill()


def test_timeout_sets_and_connect_only_extends(daemon: Daemon) -> None:
    sbx = Sandbox.create(timeout=600, **daemon.opts())
    try:
        sbx.set_timeout(100)  # shortens
        end = sbx.get_info().end_at
        assert end < datetime.now(UTC) + timedelta(seconds=101)
        Sandbox.connect(sbx.sandbox_id, timeout=10, **daemon.opts())  # never shortens
        assert sbx.get_info().end_at == end
        with api(daemon) as client:
            response = client.post(f"/v2/sandboxes/{sbx.sandbox_id}/connect", json={"timeout": 300})
            assert response.status_code == 200  # running: not resumed
            assert response.json()["sandboxID"] == sbx.sandbox_id
            assert_error(
                client.post(f"/v2/sandboxes/{sbx.sandbox_id}/connect", json={"timeout": 0}), 400
            )
            assert_error(client.post(f"/sandboxes/{sbx.sandbox_id}/timeout", json={}), 400)
        assert sbx.get_info().end_at > end + timedelta(seconds=150)
    finally:
        sbx.kill()


def test_list_filters_and_paging(daemon: Daemon) -> None:
    suite = secrets.token_hex(4)
    before = datetime.now(UTC) - timedelta(seconds=1)
    created = [
        Sandbox.create(
            metadata={"suite": suite, "n": str(i), "odd key": "a&b=c%d"}, **daemon.opts()
        )
        for i in range(3)
    ]
    try:
        mine = SandboxQuery(metadata={"suite": suite})
        found = Sandbox.list(query=mine, **daemon.opts()).next_items()
        assert [s.metadata["n"] for s in found] == ["2", "1", "0"]  # newest first by default
        ascending = Sandbox.list(query=mine, order="asc", **daemon.opts()).next_items()
        assert [s.metadata["n"] for s in ascending] == ["0", "1", "2"]
        odd = SandboxQuery(metadata={"suite": suite, "odd key": "a&b=c%d", "n": "1"})
        assert [s.sandbox_id for s in Sandbox.list(query=odd, **daemon.opts()).next_items()] == [
            created[1].sandbox_id
        ]
        none = SandboxQuery(metadata={"suite": suite, "odd key": "a&b"})
        assert Sandbox.list(query=none, **daemon.opts()).next_items() == []

        pager = Sandbox.list(query=mine, limit=2, **daemon.opts())
        first = pager.next_items()
        assert len(first) == 2 and pager.has_next
        second = pager.next_items()
        assert len(second) == 1 and not pager.has_next
        assert {s.sandbox_id for s in first + second} == {s.sandbox_id for s in created}

        paused_only = SandboxQuery(metadata={"suite": suite}, state=[SandboxState.PAUSED])
        assert Sandbox.list(query=paused_only, **daemon.opts()).next_items() == []
        by_template = SandboxQuery(metadata={"suite": suite}, template="base")
        assert len(Sandbox.list(query=by_template, **daemon.opts()).next_items()) == 3
        other = SandboxQuery(metadata={"suite": suite}, template="code-interpreter-v1")
        assert Sandbox.list(query=other, **daemon.opts()).next_items() == []
        later = SandboxQuery(metadata={"suite": suite}, started_after=datetime.now(UTC))
        assert Sandbox.list(query=later, **daemon.opts()).next_items() == []
        earlier = SandboxQuery(metadata={"suite": suite}, started_after=before)
        assert len(Sandbox.list(query=earlier, **daemon.opts()).next_items()) == 3
        start = created[1].get_info().started_at  # inclusive: a sandbox's own start matches
        same = SandboxQuery(metadata={"suite": suite}, started_after=start)
        assert {
            s.metadata["n"] for s in Sandbox.list(query=same, **daemon.opts()).next_items()
        } == {
            "1",
            "2",
        }

        with api(daemon) as client:
            v1 = client.get("/sandboxes", params={"metadata": f"suite={suite}"})
            assert v1.status_code == 200 and len(v1.json()) == 3
            for params in (
                {"limit": "0"},
                {"limit": "101"},
                {"state": "running,sleeping"},
                {"order": "sideways"},
                {"nextToken": "!!"},
                {"startedAfter": "yesterday"},
            ):
                assert_error(client.get("/v2/sandboxes", params=params), 400)
            last = client.get("/v2/sandboxes", params={"metadata": f"suite={suite}", "limit": 3})
            assert "X-Next-Token" not in last.headers
    finally:
        for sbx in created:
            sbx.kill()


def test_metrics_logs_network_refresh(daemon: Daemon) -> None:
    sbx = Sandbox.create(**daemon.opts())
    try:
        metrics = sbx.get_metrics()
        assert len(metrics) == 1 and metrics[0].cpu_count > 0 and metrics[0].mem_total > 0
        assert sbx.get_metrics(end=datetime.now(UTC) - timedelta(hours=1)) == []
        with api(daemon) as client:
            sid = sbx.sandbox_id
            logs = client.get(f"/sandboxes/{sid}/logs")
            assert logs.status_code == 200 and {"logs", "logEntries"} <= set(logs.json())
            assert logs.json()["logEntries"], "the agent logs at start-up"
            entry = client.get(f"/v2/sandboxes/{sid}/logs").json()["logs"][0]
            assert {"timestamp", "message", "level", "fields"} <= set(entry)
            many = client.get("/sandboxes/metrics", params={"sandbox_ids": sid}).json()
            assert set(many["sandboxes"]) == {sid}
            network = {"allowOut": ["1.1.1.1"], "denyOut": ["0.0.0.0/0"]}
            assert client.put(f"/sandboxes/{sid}/network", json=network).status_code == 204
            assert client.get(f"/sandboxes/{sid}").json()["network"] == network
            offline = {"allow_internet_access": False}
            assert client.put(f"/sandboxes/{sid}/network", json=offline).status_code == 204
            assert client.put(f"/sandboxes/{sid}/network", json=network).status_code == 204
            assert client.get(f"/sandboxes/{sid}").json()["allowInternetAccess"] is False
            # the process backend's agents use the host's network: no filter to report on
            assert_error(client.get(f"/sandboxes/{sid}/network"), 409)
            bad = {"allowOut": ["example.com"]}  # domains need denyOut 0.0.0.0/0, as in E2B
            assert_error(client.put(f"/sandboxes/{sid}/network", json=bad), 400)
            bad_create = {"templateID": "base", "network": {"denyOut": ["not-an-ip"]}}
            assert_error(client.post("/v2/sandboxes", json=bad_create), 400)
            end = sbx.get_info().end_at
            assert (
                client.post(f"/sandboxes/{sid}/refreshes", json={"duration": 3600}).status_code
                == 204
            )
            assert sbx.get_info().end_at > end
            assert_error(client.post(f"/sandboxes/{sid}/refreshes", json={"duration": 3601}), 400)
            assert_error(client.get("/sandboxes/nosuchsandbox/logs"), 404)
            assert_error(client.get("/sandboxes/nosuchsandbox/metrics"), 404)
    finally:
        sbx.kill()


def test_v1_create_and_connect(daemon: Daemon) -> None:
    with api(daemon) as client:
        created = client.post(
            "/sandboxes", json={"templateID": "base", "timeout": 60, "secure": True}
        )
        assert created.status_code == 201
        sid = created.json()["sandboxID"]
        connected = client.post(f"/sandboxes/{sid}/connect", json={"timeout": 60})
        assert connected.status_code == 200 and connected.json()["sandboxID"] == sid
        assert client.delete(f"/sandboxes/{sid}").status_code == 204


def test_prometheus_metrics(daemon: Daemon) -> None:
    Sandbox.create(**daemon.opts()).kill()
    text = httpx.get(daemon.url + "/metrics").text
    assert 'cube_sandboxes{state="running"}' in text
    assert 'cube_pool_ready{template="base"}' in text
    assert "cube_sandbox_create_seconds_count" in text
    assert daemon.api_key not in text


def test_burst_create(daemon: Daemon) -> None:
    """Creates run concurrently (pool shelf empty after the first): all succeed, ids differ."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as workers:
        boxes = list(workers.map(lambda _: Sandbox.create(**daemon.opts()), range(6)))
    assert len({b.sandbox_id for b in boxes}) == 6
    assert len({b._envd_access_token for b in boxes}) == 6
    for box in boxes:
        box.kill()
