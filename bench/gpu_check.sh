#!/usr/bin/env bash
# One-shot GPU check, under 10 minutes on one H200 installation included: it stops its
# timed steps by GPU_CHECK_SECONDS (default 570) after its start (not yet run anywhere).
# Run from anywhere:
#     bash bench/gpu_check.sh                      # torch fallback loader (no DALI needed)
#     bash bench/gpu_check.sh --wheels DIR         # DALI installed offline from DIR first
#     bash bench/gpu_check.sh --wheels DIR --install-only   # steps 0 only (works without a GPU)
# Figures go to $OUT (default /tmp/gpu_check).
# 0. --wheels DIR (a folder written by bench/fetch_wheels.sh, for an air-gapped machine):
#    checks DIR/SHA256SUMS, pip-installs every wheel in DIR offline (--no-index --no-deps)
#    into a temporary folder put first on PYTHONPATH, then bench/dali_check.py imports DALI
#    from there and decodes a few JPEGs (`mixed` with a GPU, else on the CPU).
# 1. generates a full-size synthetic Tiny ImageNet (100,000 train + 10,000 val JPEGs, 64x64)
#    and a Cars-like set (1,176 JPEGs of 500x375) on this machine;
# 2. measures the loader alone (bench/loader_alone.py: DALI mixed decode if importable,
#    else the torch fallback); the summary names the loader measured;
# 3. runs two epochs each of T2 and T3 --placement serial (autocast, channels_last, compile)
#    and reports the second epoch (the first includes torch.compile's compilation).
# README's Performance section will quote the summary table at the end. Model-only
# images/s and MFU are a separate, longer command: python3 bench/bench_train.py --quick.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
DATA=${DATA:-/tmp/gpu_check_data}
PROCS=$(nproc)
export PYTHONUNBUFFERED=1
START=$(date +%s)
TOTAL=${GPU_CHECK_SECONDS:-570}  # a 10-minute command limit, less 30 s for the summary
# cap_for OWN KEEP: a step's time limit: its own cap, or less when only that much of TOTAL
# is left after keeping KEEP seconds for the steps after it.
cap_for() { local left=$(( TOTAL - ($(date +%s) - START) - $2 )); echo $(( left < $1 ? left : $1 )); }
log() { echo "[gpu_check $(date +%T)] $*"; }
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }

WHEELS="" INSTALL_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || { usage; exit 2; }; WHEELS=$2; shift 2 ;;
    --install-only) INSTALL_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument $1"; usage; exit 2 ;;
  esac
done
if [ "$INSTALL_ONLY" = 1 ] && [ -z "$WHEELS" ]; then echo "gpu_check: --install-only needs --wheels DIR"; exit 2; fi
mkdir -p "$OUT" "$DATA"

# Step 0: DALI from a folder of wheels, without network. pip's --target does not look at
# what is installed already, so --no-deps with the exact set (fetch_wheels.sh) keeps it
# from wanting anything else, numpy above all (the machine's own stays in use).
if [ -n "$WHEELS" ]; then
  SECONDS=0
  [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "error: no *.whl in $WHEELS"; exit 1; }
  if [ -f "$WHEELS/SHA256SUMS" ]; then
    (cd "$WHEELS" && sha256sum --quiet -c SHA256SUMS) || {
      echo "error: a wheel in $WHEELS differs from SHA256SUMS (incomplete copy, or parts joined in the wrong order?)"; exit 1; }
  fi
  DALI_SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dali.XXXXXX")
  trap 'rm -rf "$DALI_SITE"' EXIT
  log "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $DALI_SITE (offline)"
  # --no-compile: no .pyc for ~600 MB of files (saves time; Python compiles what it imports)
  timeout -k 10 300 python3 -m pip install --quiet --no-index --no-deps --no-compile \
      --disable-pip-version-check --target "$DALI_SITE" "$WHEELS"/*.whl || {
    echo "error: offline install from $WHEELS failed (wheels for another Python? fetch_wheels.sh defaults to 3.12)"; exit 1; }
  export PYTHONPATH="$DALI_SITE${PYTHONPATH:+:$PYTHONPATH}"
  device=cpu
  python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null && device=mixed
  python3 bench/dali_check.py --expect-under "$DALI_SITE" --device "$device" || exit 1
  log "DALI installed and checked in ${SECONDS} s"
  [ "$INSTALL_ONLY" = 1 ] && exit 0
fi

log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
python3 - <<'PY' || { echo "needs torch with CUDA, torchvision, scipy, matplotlib (pip install -r requirements.txt)"; exit 1; }
import torch, torchvision, scipy, matplotlib  # noqa: F401  (the scripts need all four)
assert torch.cuda.is_available(), "torch sees no GPU"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
try:
    import nvidia.dali as dali
    print(f"DALI {dali.__version__}: GPU (mixed) decoding")
except ImportError:
    print("DALI not importable: the torch DataLoader fallback is measured instead")
PY

if [ ! -f "$DATA/tiny-imagenet-200/wnids.txt" ] || [ ! -f "$DATA/cars196/cars_annos.mat" ]; then
  log "generating synthetic datasets with $PROCS processes"
  rm -rf "$DATA/tiny-imagenet-200" "$DATA/cars196"
  # The Cars set (1,176 JPEGs of 500x375, ~56 ms each: about a minute on one core) is
  # written by one process beside the Tiny ImageNet pool, so the two overlap.
  python3 bench/make_full_synthetic.py --cars "$DATA/cars196" --cars-per-class 6 > "$OUT/cars_data.txt" 2>&1 &
  cars_pid=$!
  python3 bench/make_full_synthetic.py --tiny "$DATA" --procs "$PROCS" || { kill "$cars_pid"; exit 1; }
  wait "$cars_pid" || { cat "$OUT/cars_data.txt"; exit 1; }
  cat "$OUT/cars_data.txt"
  log "datasets written in $(( $(date +%s) - START )) s since the start"
fi

log "loader alone"
cap=$(cap_for 100 300)  # keep 300 s: T2 and T3 need at least ~150 s each
if [ "$cap" -ge 20 ]; then
  timeout -k 10 "$cap" python3 bench/loader_alone.py "$DATA" --workers 8 2>&1 | tee "$OUT/loader.txt"
else
  log "loader alone skipped: ${cap} s left of GPU_CHECK_SECONDS=$TOTAL"
fi

for task in t2 t3; do
  script=t2_resnet18.py; extra=""; cap=$(cap_for 170 150)
  [ "$task" = t3 ] && script=t3_cubs.py && extra="--placement serial" && cap=$(cap_for 190 0)
  rm -rf "${OUT:?}/$task"  # never summarise an earlier run's files
  if [ "$cap" -lt 30 ]; then log "$script skipped: ${cap} s left of GPU_CHECK_SECONDS=$TOTAL"; continue; fi
  log "$script $extra: 2 epochs (at most $cap s)"
  # -k: fit() acts on SIGTERM only between steps (compilation can take a minute)
  timeout -k 15 "$cap" python3 "$script" $extra --data-dir "$DATA" --no-download --epochs 2 \
      --out "$OUT/$task" --workers 8 --compile 2>&1 | grep -v "it/s" | tail -n 8
done

log "summary (second epoch; data wait = share of step time blocked on the loader;"
log "torch peak = torch.cuda.max_memory_allocated, without DALI's own buffers)"
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
loader = out / "loader.txt"
measured = [l for l in loader.read_text().splitlines() if l.startswith("measured:")] if loader.exists() else []
print(f"loader alone {measured[0] if measured else 'not measured'}")
print(f"{'run':22s} {'loader':>7s} {'images/s':>10s} {'data wait':>10s} {'torch peak GiB':>15s} {'holdout acc':>12s}")
for name, run in (("T2 resnet18", out / "t2"), ("T3 cubs serial plain", out / "t3" / "serial_plain")):
    path, results = run / "metrics.jsonl", run / "results.json"
    backend = json.loads(results.read_text()).get("loader", "?") if results.exists() else "?"
    records = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    second = [r for r in records if r["epoch"] == 2]
    if not second:
        print(f"{name:22s} {backend:>7s} no second epoch ({len(records)} epoch(s) finished)")
        continue
    r = second[0]
    print(f"{name:22s} {backend:>7s} {r['images_per_s']:10.0f} {r['data_wait_share']:10.1%} "
          f"{r.get('peak_mem_gib', float('nan')):15.2f} {r['holdout_acc']:12.4f}")
PY
log "done in $(( $(date +%s) - START )) s; figures in $OUT"
