#!/usr/bin/env bash
# The full tier on one many-core machine (optionally with a GPU): K bench.run processes
# drain one queue of cells (bench.run --claims) and append to one results file (one
# write per finished cell). Cells still running at the deadline are dropped; run the
# script again and it does the rest (cells already in the file are skipped).
#   bash bench/full_parallel.sh MANIFEST DATA RESULTS [WORKERS] [DEADLINE_S] [GPU_WORKERS]
# GPU_WORKERS of the WORKERS train on the GPU (launch-bound at these sizes, so several
# processes share one), the others on one CPU thread each. Extra bench.run arguments
# (e.g. --exclude-tier quick) go in BENCH_ARGS.
set -uo pipefail
MANIFEST=${1:?experts manifest}
DATA=${2:?Minari root made by bench.datasets}
RESULTS=${3:?merged JSON-lines file}
WORKERS=${4:-$(nproc)}
DEADLINE=${5:-3600}
GPU_WORKERS=${6:-0}
WORK=${LOG_DIR:-$(mktemp -d)}; mkdir -p "$WORK"  # worker logs
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$(dirname "$RESULTS")"
touch "$RESULTS"
start=$(date +%s)
for i in $(seq 1 "$WORKERS"); do
    ACCEL=cpu; [ "$i" -le "$GPU_WORKERS" ] && ACCEL=gpu
    # shellcheck disable=SC2086
    timeout "$DEADLINE" python3 -m bench.run --manifest "$MANIFEST" --data "$DATA" --tier full \
        --results "$RESULTS" --claims "$WORK/claims" --accelerator "$ACCEL" ${BENCH_ARGS:-} \
        > "$WORK/log$i.txt" 2>&1 &
done
wait
cat "$WORK"/log*.txt | grep -E "score=|Error|error" | sort | uniq | head -100
echo "full tier: $(wc -l < "$RESULTS") rows in $RESULTS, $WORKERS workers, wall $(( $(date +%s) - start )) s"
