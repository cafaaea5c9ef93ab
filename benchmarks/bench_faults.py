"""Precompute fault injection with more trials than CI runs: SIGKILL at N random points, restart, compare.

Runs the scenario of tests/test_faults_precompute.py (the same code, not a copy)
with ``--trials`` kills and ``--seed``, then prints each trial's kill point (the
committed-sample count it waited for, the jitter, driver-only or whole-job kill,
what was committed at the kill and after it), the second-job, corruption and
disk-full legs, and whether the final cache equals the uninterrupted one byte for
byte. Each trial costs one vLLM start (20-45 s on 2 idle cores).

    python benchmarks/bench_faults.py --trials 20 --seed 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="SIGKILLs before the disk-full leg and the last run.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill points.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.json"
        env = {**os.environ, "EAGLECACHE_FAULT_TRIALS": str(args.trials), "EAGLECACHE_FAULT_SEED": str(args.seed),
               "EAGLECACHE_FAULT_REPORT": str(report)}
        started = time.perf_counter()
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "tests/test_faults_precompute.py"], cwd=REPO, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        if not report.is_file():
            print(tests.stdout[-4000:], tests.stderr[-4000:])
            print("the scenario did not finish (no report)")
            return 1
        record = json.loads(report.read_text())
    print(f"seed {record['seed']}, {len(record['trials'])} trials, {elapsed:.0f} s")
    print(f"{'trial':>5} {'kill':>6} {'at':>4} {'jitter_s':>8} {'at_kill':>7} {'after':>5} {'lock':>5} survivors")
    for t in record["trials"]:
        if t["finished_first"]:
            print(f"{t['trial']:>5} finished before its kill point {t['at']}")
            continue
        print(f"{t['trial']:>5} {'job' if t['whole_job'] else 'driver':>6} {t['at']:>4} {t['jitter_s']:>8} "
              f"{t['committed_at_kill']:>7} {t['committed_after']:>5} {'free' if t['lock_freed'] else 'HELD':>5} "
              f"{t['survivors'] or 'none'}")
    second = record.get("second_job", {})
    print(f"second job on the running part: exit {second.get('rc')}: "
          f"{(second.get('stderr') or '').strip().splitlines()[-1:]}")
    if record.get("damaged"):
        print(f"damaged {len(record['damaged'])} shards; verify exit {record['verify'][0]}, "
              f"{record['verify'][1].count('DAMAGED')} named; repair exit {record['repair'][0]}")
    if record.get("disk_full"):
        full = record["disk_full"]
        print(f"disk full: exit {full['rc']}: {full['stderr_tail'].strip().splitlines()[-1]}")
    else:
        print(f"disk full: not run ({record.get('no_mount')})")
    print(f"final run exit {record['final']['rc']}; cache equal to the uninterrupted one: {record['equal']}")
    print(f"pytest: {tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.returncode}")
    return 0 if record["equal"] and tests.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
