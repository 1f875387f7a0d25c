#!/usr/bin/env bash
# One-GPU figures (what bench/results/*_gpu.json hold): the captured iteration checked
# against eager training on the GPU, the throughput comparison with d3rlpy on the GPU
# (eager and capture_graph, d3rlpy with compile_graph; K = 8 seeds batched against K = 1), and the CartPole quickstart
# trained on the GPU, end to end.
#   bash bench/gpu_check.sh DATA OUT      (DATA: a Minari root made by bench.datasets)
set -euo pipefail
DATA=${1:?Minari root with bench/hopper/expert-n10-v0}
OUT=${2:?output folder}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q tests/test_captured.py tests/test_seeds.py 2>&1 | tail -3
python3 -m bench.throughput --data "$DATA" --task hopper --accelerator gpu --levers --repeats 3 --window 200 \
    --also capture_graph=true --seeds 8 --out "$OUT/throughput_gpu.json" 2>&1 | grep -E "^(bicql|throughput)"
WORK=$(mktemp -d)
export MINARI_DATASETS_PATH="$WORK/minari"
start=$(date +%s)
python3 -m bicql_lightning.cli fit --config configs/quickstart.yaml --trainer.accelerator gpu \
    --trainer.default_root_dir "$WORK/quickstart_gpu" > "$OUT/quickstart_gpu.log" 2>&1 || { tail -30 "$OUT/quickstart_gpu.log"; exit 1; }
echo "quickstart on gpu: wall $(( $(date +%s) - start )) s (datasets made)"
grep -E "normalised score|updates/s|updates_per_sec" "$OUT/quickstart_gpu.log" | tail -3 || true
find "$WORK/quickstart_gpu" -name rollout_summary.json -exec cp {} "$OUT/quickstart_gpu_summary.json" \;
cat "$OUT/quickstart_gpu_summary.json"
