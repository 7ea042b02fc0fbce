"""Which Jupyter kernel serves each language, and how to set env vars inside it.

Kernel specs are built here rather than read from installed ``kernel.json`` files so that the
interpreter works from a plain ``pip install`` (no ``jupyter kernelspec install`` step in the
template build) and always runs the kernels with the interpreter's own Python:

- python: ipykernel, with ``kernel_startup.py`` run at start (rich formatters, charts);
- bash: the ``bash_kernel`` package (a real bash behind pexpect, as upstream's template uses);
- javascript and typescript: Deno's built-in Jupyter kernel, from the ``deno`` PyPI package
  (a self-contained binary; TypeScript, ESM imports and top-level await work natively).
  ``NO_COLOR`` keeps ANSI colour codes out of its text/plain results, and it is interrupted by
  an ``interrupt_request`` message because a SIGINT kills it (and with it the context's state).

Every kernel is started through ``launch.py`` so that it dies with the interpreter.

Env var snippets quote values (json for Python/JS string literals, shlex for bash) and names are
checked against ``ENV_NAME`` first, so a value can never break out into code.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
STARTUP_FILE = Path(__file__).with_name("kernel_startup.py")
LAUNCHER = Path(__file__).with_name("launch.py")

_ALIASES = {"js": "javascript", "ts": "typescript"}
SUPPORTED = ("python", "bash", "javascript", "typescript")


class UnsupportedLanguage(Exception):
    """A language this interpreter has no kernel for (upstream also offers r and java)."""


def normalize(language: str | None) -> str:
    """Lower case, trimmed, ``js``/``ts`` aliases resolved; None or empty means python."""
    name = (language or "").strip().lower() or "python"
    return _ALIASES.get(name, name)


def deno_binary() -> str | None:
    try:
        import deno  # type: ignore[import-untyped]

        return str(deno.find_deno_bin())
    except (ImportError, FileNotFoundError, RuntimeError):
        return shutil.which("deno")


def _guarded(argv: list[str]) -> list[str]:
    """``argv`` run through ``launch.py``, so that the kernel dies with this process."""
    return [sys.executable, str(LAUNCHER), str(os.getpid()), *argv]


def kernel_spec(language: str) -> KernelSpec:
    """The spec that launches ``language``'s kernel; raises UnsupportedLanguage."""
    if language == "python":
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        argv += [
            "--InteractiveShell.colors=nocolor",
            "--PlainTextFormatter.max_seq_length=0",
            f"--IPKernelApp.exec_files={STARTUP_FILE}",
        ]
        env = {"MPLBACKEND": "module://matplotlib_inline.backend_inline"}  # plt.show() displays
        return KernelSpec(argv=_guarded(argv), language="python", display_name="Python 3", env=env)
    if language == "bash":
        argv = [sys.executable, "-m", "bash_kernel", "-f", "{connection_file}"]
        return KernelSpec(argv=_guarded(argv), language="bash", display_name="Bash")
    if language in ("javascript", "typescript"):
        deno = deno_binary()
        if deno is None:
            raise UnsupportedLanguage(f"{language} needs the deno kernel, which is not installed")
        argv = [deno, "jupyter", "--kernel", "--conn", "{connection_file}"]
        env = {"NO_COLOR": "1"}
        return KernelSpec(
            argv=_guarded(argv),
            language="typescript",
            display_name="Deno",
            env=env,
            interrupt_mode="message",
        )
    raise UnsupportedLanguage(
        f"language {language!r} is not supported (supported: {', '.join(SUPPORTED)})"
    )


def settle_time(language: str) -> float:
    """Seconds of IOPub silence to wait for after a cell's ``status: idle``.

    Deno's kernel (2.x) sometimes publishes a cell's last stream or execute_result message a
    moment after its idle status (seen within a millisecond of it, in about one cell in ten);
    jupyter kernels that keep the protocol's order need no wait.
    """
    return 0.2 if language in ("javascript", "typescript") else 0.0


class SpecManager(KernelSpecManager):
    """Hands jupyter_client our built-in specs instead of searching kernel.json directories."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        # jupyter_client renames a kernel called "python" to its native "python3"
        language = "python" if kernel_name == "python3" else kernel_name
        try:
            return kernel_spec(language)
        except UnsupportedLanguage as e:
            raise NoSuchKernel(kernel_name) from e


def env_code(language: str, assign: Mapping[str, str], unset: list[str]) -> str:
    """Code that sets ``assign`` and removes ``unset`` in the kernel's process environment."""
    values, names = json.dumps(dict(assign)), json.dumps(unset)
    lines: list[str] = []
    if language == "python":
        if assign:
            lines.append(f"__import__('os').environ.update({values})")
        if unset:
            lines.append(f"[__import__('os').environ.pop(k, None) for k in {names}]")
    elif language in ("javascript", "typescript"):
        if assign:
            lines.append(f"Object.assign(process.env, {values});")
        if unset:
            lines.append(f"for (const k of {names}) delete process.env[k];")
    else:
        lines += [f"export {k}={shlex.quote(v)}" for k, v in assign.items()]
        if unset:
            lines.append("unset " + " ".join(unset))
    return "\n".join(lines)
