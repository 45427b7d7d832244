"""serve/alerts.yaml: valid Prometheus rules, and each alert fires on its planted incident (promtool unit tests)."""

import shutil
import subprocess
from pathlib import Path

import pytest

SERVE = Path(__file__).resolve().parent.parent / "serve"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian package prometheus; `make test` "
                                                              "installs it)")


@needs_promtool
def test_rules_are_valid():
    proc = subprocess.run([PROMTOOL, "check", "rules", "alerts.yaml"], cwd=SERVE, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 7 rules found" in proc.stdout


@needs_promtool
def test_alerts_fire_on_planted_incidents_only(tmp_path):
    proc = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yaml"], cwd=SERVE, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # the same tests must fail when a rule is broken (the error-rate threshold raised past the planted 16.7%)
    broken = (SERVE / "alerts.yaml").read_text().replace("> 0.05", "> 0.5")
    (tmp_path / "alerts.yaml").write_text(broken)
    (tmp_path / "alerts_test.yaml").write_text((SERVE / "alerts_test.yaml").read_text())
    proc = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yaml"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "LlmstackHighErrorRate" in proc.stdout + proc.stderr
