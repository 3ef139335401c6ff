"""The operator alert rules (infra/alerts/) are valid Prometheus rules and fire on the
series they are written for (promtool's own rule unit tests, beside the rules file)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ALERTS = Path(__file__).resolve().parent.parent / "infra" / "alerts"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: `make setup` installs it (Debian's prometheus package: "
            "apt-get install -y --no-install-recommends prometheus)"
        )
    return path


def test_rules_file_is_valid():
    proc = subprocess.run(
        [_promtool(), "check", "rules", str(ALERTS / "tokenaudit.rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 6 rules found" in proc.stdout


def test_each_alert_fires_on_its_series_and_not_on_healthy_ones():
    proc = subprocess.run(
        [_promtool(), "test", "rules", "tokenaudit.rules.test.yml"],
        cwd=ALERTS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_case_where_it_fires():
    alerts = set(re.findall(r"^\s*- alert: (\w+)", (ALERTS / "tokenaudit.rules.yml").read_text(), re.M))
    cases = (ALERTS / "tokenaudit.rules.test.yml").read_text()
    fired = set(re.findall(r"alertname: (\w+)\n\s*exp_alerts:\n\s*- exp_labels", cases))
    assert len(alerts) == 6 and alerts == fired
