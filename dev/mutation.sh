#!/usr/bin/env bash
# Mutation testing of the pure modules: mutmut 2.5.1 mutates a copy of the checkout, one
# mutant at a time, and runs the modules' unit tests (no broker) against each.
#
#   bash dev/mutation.sh                       # offsets.py and batching.py (about 7 minutes)
#   bash dev/mutation.sh worker/admission.py tests/test_admission.py
#
# mutmut runs from a venv of its own (it pins old dependencies); the tests run with the
# project's venv. Survivors are listed at the end (`mutmut show N` in the copy shows one).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$HOME/.cache/kafka-inference-worker/venv}
tool=${MUTMUT_VENV:-$HOME/.cache/kafka-inference-worker/mutmut}
sources=${1:-worker/offsets.py,worker/batching.py}
tests=${2:-tests/test_offsets.py tests/test_batching.py}
[ -x "$tool/bin/mutmut" ] || { python3 -m venv "$tool" && "$tool/bin/pip" install -q "mutmut==2.5.1"; }
work=$(mktemp -d)
(cd "$root" && git ls-files | tar cf - -T - | tar xf - -C "$work")
# mutmut 2 counts only exit status 1 as "killed": a mutant that breaks the import (pytest exits
# 2) would be counted as surviving, so every failure is reported as 1.
cat > "$work/run-tests.sh" <<RUN
#!/bin/sh
cd "$work" && PYTHONPATH="$work" "$venv/bin/python" -m pytest -x -q -p no:cacheprovider $tests || exit 1
RUN
chmod +x "$work/run-tests.sh"
printf '[mutmut]\npaths_to_mutate=%s\nrunner=%s\ntests_dir=tests/\n' "$sources" "$work/run-tests.sh" \
  > "$work/setup.cfg"
cd "$work"
"$tool/bin/mutmut" run || true   # exits non-zero when any mutant survives
"$tool/bin/mutmut" results
echo "mutants and results are in $work"
