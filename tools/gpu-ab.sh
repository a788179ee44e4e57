#!/usr/bin/env bash
# This tree against another source tree on a GPU, in turns on one machine:
#   1. tests/test_gpu.py (this tree);
#   2. the bench's GPU workflow (U-Net 108^3 -> 92^3, 752^3 uint8, 512 blocks) and its
#      limit (bare forwards on preloaded device tensors, batch 1 and 4, eager and graphed);
#   3. the engine on it from each tree in turns, at batch 1 ($REPS times) and batch 4
#      (once): steady M voxels/s (from the run's report) and per-phase p50s;
#   4. the demo's start-up from each tree in turns ($REPS times): the run's start, the model
#      loaded on the workers, the first finished block and the command's end.
# OLD is the other tree's folder holding blockpredict (e.g. `mkdir .ab-old && git archive
# REV src | tar -x -C .ab-old`, OLD=.ab-old/src). PARTS picks the parts (default
# "tests limit engine demo"; the workflow is always made). Logs go to $OUT (./gpu-out).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
source "$(dirname "$0")/gpu-site.sh"
new=$PWD/src
old=$(cd "${OLD:?the other tree: OLD=folder holding blockpredict}" && pwd)
reps=${REPS:-2}
parts=" ${PARTS:-tests limit engine demo} "
with() { PYTHONPATH=${site:+$site:}$1 "${@:2}"; }  # a command with one tree's blockpredict
nvidia-smi -L
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)"

if [[ $parts == *" tests "* ]]; then
  echo "== 1. tests/test_gpu.py"
  with "$new" timeout "${TEST_S:-200}" python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log" | tail -4
fi

echo "== 2. workflow and limit"
export LIMIT=$([[ $parts == *" limit "* ]] && echo 1)
with "$new" python3 - <<'PY' 2>&1 | tee "$out/limit.log"
import os
from pathlib import Path
import numpy as np
from blockpredict.bench import UNET, _cube, _workflow
from blockpredict.benchmodes import limit
sub = Path("/tmp/ab")
sub.mkdir(exist_ok=True)
size = 8 * 92 + 16  # 8^3 blocks
_cube(sub / "in.zarr" / "raw", size, np.random.default_rng(0).integers(0, 255, (size,) * 3, dtype=np.uint8))
model = {"unet": UNET, "head": {"out_channels": 1}}
_workflow(sub, model, cluster={"device": "cuda"})
_workflow(sub, model, "workflow-b4.yaml", cluster={"device": "cuda"}, execution={"batch_size": 4})
for row in limit(model, 512, 92**3, len(os.sched_getaffinity(0)), "cuda")["layouts"] if os.environ.get("LIMIT") else []:
    print(f"limit: {row['layout']:32s} {row['voxels_per_s'] / 1e6:7.1f} M voxels/s")
PY

engine() {  # tree label workflow
  local t0 t1
  t0=$(date +%s.%N)
  with "$1" timeout 120 python3 -m blockpredict.cli predict "$3" --no-progress \
    --report "$out/r.json" >"$out/engine.log" 2>&1 || { echo "$2: failed"; tail -3 "$out/engine.log"; return; }
  t1=$(date +%s.%N)
  python3 - "$2" "$out/r.json" "$t0" "$t1" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
steady = r["wall_seconds"] - r["setup_seconds"]
voxels = r["output_voxels_per_second"] * r["wall_seconds"]
p = "  ".join(f"{k} {v['p50'] * 1000:.1f}" for k, v in r["phase_seconds"].items())
print(f"{sys.argv[1]:10s} command {float(sys.argv[4]) - float(sys.argv[3]):5.1f} s  steady "
      f"{steady:5.2f} s  {voxels / steady / 1e6:6.1f} M voxels/s  p50 ms: {p}")
PY
}
if [[ $parts == *" engine "* ]]; then
  echo "== 3. engine, in turns"
  for i in $(seq "$reps"); do
    engine "$new" new /tmp/ab/workflow.yaml
    engine "$old" old /tmp/ab/workflow.yaml
  done
  engine "$new" "new b4" /tmp/ab/workflow-b4.yaml
  engine "$old" "old b4" /tmp/ab/workflow-b4.yaml
fi

[[ $parts == *" demo "* ]] || exit 0
echo "== 4. demo start-up, in turns"
with "$new" timeout 200 python3 -m blockpredict.cli demo --dir /tmp/demo >"$out/demo.log" 2>&1 \
  || { tail -5 "$out/demo.log"; exit 0; }
for i in $(seq "$reps"); do
  for label in new old; do
    tree=$new; [[ $label == old ]] && tree=$old
    t0=$(date +%s.%N)
    with "$tree" timeout 120 python3 -m blockpredict.cli predict /tmp/demo/workflow.yaml \
      --no-progress --report "$out/demo-r.json" >/dev/null 2>&1
    t1=$(date +%s.%N)
    python3 - "$label" "$t0" "$t1" /tmp/demo/prediction.zarr/affinities-events.jsonl \
      "$out/demo-r.json" <<'PY'
import json, sys
label, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
events = [json.loads(line) for line in open(sys.argv[4]) if line.strip()]
events = [e for e in events if e["time"] >= t0]
start = min(e["time"] for e in events if e["event"] == "run_started")
first = min(e["time"] for e in events if e["event"] == "block_finished")
setup = json.load(open(sys.argv[5]))["setup_seconds"]
print(f"demo {label}: run started {start - t0:.2f} s, model loaded {setup:.2f} s into the run, "
      f"first block {first - t0:.2f} s, command {t1 - t0:.2f} s")
PY
  done
done
