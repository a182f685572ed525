#!/usr/bin/env bash
# Every benchmark the README lists, at GPU sizes, in one run (about 8 minutes on one H100/H200), writing
# the rows for docs/benchmarks.md with the machine line to $OUT/benchmarks_rows.md.
#
#   bash bench/gpu.sh                 # on the GPU machine, from the repository root
#   bash bench/gpu.sh --smoke         # tiny sizes on a CPU: checks the script end to end in ~3 minutes
#   bash bench/gpu.sh --out DIR       # where logs, JSON and the rows go (default bench/out)
#
# Each benchmark runs under its own time limit; one that fails or overruns is reported as such in the
# rows and the others still run. Benchmarks alternate their loops in rounds, so each ratio is side by side.
set -uo pipefail

SMOKE=0
OUT=bench/out
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "bench/gpu.sh: unknown argument $1 (expected --smoke, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
PY=${PYTHON:-python}
ROWS="$OUT/benchmarks_rows.md"

gpu=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>/dev/null)
if [ "$SMOKE" = 0 ] && [ "$gpu" = "no GPU" ]; then
  echo "bench/gpu.sh: no CUDA device visible; run with --smoke to check the script on a CPU" >&2
  exit 2
fi
cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
torch_version=$($PY -c "import torch; print(torch.__version__)")
machine="$gpu; $(nproc) cores ${cpu:-unknown CPU}; torch $torch_version; load average $(cut -d' ' -f1-3 /proc/loadavg) at start"
mode=$([ "$SMOKE" = 1 ] && echo "smoke (tiny sizes, CPU: not figures)" || echo "GPU sizes")

if [ "$SMOKE" = 1 ]; then
  LOADER="--loader --images 24 --size 64 --batch 8 --rounds 2"
  STEP="--teacher timm:test_resnet --student timm:test_resnet --batch 8 --size 32 --steps 2 --warmup 1 --workers 0 --device cpu"
  CACHE="--cache --teacher timm:test_resnet --student timm:test_convnext --batch 8 --size 32 --steps 2 --warmup 1 --workers 0 --device cpu --rounds 2"
  MINE="--sizes 1000 --kinds wds --classes 10 --k 5 --batch-size 64 --pass-teacher timm:test_resnet --pass-images 32 --pass-size 32 --pass-batch 16 --rounds 2 --device cpu"
  TRANSFER="--backbone timm:test_resnet --image-size 32 --batch-size 8 --steps 2 --rounds 2 --device cpu"
  DETECTION="--size 128 --batch 1 --iters 1 --warmup 0 --backbones mv3 --archs faster --coco-images 20 --device cpu"
  LIMIT=300
else
  LOADER="--loader --images 600 --size 224 --batch 64 --rounds 4"
  STEP="--teacher r50_vd --student mv3_large --batch 128 --size 224 --steps 24 --warmup 4 --workers 8"
  CACHE="--cache --teacher timm:resnet101d --student timm:resnet26d --batch 128 --size 224 --steps 24 --warmup 4 --workers 8 --epochs 4"
  MINE="--sizes 10000 100000 --threads 4 --workers 4 --pass-teacher timm:resnet50d --pass-images 2048 --pass-size 224 --pass-batch 256 --rounds 4 --device cuda"
  TRANSFER="--backbone timm:resnet50d --backbone timm:mobilenetv3_large_100 --image-size 224 --batch-size 64 --steps 10 --rounds 5 --amp bf16 --channels-last --device cuda"
  DETECTION="--iters 10 --warmup 2 --device cuda"
  LIMIT=200
fi

{
  echo "<!-- written by bench/gpu.sh ($mode) on $(date -u +%Y-%m-%dT%H:%MZ) -->"
  echo "Machine: $machine."
  echo
} > "$ROWS"

run() {  # run NAME SECONDS MODULE ARGS...
  local name=$1 seconds=$2; shift 2
  local log="$OUT/$name.log" start=$SECONDS
  echo "== $name: $PY -m $*" >&2
  timeout "$seconds" $PY -m "$@" > "$log" 2> "$OUT/$name.err"
  local rc=$?
  {
    echo "### $name"
    echo
    echo "\`python -m $*\` ($((SECONDS - start)) s)"
    echo
    if [ $rc -eq 0 ]; then
      echo '```'
      cat "$log"
      echo '```'
    elif [ $rc -eq 124 ]; then
      echo "**did not finish within $seconds s** (raise the limit in bench/gpu.sh or shrink the sizes)"
    else
      echo "**failed (exit $rc)**: $(tail -n 1 "$OUT/$name.err")"
    fi
    echo
  } >> "$ROWS"
  return 0
}

run loader "$LIMIT" distill.bench $LOADER --json "$OUT/loader.json"
run distill_step "$LIMIT" distill.bench $STEP --json "$OUT/distill_step.json"
run label_cache "$LIMIT" distill.bench $CACHE --json "$OUT/label_cache.json"
run mine "$((LIMIT + 60))" distill.mine bench $MINE --json "$OUT/mine.json"
run transfer "$LIMIT" transfer.bench $TRANSFER --json "$OUT/transfer.json"
run detection "$((LIMIT + 60))" detection.bench $DETECTION --json "$OUT/detection.json" --out "$OUT/detection.md"

echo "rows for docs/benchmarks.md: $ROWS" >&2
cat "$ROWS"
