#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set +e
# Two worker processes, each test file whole on one (its module fixtures made once): the
# suite's wall time on CI's 2 cores went from ~19 to ~10 minutes. ARX_TEST_WORKERS=0 runs it
# in this process alone.
.venv/bin/python -m pytest -n "${ARX_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing, an empty run is not a pass" >&2
  exit 1
fi
exit "$rc"
