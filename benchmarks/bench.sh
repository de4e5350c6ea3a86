#!/usr/bin/env bash
# One benchmark runner: the protocol's stages in order, repeated until no run is left (benchmarks/README.md).
# Start two, one per core; they share the plan (each run is claimed by one) and commit each record as it lands.
# Extra arguments go to every run.py call (e.g. --results DIR --python PATH).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STOP=benchmarks/work/STOP  # touch it to stop after the runs in flight (run.py checks it between runs)
while [ ! -e "$STOP" ]; do
    $PY benchmarks/run.py --stage sweep --variants full lora --threads 1 --commit "$@"
    $PY benchmarks/run.py --stage evidence --threads 1 --commit "$@"
    $PY benchmarks/run.py --stage headline --threads 1 --commit "$@"
    $PY benchmarks/run.py --stage sweep --threads 1 --commit "$@"
    $PY benchmarks/run.py --stage seeds --threads 1 --commit "$@"
    left=$($PY benchmarks/run.py --list "$@" | grep -c -v ' recorded$')
    [ "$left" -eq 0 ] || [ -e "$STOP" ] && break
    # what is left waits on the other runner (a sweep's next rate, a chosen rate): look again shortly
    sleep 60
done
