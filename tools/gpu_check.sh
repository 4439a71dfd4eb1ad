#!/usr/bin/env bash
# The GPU check: every GPU entry point of the README once, and the speed figures of README "Speed", in a few minutes
# on one GPU. Run from anywhere; nothing needs the network.
#
#     bash tools/gpu_check.sh [OUT_DIR]          # default: $OUT, else ./gpu_check_out
#     DEVICE=cpu bash tools/gpu_check.sh /tmp/x  # rehearsal on a CPU: the same commands at tiny sizes
#     ONLY='bench' bash tools/gpu_check.sh   # only the steps whose name matches this regex (a step that reads an
#                                            # earlier one's output, resume or bench-e2e, needs that one too)
#
# Writes exactly two files to OUT_DIR: gpu_check.log (every command and all its output) and summary.txt (per step:
# exit code and seconds; the bench JSON lines; the test counts; a table of the speed ratios), which is also printed.
# Runs and data go to a scratch folder ($WORK, default a new temp dir, removed at exit). Every step is bounded by `timeout` and the
# script goes on past failures; steps marked optional are skipped once the time budget ($BUDGET seconds, default
# 420) would be exceeded. Exit code: the number of failed steps (0 = all passed).

set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
SUM="$OUT_DIR/summary.txt"
: >"$LOG"
: >"$SUM"
if [ -z "${WORK:-}" ]; then         # our own scratch folder: removed at exit (a WORK you give is kept)
    WORK=$(mktemp -d -t pgnm_gpu_check.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
BUDGET=${BUDGET:-420}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python}
T0=$(date +%s)
FAILED=0

if [ "$DEVICE" = "cpu" ]; then
    # rehearsal: the same steps at sizes a 2-core CPU runs in seconds, timeouts x4, no time budget
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"
    DEV0="--device cpu"
    BENCH="--model resnet10t --batch-size 2 --train-crop-size 32 --grid 8 --kernel 3 --sigma 1 --bench-rounds 2"
    TINY="--synthetic-per-class 2 --synthetic-size 32 --train-crop-size 32 --val-resize-size 32 --val-crop-size 32 \
--batch-size 8"
    MASK="--grid 8 --kernel 3 --sigma 1"        # the heated phase's only: finetune refuses flags it would not read
    PNG="--size 40 --per-class 1 --copies 2 --val-per-class 1"
    E2E="--model resnet10t --batch-size 8 --train-crop-size 32 --val-resize-size 32 --val-crop-size 32 --grid 8 \
--kernel 3 --sigma 1 --bench-steps 3"
    BDATA="--batch-size 8 --train-crop-size 32 --val-resize-size 32 --val-crop-size 32 --grid 8 --kernel 3"
    EVAL="--image-size 32 --trials 1 --lowshot-trials 1 --shots 8"
    TEST_K="device or channels_last or fused or gpu or cuda or bf16 or fp16 or compile"
    SCALE=4
    BUDGET=100000
else
    DEV0="--device cuda:0"
    # the issue's setting: resnet50 + resnet10t policy, batch 64, 224 px, grid 64, kernel 13, sigma 6, 15 rounds
    BENCH="--model resnet50 --batch-size 64 --train-crop-size 224 --grid 64 --kernel 13 --sigma 6 --bench-rounds 15"
    TINY=""                                     # the built-in synthetic preset (resnet10t, 64 px)
    MASK=""
    PNG="--size 256 --per-class 16 --copies 25 --val-per-class 4"
    E2E="--model resnet50 --batch-size 64 --train-crop-size 224 --val-resize-size 256 --val-crop-size 224 --grid 64 \
--kernel 13 --sigma 6 --bench-steps 150"
    BDATA="--batch-size 64"
    EVAL="--trials 1 --lowshot-trials 2"
    TEST_K="(gpu or cuda or amp or fp16 or bf16 or compile) and not two_process"
    SCALE=1
fi
RUNS="$WORK/runs"

say() { echo "$*" | tee -a "$SUM"; }

# step NAME TIMEOUT_S [optional EST_S] -- COMMAND...: run, log, record exit code, seconds and JSON result lines
step() {
    local name=$1 limit=$(($2 * SCALE)) est=0 optional=0
    shift 2
    if [ "$1" = "optional" ]; then optional=1; est=$2; shift 2; fi
    [ "$1" = "--" ] && shift
    if [ -n "${ONLY:-}" ] && ! grep -qE "$ONLY" <<<"$name"; then return 0; fi
    local now=$(($(date +%s) - T0))
    if [ $optional = 1 ] && [ $((now + est)) -gt "$BUDGET" ]; then
        say "[skipped: ${now}s used of the ${BUDGET}s budget] $name"
        return 0
    fi
    local t=$(date +%s)
    local tmp="$WORK/step.out"
    {
        echo
        echo "=== $name  (t=${now}s, timeout ${limit}s)"
        echo "\$ $*"
    } >>"$LOG"
    timeout -k 15 "$limit" "$@" >"$tmp" 2>&1
    local rc=$?
    cat "$tmp" >>"$LOG"
    local dt=$(($(date +%s) - t))
    [ $rc -ne 0 ] && FAILED=$((FAILED + 1))
    say "[rc=$rc ${dt}s] $name$( { [ $rc = 124 ] || [ $rc = 137 ]; } && echo '  (TIMED OUT)')"
    grep -E '^\{"|^CHECK: |^resumed from' "$tmp" | sed 's/^/    /' | tee -a "$SUM"
    grep -E '^(=+ )?[0-9]+ (passed|failed)|[0-9]+ (passed|failed|skipped|error)' "$tmp" | tail -1 | sed 's/^/    /' \
        | tee -a "$SUM"
    if [ $rc -ne 0 ]; then grep -vE '^\s*$' "$tmp" | tail -3 | sed 's/^/    ! /' | tee -a "$SUM"; fi
    return 0
}

say "pgnm GPU check: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(date -u +%FT%TZ) DEVICE=$DEVICE WORK=$WORK"
step "environment" 60 -- bash -c "nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi'; nproc; $PY -c \"import torch, \
torchvision, numpy, PIL; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', \
torchvision.__version__, 'numpy', numpy.__version__, 'pillow', PIL.__version__); print('gpus', torch.cuda.device_count(), \
[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])\"; $PY -c 'import timm' 2>&1 | tail -1; \
$PY -c 'import sklearn' 2>&1 | tail -1; true"
head -c 2000 "$LOG" | grep -E "^(GPU|torch|gpus|[0-9]+$)" | sed 's/^/    /' | tee -a "$SUM"

# 1. the GPU tests (and the CPU tests of the same subjects)
step "pytest -k '$TEST_K'" 240 -- "$PY" -m pytest -q -p no:cacheprovider test_pgnm.py -k "$TEST_K"

# 2. --bench: with no --device (used to crash), fp16 on cuda:0, bf16, the policy at 112 px (compile: optional, below)
step "bench fp32, no --device" 90 -- "$PY" pgnm.py --bench $BENCH
step "bench --amp (fp16, channels-last by default) --device cuda:0" 90 -- "$PY" pgnm.py --bench $BENCH $DEV0 --amp
step "bench --amp --amp-dtype bfloat16" 90 -- "$PY" pgnm.py --bench $BENCH --amp --amp-dtype bfloat16
step "bench --amp --amp-dtype bfloat16 --policy-size 112" 90 -- "$PY" pgnm.py --bench $BENCH --amp --amp-dtype bfloat16 \
    --policy-size 112
step "bench --amp --policy-size 112" 90 -- "$PY" pgnm.py --bench $BENCH --amp --policy-size 112

step "torchrun --bench (1 process, small)" 90 -- "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    pgnm.py --bench --model resnet10t --batch-size 8 --train-crop-size 64 --grid 16 --kernel 5 --sigma 2 \
    --bench-rounds 2 --amp

# 3. training entry points: torchrun heated + finetune with AMP and SyncBN, resume with AMP, evaluate on CUDA
step "torchrun heated --amp --sync-bn" 150 -- "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    pgnm.py --phase heated --amp --sync-bn --epochs 2 $TINY $MASK --output-dir "$RUNS/heated"
step "resume heated --amp (epoch 3 of 3)" 120 -- bash -c "\"$PY\" pgnm.py --phase heated --amp --sync-bn --epochs 3 \
    $TINY $MASK --output-dir '$RUNS/heated' --resume auto | tee /dev/stderr | grep 'resumed from .*checkpoint.pth: epoch 3'"
step "torchrun finetune --amp" 150 -- "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    pgnm.py --phase finetune --amp --epochs 1 $TINY --output-dir "$RUNS/finetune"
step "evaluate.py --device ${DEVICE}" 150 -- "$PY" evaluate.py --checkpoints "$RUNS/heated/model_heated.pth" \
    --device "$DEVICE" --output-dir "$RUNS/evaluate" $EVAL

# 4. end to end: heated steps fed from PNG files on disk, against the same step on a resident batch
step "make PNG ImageFolder" 120 -- "$PY" tools/make_png_folder.py "$WORK/pngs" $PNG
step "bench-e2e bf16, 8 workers" 120 -- "$PY" pgnm.py --bench-e2e "$WORK/pngs" $E2E --amp --amp-dtype bfloat16 \
    --workers 8 --output-dir "$RUNS/e2e"

# 5. optional, while the budget lasts: more speed figures and entry points
step "bench --amp --amp-dtype bfloat16 --compile --policy-size 112" 200 optional 90 -- "$PY" pgnm.py --bench $BENCH \
    --amp --amp-dtype bfloat16 --compile --policy-size 112
step "bench-e2e bf16, 4 workers" 120 optional 30 -- "$PY" pgnm.py --bench-e2e "$WORK/pngs" $E2E --amp \
    --amp-dtype bfloat16 --workers 4 --output-dir "$RUNS/e2e"
step "bench-e2e bf16, 12 workers" 120 optional 30 -- "$PY" pgnm.py --bench-e2e "$WORK/pngs" $E2E --amp \
    --amp-dtype bfloat16 --workers 12 --output-dir "$RUNS/e2e"
step "heated --amp --deterministic, twice, identical weights" 120 optional 30 -- bash -c "for r in a b; do \
    \"$PY\" pgnm.py --phase heated --amp --deterministic --epochs 1 $TINY $MASK --output-dir '$RUNS/det_'\$r || exit 1; done; \
    \"$PY\" -c \"import torch; a, b = (torch.load('$RUNS/det_' + r + '/model_heated.pth', weights_only=True) \
for r in 'ab'); same = all(torch.equal(a[k], b[k]) for k in a); print('CHECK: deterministic runs identical:', same); \
raise SystemExit(0 if same else 1)\""
step "bench-data, 8 workers" 90 optional 20 -- "$PY" pgnm.py --bench-data "$WORK/pngs" $BDATA --workers 8
step "heated --amp --compile (2 epochs)" 200 optional 60 -- "$PY" pgnm.py --phase heated --amp --compile --epochs 2 \
    $TINY $MASK --output-dir "$RUNS/compiled"
step "bench --amp --amp-dtype bfloat16 --compile --compile-mode reduce-overhead (CUDA graphs)" 200 optional 70 -- \
    "$PY" pgnm.py --bench $BENCH --amp --amp-dtype bfloat16 --compile --compile-mode reduce-overhead
step "bench --amp --compile (fp16)" 200 optional 70 -- "$PY" pgnm.py --bench $BENCH --amp --compile
step "bench --amp --no-channels-last" 90 optional 25 -- "$PY" pgnm.py --bench $BENCH --amp --no-channels-last

# the ratios of every bench line, one row each
"$PY" - "$SUM" <<'EOF' | tee -a "$SUM"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith('{"')]
bench = [r for r in rows if "heated_over_parts" in r]
if bench:
    print(f"\n{bench[0].get('device_name', '?')}, torch {bench[0].get('torch', '?')}")
    print(f"{'amp':>9} {'NHWC':>5} {'compile':>15} {'pol px':>6} | {'heated ms':>9} {'base ms':>8} "
          f"{'heat/parts':>10} {'heat/base':>9} {'auth/ours':>9} {'authfp32/ours':>13} {'host/base':>9}")
    for r in bench:
        print(f"{r['amp']:>9} {str(r['channels_last'])[0]:>5} {r['compile']:>15} {str(r['policy_size'] or 'full'):>6} | "
              f"{r['heated_ms']:9.2f} {r['baseline_ms']:8.2f} {r['heated_over_parts']:10.3f} "
              f"{r['heated_over_baseline']:9.3f} {r['authors_over_heated']:9.3f} {r['authors_fp32_over_heated']:13.3f} "
              f"{r.get('baseline_host_ms', float('nan')) / r['baseline_ms']:9.3f}")
for r in rows:
    if "e2e_over_resident" in r:
        print(f"e2e {r['workers']:>2} workers: {r['e2e_img_s']} img/s from PNG files vs {r['resident_img_s']} resident "
              f"= {r['e2e_over_resident']:.3f}, waiting for data {100 * r['data_wait_share']:.1f}% "
              f"({r['cpu_count']} CPUs)")
EOF
say "done in $(($(date +%s) - T0))s; failed steps: $FAILED; full log: $LOG"
exit "$FAILED"
