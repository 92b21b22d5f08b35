#!/usr/bin/env bash
# The full-size benchmark on one GPU, within about 9.5 minutes:
#   1. python -m bench.compare --size full: this collection's defaults against the zoo recipe, pipelines
#      end to end (training crops/s, inference s/volume and label agreement, SSL crops/s, memory).
#      Inference runs three pipelines: the zoo recipe (whole image, bench/zoo_recipe/inference.json sets
#      body_crop false), ours (the inference config's defaults, body_crop true: windows wholly in the air
#      are skipped) and ours_no_crop (ours with body_crop false: the crop as a lever); each reports the
#      windows run per volume of the whole image's total, seconds per volume, peak GPU memory, and the
#      label agreement (ours vs zoo, ours vs ours_no_crop). The crop is on in ours by the config's
#      default, so no flag is passed for it; the third pipeline adds two runs, hence 450 s, not 360.
#   2. python -m bench.levers --size full: each speed lever alone on the network step (f48, 96^3, 4 crops)
#      and on sliding-window inference, from the model zoo's settings one change at a time
#      (torch.compile left out: it compiles for minutes; `python -m bench.levers --ours_compile` measures it).
# On an H100 (before the crop's third pipeline) the two took 285 s (cut off in SSL's second pair at the
# then 360 s limit) and 87 s (5 of the 7 training rows). python -m bench.infer_probe (about 3.5 minutes)
# profiles inference apart.
# Results go to $OUT (when set, e.g. on a lent device machine) or bench/results/.
#
#   bash bench/gpu.sh [SAMPLE_DIR]        # SAMPLE_DIR defaults to ../shared/data/ct_sample
#
# Wheels in .whl/ (monai, pytorch-ignite, nibabel, fire, termcolor) are installed first when present,
# for machines that have torch but not the rest and no network.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
SAMPLE_DIR=${1:-../shared/data/ct_sample}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
TAG=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
DAY=$(date +%F)
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 450 python3 -m bench.compare --size full --repeats 2 --steps 8 --warmup 3 --copies 2 \
    --sample_dir "$SAMPLE_DIR" --out "$RESULTS/compare_${TAG}_full_${DAY}.json" || echo "compare: exit $?"
timeout 110 python3 -m bench.levers --size full --steps 5 --warmup 2 --repeats 2 --skip compile \
    --out "$RESULTS/levers_${TAG}_${DAY}.json" || echo "levers: exit $?"
