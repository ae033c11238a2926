"""Mosquitto restarted under QoS 1 load into Telemetra: how many broker-acknowledged messages survive.

The long version of tests/reliability/test_mosquitto_restart.py (same scenario: tests/support/
restart_scenario.py). For each restart kind and broker configuration it runs Telemetra (``telemetra
serve``, PostgreSQL, Mosquitto with dynamic security), ``--devices`` devices publishing ``--messages``
numbered QoS 1 messages each at ``--rate`` msg/s, restarts the broker half-way, and prints per run:
acknowledged (PUBACK reached the device), stored, lost (acknowledged, not stored), duplicated (stored
twice), the publish rate, how long the collector took to be back, and the redeliveries the primary key
absorbed.

Configurations (``--configs``): ``deploy`` is deploy/mosquitto/mosquitto.conf as shipped; ``test`` is the
test harness's config (tests/support/mosquitto.py); ``autosave=<interval>[+changes]`` is the harness
config with ``autosave_interval <interval>`` (and ``autosave_on_changes true``) — for measuring what each
setting does for SIGKILL.

    .venv/bin/python bench/mosquitto_restart.py [--restarts graceful,kill] [--configs deploy,test] \\
        [--devices 4] [--messages 10000] [--rate 500] [--repeat 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.support

from tests.conftest import postgres_database  # noqa: E402
from tests.support.mosquitto import MosquittoInstance, deploy_mosquitto, start_mosquitto  # noqa: E402
from tests.support.restart_scenario import RestartOutcome, restart_scenario  # noqa: E402


@contextlib.contextmanager
def broker_for(config: str, workdir: Path) -> Iterator[MosquittoInstance]:
    if config == "deploy":
        with deploy_mosquitto() as deploy:
            yield deploy.instance
        return
    extra = ""
    if config.startswith("autosave="):
        interval, _, changes = config.removeprefix("autosave=").partition("+")
        extra = f"autosave_interval {int(interval)}\n"
        if changes:
            extra += "autosave_on_changes true\n"
    elif config != "test":
        raise SystemExit(f"unknown config {config!r}")
    instance = start_mosquitto(workdir / "mosquitto", extra_conf=extra)
    try:
        yield instance
    finally:
        instance.stop()


async def one_run(config: str, restart: str, opts: argparse.Namespace) -> RestartOutcome:
    async with postgres_database() as url:
        with tempfile.TemporaryDirectory(prefix="telemetra-restart-") as tmp, broker_for(config, Path(tmp)) as broker:
            outcome = await asyncio.to_thread(
                restart_scenario,
                broker,
                url,
                Path(tmp),
                restart=restart,  # type: ignore[arg-type]
                devices=opts.devices,
                messages=opts.messages,
                rate=opts.rate,
                restart_at=opts.restart_at,
                env={"TELEMETRA_MQTT_SHARE_GROUP": opts.share_group} if opts.share_group else None,
            )
            return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restarts", default="graceful,kill")
    parser.add_argument("--configs", default="deploy,test")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--messages", type=int, default=10_000, help="per device")
    parser.add_argument("--rate", type=float, default=500.0, help="msg/s per device")
    parser.add_argument("--restart-at", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--share-group", default="", help="subscribe through $share/<group>/... (as with several processes)"
    )
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args(argv)
    print(f"# {platform.node()} {platform.machine()} python {platform.python_version()}")
    print(
        f"# {opts.devices} devices x {opts.messages} msgs at {opts.rate:.0f} msg/s each, broker restarted at "
        f"{opts.restart_at:.0%}" + (f", shared subscription $share/{opts.share_group}/" if opts.share_group else "")
    )
    print(f"{'config':<16} {'restart':<9} {'acked':>7} {'stored':>7} {'lost':>6} {'dup':>4} {'msg/s':>7} back_s redel")
    rows: list[dict[str, Any]] = []
    failed = False
    for config in opts.configs.split(","):
        for restart in opts.restarts.split(","):
            for _ in range(opts.repeat):
                out = asyncio.run(one_run(config, restart, opts))
                t = out.tally
                rate = out.published / max(out.publish_s, 1e-9)
                back = f"{out.collector_back_s:6.2f}" if out.collector_back_s is not None else " <0.01"
                print(
                    f"{config:<16} {restart:<9} {t.acknowledged:>7} {t.stored:>7} {t.lost:>6} {t.duplicated:>4} "
                    f"{rate:>7.0f} {back} {out.redelivered:>7}",
                    flush=True,
                )
                failed |= t.lost > 0 or t.duplicated > 0
                rows.append(
                    {
                        "config": config,
                        "restart": restart,
                        "acknowledged": t.acknowledged,
                        "stored": t.stored,
                        "lost": t.lost,
                        "duplicated": t.duplicated,
                        "publish_rate": rate,
                        "collector_back_s": out.collector_back_s,
                        "redelivered": out.redelivered,
                    }
                )
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
