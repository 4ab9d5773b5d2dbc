#!/bin/bash
# On one GPU machine, in two stages: tools/latency_plan.py for the settings in LATENCY (e.g.
# cuda-b1,cuda-b32), alone; then, side by side, several tools/deeptwist_vs_tucker.py runs (RUNS), the
# test suite with the GPU visible (TESTS=1) and a one-process torchrun compile on CUDA with NCCL and
# bf16 autocast (DDP=1). Packs what they made into $OUT: latency.tgz, runs.tgz (finished runs),
# checkpoints.tgz (runs the time limit stopped) and logs.tgz (every log, the tests' too).
#
# Prepare once on the machine that sends the command (the GPU machine reaches no package registry, and
# its image lacks tensorly; .gitignore keeps .device/ out of the repository):
#   mkdir -p .device && cp ../shared/data/cifar10-jpg.tar.gz ../shared/data/resnet32_cifar10.pt .device/
#   pip download --no-deps -d .device tensorly
# Then, through the device tool, with carry [".device"] and a timeout_s above the two stages' limits
# (seconds: LATENCY_LIMIT, then LIMIT for the runs, tests and torchrun) plus a minute:
#   LATENCY=cuda-b32,cuda-b1 RUNS="conventional-r4.3-e30-s1 deeptwist-r4.3-sd200-e30-late10at8800-s0:--late=10@8800" \
#   OPTIONS="--epochs 30 --eval-every 3" TESTS=1 DDP=1 LATENCY_LIMIT=150 LIMIT=330 bash tools/gpu_batch.sh
# A run is its id, then, after a colon, its own options, comma-separated. Unpack runs.tgz into
# results/deeptwist_vs_tucker/ (latency.tgz into results/latency_plan/) and run the tool with
# --report-only. A stopped run continues from checkpoints.tgz (unpacked into .device/ for the same
# command, or into the local --checkpoints folder: a run may move from the GPU to a CPU).
set -u
RUNS=${RUNS:-}
LATENCY=${LATENCY:-}
TESTS=${TESTS:-0}
DDP=${DDP:-0}
[ -n "$RUNS$LATENCY" ] || [ "$TESTS$DDP" != 00 ] || { echo "name RUNS, LATENCY, TESTS=1 or DDP=1" >&2; exit 2; }
OPTIONS=${OPTIONS:-}
LIMIT=${LIMIT:-480}
LATENCY_LIMIT=${LATENCY_LIMIT:-$LIMIT}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-.device/out}
HERE=${HERE:-.device}  # the carried folder: data, checkpoint, wheel; work and results
mkdir -p "$OUT" "$HERE/results" "$HERE/logs" "$HERE/checkpoints"
pack() { [ -d "$1/$2" ] && [ -n "$(ls -A "$1/$2")" ] && tar czf "$OUT/$3" -C "$1" "$2"; }

if ! python3 -c "import tensorly" 2>/dev/null; then
    python3 -m pip install --quiet --no-deps --no-index "$HERE"/tensorly-*.whl || exit 1
fi
# the working tree, installed as the README says but offline (twistc.passes lives in passes/)
python3 -m pip install --quiet --no-deps --no-build-isolation -e . || exit 1
export PYTHONUNBUFFERED=1
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if [ -n "$LATENCY" ]; then
    timeout --signal=TERM "$LATENCY_LIMIT" python3 tools/latency_plan.py --settings "$LATENCY" --out "$HERE/latency" \
        --models "${LATENCY_MODELS:-resnet32,resnet18,resnet50}" \
        --checkpoint "$HERE/resnet32_cifar10.pt" --latency-cache "$HERE/latency-cache.json" \
        > "$HERE/logs/latency_plan.log" 2>&1
    tail -3 "$HERE/logs/latency_plan.log"
    pack "$HERE/latency" runs latency.tgz
fi

if [ -n "$RUNS" ]; then  # decoded once here, not by every run at once
    python3 -c "import sys; from twistc.data.cifar10 import load_cifar10 as f; [f(sys.argv[1], s) for s in sys.argv[2:]]" \
        "$HERE/cifar10-jpg.tar.gz" train test
fi
for spec in $RUNS; do
    run=${spec%%:*}
    extra=$([ "$spec" != "$run" ] && echo "${spec#*:}" | tr ',' ' ')
    # shellcheck disable=SC2086  # OPTIONS and extra hold several options
    timeout --signal=TERM "$LIMIT" python3 tools/deeptwist_vs_tucker.py --device "$DEVICE" --threads 2 \
        --data "$HERE/cifar10-jpg.tar.gz" --checkpoint "$HERE/resnet32_cifar10.pt" \
        --out "$HERE/results" --checkpoints "$HERE/checkpoints" $OPTIONS $extra --only "$run" \
        > "$HERE/logs/$run.log" 2>&1 &
done
# torch's default, a thread per core for each process, made small steps crawl beside the runs there
if [ "$TESTS" = 1 ]; then
    OMP_NUM_THREADS=4 timeout --signal=TERM "$LIMIT" python3 -m pytest -p no:warnings -p no:cacheprovider \
        > "$HERE/logs/tests.log" 2>&1 &
fi
if [ "$DDP" = 1 ]; then
    OMP_NUM_THREADS=2 timeout --signal=TERM "$LIMIT" torchrun --standalone --nproc-per-node 1 -m twistc compile \
        examples/digits.py --pass deeptwist-tucker --epochs 2 --period 20 --device "$DEVICE" --option amp=bf16 \
        --threads 2 -o "$HERE/ddp-out" --force \
        > "$HERE/logs/torchrun.log" 2>&1 &
fi
wait

for log in "$HERE"/logs/*.log; do
    echo "== $log"
    grep -E "test acc|stopped|Error|error|passed|failed|speedup" "$log" | tail -3
done
pack "$HERE/results" runs runs.tgz
pack "$HERE" checkpoints checkpoints.tgz
tar czf "$OUT/logs.tgz" -C "$HERE" logs
ls -la "$OUT"
