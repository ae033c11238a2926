"""The README's shell examples, extracted from the README (so they cannot drift) and run verbatim, in order,
in one bash shell (as a reader pastes them: a variable one block defines is there for the next), against
a server started the README's way (``telemetra serve`` — what ``make run`` runs — in a directory with
``.venv/bin/telemetra``), on this machine where another broker may hold 1883: the examples take their ports
from the same TELEMETRA_* variables as the server, which the test exports as the README tells users to.

Every ```sh block runs unless the line before it is ``<!-- readme-test: skip: <why> -->`` (starting the
server, production deploys, interactive sessions): the README says which of its blocks are not run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import missing_service
from tests.mqtt.conftest import telemetra_binary
from tests.support.mosquitto import free_port

README = Path(__file__).resolve().parent.parent / "README.md"
VIEWER_KEY = "readme-viewer-key-0123456789abcdefghijklmn"  # pragma: allowlist secret
BLOCK = re.compile(r"(?:<!-- readme-test: ([^>]*?) -->\n)?```sh\n(.*?)```", re.S)


@dataclass
class Block:
    line: int
    marker: str | None
    text: str

    @property
    def skipped(self) -> bool:
        return self.marker is not None and self.marker.startswith("skip")


def readme_blocks() -> list[Block]:
    text = README.read_text()
    return [Block(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def script(blocks: list[Block], out: Path) -> str:
    """One shell script: each block's output into its own file (``{ …; }`` keeps its variables), and a
    line on stderr after each, so a failure names its block."""
    parts = ["set -euo pipefail"]
    for n, block in enumerate(blocks):
        parts.append(f"{{\n{block.text}}} > {out / f'block-{n}.out'}")
        parts.append(f'echo "README block at line {block.line} done at $(date +%s.%N)" >&2')
    return "\n".join(parts) + "\n"


def json_documents(text: str) -> list[object]:
    """curl prints each answer without a newline: the JSON documents follow each other."""
    found, decoder, text = [], json.JSONDecoder(), text.strip()
    while text:
        doc, end = decoder.raw_decode(text)
        found.append(doc)
        text = text[end:].lstrip()
    return found


def test_every_skip_says_why() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 15, "README shell blocks not found"
    for block in blocks:
        if block.marker is not None:
            assert re.fullmatch(r"first-minutes|skip: \S.*", block.marker), f"line {block.line}: {block.marker!r}"
    assert sum(not b.skipped for b in blocks) >= 8  # the device examples run


def test_readme_examples_run_verbatim_in_order(tmp_path: Path) -> None:
    for tool in ("curl", "mosquitto_pub", "mosquitto_sub"):
        if shutil.which(tool) is None:
            missing_service(f"{tool} not installed (the README's examples use it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_") and k != "DATABASE_URL"}
    # The README's advice when 1883 is taken (it is, on the machines this suite runs on): export the ports;
    # and a viewer key, which its roles example reads from TELEMETRA_VIEWER_KEYS.
    env |= {
        "TELEMETRA_PORT": str(free_port()),
        "TELEMETRA_MQTT_PORT": str(free_port()),
        "TELEMETRA_VIEWER_KEYS": VIEWER_KEY,
    }
    # The reader's directory: the checkout, with `make run`'s .venv (here a link to this one's).
    venv_bin = Path(telemetra_binary()[0]).parent
    (tmp_path / ".venv").symlink_to(venv_bin.parent, target_is_directory=True)
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([*telemetra_binary(), "serve"], cwd=tmp_path, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "telemetra-data" / "admin.key").exists():  # written once it has started
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        runs = [b for b in readme_blocks() if not b.skipped]
        outputs = tmp_path / "outputs"
        outputs.mkdir()
        done = subprocess.run(
            ["bash", "-c", script(runs, outputs)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90
        )
        assert done.returncode == 0, done.stderr[-3000:] + log.read_text()[-3000:]
        answers = {b.line: (outputs / f"block-{n}.out").read_text() for n, b in enumerate(runs)}

        first = next(b for b in runs if b.marker == "first-minutes")
        ingested, latest = json_documents(answers[first.line])
        assert ingested["accepted"] is True  # type: ignore[index]
        assert json.dumps(latest).count("21.5") == 1 and json.dumps(latest).count("41") >= 1, latest
        everything = "\n".join(answers.values())
        # No example ran with a missing or wrong key or id: those would answer 401/404 in the output.
        for refusal in ('"code":"unauthorized"', '"code":"not_found"', '"code":"forbidden"'):
            assert refusal not in everything, refusal + "\n" + everything[-3000:]
        assert "Internal Server Error" not in everything
        assert "Traceback" not in done.stderr + log.read_text()
        assert httpx.get(f"http://127.0.0.1:{env['TELEMETRA_PORT']}/health").status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_readme_stands_alone() -> None:
    """For a reader who never saw this repository's history: no internal "issue N" / "seed N" notes, and
    the production admin key is found where the deploy puts it."""
    text = README.read_text()
    internal = re.findall(r"\b(?:issues?|seeds?) #?\d+\b", text, re.I)
    assert not internal, f"internal references in README.md: {sorted(set(internal))}"
    assert "deploy/secrets/admin_key" in text and "TELEMETRA_ADMIN_KEYS_FILE" in text
    assert "**Where the admin key lives.**" in text
