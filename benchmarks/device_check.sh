#!/usr/bin/env bash
# The trial engine's GPU checks in one run of at most 5 minutes on one GPU (an H200 in mind):
# resume after SIGKILL on CUDA, fp32 / tf32 / bf16 throughput and MFU of a ViT-B/16 pair, chunked
# vs naive losses at B = 16k and 64k, host syncs per step, the monitors' overhead, and the
# distributed losses in a one-rank NCCL group. What each part measures: benchmarks/device_check.py.
#
#   benchmarks/device_check.sh [--cpu-dry-run] [--parts resume,losses,...] [OUT_DIR]
#
# Run it from anywhere; it works in the repository root with .venv's python ($PYTHON overrides).
# OUT_DIR defaults to $OUT, else ./device_check_out. Every part runs in its own process under its
# own time budget, so one that fails or hangs costs only its budget: each writes OUT_DIR/PART.json
# (its result, or its error) and OUT_DIR/PART.log, and OUT_DIR/summary.txt lists each part's exit
# status and seconds. The script's own exit status is 0 when every part succeeded.
# --cpu-dry-run runs every part tiny on the CPU, to check the script without a GPU. --parts runs
# only the parts named (to re-run those that failed without paying for the rest again).
set -u

cd "$(dirname "$0")/.."
DRY=()
ONLY=""
OUT_DIR="${OUT:-device_check_out}"
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-dry-run) DRY=(--cpu-dry-run) ;;
        --parts) ONLY=",${2:?--parts needs a comma-separated list, e.g. --parts resume,syncs},"; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        -*) echo "device_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) OUT_DIR="$1" ;;
    esac
    shift
done
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"

# part:seconds. The budgets add up to 280 s, under the 5 minutes, with each process's start
# (import torch, CUDA context: ~5–10 s) inside its part's budget.
PARTS="resume:80 precision:70 losses:45 syncs:25 monitors:40 distributed:20"
for name in ${ONLY//,/ }; do
    case " $PARTS " in
        *" $name:"*) ;;
        *) echo "device_check.sh: no part '$name'; the parts are: $PARTS" >&2; exit 2 ;;
    esac
done

{
    echo "device check $(date -u +%Y-%m-%dT%H:%M:%SZ) ${DRY[*]:-}"
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' 2>&1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
} > "$OUT_DIR/summary.txt"

failed=0
for entry in $PARTS; do
    part="${entry%%:*}"
    budget="${entry##*:}"
    [ -n "$ONLY" ] && [ "${ONLY#*,$part,}" = "$ONLY" ] && continue
    [ ${#DRY[@]} -gt 0 ] && budget=$(( budget * 4 ))  # a shared CPU is no H200
    start=$(date +%s)
    timeout --kill-after=5 "$budget" "$PYTHON" benchmarks/device_check.py "$part" --out "$OUT_DIR" \
        "${DRY[@]}" > "$OUT_DIR/$part.log" 2>&1
    status=$?
    seconds=$(( $(date +%s) - start ))
    if [ "$status" -ne 0 ]; then
        failed=1
        if [ "$status" -ge 124 ] && [ ! -s "$OUT_DIR/$part.json" ]; then
            # Killed at its budget before it could write anything: say so in its place.
            printf '{"part": "%s", "ok": false, "error": "killed after its %s s budget (exit %s); see %s.log"}\n' \
                "$part" "$budget" "$status" "$part" > "$OUT_DIR/$part.json"
        fi
    fi
    printf '%-12s exit %-3s %4s s (budget %s s)\n' "$part" "$status" "$seconds" "$budget" | tee -a "$OUT_DIR/summary.txt"
done
exit "$failed"
