"""The distribution installs one import namespace, `yardmaster.*`, and nothing else."""

from __future__ import annotations

import ast
import pathlib
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[2]
FOLDERS = {"protocol": "yardmaster.protocol", "server": "yardmaster.server", "agent": "yardmaster.agent"}


def _setuptools() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]  # type: ignore[no-any-return]


def test_every_package_folder_is_installed_under_yardmaster() -> None:
    cfg = _setuptools()
    assert cfg["package-dir"] == {v: k for k, v in FOLDERS.items()}
    on_disk = set()
    for folder, namespace in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            on_disk.add(".".join((namespace, *rel)))
    assert set(cfg["packages"]) == on_disk  # type: ignore[arg-type]


def test_no_module_imports_the_bare_folder_names() -> None:
    offenders = []
    for path in [*REPO.glob("protocol/**/*.py"), *REPO.glob("server/**/*.py"), *REPO.glob("agent/**/*.py"),
                 *REPO.glob("tests/**/*.py"), *REPO.glob("scripts/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert offenders == []


def test_the_console_script_points_into_the_namespace() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["yardmaster"] == "yardmaster.server.cli:main"
