#!/usr/bin/env bash
# Downloads, on a machine with internet, the wheels that `bench/gpu_check.sh --wheels DIR`
# installs offline on an air-gapped GPU machine (Python 3.12, torch built for CUDA 13):
#     bash bench/fetch_wheels.sh                  # -> .whl/dali-cu13-py312/ (git ignores .whl/)
#     bash bench/fetch_wheels.sh DIR --split      # also DIR.tar.part-aa, -ab, ... (55 MiB each)
#     PYTHON_VERSION=3.11 bash bench/fetch_wheels.sh DIR   # the same set for another Python
# Exactly the pinned set below, no dependency resolution at download time, so the folder is
# the same on every machine. It is DALI 2.4.0's whole dependency closure (read from the
# wheels' Requires-Dist; nvimgcodec with its [all] extra, as DALI asks) minus numpy, which
# the GPU machine already has for torch and the scripts (a second numpy on PYTHONPATH would
# shadow the one its scipy / matplotlib were built against). Writes SHA256SUMS, which
# gpu_check.sh verifies, so a bad copy or a wrong `cat` order fails before anything runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
DIR=${1:-.whl/dali-cu13-py${PYTHON_VERSION/./}}
SPLIT=${2:-}

# name==version: size of the Python 3.12 wheel (2026-11-29, PyPI)
WHEELS=(
  nvidia-dali-cuda130==2.4.0          # 199 MB: DALI itself
  nvidia-nvimgcodec-cu13==0.9.0.20    #  25 MB: image decoders (nvJPEG front end)
  nvidia-libnvcomp-cu13==5.3.0.16     #  29 MB: GPU (de)compression, DALI pins it exactly
  nvidia-nvjpeg==13.3.2.43            # 3.8 MB: nvimgcodec[all]
  nvidia-nvjpeg2k-cu13==0.11.0.51     # 4.3 MB: nvimgcodec[all]
  nvidia-nvtiff-cu13==0.8.0.82        # 2.4 MB: nvimgcodec[all]
  libcst==1.9.0                       # 2.3 MB: compiled (cp312), for DALI's autograph
  nvtx==0.2.17                        # 3.1 MB: compiled (cp312)
  optree==0.20.0                      # 0.5 MB: compiled (cp312)
  pyyaml==6.0.4                       # 0.8 MB: compiled (cp312), libcst needs it
  astunparse==1.6.3                   # small pure-Python ones from here on
  gast==0.7.0
  makefun==1.16.0
  packaging==26.3
  six==1.17.0
  typing-extensions==4.16.0
  wheel==0.48.0                       # astunparse declares it
)

mkdir -p "$DIR"
# Platforms: DALI and nvimgcodec are manylinux_2_28 wheels, others older; pip needs each tag.
python3 -m pip download --no-deps --only-binary=:all: --implementation cp \
    --python-version "$PYTHON_VERSION" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" "${WHEELS[@]}"

count=$(ls "$DIR"/*.whl | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ]; then
  echo "error: $DIR holds $count wheels, expected ${#WHEELS[@]} (remove stray files and rerun)" >&2
  exit 1
fi
(cd "$DIR" && sha256sum -- *.whl > SHA256SUMS)
echo "$count wheels, $(du -sh "$DIR" | cut -f1) in $DIR (SHA256SUMS written)"

if [ "$SPLIT" = "--split" ]; then
  # Transfers capped at 64 MiB: 55 MiB parts leave room; on the GPU machine
  #   cat DIR.tar.part-* > DIR.tar && tar -xf DIR.tar
  tar -cf "$DIR.tar" -C "$(dirname "$DIR")" "$(basename "$DIR")"
  rm -f "$DIR.tar.part-"*
  split -b 55m "$DIR.tar" "$DIR.tar.part-"
  rm "$DIR.tar"
  ls -l "$DIR.tar.part-"*
fi
