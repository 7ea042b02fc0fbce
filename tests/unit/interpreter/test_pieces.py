"""The interpreter's pure pieces, without a server: bundles, languages, env var code."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cube.guest.interpreter import languages
from cube.guest.interpreter.bundle import to_result
from cube.guest.interpreter.envs import GlobalEnvs, KernelEnv
from cube.guest.interpreter.protocol import encode_line

AWKWARD = 'it\'s "both" $HOME `x` \\ \n new line'


def test_bundle_keys_quotes_and_extra() -> None:
    result = to_result({"text/plain": "'abc'", "image/png": "iVBO", "x/custom": 1}, True)
    assert (result.text, result.png, result.extra) == ("abc", "iVBO", {"x/custom": 1})
    assert to_result({"text/plain": "'"}, False).text == "'"
    line = encode_line(to_result({"text/plain": "2"}, True))
    assert line == b'{"type":"result","is_main_result":true,"text":"2"}\n'


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, "python"),
        ("", "python"),
        (" Python ", "python"),
        ("JS", "javascript"),
        ("ts", "typescript"),
    ],
)
def test_normalize(given: str | None, expected: str) -> None:
    assert languages.normalize(given) == expected


def test_unsupported_language() -> None:
    with pytest.raises(languages.UnsupportedLanguage, match="not supported"):
        languages.kernel_spec("java")


def test_python_env_code_round_trips_any_value() -> None:
    code = languages.env_code("python", {"A": AWKWARD}, ["B"])
    os.environ["B"] = "present"
    try:
        exec(code)
        assert os.environ.pop("A") == AWKWARD
        assert "B" not in os.environ
    finally:
        os.environ.pop("B", None)


def test_bash_env_code_round_trips_any_value() -> None:
    code = languages.env_code("bash", {"A": AWKWARD}, ["B"])
    script = f'{code}\nprintf %s "$A"; echo "|${{B-unset}}"'
    out = subprocess.run(["bash", "-c", script], env={"B": "x"}, capture_output=True, text=True)
    assert out.stdout == AWKWARD + "|unset\n"


def test_global_envs_file(tmp_path: Path) -> None:
    envs = GlobalEnvs(tmp_path)
    assert envs.current() == {}
    (tmp_path / "envs.json").write_text('{"GOOD": "1", "bad name": "2", "NUL": "a\\u0000b"}')
    assert envs.current() == {"GOOD": "1"}
    (tmp_path / "envs.json").write_text("[1, 2]")
    assert envs.current() == {}
    (tmp_path / "envs.json").write_bytes(b'{"A": "' + b"x" * (2 << 20) + b'"}')
    assert envs.current() == {}


def test_kernel_env_sync_and_restore(tmp_path: Path) -> None:
    envs = GlobalEnvs(tmp_path)
    (tmp_path / "envs.json").write_text('{"G": "1", "H": "2"}')
    env = KernelEnv("bash", envs)
    assert env.launch()["G"] == "1"
    assert env.sync_code() == ""
    (tmp_path / "envs.json").write_text('{"G": "3"}')
    assert env.sync_code() == "export G=3\nunset H"
    assert env.restore_code({"G": "call", "NEW": "x"}) == "export G=3\nunset NEW"
