"""How long a revoked or expired API key keeps working: from `keys revoke` (or the expiry
instant) to the first 401, on the inference app and the usage API side by side, each polled
every 10 ms through its real ASGI stack (identity layer, registry reload) in process.

Prints RESULT lines; the target is < 2 s on every service.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROUNDS = 10
TARGET_S = 2.0


def main() -> None:
    from tests.support.asgi import call
    from tokenaudit.inference.app import create_app
    from tokenaudit.infra.clickhouse import connect
    from tokenaudit.infra.keys import add_key, key_id_of, revoke_key
    from tokenaudit.infra.store import Store
    from tokenaudit.reports.usage_api import create_app as usage_app
    from tokenaudit.settings import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.toml"
        add_key(keys, "bench")
        s = load_settings(data_dir=Path(tmp) / "data", api_keys_file=keys, model=str(Path(tmp) / "no-model"))
        store = Store(connect(f"chdb://{tmp}/ch"), "bench")
        store.migrate()
        apps = {
            "inference": (create_app(s), "/v1/models", b""),
            "usage_api": (usage_app(store, s), "/v1/top", b"since=1h"),
        }

        async def status(name: str, raw: str) -> int:
            app, path, query = apps[name]
            code, _, _ = await call(
                app, "GET", path, query=query, headers=[(b"authorization", f"Bearer {raw}".encode())]
            )
            return code

        async def until_401(name: str, raw: str, since: float) -> float:
            while time.monotonic() < since:
                await asyncio.sleep(0.005)
            while await status(name, raw) != 401:
                await asyncio.sleep(0.01)
            return time.monotonic() - since

        async def rounds() -> dict[str, list[float]]:
            out: dict[str, list[float]] = {f"{n}_{k}": [] for n in apps for k in ("revoked", "expired")}
            for _ in range(ROUNDS):
                raw = add_key(keys, "doomed")
                for name in apps:  # both know the key (a first request loads it)
                    assert await status(name, raw) == 200, name
                revoke_key(keys, key_id_of(raw))
                at = time.monotonic()
                for name, took in zip(apps, await asyncio.gather(*[until_401(n, raw, at) for n in apps])):
                    out[f"{name}_revoked"].append(took)
                expires = datetime.now(UTC) + timedelta(seconds=2)
                # stored to the second: the key expires at the last whole second before `expires`
                left = expires.replace(microsecond=0).timestamp() - time.time()
                short = add_key(keys, "short", expires=expires)
                for name in apps:
                    assert await status(name, short) == 200, name
                at = time.monotonic() + max(0.0, left)
                for name, took in zip(apps, await asyncio.gather(*[until_401(n, short, at) for n in apps])):
                    out[f"{name}_expired"].append(took)
            return out

        results = asyncio.run(rounds())
        store.close()
    worst = 0.0
    for name, values in results.items():
        worst = max(worst, *values)
        print(f"RESULT key_{name}_delay_s_median={statistics.median(values):.3f}")
        print(f"RESULT key_{name}_delay_s_max={max(values):.3f}")
    print(f"RESULT key_refused_within_s_worst={worst:.3f}")
    print(f"RESULT key_refused_vs_target_ratio={worst / TARGET_S:.3f}")


if __name__ == "__main__":
    main()
