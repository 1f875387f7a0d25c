#!/usr/bin/env bash
# The full tier on one many-core machine (optionally with a GPU): K bench.run processes
# drain one queue of cells (bench.run --claims), each appending to its own file; the files
# are merged at the end. Cells still running at the deadline are dropped (rerun them with
# bench.run: it skips the cells already in the results file).
#   bash bench/full_parallel.sh MANIFEST DATA RESULTS [WORKERS] [DEADLINE_S] [ACCELERATOR]
set -uo pipefail
MANIFEST=${1:?experts manifest}
DATA=${2:?Minari root made by bench.datasets}
RESULTS=${3:?merged JSON-lines file}
WORKERS=${4:-$(nproc)}
DEADLINE=${5:-3600}
ACCEL=${6:-cpu}
WORK=$(mktemp -d)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
start=$(date +%s)
for i in $(seq 1 "$WORKERS"); do
    timeout "$DEADLINE" python3 -m bench.run --manifest "$MANIFEST" --data "$DATA" --tier full \
        --results "$WORK/part$i.jsonl" --claims "$WORK/claims" --accelerator "$ACCEL" \
        > "$WORK/log$i.txt" 2>&1 &
done
wait
mkdir -p "$(dirname "$RESULTS")"
cat "$WORK"/part*.jsonl >> "$RESULTS" 2>/dev/null
cat "$WORK"/log*.txt | grep -E "score=|Error|error" | sort | uniq | head -100
echo "full tier: $(wc -l < "$RESULTS") rows in $RESULTS, $WORKERS workers, wall $(( $(date +%s) - start )) s"
