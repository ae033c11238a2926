"""Fail when a tracked file holds something that looks like a secret and ``.secrets.baseline`` does not
list it as reviewed (run by ``make test``).

detect-secrets' own hook does the scan (``detect-secrets-hook --baseline``). It runs here on a copy of the
baseline because the hook rewrites the baseline, and exits 3, whenever a listed finding merely moved to
another line: that is not a new secret, and ``make test`` must not edit tracked files. A finding in the
baseline that nobody marked ``"is_secret": false`` fails too — listed is not the same as reviewed.

After adding a placeholder password to a test or a document:
    .venv/bin/detect-secrets scan --baseline .secrets.baseline   # adds the new findings
    .venv/bin/detect-secrets audit .secrets.baseline             # mark each: real secret or not
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from detect_secrets.pre_commit_hook import main as hook

BASELINE = Path(".secrets.baseline")
BASELINE_ONLY_MOVED = 3  # the hook's "baseline updated" exit status: line numbers changed, nothing new


def unreviewed(baseline: dict[str, object]) -> list[str]:
    results = baseline.get("results", {})
    assert isinstance(results, dict)
    return [
        f"{filename}:{finding.get('line_number')} {finding.get('type')}"
        for filename, findings in results.items()
        for finding in findings
        if finding.get("is_secret") is not False
    ]


def main() -> int:
    tracked = subprocess.run(["git", "ls-files", "-z"], check=True, capture_output=True).stdout.decode()
    files = [f for f in tracked.split("\0") if f and f != str(BASELINE) and Path(f).is_file()]
    pending = unreviewed(json.loads(BASELINE.read_text()))
    if pending:
        print("findings in .secrets.baseline not reviewed (is_secret must be false):", *pending, sep="\n  ")
        return 1
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / BASELINE.name
        shutil.copyfile(BASELINE, copy)
        report = io.StringIO()
        with contextlib.redirect_stdout(report):
            status = hook(["--baseline", str(copy), *files])
    if status in (0, BASELINE_ONLY_MOVED):
        print(f"detect-secrets: no new secrets in {len(files)} tracked files")
        return 0
    print(report.getvalue())
    return status


if __name__ == "__main__":
    sys.exit(main())
