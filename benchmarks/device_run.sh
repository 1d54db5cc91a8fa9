#!/usr/bin/env bash
# One device call that measures the GPU figures still open (README "Results"): training and TTA throughput
# against the pure loop, the per-phase profile, and the five-recipe HAM10000 quality run. Writes JSON and logs
# to $OUT. Prepare with benchmarks/device_prepare.sh, then call the device with carry [".whl", ".carry"] and
#   bash benchmarks/device_run.sh
# Check it here first on tiny CPU settings: SMALL=1 OUT=/tmp/dev bash benchmarks/device_run.sh
# The quality run is sized by EPOCHS, FOLDS, SIZE and IMAGES (empty = all 10,015) to fit the device time left.
set -uo pipefail
OUT=${OUT:-/tmp/melafast-device}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null && ! python3 -c "import fastai" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
python3 -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')"
SMALL=${SMALL:+--small}
DATA=${DATA:-.carry/ham10000}
WEIGHTS=${WEIGHTS:-.carry/tf_efficientnet_lite2.safetensors}
step() {  # name, command...: run one benchmark, keep its log, report its exit status and time
  local name=$1; shift
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s"
  tail -n 40 "$OUT/$name.log" | grep -v "█" | tail -n 25
}
step throughput python3 benchmarks/throughput.py $SMALL --arch efficientnet_b3 --size 384 --bs 64 --out "$OUT/throughput.json"
step profile python3 benchmarks/profile_epoch.py $SMALL --arch efficientnet_b3 --size 384 --bs 64 --out "$OUT/profile.json"
if [ -n "$SMALL" ]; then
  step quality python3 benchmarks/quality.py --small --out "$OUT/quality.json"
else
  step quality python3 benchmarks/quality.py --data "$DATA" --weights "$WEIGHTS" --arch tf_efficientnet_lite2 \
    --size "${SIZE:-224}" --epochs "${EPOCHS:-6}" --folds "${FOLDS:-5}" ${IMAGES:+--images $IMAGES} --bs 64 \
    --out "$OUT/quality.json"
fi
ls -la "$OUT"
