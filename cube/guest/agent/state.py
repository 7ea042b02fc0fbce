"""The sandbox-level settings every service reads: token, env vars, default user and workdir.

They start empty (no token, no env vars, user ``user``) and are replaced as a whole by each
identity Refresh from the host, so a restored clone never keeps its template's token or env.
The env vars are also mirrored to ``<state_dir>/envs.json`` (0600, written atomically) for the
code interpreter, which runs as a separate process in the guest.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
from dataclasses import dataclass, field

from cube.guest.agent.atomic import write_atomic
from cube.guest.agent.connect import Code, ConnectError
from cube.guest.agent.users import UnknownUser, User, Users


@dataclass
class AgentState:
    users: Users
    state_dir: str
    access_token: str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)
    default_user: str = "user"
    default_workdir: str | None = None

    def token_ok(self, header: str | None) -> bool:
        """True when no token is set or the header matches it (constant time)."""
        if not self.access_token:
            return True
        return header is not None and hmac.compare_digest(
            header.encode("utf-8", "surrogateescape"), self.access_token.encode()
        )

    def rpc_user(self, authorization: str | None) -> User:
        """The user an RPC runs as: Basic auth ``<user>:`` if given, else the default user."""
        name = self.default_user
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "basic":
                raise ConnectError(Code.UNAUTHENTICATED, "unsupported authorization scheme")
            try:
                name = base64.b64decode(value.strip(), validate=True).decode().partition(":")[0]
            except (ValueError, UnicodeDecodeError):
                raise ConnectError(Code.UNAUTHENTICATED, "malformed basic authorization") from None
        try:
            return self.users.lookup(name)
        except UnknownUser:
            raise ConnectError(Code.UNAUTHENTICATED, f"invalid username: '{name}'") from None

    def write_envs_file(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        payload = json.dumps(self.env_vars).encode()
        write_atomic(os.path.join(self.state_dir, "envs.json"), payload, 0o600)
