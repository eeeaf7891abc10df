"""Under CI (INSTSEG_REQUIRE_TOOLS=1, set by .ci/run) a missing PaddleX venv fails the PaddleX
tests instead of skipping them unnoticed; elsewhere it still skips."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, require: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "INSTSEG_REQUIRE_TOOLS"}
    env["INSTSEG_PADDLEX_PYTHON"] = str(tmp_path / "no-such-python")
    if require:
        env["INSTSEG_REQUIRE_TOOLS"] = "1"
    test = tmp_path / "test_uses_paddlex.py"
    test.write_text("def test_needs_paddlex(paddlex_python):\n    pass\n")
    # the suite's conftest loaded as a plugin (the test file lives outside tests/)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-p", "conftest",
                           str(test)], cwd=REPO / "tests", env=env, capture_output=True, text=True, timeout=300)


def test_missing_paddlex_venv_fails_under_ci_and_skips_elsewhere(tmp_path):
    strict = _run(tmp_path, require=True)
    assert strict.returncode == 1 and "1 error" in strict.stdout, strict.stdout
    assert "PaddleX 3.7.2 venv not found" in strict.stdout and "required in this run" in strict.stdout
    relaxed = _run(tmp_path, require=False)
    assert relaxed.returncode == 0 and "1 skipped" in relaxed.stdout, relaxed.stdout
