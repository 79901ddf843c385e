#!/usr/bin/env bash
# One-shot GPU check of all four tasks, under 10 minutes on one H200 with DALI installed
# from packed parts: it stops its timed steps by GPU_CHECK_SECONDS (default 570) after its start.
# Run from anywhere:
#     bash bench/gpu_check.sh                      # DALI as installed (else the torch fallback)
#     bash bench/gpu_check.sh --dali-parts DIR     # DALI unpacked from DIR first (below)
#     bash bench/gpu_check.sh --wheels DIR         # DALI installed offline from wheels first
#     bash bench/gpu_check.sh --wheels DIR --install-only   # step 0 only (works without a GPU)
# Figures go to $OUT (default /tmp/gpu_check): summary.json, summary.txt, one log per step.
# 0. --dali-parts DIR: DIR holds dali312.tar.zst.part00.. and SHA256 from
#    ../shared/tools/pack_dali_site.sh, and the zstandard wheel it downloads (a machine
#    without the zstd command): checks the joined parts against SHA256, unpacks them into a
#    temporary folder put first on PYTHONPATH. --wheels DIR (bench/fetch_wheels.sh): checks
#    DIR/SHA256SUMS (required; it must list every wheel there) and pip-installs the wheels
#    offline into such a folder. Either way
#    bench/dali_check.py then imports DALI from there and decodes a few JPEGs.
# 1. generates a full-size synthetic Tiny ImageNet (100,000 train + 10,000 val JPEGs, 64x64)
#    and a Cars-like set (1,176 JPEGs of 500x375) on this machine;
# 2. runs 2 epochs of T3 --placement serial, T2, T1 (compiled, bf16, channels_last; the
#    first epoch includes torch.compile's build) and T4 (2 + 2 epochs, --init scratch), each
#    as a user runs it, with the default loader (the device cache for T1-T3, DALI for T4);
# 3. measures the loaders alone (bench/loader_alone.py) with what time is left.
# The summary takes each run's second epoch from its metrics.jsonl (T4: Phase A's), and
# counts the recompiles and CUDA graph (re-)recordings in its log, with the first reasons.
# README's Performance section quotes it. The model and loop alone, without data:
# python3 bench/gpu_diagnose.py (< 7 minutes).
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
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

WHEELS="" PARTS="" INSTALL_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || { usage; exit 2; }; WHEELS=$2; shift 2 ;;
    --dali-parts) [ $# -ge 2 ] || { usage; exit 2; }; PARTS=$2; shift 2 ;;
    --install-only) INSTALL_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument $1"; usage; exit 2 ;;
  esac
done
if [ "$INSTALL_ONLY" = 1 ] && [ -z "$WHEELS$PARTS" ]; then echo "gpu_check: --install-only needs --wheels DIR or --dali-parts DIR"; exit 2; fi
mkdir -p "$OUT" "$DATA"

# Step 0: DALI without network, into a temporary folder first on PYTHONPATH. pip's --target
# does not look at what is installed already, so --no-deps with the exact set
# (fetch_wheels.sh) keeps it from wanting anything else, numpy above all (the machine's own
# stays in use).
DALI_SITE=""
if [ -n "$WHEELS$PARTS" ]; then
  SECONDS=0
  DALI_SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dali.XXXXXX")
  trap 'rm -rf "$DALI_SITE"' EXIT
fi
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "error: no *.whl in $WHEELS"; exit 1; }
  [ -f "$WHEELS/SHA256SUMS" ] || { echo "error: $WHEELS has no SHA256SUMS (bench/fetch_wheels.sh writes it beside the wheels)"; exit 1; }
  (cd "$WHEELS" && sha256sum --quiet --strict -c SHA256SUMS) || {
    echo "error: a wheel in $WHEELS differs from SHA256SUMS (incomplete copy, or parts joined in the wrong order?)"; exit 1; }
  # Every wheel installed must be one SHA256SUMS vouches for (a stale one of another version, say).
  unlisted=$(comm -13 <(sed -E 's/^[0-9a-fA-F]{64} [ *]//' "$WHEELS/SHA256SUMS" | sort) <(cd "$WHEELS" && ls -- *.whl | sort))
  [ -z "$unlisted" ] || { echo "error: wheels in $WHEELS that SHA256SUMS does not list: $(echo $unlisted)"; exit 1; }
  log "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $DALI_SITE (offline)"
  # --no-compile: no .pyc for ~600 MB of files (saves time; Python compiles what it imports)
  timeout -k 10 300 python3 -m pip install --quiet --no-index --no-deps --no-compile \
      --disable-pip-version-check --target "$DALI_SITE" "$WHEELS"/*.whl || {
    echo "error: offline install from $WHEELS failed (wheels for another Python? fetch_wheels.sh defaults to 3.12)"; exit 1; }
elif [ -n "$PARTS" ]; then
  ls "$PARTS"/dali312.tar.zst.part* >/dev/null 2>&1 && [ -f "$PARTS/SHA256" ] || {
    echo "error: $PARTS needs dali312.tar.zst.part00.. and SHA256 (../shared/tools/pack_dali_site.sh)"; exit 1; }
  expected=$(cut -d' ' -f1 "$PARTS/SHA256")
  actual=$(cat "$PARTS"/dali312.tar.zst.part* | sha256sum | cut -d' ' -f1)
  [ "$expected" = "$actual" ] || { echo "error: the joined parts in $PARTS differ from SHA256 (a part missing or incomplete?)"; exit 1; }
  unzstd=(zstd -dc --long=27)
  # No zstd command: the zstandard wheel beside the parts. pack_dali_site.sh writes no checksum
  # for it; pip refuses a damaged wheel by its zip CRCs.
  if ! command -v zstd >/dev/null; then
    ls "$PARTS"/zstandard-*.whl >/dev/null 2>&1 || { echo "error: no zstd command and no zstandard wheel in $PARTS"; exit 1; }
    python3 -m pip install --quiet --no-index --no-deps --target "$DALI_SITE/.zstandard" "$PARTS"/zstandard-*.whl || exit 1
    unzstd=(env PYTHONPATH="$DALI_SITE/.zstandard" python3 -c "import sys, zstandard
zstandard.ZstdDecompressor(max_window_size=2**27).copy_stream(sys.stdin.buffer, sys.stdout.buffer)")
  fi
  log "unpacking $(ls "$PARTS"/dali312.tar.zst.part* | wc -l) parts from $PARTS into $DALI_SITE"
  cat "$PARTS"/dali312.tar.zst.part* | "${unzstd[@]}" | tar -xf - -C "$DALI_SITE" || { echo "error: unpacking $PARTS failed"; exit 1; }
fi
if [ -n "$DALI_SITE" ]; then
  export PYTHONPATH="$DALI_SITE${PYTHONPATH:+:$PYTHONPATH}"
  device=cpu
  python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null && device=mixed
  python3 bench/dali_check.py --expect-under "$DALI_SITE" --device "$device" || exit 1
  log "DALI installed and checked in ${SECONDS} s"
  [ "$INSTALL_ONLY" = 1 ] && exit 0
fi

log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
python3 - <<'PY' || exit 1
import sys
try:
    import torch, torchvision, scipy, matplotlib  # noqa: F401  (the scripts need all four)
except ImportError as err:
    sys.exit(f"gpu_check: needs torch with CUDA, torchvision, scipy, matplotlib "
             f"(pip install -r requirements.txt): {err}")
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no GPU on this machine; this script measures the GPU path "
             "(CPU figures: python -m bench.bench_cubs, python -m bench.bench_data)")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
try:
    import nvidia.dali as dali
    print(f"DALI {dali.__version__}: GPU (mixed) decoding")
except ImportError:
    print("DALI not importable: the torch DataLoader fallback is measured instead")
PY

# The marker, not wnids.txt (written first), says the Tiny ImageNet set was finished.
if [ ! -f "$DATA/tiny-imagenet-200/.full-size-complete" ] || [ ! -f "$DATA/cars196/cars_annos.mat" ]; then
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

# run NAME OWN KEEP SCRIPT ARGS...: one task script, 2 epochs, at most OWN seconds (less when
# only that much of TOTAL is left after KEEP for the later steps); its output in $OUT/NAME.log.
run() {
  local name=$1 cap; cap=$(cap_for "$2" "$3"); shift 3
  rm -rf "${OUT:?}/$name"  # never summarise an earlier run's files
  if [ "$cap" -lt 30 ]; then log "$name skipped: ${cap} s left of GPU_CHECK_SECONDS=$TOTAL"; return; fi
  log "$name: $* (at most $cap s)"
  # -k: fit() acts on SIGTERM only between steps (compilation can take a minute).
  # TORCH_LOGS: each recompile and each CUDA graph (re-)recording, with its reason, goes to
  # the log (the summary counts them).
  TORCH_LOGS=${TORCH_LOGS:-recompiles,cudagraphs} timeout -k 15 "$cap" python3 "$@" --data-dir "$DATA" \
      --out "$OUT/$name" --workers 8 > "$OUT/$name.log" 2>&1
  grep -v "it/s" "$OUT/$name.log" | tail -n 4
}
# Most important first; KEEP leaves the later steps their minimum.
run t3 170 150 t3_cubs.py --placement serial --epochs 2 --no-download
run t2 100 100 t2_resnet18.py --epochs 2 --no-download
run t1 100 50 t1_custom_cnn.py --epochs 2 --no-download
# T4 on 6 generated images per class: 2 held out (holdout Recall@1 needs two), 4 train,
# batches of 64 (P x K = 32 x 4).
run t4 90 0 t4_retrieval.py --epochs 2 --embed-epochs 2 --init scratch --t3-results "$OUT/none.json" \
    --holdout-per-class 2 --batch-size 64

cap=$(cap_for 60 0)
if [ "$cap" -ge 20 ]; then
  log "loaders alone (at most $cap s)"
  timeout -k 10 "$cap" python3 bench/loader_alone.py "$DATA" --workers 8 > "$OUT/loader.txt" 2>&1
  cat "$OUT/loader.txt"
else
  log "loaders alone skipped: ${cap} s left of GPU_CHECK_SECONDS=$TOTAL"
fi

log "summary (second epoch; data wait = share of step time blocked on the loader;"
log "GiB = torch's peak allocated / reserved memory, without DALI's own buffers; under CUDA graphs"
log "only the reserved figure holds the graphs' activations)"
python3 - "$OUT" "$(( $(date +%s) - START ))" <<'PY' | tee "$OUT/summary.txt"
import json, sys, time
from pathlib import Path
from bench.gpu_diagnose import without_nan
out, wall = Path(sys.argv[1]), int(sys.argv[2])
try:
    import torch
    device = torch.cuda.get_device_name()
except Exception:
    device = "?"
summary = {"date": time.strftime("%Y-%m-%d"), "device": device, "wall_s": wall, "runs": {}}
loader = out / "loader.txt"
summary["loaders_alone"] = [l for l in loader.read_text().splitlines() if l.startswith("loader ")] if loader.exists() else []
print(f"{'run':22s} {'loader':>7s} {'images/s':>9s} {'data wait':>9s} {'epoch s':>8s} {'1st step s':>10s} "
      f"{'builds s':>9s} {'GiB':>11s} {'holdout':>8s} {'eval s':>7s}")


def torch_log_events(log: Path) -> dict:
    """Counts of recompiles and CUDA graph recordings in a run's log, and the first reasons."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    events = {}
    for key, marker in (("recompiles", "Recompiling function"), ("graph_recordings", "Recording function="),
                        ("graph_rerecordings", "Re-recording function=")):
        hits = [i for i, line in enumerate(lines) if marker in line]
        events[key] = len(hits)
        if hits and key != "graph_recordings":  # the line after a recompile's holds its reason
            events[key + "_first"] = " | ".join(lines[hits[0]:hits[0] + 3])[:400]
    return events


for name, run in (("T3 cubs serial plain", out / "t3" / "serial_plain"), ("T2 resnet18", out / "t2"),
                  ("T1 custom cnn", out / "t1"), ("T4 phase A", out / "t4" / "phase_a")):
    log = out / (run.relative_to(out).parts[0] + ".log")
    events = torch_log_events(log)
    path = run / "metrics.jsonl"
    records = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    backend = "?"
    for results in (run / "results.json", run.parent / "results.json"):
        if results.exists():
            backend = json.loads(results.read_text()).get("loader", "?")
            break
    second = [r for r in records if r["epoch"] == 2]
    if not second:  # the log's last line says why (a usage error, a crash, the time cap)
        tail = [l for l in log.read_text(errors="replace").splitlines() if l.strip()] if log.exists() else []
        why = tail[-1][:300] if tail else f"no {log.name}"
        print(f"{name:22s} no second epoch ({len(records)} epoch(s) finished); {log.name} ends: {why}")
        summary["runs"][name] = {"epochs_finished": len(records), "first_epoch": records[0] if records else None,
                                 "log_tail": why, **events}
        continue
    r = second[0]
    first = records[0]
    held = r.get("holdout_acc", r.get("holdout_r1", float("nan")))
    summary["runs"][name] = {"loader": backend, **{k: r.get(k) for k in (
        "images_per_s", "data_wait_share", "epoch_time_s", "peak_mem_gib", "peak_reserved_gib", "train_images",
        "exact_redo_steps", "slowest_step_s", "compiled_graphs", "eval_time_s")},
        "holdout": held, "first_epoch_s": first["epoch_time_s"], "first_step_s": first.get("first_step_s"),
        "loader_builds_s": first.get("loader_builds_s"), **events}
    builds = sum(first.get("loader_builds_s") or [])
    print(f"{name:22s} {backend:>7s} {r['images_per_s']:9.0f} {r['data_wait_share']:9.1%} "
          f"{r['epoch_time_s']:8.2f} {first.get('first_step_s') or float('nan'):10.1f} {builds:9.1f} "
          f"{r.get('peak_mem_gib', float('nan')):5.1f} / {r.get('peak_reserved_gib', float('nan')):3.1f} "
          f"{held:8.4f} {r.get('eval_time_s') or float('nan'):7.2f}")
    if events["recompiles"] or events["graph_rerecordings"]:
        print(f"{'':22s} {events['recompiles']} recompile(s), {events['graph_rerecordings']} CUDA graph "
              f"re-recording(s) of {events['graph_recordings']} recording(s) (summary.json: the first reasons)")
for line in summary["loaders_alone"]:
    print(line)
# NaN (a figure a run did not log) as null: summary.json stays strict JSON
(out / "summary.json").write_text(json.dumps(without_nan(summary), indent=1, allow_nan=False))
PY
log "done in $(( $(date +%s) - START )) s; figures in $OUT (summary.json)"
