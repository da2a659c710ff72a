"""Schemathesis against a real `bentoml serve`, driven by the service's own API document: at least
1,000 generated cases (positive and negative, every operation; a fixed seed and example count, ~1 minute
unloaded, not cut by a time budget so the count never depends on the machine's speed), and not one 5xx or
answer that breaks the document (status, media type, schema, headers, refusal of schema-violating input)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
    "response_headers_conformance,negative_data_rejection,unsupported_method"
)
MIN_CASES = 1000


def test_schemathesis_finds_nothing(served, tmp_path):
    url = served["server"].url
    report = tmp_path / "report.json"
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{url}/docs.json",
        "--checks",
        CHECKS,
        "--max-examples",
        "200",
        "--seed",
        "12",
        "--workers",
        "2",
        "--request-timeout",
        "30",
        "--continue-on-failure",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        "--warnings",
        "off",
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "NO_COLOR": "1"},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    run = json.loads(report.read_text())
    cases = _cases(run)
    assert cases >= MIN_CASES, f"only {cases} cases generated:\n{output[-3000:]}"


def _cases(run: dict) -> int:
    """Test cases the run sent, from its JSON report; no case may have errored or failed."""
    cases = run["test_cases"]
    assert cases["errored"] == 0 and cases["with_failures"] == 0 and not run["errors"], cases
    assert run["operations"]["tested"] == run["operations"]["total"] == 6, run["operations"]  # /explain is the 6th
    return int(cases["generated"])
