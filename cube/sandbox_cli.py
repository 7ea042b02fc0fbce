"""`cube sandbox ls/kill/logs/net/exec`: operator commands against a running `cube serve`.

They speak the daemon's own E2B API (stdlib HTTP, no SDK needed) with an API key from
``--api-key`` or ``E2B_API_KEY``; ``ls`` also shows sandboxes the daemon reports as lost, read
from the data dir, since the E2B API has no state for them. ``exec`` goes through envd and
therefore uses the E2B SDK when it is installed.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer

from cube import paths
from cube.pool.records import SANDBOXES_DIR, RecordStore

sandbox_app = typer.Typer(no_args_is_help=True, help="Inspect and manage running sandboxes.")

Url = Annotated[str, typer.Option(envvar="E2B_API_URL", help="The daemon's URL.")]
Key = Annotated[str, typer.Option(envvar="E2B_API_KEY", help="An API key (cube apikey create).")]
DEFAULT_URL = "http://127.0.0.1:3000"


def _call(url: str, key: str, method: str, path: str) -> tuple[Any, dict[str, str]]:
    request = urllib.request.Request(url.rstrip("/") + path, method=method)
    request.add_header("X-API-Key", key)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = response.read()
            return (json.loads(body) if body else None), dict(response.headers)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        typer.echo(f"{method} {path}: {exc.code} {detail}", err=True)
        raise typer.Exit(1) from None
    except urllib.error.URLError as exc:
        typer.echo(f"cannot reach {url}: {exc.reason}", err=True)
        raise typer.Exit(1) from None


@sandbox_app.command("ls")
def ls_command(
    url: Url = DEFAULT_URL,
    api_key: Key = "",
    data_dir: Annotated[Path | None, typer.Option(help="For lost sandboxes.")] = None,
) -> None:
    """Running and paused sandboxes (newest first), then lost ones."""
    token: str | None = ""
    while token is not None:
        query = "?" + urllib.parse.urlencode({"nextToken": token}) if token else ""
        items, headers = _call(url, api_key, "GET", "/v2/sandboxes" + query)
        for s in items:
            typer.echo(
                f"{s['sandboxID']}  {s['state']:8} {s.get('alias') or s['templateID']:20} "
                f"started {s['startedAt']}  ends {s['endAt']}"
            )
        token = headers.get("X-Next-Token") or None
    folder = (data_dir or paths.data_dir()) / SANDBOXES_DIR
    for record in RecordStore(folder).load_all() if folder.is_dir() else []:
        if record.state == "lost":
            typer.echo(f"{record.sandbox_id}  lost     {record.lost_reason}")


@sandbox_app.command("kill")
def kill_command(sandbox_ids: list[str], url: Url = DEFAULT_URL, api_key: Key = "") -> None:
    """Kill sandboxes (also clears lost ones)."""
    for sandbox_id in sandbox_ids:
        _call(url, api_key, "DELETE", f"/sandboxes/{urllib.parse.quote(sandbox_id)}")
        typer.echo(f"killed {sandbox_id}")


@sandbox_app.command("logs")
def logs_command(sandbox_id: str, url: Url = DEFAULT_URL, api_key: Key = "") -> None:
    """The sandbox's console and agent log lines."""
    body, _ = _call(url, api_key, "GET", f"/v2/sandboxes/{urllib.parse.quote(sandbox_id)}/logs")
    for entry in body["logs"]:
        typer.echo(f"[{entry['fields'].get('source', '?')}] {entry['message']}")


@sandbox_app.command("net")
def net_command(sandbox_id: str, url: Url = DEFAULT_URL, api_key: Key = "") -> None:
    """The sandbox's egress rules, filter counters and newest drops."""
    quoted = urllib.parse.quote(sandbox_id)
    detail, _ = _call(url, api_key, "GET", f"/sandboxes/{quoted}")
    stats, _ = _call(url, api_key, "GET", f"/sandboxes/{quoted}/network")
    network = detail.get("network") or {}
    internet = detail.get("allowInternetAccess")
    typer.echo(f"internet access: {'no' if internet is False else 'yes'}")
    typer.echo(f"allow out: {', '.join(network.get('allowOut') or []) or '-'}")
    typer.echo(f"deny out:  {', '.join(network.get('denyOut') or []) or '-'}")
    typer.echo(f"bytes passed {stats['bytesPassed']}, dropped {stats['bytesDropped']}")
    for reason, count in stats["packets"].items():
        if count:
            typer.echo(f"  {reason:24} {count} packets")
    if stats["logLost"]:
        typer.echo(f"({stats['logLost']} drops not logged: the log was full)")
    for drop in stats["log"]:
        when = time.strftime("%H:%M:%S", time.localtime(drop["time"]))
        where = f"{drop['destination']}:{drop['port']}" if drop["port"] else drop["destination"]
        typer.echo(f"{when} dropped {where} proto {drop['proto']} ({drop['reason']})")


@sandbox_app.command("exec")
def exec_command(
    sandbox_id: str,
    command: Annotated[str, typer.Argument(help="A shell command line.")],
    url: Url = DEFAULT_URL,
    api_key: Key = "",
) -> None:
    """Run a command in the sandbox, streaming its output; exits with its exit code."""
    try:
        from e2b import CommandExitException, Sandbox
    except ImportError:
        typer.echo("cube sandbox exec needs the e2b package (pip install e2b)", err=True)
        raise typer.Exit(2) from None
    sandbox = Sandbox.connect(sandbox_id, api_url=url, sandbox_url=url, api_key=api_key)
    try:
        result = sandbox.commands.run(
            command,
            on_stdout=lambda s: typer.echo(s, nl=False),
            on_stderr=lambda s: typer.echo(s, nl=False, err=True),
            timeout=0,
        )
        code = result.exit_code
    except CommandExitException as exc:
        code = exc.exit_code
    raise typer.Exit(code)
