#!/usr/bin/env bash
# The whole test run (what the README's test command and .ci/run run), in the active venv.
#
# Every test process is single-threaded (tests/conftest.py), so two pytest processes run at once,
# one per core: the validator-round modules in one, then the Triton-interpreter tests in a process
# of their own (the interpreter is process-wide); everything else in the other.
# Each shard writes its own log and temp dir; the run fails if any part fails, and every
# part runs to its end either way, so one failure does not hide another.
set -uo pipefail
cd "$(dirname "$0")/.."

ROUNDS=(tests/test_validator.py tests/test_replay.py tests/test_redteam_scoring.py tests/test_evaluate.py
        tests/test_redteam_isolation.py tests/test_stack.py tests/test_redteam_commitments.py)
LOGS=.test-logs
rm -rf "$LOGS" .pytest-tmp && mkdir -p "$LOGS" .pytest-tmp  # pytest makes --basetemp, not its parent

(
  python -m pytest -q -m "slow or not slow" -p no:cacheprovider --basetemp=.pytest-tmp/rounds "${ROUNDS[@]}"
  echo $? >"$LOGS/rounds.rc"
  TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret
  echo $? >"$LOGS/interpret.rc"
) >"$LOGS/rounds.log" 2>&1 &
rounds=$!
ignore=()
for f in "${ROUNDS[@]}"; do ignore+=(--ignore="$f"); done
python -m pytest -q -m "slow or not slow" -p no:cacheprovider --basetemp=.pytest-tmp/rest \
    "${ignore[@]}" tests 2>&1 | tee "$LOGS/rest.log"
rest=${PIPESTATUS[0]}
wait "$rounds"
echo "--- validator-round and interpreter tests ($LOGS/rounds.log)"
cat "$LOGS/rounds.log"
rounds_rc=$(cat "$LOGS/rounds.rc" 2>/dev/null)
interpret=$(cat "$LOGS/interpret.rc" 2>/dev/null)

echo "rc: rounds ${rounds_rc:-missing}, rest $rest, interpret ${interpret:-missing}"
[ "${rounds_rc:-1}" -eq 0 ] && [ "$rest" -eq 0 ] && [ "${interpret:-1}" -eq 0 ]
