"""The plugin mechanism: import paths and installed packages' entry points."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mbdl.plugins import PluginError, Registry, import_object, is_import_path


def _install_fake_package(root: Path, group: str, name: str, value: str, code: str) -> None:
    """A module ``fake_plugin_pkg`` plus a ``.dist-info`` declaring one entry point, as pip would."""
    (root / "fake_plugin_pkg.py").write_text(code)
    info = root / "fake_plugin_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{name} = {value}\n")


def test_import_path_resolves_nested_attribute() -> None:
    assert is_import_path("a.b:C") and not is_import_path("mdl")
    assert import_object("os.path:join", kind="loss") is __import__("os").path.join
    assert import_object("collections:OrderedDict.fromkeys", kind="loss") is not None


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_xyz:Thing", "cannot import module 'no_such_module_xyz'"),
        ("os.path:no_such_name", "has no 'no_such_name'"),
        (":Thing", "write an import path as package.module:Name"),
        ("os.path:", "write an import path as package.module:Name"),
    ],
)
def test_bad_import_paths_name_the_problem(path: str, message: str) -> None:
    with pytest.raises(PluginError, match=message):
        import_object(path, kind="loss")


def test_registry_builtin_entry_point_and_import_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_fake_package(tmp_path, "mbdl.things", "fancy", "fake_plugin_pkg:Fancy", "Fancy = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry: Registry[object] = Registry("thing", "mbdl.things", {"plain": lambda: 1})
    assert registry.names() == ("plain", "fancy")
    assert registry.get("plain") == 1
    assert registry.get("fancy") == 42
    assert registry.get("fake_plugin_pkg:Fancy") == 42
    assert "fancy" in registry and "x.y:Z" in registry and "nothing" not in registry
    with pytest.raises(PluginError, match="unknown thing 'nothing'; choose one of plain, fancy"):
        registry.get("nothing")
    sys.modules.pop("fake_plugin_pkg", None)


def test_broken_entry_point_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_package(
        tmp_path, "mbdl.things", "broken", "fake_plugin_pkg:Missing", "raise RuntimeError('boom')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry: Registry[object] = Registry("thing", "mbdl.things", {})
    with pytest.raises(PluginError, match=r"thing 'broken' .* failed to load: boom"):
        registry.get("broken")
    sys.modules.pop("fake_plugin_pkg", None)


def test_check_validates_resolved_objects() -> None:
    def must_be_int(found: object, name: str) -> int:
        if not isinstance(found, int):
            raise PluginError(f"thing {name!r} is not an int")
        return found

    registry = Registry("thing", "mbdl.things", {"one": lambda: 1, "bad": lambda: "x"}, must_be_int)
    assert registry.get("one") == 1
    with pytest.raises(PluginError, match="thing 'bad' is not an int"):
        registry.get("bad")
