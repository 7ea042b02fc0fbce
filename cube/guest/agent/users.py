"""Sandbox users and E2B's path rules (relative paths and ``~`` resolve against the user's home).

In the guest the users are real accounts from the template's /etc/passwd (``root`` uid 0 with
/root, ``user`` uid 1000 with /home/user, created by the rootfs builder) and processes switch to
them. In host mode (tests run the agent as an ordinary host process) only ``root`` and ``user``
exist, both mapped to the agent's own uid with homes under a given folder, so nothing on the host
is touched and no privilege is needed.
"""

from __future__ import annotations

import grp
import os
import posixpath
import pwd
from dataclasses import dataclass

MAX_PATH = 4096  # PATH_MAX: longer paths can only be mistakes or attacks


class PathError(ValueError):
    """A path the agent refuses (too long, NUL byte, unknown ``~user``)."""


class UnknownUser(LookupError):
    pass


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...]
    switch: bool  # whether a child process must setuid/setgid to this user


class Users:
    """Looks users up either in the guest's passwd database or in host mode's fixed pair."""

    def __init__(self, host_home_base: str | None = None) -> None:
        self._host: dict[str, User] | None = None
        if host_home_base is not None:
            uid, gid = os.getuid(), os.getgid()
            homes = {"root": "root", "user": "home/user"}
            self._host = {
                name: User(name, uid, gid, os.path.join(host_home_base, rel), (), switch=False)
                for name, rel in homes.items()
            }

    @property
    def host_mode(self) -> bool:
        return self._host is not None

    def host_homes(self) -> list[str]:
        return [u.home for u in (self._host or {}).values()]

    def lookup(self, name: str) -> User:
        if self._host is not None:
            try:
                return self._host[name]
            except KeyError:
                raise UnknownUser(f"error looking up user '{name}': unknown user") from None
        try:
            entry = pwd.getpwnam(name)
        except (KeyError, ValueError):
            raise UnknownUser(f"error looking up user '{name}': unknown user {name}") from None
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return User(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, groups, switch=True)


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def check_path(path: str) -> None:
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise PathError(f"path is longer than {MAX_PATH} bytes")
    if "\0" in path:
        raise PathError("path contains a NUL byte")


def resolve(path: str, user: User, default_workdir: str | None) -> str:
    """envd's ExpandAndResolve: default workdir for an empty path, ``~`` expansion, relative
    paths joined to the user's home (and cleaned); absolute paths are kept as given."""
    check_path(path)
    if not path and default_workdir:
        path = default_workdir
    if path.startswith("~"):
        if len(path) > 1 and path[1] != "/":
            raise PathError(
                f"failed to expand path '{path}' for user '{user.name}': "
                "cannot expand user-specific home dir"
            )
        path = posixpath.join(user.home, path[2:]) if len(path) > 1 else user.home
    if posixpath.isabs(path):
        return path
    return posixpath.normpath(posixpath.join(user.home, path))
