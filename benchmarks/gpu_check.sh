#!/usr/bin/env bash
# The GPU machine's one prepared run: the CUDA tests and every benchmark with --device cuda, then one table of
# the targets (benchmarks/gpu_table.py): target, measured, the reference measured in the same run.
#
#   export PYTHONPATH=$PWD:/tmp/site; bash benchmarks/gpu_check.sh
#
# onnxruntime-gpu and the reference (vector-quantize-pytorch 1.14.17) come over first as ../shared/gpu/README.md
# describes (stage-ort-gpu "vector-quantize-pytorch==1.14.17" einx frozendict pytest-xdist execnet).
# Sections run in order of priority, each under its own time limit, and leave their results in .dev/gpu (kept
# between calls while the machine stays warm, like the compile caches in .dev/cache): a second run skips the
# sections that finished and goes on with the rest.  Results are copied to $OUT after every section, so a run
# cut short still brings back what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-.dev/gpu}
mkdir -p "$RESULTS" .dev/cache
export TORCHINDUCTOR_CACHE_DIR=$PWD/.dev/cache/inductor TRITON_CACHE_DIR=$PWD/.dev/cache/triton
export PYTHONWARNINGS=ignore TRITON_DEFAULT_FP_FUSION=1

save() { [ -n "${OUT:-}" ] && cp -r "$RESULTS"/. "$OUT"/ 2>/dev/null; true; }

section() {  # section NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  if [ -e "$RESULTS/$name.done" ]; then echo "== $name: done in an earlier run"; return; fi
  echo "== $name ($(date +%T))"
  local start=$SECONDS
  timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] && touch "$RESULTS/$name.done"
  tail -n 25 "$RESULTS/$name.log"
  echo "-- $name: exit $rc in $((SECONDS - start)) s"
  save
}

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || {
  echo "no CUDA device here: gpu_check.sh is for the GPU machine"; exit 2; }

XDIST=()
$PY -c "import xdist" 2>/dev/null && XDIST=(-n 8)

section versions 60 $PY -c "
import json, platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
try:
    import onnxruntime as ort; ov = ort.__version__; providers = ort.get_available_providers()
except ImportError:
    ov, providers = None, []
print(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                      triton=tv, onnxruntime=ov, providers=providers, python=platform.python_version())))"
cp "$RESULTS/versions.log" "$RESULTS/versions.json"
section search 240 $PY benchmarks/bench_nearest.py --json "$RESULTS/search.json"
section tests 300 $PY -m pytest tests/test_cuda.py -q -o addopts="" "${XDIST[@]}" --junitxml "$RESULTS/tests.xml"
section vq 180 $PY benchmarks/bench_vector_quantize.py --device cuda --codebook-sizes 1024 --iters 30 \
  --exec compile --reference-exec eager --json "$RESULTS/vq.json"
section rvq 240 $PY benchmarks/bench_residual_vq.py --device cuda --iters 20 --exec compile \
  --reference-exec eager --json "$RESULTS/rvq.json"
section lfq 180 $PY benchmarks/bench_scalar.py --device cuda --cases lfq16 --batch 16 --iters 30 \
  --exec compile --reference-exec eager --references reference --json "$RESULTS/lfq.json"
section export 240 $PY benchmarks/bench_export.py --device cuda --iters 30 --json "$RESULTS/export.json"
$PY benchmarks/gpu_table.py "$RESULTS" | tee "$RESULTS/table.md"
save
