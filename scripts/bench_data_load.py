"""First (parse + cache write) and second (cached) load times of the real datasets present.

Each load runs in a fresh Python process (so the second load is a cold start from the cache,
as a user's next run is), with an empty cache folder per dataset; import time is excluded.

    METAREC_DATA_DIR=../shared/data python scripts/bench_data_load.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LOADS = {
    "ml-100k": "from metarec_runner.data.movielens import load_movielens as f; args = ('ml-100k',)",
    "ml-latest-small": "from metarec_runner.data.movielens import load_movielens as f; args = ('ml-latest-small',)",
    "lastfm-2k": ("from metarec_runner.data.tabular import load_tabular as f; args = ('lastfm-2k', "
                  "'hetrec2011-lastfm-2k/user_artists.dat', {'user': 'userID', 'item': 'artistID', "
                  "'weight': 'weight'}, '\\t', 'log')"),
}
TIMED = """
import json, time
{setup}
t = time.perf_counter(); d = f(*args); dt = time.perf_counter() - t
print(json.dumps({{"seconds": dt, "interactions": len(d.ratings), "users": d.n_users, "items": d.n_items}}))
"""


def data_dir() -> Path:
    env = os.environ.get("METAREC_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def timed_load(setup: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", TIMED.format(setup=setup)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    root = data_dir()
    pairs: dict[str, object] = {}
    print(f"{'dataset':18s} {'interactions':>12s} {'first load':>11s} {'second load':>12s}")
    for name, setup in LOADS.items():
        folder = "hetrec2011-lastfm-2k" if name == "lastfm-2k" else name
        if not (root / folder).is_dir():
            print(f"{name:18s} absent from {root}")
            continue
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "METAREC_DATA_DIR": str(root), "METAREC_CACHE_DIR": cache}
            first, second = timed_load(setup, env), timed_load(setup, env)
        print(f"{name:18s} {first['interactions']:>12,} {first['seconds']:>10.3f}s {second['seconds']:>11.3f}s")
        key = name.replace("-", "_")
        pairs[f"{key}_first_s"] = round(first["seconds"], 3)
        pairs[f"{key}_second_s"] = round(second["seconds"], 3)
    print(" ".join(f"{k}={v}" for k, v in pairs.items()))


if __name__ == "__main__":
    main()
