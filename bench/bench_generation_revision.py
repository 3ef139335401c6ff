"""Non-streamed generation throughput of this tree against another git revision, side by side:
did a change to the runner or the micro-batcher cost the non-streamed path anything?

Usage: ``python bench/bench_generation_revision.py [REV]`` (default ``HEAD~1``). REV's packages
are exported with ``git archive`` into a temporary folder and imported from there in a process
of their own (this tree's compiled Avro and JSON codecs are copied beside them); each side then
runs the same driver: XLA-compiled tiny T5, runner + micro-batcher in process, 8 new tokens,
best of three runs at concurrency 16 and 1. The two sides alternate three times; the RESULT
lines give the medians and their ratio.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("inference", "schemas", "infra", "streams", "sinks")
ROUNDS = 3

DRIVER = r"""
import asyncio, logging, statistics, sys, time
logging.disable(logging.WARNING)
from tokenaudit.inference.batcher import MicroBatcher
from tokenaudit.inference.runner import ModelRunner
words = "audit token usage model kafka stream window client department latency spool".split()
prompts = [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 8)) for i in range(256)]
runner = ModelRunner(sys.argv[1], max_input_tokens=32, xla=True, batch_buckets="1,16", length_buckets="32",
                     new_token_buckets="8", max_batch=16, max_new_tokens_limit=8).load()
runner.warmup()
encoded = [runner.tokenize(p) for p in prompts]

async def drive(batcher, n, concurrency):
    todo = list(encoded[:n])
    async def client():
        while todo:
            await batcher.submit(todo.pop(), 8)
    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return n / (time.perf_counter() - t0)

for concurrency, n in ((16, 256), (1, 96)):
    batcher = MicroBatcher(runner, max_size=16, max_wait_ms=5).start()
    asyncio.run(drive(batcher, 32, concurrency))
    print(f"c{concurrency}", max(asyncio.run(drive(batcher, n, concurrency)) for _ in range(3)))
    batcher.stop()
"""


def export(rev: str, into: Path) -> Path:
    """REV's packages laid out as the installed ``tokenaudit`` package (pyproject's package-dir)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "tokenaudit", *PACKAGES], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    pkg = into / "pkg"
    pkg.mkdir()
    shutil.move(str(into / "tokenaudit"), pkg / "tokenaudit")
    for name in PACKAGES:
        shutil.move(str(into / name), pkg / "tokenaudit" / name)
        for built in (ROOT / name).glob("*.so"):  # the native codecs, as built for this tree
            shutil.copy(built, pkg / "tokenaudit" / name)
    return pkg


def run(model: str, pythonpath: str | None) -> dict[str, float]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath  # ahead of the editable install's finder
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, model],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.startswith("c")}


def main() -> None:
    from tests.support.apps import cached_model
    from tokenaudit.settings import load_settings

    rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD~1"
    model = str(cached_model("t5", load_settings().cache_dir))
    with tempfile.TemporaryDirectory() as tmp:
        pkg = export(rev, Path(tmp))
        before, after = [], []
        for _ in range(ROUNDS):
            before.append(run(model, str(pkg)))
            after.append(run(model, None))
    for key in ("c16", "c1"):
        b, a = statistics.median(r[key] for r in before), statistics.median(r[key] for r in after)
        print(f"RESULT nonstream_{key}_rps_{rev}={b:.1f}  # runs: {', '.join(f'{r[key]:.0f}' for r in before)}")
        print(f"RESULT nonstream_{key}_rps_this_tree={a:.1f}  # runs: {', '.join(f'{r[key]:.0f}' for r in after)}")
        print(f"RESULT nonstream_{key}_this_tree_vs_{rev}={a / b:.2f}")


if __name__ == "__main__":
    main()
