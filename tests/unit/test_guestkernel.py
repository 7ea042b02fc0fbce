"""The guest kernel's config check and cache key, without building anything."""

from pathlib import Path

import pytest

from cube import guestkernel


def _config_meeting_the_fragment() -> str:
    """A .config that holds exactly what the fragment asks for, the way Kconfig writes it."""
    lines = []
    for name, value in guestkernel.required_options().items():
        lines.append(f"# {name} is not set" if value == "n" else f"{name}={value}")
    return "\n".join(["#", "# Automatically generated file; DO NOT EDIT.", *lines, ""])


def test_fragment_states_the_guest_essentials() -> None:
    required = guestkernel.required_options()
    for name in ("CONFIG_PVH", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES", "CONFIG_VIRTIO_VSOCKETS"):
        assert required[name] == "y"
    assert required["CONFIG_NR_CPUS"] == "16"
    assert required["CONFIG_MODULES"] == "n"
    assert required["CONFIG_ACPI"] == "n"


def test_config_meeting_the_fragment_misses_nothing() -> None:
    assert guestkernel.missing_options(_config_meeting_the_fragment()) == []


def test_absent_and_wrong_values_are_reported_as_fragment_lines() -> None:
    config = _config_meeting_the_fragment()
    config = config.replace("CONFIG_PVH=y\n", "# CONFIG_PVH is not set\n")
    config = config.replace("CONFIG_VIRTIO_BLK=y\n", "")
    config = config.replace("CONFIG_NR_CPUS=16\n", "CONFIG_NR_CPUS=64\n")
    assert sorted(guestkernel.missing_options(config)) == [
        "CONFIG_NR_CPUS=16",
        "CONFIG_PVH=y",
        "CONFIG_VIRTIO_BLK=y",
    ]


def test_y_is_not_m() -> None:
    config = _config_meeting_the_fragment().replace("CONFIG_EXT4_FS=y\n", "CONFIG_EXT4_FS=m\n")
    assert guestkernel.missing_options(config) == ["CONFIG_EXT4_FS=y"]


def test_options_meant_to_be_off_may_be_absent_but_not_on() -> None:
    config = _config_meeting_the_fragment()
    assert guestkernel.missing_options(config.replace("# CONFIG_ACPI is not set\n", "")) == []
    for on in ("y", "m"):
        wrong = config.replace("# CONFIG_MODULES is not set\n", f"CONFIG_MODULES={on}\n")
        assert guestkernel.missing_options(wrong) == ["# CONFIG_MODULES is not set"]


def test_parse_config_reads_values_and_unset_options_only() -> None:
    text = '# comment\nCONFIG_A=y\nCONFIG_B="ttyS0"\n# CONFIG_C is not set\n\nCONFIG_D=0x10\n'
    assert guestkernel.parse_config(text) == {
        "CONFIG_A": "y",
        "CONFIG_B": '"ttyS0"',
        "CONFIG_C": "n",
        "CONFIG_D": "0x10",
    }


def _point_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Copies of the real fragment and build script, used in their place."""
    fragment, script = tmp_path / "config.fragment", tmp_path / "build.sh"
    fragment.write_bytes(guestkernel.FRAGMENT.read_bytes())
    script.write_bytes(guestkernel.BUILD_SCRIPT.read_bytes())
    monkeypatch.setattr(guestkernel, "FRAGMENT", fragment)
    monkeypatch.setattr(guestkernel, "BUILD_SCRIPT", script)
    return fragment, script


def test_key_follows_fragment_and_build_script_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fragment, script = _point_at(tmp_path, monkeypatch)
    first = guestkernel.kernel_key()
    # Same key without dpkg or the source package: L1 must find what the host built.
    monkeypatch.setattr(guestkernel, "installed_source_version", lambda: "")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert guestkernel.kernel_key() == first
    fragment.write_text(fragment.read_text() + "CONFIG_EXTRA=y\n")
    second = guestkernel.kernel_key()
    assert second != first
    script.write_text(script.read_text() + "\n# changed\n")
    assert guestkernel.kernel_key() not in (first, second)


def test_find_kernel_looks_in_the_cache_under_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUBE_CACHE_DIR", str(tmp_path / "cache"))
    assert guestkernel.find_kernel() is None
    folder = tmp_path / "cache" / "kernel" / guestkernel.kernel_key()
    folder.mkdir(parents=True)
    (folder / "vmlinux").write_bytes(b"\x7fELF")
    assert guestkernel.find_kernel() == folder / "vmlinux"


def test_without_the_sources_there_is_no_kernel_to_find(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guestkernel, "FRAGMENT", tmp_path / "absent")
    assert guestkernel.find_kernel() is None
    with pytest.raises(guestkernel.KernelError, match="checkout"):
        guestkernel.kernel_key()
