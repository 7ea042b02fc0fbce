"""Fresh identities for sandboxes: ids, tokens and the Identity pushed to a clone's agent.

Every clone of a template starts with the template's identity; the daemon replaces it on every
hand-out and every resume so that no two sandboxes share a token, hostname, machine-id, random
stream or a stale clock.
"""

from __future__ import annotations

import secrets
import string
import time

import trio

from cube.guest.wire import Identity, NetConfig, Refresh, Reply
from cube.pool.backend import Backend, BackendError, Instance

_ID_ALPHABET = string.ascii_lowercase + string.digits
SANDBOX_ID_LENGTH = 20  # what E2B issues; no "-" so Host routing can split on it


def new_id(length: int = SANDBOX_ID_LENGTH) -> str:
    """A random [a-z0-9] id, as E2B's proxy validates sandbox ids."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def new_token() -> str:
    """An envd access token: 256 bits, URL-safe so it can travel in headers and signatures."""
    return secrets.token_urlsafe(32)


def identity_for(
    sandbox_id: str,
    access_token: str,
    env_vars: dict[str, str],
    network: NetConfig | None = None,
) -> Identity:
    """The Identity a sandbox should have right now (clock and RNG seed are taken fresh)."""
    return Identity(
        sandbox_id=sandbox_id,
        hostname=f"e2b-{sandbox_id}",
        machine_id=secrets.token_hex(16),
        wall_clock_ns=time.time_ns(),
        rng_seed=secrets.token_bytes(64),
        access_token=access_token,
        env_vars=env_vars,
        network=network,
    )


async def push_identity(backend: Backend, instance: Instance, identity: Identity) -> Reply:
    """Give a freshly started, resumed or forked sandbox its identity. A sandbox that will not
    take it must never be handed out with someone else's, so it is killed and BackendError
    raised (also when the caller is cancelled midway)."""
    try:
        reply = await backend.control(instance, Refresh(identity=identity))
        if not reply.ok:
            raise BackendError(f"identity refresh refused: {reply.error}")
    except BaseException:
        with trio.CancelScope(shield=True):
            await backend.kill(instance)
        raise
    return reply
