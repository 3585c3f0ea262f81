#!/usr/bin/env bash
# Fills runs/gpu_carry/ (ignored by git) with what benchmarks/gpu_feed_check.sh needs on the device
# machine, which reaches no network and has no nibabel: nibabel's wheel (pure Python) and a dataset.
#
#   bash benchmarks/gpu_carry.sh [DATASET_FOLDER]   # default ../shared/data/Task04_Hippocampus
#
# Then give the device call carry=["runs/gpu_carry"] (about 19 MB of its 64 MiB for the hippocampus).
set -euo pipefail
data=${1:-../shared/data/Task04_Hippocampus}
dest=runs/gpu_carry
[ -d "$data" ] || { echo "gpu_carry.sh: $data: no such dataset folder" >&2; exit 2; }
if [ -d "$dest" ]; then chmod -R u+w "$dest" && rm -rf "${dest:?}"; fi # a fresh folder: nothing else travels
mkdir -p "$dest/wheels"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$dest/wheels" "nibabel>=5.0"
cp -r "$data" "$dest/"
chmod -R u+w "$dest"
du -sh "$dest"
