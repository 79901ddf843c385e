#!/usr/bin/env bash
# One-shot GPU check; its time caps keep it near 8 minutes (not yet run anywhere). Run from anywhere:
#     bash bench/gpu_check.sh            # writes its figures to $OUT (default /tmp/gpu_check)
# 1. generates a full-size synthetic Tiny ImageNet (100,000 train + 10,000 val JPEGs, 64x64)
#    and a Cars-like set (1,176 JPEGs of 500x375) on this machine;
# 2. measures the loader alone (bench/loader_alone.py: DALI mixed decode if importable,
#    else the torch fallback);
# 3. runs two epochs each of T2 and T3 --placement serial (autocast, channels_last, compile)
#    and reports the second epoch (the first includes torch.compile's compilation).
# README's Performance section will quote the summary table at the end. Model-only
# images/s and MFU are a separate, longer command: python3 bench/bench_train.py --quick.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
DATA=${DATA:-/tmp/gpu_check_data}
PROCS=$(nproc)
mkdir -p "$OUT" "$DATA"
export PYTHONUNBUFFERED=1
log() { echo "[gpu_check $(date +%T)] $*"; }

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
  python3 bench/make_full_synthetic.py --tiny "$DATA" --cars "$DATA/cars196" \
      --cars-per-class 6 --procs "$PROCS" || exit 1
fi

log "loader alone"
timeout -k 10 100 python3 bench/loader_alone.py "$DATA" --workers 8 2>&1 | tee "$OUT/loader.txt"

for task in t2 t3; do
  script=t2_resnet18.py; extra=""; cap=170
  [ "$task" = t3 ] && script=t3_cubs.py && extra="--placement serial" && cap=190
  log "$script $extra: 2 epochs (at most $cap s)"
  rm -rf "${OUT:?}/$task"  # never summarise an earlier run's files
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
print(f"{'run':22s} {'images/s':>10s} {'data wait':>10s} {'torch peak GiB':>15s} {'holdout acc':>12s}")
for name, path in (("T2 resnet18", out / "t2" / "metrics.jsonl"),
                   ("T3 cubs serial plain", out / "t3" / "serial_plain" / "metrics.jsonl")):
    records = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    second = [r for r in records if r["epoch"] == 2]
    if not second:
        print(f"{name:22s} no second epoch ({len(records)} epoch(s) finished)")
        continue
    r = second[0]
    print(f"{name:22s} {r['images_per_s']:10.0f} {r['data_wait_share']:10.1%} "
          f"{r.get('peak_mem_gib', float('nan')):15.2f} {r['holdout_acc']:12.4f}")
PY
log "done; figures in $OUT"
