#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run on a GPU machine, from the repository root:
#   1. tests/test_gpu.py (the engine's output on the GPU, CUDA graphs, fp16/bf16,
#      torch.compile, pinned staging, one GPU per worker);
#   2. `blockpredict bench --only compare` on the GPU (limit, engine, naive loop, dask.array),
#      then the engine on the bench's workflow with each `--set` of $VARIANTS (';' between);
#   3. the demo's start-up: seconds from the command's start to its first finished block
#      (skipped once $UNTIL_S seconds have passed).
# Logs and figures go to $OUT (default ./gpu-out). Dependencies: tools/gpu-site.sh.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
source "$(dirname "$0")/gpu-site.sh"
[[ -n $site ]] && export PYTHONPATH=$site:$PWD/src
bp() { python3 -m blockpredict.cli "$@"; }
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
nproc

echo "== 1. tests/test_gpu.py"
timeout "${TEST_S:-240}" python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 \
  | tee "$out/test_gpu.log" | grep -v "^$"

echo "== 2. bench on the GPU"
timeout "${BENCH_S:-300}" python3 -m blockpredict.cli bench --only compare --repeat "${REPEAT:-1}" \
  ${QUICK:+--quick} --dir /tmp/bench --json "$out/bench-gpu.json" 2>&1 | tee "$out/bench-gpu.log"
cp /tmp/bench/compare/engine-report.json "$out/" 2>/dev/null  # the last engine run's report

echo "== 2b. the engine on the bench's workflow with other settings (--set), steady M voxels/s"
IFS=';' read -ra variants <<< "${VARIANTS:-}"  # settings separated by ';'
for setting in "${variants[@]}"; do
  timeout 60 python3 -m blockpredict.cli predict /tmp/bench/compare/workflow.yaml --no-progress \
    --set "$setting" --report "$out/variant.json" >/dev/null 2>&1 || { echo "$setting: failed"; continue; }
  python3 - "$setting" "$out/variant.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
steady = r["wall_seconds"] - r["setup_seconds"]
voxels = r["output_voxels_per_second"] * r["wall_seconds"]
phases = "  ".join(f"{k} p50 {v['p50'] * 1000:.1f} ms" for k, v in r["phase_seconds"].items())
print(f"{sys.argv[1]}: {voxels / steady / 1e6:.1f} M voxels/s steady  ({phases})")
PY
done

echo "== 3. the demo's start-up (while less than \$UNTIL_S=${UNTIL_S:-420} s have passed)"
left=$(( ${UNTIL_S:-420} - SECONDS ))
(( left > 60 )) || { echo "skipped: ${SECONDS} s passed"; exit 0; }
if timeout "$left" python3 -m blockpredict.cli demo --dir /tmp/demo >"$out/demo.log" 2>&1; then
  for i in 1 2; do
    t0=$(date +%s.%N)
    bp predict /tmp/demo/workflow.yaml --no-progress --report "$out/demo-report-$i.json" >/dev/null 2>&1
    t1=$(date +%s.%N)
    python3 - "$t0" "$t1" /tmp/demo/prediction.zarr/affinities-events.jsonl "$out/demo-report-$i.json" <<'PY'
import json, sys
t0, t1, path = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
events = [json.loads(line) for line in open(path) if line.strip() and json.loads(line)["time"] >= t0]
start = min(e["time"] for e in events if e["event"] == "run_started")
first = min(e["time"] for e in events if e["event"] == "block_finished")
setup = json.load(open(sys.argv[4]))["setup_seconds"]
print(f"demo predict: run_started {start - t0:.2f} s (model loaded on the workers {setup:.2f} s "
      f"into the run), first block {first - t0:.2f} s after the command started; "
      f"command {t1 - t0:.2f} s")
PY
  done
else
  tail -5 "$out/demo.log"
fi
