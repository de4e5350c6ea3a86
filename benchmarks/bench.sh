#!/usr/bin/env bash
# One benchmark runner: the protocol's stages in order, repeated until no run is left (benchmarks/README.md).
# Start two, one per core; they share the plan (each run is claimed by one) and commit each record as it lands.
# Extra arguments go to every run.py call (e.g. --results DIR --python PATH).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STOP=benchmarks/work/STOP  # touch it to stop after the runs in flight (run.py checks it between runs)
# STAGES="sweep seeds" keeps a runner off the hours-long headline runs (one that starts late in a session is
# killed with it and lost); the default is the protocol's order.
STAGES=${STAGES:-"sweep-full-lora evidence headline sweep seeds"}
while [ ! -e "$STOP" ]; do
    for stage in $STAGES; do
        case $stage in
            sweep-full-lora) $PY benchmarks/run.py --stage sweep --variants full lora --threads 1 --commit "$@" ;;
            *) $PY benchmarks/run.py --stage "$stage" --threads 1 --commit "$@" ;;
        esac
    done
    left=0  # runs of this runner's stages not yet recorded (those "not run: ..." never will be)
    for stage in $STAGES; do
        n=$($PY benchmarks/run.py --list --stage "${stage%-full-lora}" "$@" | grep -v ' recorded$' | grep -c -v ' not run: ')
        left=$((left + n))
    done
    [ "$left" -eq 0 ] || [ -e "$STOP" ] && break
    # what is left waits on the other runner (a sweep's next rate, a chosen rate): look again shortly
    sleep 60
done
