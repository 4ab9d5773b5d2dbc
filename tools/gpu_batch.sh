#!/bin/bash
# On one GPU machine: first, alone, tools/latency_plan.py for the settings in LATENCY (e.g. cuda-b1,cuda-b32);
# then several tools/deeptwist_vs_tucker.py runs (RUNS) side by side. Packs what they made into $OUT:
# latency.tgz, runs.tgz (finished runs), checkpoints.tgz (runs the time limit stopped) and logs.tgz.
#
# Prepare once on the machine that sends the command (the GPU machine reaches no package registry, and
# its image lacks tensorly; .gitignore keeps .device/ out of the repository):
#   mkdir -p .device && cp ../shared/data/cifar10-jpg.tar.gz ../shared/data/resnet32_cifar10.pt .device/
#   pip download --no-deps -d .device tensorly
# Then, through the device tool, with carry [".device"] and a timeout_s above LIMIT (seconds, for each of
# the two stages):
#   RUNS="conventional-r4.3-e30-s0 deeptwist-r4.3-sd200-e30-s0" OPTIONS="--epochs 30 --eval-every 3" \
#   LIMIT=480 bash tools/gpu_batch.sh
# Unpack runs.tgz into results/deeptwist_vs_tucker/ (latency.tgz into results/latency_plan/) and run the
# tool with --report-only. To continue stopped runs, unpack checkpoints.tgz into .device/ and send the
# same command again.
set -u
RUNS=${RUNS:-}
LATENCY=${LATENCY:-}
[ -n "$RUNS$LATENCY" ] || { echo "name RUNS (run ids) or LATENCY (latency_plan settings)" >&2; exit 2; }
OPTIONS=${OPTIONS:-}
LIMIT=${LIMIT:-480}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-.device/out}
HERE=${HERE:-.device}  # the carried folder: data, checkpoint, wheel; work and results
mkdir -p "$OUT" "$HERE/results" "$HERE/logs" "$HERE/checkpoints"

if ! python3 -c "import tensorly" 2>/dev/null; then
    python3 -m pip install --quiet --no-deps --no-index "$HERE"/tensorly-*.whl || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

if [ -n "$LATENCY" ]; then
    timeout --signal=TERM "$LIMIT" python3 tools/latency_plan.py --settings "$LATENCY" --out "$HERE/latency" \
        --models "${LATENCY_MODELS:-resnet32,resnet18,resnet50}" \
        --checkpoint "$HERE/resnet32_cifar10.pt" --latency-cache "$HERE/latency-cache.json" \
        > "$HERE/logs/latency_plan.log" 2>&1
    tail -3 "$HERE/logs/latency_plan.log"
    [ -d "$HERE/latency/runs" ] && tar czf "$OUT/latency.tgz" -C "$HERE/latency" runs
fi

for run in $RUNS; do
    # shellcheck disable=SC2086  # OPTIONS holds several options
    timeout --signal=TERM "$LIMIT" python3 tools/deeptwist_vs_tucker.py --device "$DEVICE" --threads 2 \
        --data "$HERE/cifar10-jpg.tar.gz" --checkpoint "$HERE/resnet32_cifar10.pt" \
        --out "$HERE/results" --checkpoints "$HERE/checkpoints" $OPTIONS --only "$run" \
        > "$HERE/logs/$run.log" 2>&1 &
done
wait

for log in "$HERE"/logs/*.log; do
    echo "== $log"
    grep -E "test acc|stopped|Error|error" "$log" | tail -3
done
[ -d "$HERE/results/runs" ] && tar czf "$OUT/runs.tgz" -C "$HERE/results" runs
[ -n "$(ls -A "$HERE/checkpoints")" ] && tar czf "$OUT/checkpoints.tgz" -C "$HERE" checkpoints
tar czf "$OUT/logs.tgz" -C "$HERE" logs
ls -la "$OUT"
