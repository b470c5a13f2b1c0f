#!/usr/bin/env bash
# The CUDA checks in one run: at most ~8 minutes on one GPU, installs nothing (it uses the
# environment the README sets up), writes OUT_DIR/gpu_check.json.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default: gpu-check/
#
# 1. the tests that need CUDA (pytest -m cuda: AMP bf16/fp16 steps finite, detect CUDA = CPU,
#    two-process nccl pretraining and fine-tuning with resume; the nccl ones need 2 GPUs and
#    say so when skipped);
# 2. `rclip detect` on CUDA against the CPU: boxes and region embeddings within 1e-3;
# 3. a tiny quickstart-like chain on CUDA (teacher -> region pretraining -> fine-tuning ->
#    detect on a ShapesWorld of 64 px images), once with amp_dtype=bf16 and once with fp16.
# Each step has its own time limit and a log in OUT_DIR/<step>.log; a step that fails does
# not stop the others. Exit status: 0 when every step passed, 1 otherwise.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
RCLIP=("$PY" -m rclip_cli)
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}
# GPU_CHECK_DEVICE=cpu runs the same commands on the CPU (AMP is off there): a dry check of the
# script itself on a machine without a GPU
DEV=${GPU_CHECK_DEVICE:-cuda}
: > "$OUT/steps.tsv"

# step NAME LIMIT_S CMD...: run CMD under a time limit (never past the budget), log it, record it
step() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 15 )); then
    printf '%s\t%s\t%s\n' "$name" "skipped" 0 >> "$OUT/steps.tsv"
    echo "[$name] skipped: the 8-minute budget is spent"
    return 1
  fi
  (( limit > left )) && limit=$left
  local t0
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/steps.tsv"
  echo "[$name] rc=$rc ($(( $(date +%s) - t0 )) s)"
  return $rc
}

step env 30 "$PY" -c '
import json, sys, torch
print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available(), "gpus": torch.cuda.device_count(),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
                  "nccl": bool(torch.distributed.is_nccl_available())}))'
cp "$OUT/env.log" "$OUT/env.json" 2>/dev/null

# 1. the CUDA tests
step cuda_tests 210 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider -ra \
  --junitxml "$OUT/cuda_tests.xml"

# 2. detect: CUDA against CPU (the same seeded random weights, the same grid boxes)
IMG=tests/data/sample_img1.jpg
DET=(detect "$IMG" --model test-micro --random-init --proposals grid --classes "kite,boy,surfboard"
     --short-side 160 --max-size 320 --save-embeddings --no-images)
step detect_cpu 60 "${RCLIP[@]}" "${DET[@]}" --device cpu --out "$OUT/detect_cpu"
step detect_cuda 60 "${RCLIP[@]}" "${DET[@]}" --device "$DEV" --out "$OUT/detect_cuda"
step detect_parity 30 "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from rclip_core.weights.io import read_weights
out = Path(sys.argv[1])
res = {}
for f in sorted((out / "detect_cpu" / "embeddings").glob("*.safetensors")):
    a, b = read_weights(f).tensors, read_weights(out / "detect_cuda" / "embeddings" / f.name).tensors
    res[f.name] = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a}
ok = bool(res) and all(v <= 1e-3 for r in res.values() for v in r.values())
json.dump({"max_abs_diff": res, "tolerance": 1e-3, "ok": ok}, open(out / "detect_parity.json", "w"), indent=1)
print(json.dumps(res))
sys.exit(0 if ok else 1)
EOF

# 3. a tiny quickstart-like chain on CUDA, bf16 and fp16
W="$OUT/world"
step world 60 "${RCLIP[@]}" data shapes "$W" --train 200 --val 40 --image-size 64
for DT in bf16 fp16; do
  Q="$OUT/qs_$DT"
  step "qs_${DT}_teacher" 60 "${RCLIP[@]}" pretrain recipes/shapes_teacher.yaml data.root="$W" \
    output_dir="$Q/teacher" max_steps=30 checkpoint_every=0 batch.images_per_process=32 \
    optim.warmup_iters=5 amp=true amp_dtype=$DT logging.tensorboard=false --device "$DEV" \
  && step "qs_${DT}_pretrain" 60 "${RCLIP[@]}" pretrain recipes/shapes_regionclip.yaml data.root="$W" \
    model.teacher.weights="$Q/teacher/final.safetensors" output_dir="$Q/student" max_steps=20 \
    checkpoint_every=0 data.short_sides=[128] data.max_size=256 optim.warmup_iters=5 optim.steps=[15] \
    amp=true amp_dtype=$DT logging.tensorboard=false --device "$DEV" \
  && step "qs_${DT}_finetune" 75 "${RCLIP[@]}" finetune recipes/shapes_finetune.yaml --dataset "$W" \
    --init "$Q/student/final.safetensors" --out "$Q/detector" max_steps=20 checkpoint_every=0 \
    data.train_short_sides=[128] data.max_size=256 data.test_short_side=128 data.test_max_size=256 \
    data.num_workers=0 optim.warmup_iters=5 optim.steps=[15] test.eval_every=0 test.max_images=20 \
    amp=true amp_dtype=$DT --device "$DEV" \
  && step "qs_${DT}_detect" 45 "${RCLIP[@]}" detect "$W/val" --weights "$Q/detector/detector.safetensors" \
    --short-side 128 --max-size 256 --no-images --device "$DEV" --out "$Q/detect"
done

# the one JSON
"$PY" - "$OUT" "$START" <<'EOF'
import json, math, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path
out, start = Path(sys.argv[1]), float(sys.argv[2])
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    steps[name] = {"rc": None if rc == "skipped" else int(rc), "seconds": int(secs), "passed": rc == "0"}
tests = {}
if (out / "cuda_tests.xml").is_file():
    for case in ET.parse(out / "cuda_tests.xml").getroot().iter("testcase"):
        status = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                status += ": " + (node.get("message") or "")[:200]
        tests[case.get("name")] = status
def last_losses(metrics):
    if not metrics.is_file():
        return None
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    last = rows[-1] if rows else {}
    vals = {k: v for k, v in last.items() if isinstance(v, (int, float)) and (k.startswith("loss") or k in (
        "total", "image_text_contrastive", "region_concept_contrastive", "concept_distillation"))}
    return {"step": last.get("step"), "losses": vals, "finite": all(math.isfinite(v) for v in vals.values())}
quick = {}
for dt in ("bf16", "fp16"):
    q = out / f"qs_{dt}"
    quick[dt] = {"teacher": last_losses(q / "teacher" / "metrics.jsonl"),
                 "pretrain": last_losses(q / "student" / "metrics.jsonl"),
                 "finetune": last_losses(q / "detector" / "metrics.jsonl"),
                 "finetune_metrics": json.loads((q / "detector" / "metrics.json").read_text())
                 if (q / "detector" / "metrics.json").is_file() else None}
env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else None
parity = json.loads((out / "detect_parity.json").read_text()) if (out / "detect_parity.json").is_file() else None
ok = all(s["passed"] for s in steps.values()) and not any(v.startswith(("failed", "error")) for v in tests.values())
report = {"ok": ok, "seconds": round(time.time() - start, 1), "env": env, "steps": steps, "cuda_tests": tests,
          "detect_parity": parity, "quickstart": quick}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))
print(json.dumps({"ok": ok, "seconds": report["seconds"], "steps": {k: v["rc"] for k, v in steps.items()},
                  "cuda_tests": tests}, indent=1))
sys.exit(0 if ok else 1)
EOF
