"""Wall time of `tokenaudit demo` on a warm machine (venv, Kafka jars and model cached),
split into its phases, and whether every request was accounted for exactly.

Runs in a temporary data directory on free ports, so it never touches a running stack.
Prints RESULT lines; the ratio compares the fixed traffic time with the whole run, i.e. how
much of the demo is overhead (start-up, waiting for windows, reports, shutdown).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: the suite's helpers

from tokenaudit.infra.procutil import free_port
from tokenaudit.settings import load_settings


def main() -> None:
    steady, spike = 40.0, 15.0
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        env.update(
            {
                "TOKENAUDIT_DATA_DIR": tmp,
                "TOKENAUDIT_KAFKA_PORT": str(free_port()),
                "TOKENAUDIT_KAFKA_CONTROLLER_PORT": str(free_port()),
                "TOKENAUDIT_HTTP_PORT": str(free_port()),
                "TOKENAUDIT_USAGE_API_PORT": str(free_port()),
                "TOKENAUDIT_WORKER_WEB_PORT": str(free_port()),
                # the model is built once in the cache and reused: "warm machine"
                "TOKENAUDIT_MODEL": str(_cached_model()),
            }
        )
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "tokenaudit.cli", "demo", "--steady", str(steady), "--spike", str(spike)],
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        wall = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    up = re.search(r"pipeline up in (\d+)s", out)
    accounted = re.search(r"accounted\s+(\d+) of (\d+) requests \((.*?)\)", out)
    print(f"RESULT demo_exit_code={proc.returncode}")
    print(f"RESULT demo_wall_s={wall:.1f}")
    if up:
        print(f"RESULT demo_startup_s={up.group(1)}")
    print(f"RESULT demo_traffic_s={steady + spike:.0f}")
    print(f"RESULT demo_traffic_share_of_wall={(steady + spike) / wall:.2f}")
    if accounted:
        print(f"RESULT demo_requests_accounted={accounted.group(1)}/{accounted.group(2)}")
        print(f"RESULT demo_accounting_exact={int(accounted.group(3) == 'exact per client')}")
    if proc.returncode != 0:
        print(out[-3000:], file=sys.stderr)


def _cached_model() -> Path:
    from tests.support.apps import cached_model

    return cached_model("t5", load_settings().cache_dir)


if __name__ == "__main__":
    main()
