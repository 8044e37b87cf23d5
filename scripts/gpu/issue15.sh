#!/usr/bin/env bash
# Issue 15's GPU measurements on a lent H100 or H200, in stages that each fit one 10-minute device call.
# First, here: scripts/gpu/fetch_wheels.sh (once; it fills the git-ignored .whl/). Then one device call
# per stage, each carrying the wheels:
#     run(command="bash scripts/gpu/issue15.sh faster", carry=[".whl"], timeout_s=600)
# Stages (a machine goes back 30 s after a call, so each one installs and builds what it needs):
#   faster     faster-qwen3-tts 0.5.4 in its own environment (transformers 5.15.1, qwen-tts-hf)
#   engine     this engine with CUDA graphs (streams 1, 8, 32; census; step) beside plain qwen-tts
#   compiled   the same with the Inductor-compiled step (TTS_COMPILE_STEP), no plain qwen-tts
#   equality   codes equal plain qwen-tts's on the GPU (float32, greedy), and memory over 1,000 joins
# All of them use the same random-weight checkpoint at the 1.7B sizes (ARCH=0.6b for the small one),
# the same text and voices (scripts/benchmarks/workload.py) and 250 frames (20 s) per request.
# Logs and JSON land in $OUT (what the device tool brings back).
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=${1:?usage: issue15.sh faster|engine|compiled|equality}
arch=${ARCH:-1.7b}
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

install() {  # TARGET SET: the common wheels and one set, into a folder of their own
    [ -d "$1" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$1" \
        .whl/common/*.whl ".whl/$2"/*.whl
}
engine_python() { PYTHONPATH="/tmp/engine:$PWD/src" python3 "$@"; }

install /tmp/engine engine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
ckpt=$(engine_python -c "
from pathlib import Path
from tts_service.dev.tiny_checkpoint import ensure_tiny_checkpoint
print(ensure_tiny_checkpoint(Path('/tmp/ckpt'), arch='$arch'))" | tail -1)
echo "checkpoint: $ckpt"
common=(--model "$ckpt" --device cuda --frames 250 --streams 1 8 32 --stagger-ms 20)

case $stage in
faster)
    install /tmp/faster faster
    PYTHONPATH=/tmp/faster python3 scripts/bench_faster_qwen3_tts.py --model "$ckpt" --frames 250 \
        --json "$out/faster-$arch.json" 2>&1 | tee "$out/faster-$arch.log"
    ;;
engine)
    engine_python scripts/bench_engine.py "${common[@]}" --plain-frames 40 --no-eager \
        --json "$out/engine-$arch.json" 2>&1 | tee "$out/engine-$arch.log"
    ;;
compiled)
    engine_python scripts/bench_engine.py "${common[@]}" --no-plain --no-eager --compile-step \
        --json "$out/compiled-$arch.json" 2>&1 | tee "$out/compiled-$arch.log"
    ;;
equality)
    engine_python scripts/check_gpu_equality.py --device cuda 2>&1 | tee "$out/equality.log"
    engine_python scripts/join_soak.py --model "$ckpt" --device cuda --joins 1000 \
        2>&1 | tee "$out/joins-$arch.log"
    ;;
*)
    echo "unknown stage: $stage" >&2
    exit 2
    ;;
esac
