#!/usr/bin/env bash
# The README's test command: installs eaglecache with its test tools, then runs the suite.
# Without arguments it runs every test, the end-to-end demo sized for CI (tests/test_demo.py, about
# 6 minutes on 2 AVX512 cores) included; arguments go to pytest (`bash scripts/test.sh -m "not slow"`
# leaves out the slow ones).
# pytest exits 5 when it collected no test; that is a failure here, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test || exit 1
export TOKENIZERS_PARALLELISM=false
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
