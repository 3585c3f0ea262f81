#!/usr/bin/env bash
# Fills runs/gpu_carry/ (ignored by git) with what the GPU scripts need on the device machine, which
# reaches no network and has no nibabel: nibabel's wheel and the pure-Python packages it needs that a
# bare machine may lack (importlib_resources on Python < 3.12, packaging), a dataset for
# gpu_feed_check.sh, and the official nnFormer model files for gpu_check.sh where they were extracted
# to runs/official_nnformer (benchmarks/README.md says how).
#
#   bash benchmarks/gpu_carry.sh [DATASET_FOLDER]   # default ../shared/data/Task04_Hippocampus
#
# Then give both device calls carry=["runs/gpu_carry"] (about 19 MB of its 64 MiB for the hippocampus,
# plus the official files).
set -euo pipefail
data=${1:-../shared/data/Task04_Hippocampus}
dest=runs/gpu_carry
[ -d "$data" ] || { echo "gpu_carry.sh: $data: no such dataset folder" >&2; exit 2; }
if [ -d "$dest" ]; then chmod -R u+w "$dest" && rm -rf "${dest:?}"; fi # a fresh folder: nothing else travels
mkdir -p "$dest/wheels"
# --no-deps: each named on its own, so numpy (there already) is not fetched; installed --no-deps there.
python3 -m pip download -q --no-deps --only-binary=:all: -d "$dest/wheels" "nibabel>=5.0" \
    "importlib_resources>=5.12" "packaging>=20"
cp -r "$data" "$dest/"
if [ -d runs/official_nnformer ]; then
    cp -r runs/official_nnformer "$dest/"
else
    echo "gpu_carry.sh: no runs/official_nnformer: gpu_check.sh will skip the official-code comparison" >&2
fi
chmod -R u+w "$dest"
du -sh "$dest"
