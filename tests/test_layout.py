"""The repository's layout as a user gets it: a job that needs nothing but the standard library,
one version, and the files a release carries."""

from __future__ import annotations

import ast
import fnmatch
import re
import sys
import tomllib

import lapi_kv_sync as job
from tests.conftest import ROOT, SCRIPT


def imported_modules(source: str) -> set[str]:
    """The top-level package of every import in `source`, wherever it sits (a function, a try)."""
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import cannot work from a mounted file"
            modules.add(node.module.split(".")[0])
    return modules


def test_imported_modules_sees_every_form():
    source = (
        "import a.b, c\nfrom d.e import f\ndef g():\n    import h\ntry:\n    import i\nexcept ImportError:\n    pass\n"
    )
    assert imported_modules(source) == {"a", "c", "d", "h", "i"}


def test_the_job_imports_only_the_standard_library():
    """The tests run the job with the test venv's Python, where a third-party import would work;
    on python:3.12-alpine, the CronJob's image, it would not."""
    modules = imported_modules(SCRIPT.read_text())
    assert {"json", "http", "urllib"} <= modules
    assert modules - {"__future__"} <= sys.stdlib_module_names, modules - sys.stdlib_module_names


VERSION_MENTIONS = {
    # file: how the version appears in it
    "k8s/components/image/kustomization.yaml": r"lapi-kv-sync:(\d+\.\d+\.\d+)",
    "CHANGELOG.md": r"^## \[(\d+\.\d+\.\d+)\]",
    "docs/deploy.md": r"(?:\?ref=v|lapi-kv-sync:)(\d+\.\d+\.\d+)",
}


def test_the_version_is_defined_once_and_every_mention_agrees():
    assert re.fullmatch(r"\d+\.\d+\.\d+", job.__version__)
    for path, pattern in VERSION_MENTIONS.items():
        found = re.findall(pattern, (ROOT / path).read_text(), re.M)
        assert found, f"{path}: no version found"
        assert found[0] == job.__version__, f"{path} says {found[0]}, lapi_kv_sync.__version__ is {job.__version__}"
        assert set(found) == {job.__version__} or path == "CHANGELOG.md", f"{path}: {found}"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lapi_kv_sync.__version__"}
    assert not re.search(r"\d+\.\d+\.\d+", (ROOT / "Dockerfile").read_text().replace("3.12", ""))


def test_the_release_page_names_every_place_the_version_is_written():
    """docs/release.md's last step (open the next version) names each file a test holds to
    __version__, so a release cannot leave one behind; the CHANGELOG's top section is the
    version's, dated or unreleased."""
    page = (ROOT / "docs" / "release.md").read_text()
    assert "__version__" in page and "tests/test_layout.py" in page
    for path in VERSION_MENTIONS:
        assert path in page or f"]({path.removeprefix('docs/')})" in page, f"docs/release.md does not name {path}"
    top = re.search(r"^## \[(.*?)\] - (.*)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert top.group(1) == job.__version__
    assert re.fullmatch(r"unreleased|\d{4}-\d{2}-\d{2}", top.group(2)), top.group(0)


def test_the_license_matches_pyproject():
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def docker_sends(path: str, patterns: list[str]) -> bool:
    """Whether `docker build` sends `path` to the daemon: the last .dockerignore pattern matching
    it, or a folder above it, decides; `!` lets it through again."""
    sent = True
    for pattern in patterns:
        negated, pattern = pattern.startswith("!"), pattern.removeprefix("!").strip("/")
        parts = path.split("/")
        if any(fnmatch.fnmatchcase("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            sent = negated
    return sent


def test_the_docker_build_context_is_the_script_alone():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert docker_sends("lapi_kv_sync.py", patterns)
    for path in (".git/HEAD", ".venv/bin/python", ".cache/venv/x", "node_modules/a/b.js", "tests/test_core.py"):
        assert not docker_sends(path, patterns), path
    for path in ("bench/run.py", "lapi-key", "cf-api-token", "worker/worker.js", "README.md"):
        assert not docker_sends(path, patterns), path
    copied = re.findall(r"^COPY (?:--\S+ )*(\S+) ", (ROOT / "Dockerfile").read_text(), re.M)
    assert copied and all(docker_sends(path, patterns) for path in copied)


def test_ci_runs_the_readme_set_up_commands():
    """The README's test commands: a virtual environment (pip refuses the system Python on Debian
    12 and Ubuntu), then the install command and the test command, which .ci/run runs as written."""
    readme = (ROOT / "README.md").read_text()
    commands = re.search(r"^## Tests\n.*?```sh\n(.*?)```", readme, re.S | re.M).group(1).splitlines()
    assert len(commands) == 3 and commands[0].startswith("python3 -m venv ")
    assert commands[1:] == ["bash .ci/install-components", "python3 -m pytest"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci.index(commands[1]) < ci.index(commands[2])


# --------------------------------------------------------------------------- what a fresh clone runs


def test_every_skip_names_the_one_install_command(monkeypatch):
    """A test skipped for want of a component says how to get it: the README's install command."""
    import pytest

    from tests import real, test_deploy, test_worker

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(real.shutil, "which", lambda name: None)
    monkeypatch.setattr(real, "CACHES", ())
    monkeypatch.setattr(test_worker, "WORKER", ROOT / "no-such-folder")
    for needs in (lambda: real.require("promtool"), test_deploy.kubectl, test_worker.node):
        with pytest.raises(pytest.skip.Exception) as skipped:
            needs()
        assert "`bash .ci/install-components`" in str(skipped.value)
    assert "bash .ci/install-components" in (ROOT / "README.md").read_text()
    assert "bash .ci/install-components" in (ROOT / ".ci" / "run").read_text()


def test_no_test_reads_outside_the_repository():
    """The published schemas and recorded answers the tests check against are in tests/reference."""
    for path in (ROOT / "tests").glob("*.py"):
        assert "../" + "shared" not in path.read_text(), path.name
    assert (ROOT / "tests" / "reference" / "LICENSE.cloudflare-api-schemas").is_file()
