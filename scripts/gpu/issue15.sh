#!/usr/bin/env bash
# Issue 15's GPU measurements on a lent H100 or H200.
# First, here: scripts/gpu/fetch_wheels.sh (once; it fills the git-ignored .whl/). A task is lent 15
# minutes of device time in all, a machine's start included, so the first call should be the one that
# fits them all, most important first, each part cut off when the budget (BUDGET_S, 420 s) runs out:
#     run(command="bash scripts/gpu/issue15.sh quick", carry=[".whl"], timeout_s=540)
# The budget starts once the wheels are installed and the random checkpoint is built: the 1.7B one took
# 52 s and 9.6 GB of memory on a 2-core CPU (4.3 GB on disk) and the wheels' install 1.3 s, so 540 s leave
# about a minute beside the budget for the parts' overruns (each is killed 10 s after its time).
#   quick      engine (with plain qwen-tts at 40 frames), then faster, then http, then 1,000 joins, then the seed
#              replay check (bf16, in company) without and with TTS_BATCH_INVARIANT, then the engine
#              with it (its cost); one log
# The single stages, each one call (a machine goes back 30 s after a call, so each installs what it needs):
#   faster     faster-qwen3-tts 0.5.4 in its own environment (transformers 5.15.1, qwen-tts-hf)
#   engine     this engine with CUDA graphs (streams 1, 8, 32, each with first chunks of 4, quick start, 1;
#              census; the step's kernel forms greedy and sampled: qwen-tts's ops, fewer kernels, + Triton layers,
#              + Triton sampling (both with SDPA's attention), + Triton decode attention over live keys (and
#              that attention in fewer programs looping over splits, the same bits), at
#              200 keys and at 32 rows staggered from 100 to 2,000 keys (SDPA attends them all to 2,048), the
#              same-bits lines of the Triton kernels and of the fused products and both decode attentions
#              against qwen-tts's ops for a lone request; step) beside plain qwen-tts. In order of importance,
#              the JSON rewritten after each, so a run cut off keeps what it measured: graphs against eager and
#              the census, the streams, plain qwen-tts, the prefill and the step's time, then the kernel forms
#   http       the service itself (`bentoml serve`, greedy): first bytes of /v1/tts/stream at 1 and 8 streams
#              beside /v1/tts/synthesize (scripts/bench.py stream --url), and the server's own first-audio lines
#   compiled   the same with the Inductor-compiled step (TTS_COMPILE_STEP), no plain qwen-tts
#   sampled    engine with qwen-tts's sampling settings (the service's default) beside plain qwen-tts sampled
#   stateful   engine with the stateful stream decoder (TTS_STREAM_DECODER=stateful: batched across streams,
#              no re-decoded context, not graph-captured) instead of the GPU's default windows
#   equality   codes equal plain qwen-tts's on the GPU (float32, greedy), memory over 1,000 joins, and
#              whether a seed replays the same bytes alone and in company (bf16, sampled)
#   invariance the seed replay check without and with TTS_BATCH_INVARIANT, and the engine with it
# All of them use the same random-weight checkpoint at the 1.7B sizes (ARCH=0.6b for the small one),
# the same text and voices (scripts/benchmarks/workload.py) and 250 frames (20 s) per request.
# Logs and JSON land in $OUT (what the device tool brings back: at most 8 files).
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=${1:?usage: issue15.sh quick|faster|engine|http|compiled|sampled|stateful|equality|invariance}
arch=${ARCH:-1.7b}
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

install() {  # TARGET SET: the common wheels and one set, into a folder of their own
    [ -d "$1" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$1" \
        .whl/common/*.whl ".whl/$2"/*.whl
}
in_engine_env=(env "PYTHONPATH=/tmp/engine:$PWD/src")  # the engine's wheels, then this checkout
engine_python() { "${in_engine_env[@]}" python3 "$@"; }

install /tmp/engine engine
device=${DEVICE:-cuda}  # DEVICE=cpu ARCH=tiny: a dry run of the kit on a machine without a GPU
if [ "$device" = cpu ]; then  # as a GPU's default (a CPU's is on), so the dry run takes the GPU's paths
    export TTS_BATCH_INVARIANT=${TTS_BATCH_INVARIANT:-false}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
ckpt=$(engine_python -c "
from pathlib import Path
from tts_service.dev.tiny_checkpoint import ensure_tiny_checkpoint
print(ensure_tiny_checkpoint(Path('/tmp/ckpt'), arch='$arch'))" | tail -1)
echo "checkpoint: $ckpt"
common=(--model "$ckpt" --device "$device" --frames 250 --streams 1 8 32 --stagger-ms 20)

# Each part takes a time limit in seconds (0: none), so that `quick` can cut it off and go on.
faster_bench() {
    install /tmp/faster faster
    timeout --kill-after=10 "$1" env PYTHONPATH=/tmp/faster python3 scripts/bench_faster_qwen3_tts.py \
        --model "$ckpt" --frames 250 --json "$out/faster-$arch.json"
}
engine_bench() {
    timeout --kill-after=10 "$1" "${in_engine_env[@]}" python3 scripts/bench_engine.py "${common[@]}" \
        --plain-frames 40 --no-eager --first-frames 4 quick 1 --kernel-forms --json "$out/engine-$arch.json"
}
sampled_bench() {
    timeout --kill-after=10 "$1" "${in_engine_env[@]}" python3 scripts/bench_engine.py "${common[@]}" \
        --plain-frames 40 --no-eager --sampling --json "$out/sampled-$arch.json"
}
stateful_bench() {
    timeout --kill-after=10 "$1" env TTS_STREAM_DECODER=stateful "${in_engine_env[@]}" python3 scripts/bench_engine.py \
        "${common[@]}" --no-plain --no-eager --json "$out/stateful-$arch.json"
}
compiled_bench() {
    timeout --kill-after=10 "$1" "${in_engine_env[@]}" python3 scripts/bench_engine.py "${common[@]}" \
        --no-plain --no-eager --compile-step --json "$out/compiled-$arch.json"
}
equality() { timeout --kill-after=10 "$1" "${in_engine_env[@]}" python3 scripts/check_gpu_equality.py --device "$device"; }
joins() {
    timeout --kill-after=10 "$1" "${in_engine_env[@]}" python3 scripts/join_soak.py --model "$ckpt" --device "$device" \
        --joins 1000
}
seeds() {  # without batch invariance (the GPU's default), then with it; $1 seconds for both
    local deadline=$((SECONDS + $1))
    timeout --kill-after=10 "$1" "${in_engine_env[@]}" python3 scripts/check_seed_replay.py --model "$ckpt" \
        --device "$device" --batch-invariant false --json "$out/seeds-$arch.json" || true
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 30 ]; then
        echo "== seeds with batch invariance: skipped, $left s left"
        return 124
    fi
    timeout --kill-after=10 "$left" "${in_engine_env[@]}" python3 scripts/check_seed_replay.py --model "$ckpt" \
        --device "$device" --batch-invariant true --json "$out/seeds-invariant-$arch.json"
}
http_bench() {  # `bentoml serve` on this machine, then first bytes over HTTP at 1 and 8 streams; $1 s in all (0: 600)
    install /tmp/http http
    local budget=$1 port=38200 pid status=0
    [ "$budget" -gt 0 ] || budget=600
    local deadline=$((SECONDS + budget)) served=/tmp/http-serve.log  # not in $out: a call brings back 8 files
    env "PYTHONPATH=/tmp/engine:/tmp/http:$PWD/src" TTS_MODEL="$ckpt" TTS_DEVICE="$device" TTS_GREEDY=true \
        BENTOML_HOME=/tmp/bentoml-home BENTOML_DO_NOT_TRACK=True python3 -m bentoml serve --port "$port" >"$served" 2>&1 &
    pid=$!
    until engine_python -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:$port/readyz').status_code != 200)" \
        2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
            echo "== http: the server is not ready after $((budget - deadline + SECONDS)) s; its log's end:"
            tail -n 30 "$served"
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" || true
            return 1
        fi
        sleep 2
    done
    echo "== http: ready after $((budget - deadline + SECONDS)) s"
    grep -E "captured|step engine|quick start|loaded|Triton" "$served" | cut -c1-300 || true
    timeout --kill-after=10 "$((deadline - SECONDS))" "${in_engine_env[@]}" python3 scripts/bench.py stream \
        --url "http://127.0.0.1:$port" --concurrency 1 8 --repeat 5 || status=$?
    # the server's view: the warm-up and the five lone streams, then the last of the eight-stream rounds
    grep -E "\(stream.*first audio after" "$served" | sed -n '1,6p' | cut -c1-300 || true
    grep -E "\(stream.*first audio after" "$served" | tail -n 4 | cut -c1-300 || true
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" || true
    return "$status"
}
invariant_bench() {  # what TTS_BATCH_INVARIANT=true costs (compare with engine_bench's figures)
    timeout --kill-after=10 "$1" env TTS_BATCH_INVARIANT=true "${in_engine_env[@]}" python3 scripts/bench_engine.py \
        "${common[@]}" --no-plain --no-eager --json "$out/invariant-$arch.json"
}

case $stage in
quick)
    deadline=$((SECONDS + ${BUDGET_S:-420}))
    for part in engine_bench faster_bench http_bench joins seeds invariant_bench; do
        left=$((deadline - SECONDS))
        if [ "$left" -lt 30 ]; then
            echo "== $part: skipped, $left s of the budget left"
            continue
        fi
        echo "== $part (at most $left s)"
        "$part" "$left" || echo "== $part ended with status $? (124: out of time)"  # the next part still runs
    done 2>&1 | tee "$out/quick-$arch.log"
    ;;
faster) faster_bench 0 2>&1 | tee "$out/faster-$arch.log" ;;
engine) engine_bench 0 2>&1 | tee "$out/engine-$arch.log" ;;
http) http_bench 0 2>&1 | tee "$out/http-$arch.log" ;;
compiled) compiled_bench 0 2>&1 | tee "$out/compiled-$arch.log" ;;
sampled) sampled_bench 0 2>&1 | tee "$out/sampled-$arch.log" ;;
stateful) stateful_bench 0 2>&1 | tee "$out/stateful-$arch.log" ;;
invariance)
    seeds 600 2>&1 | tee "$out/seeds-$arch.log"
    invariant_bench 0 2>&1 | tee "$out/invariant-$arch.log"
    ;;
equality)
    equality 0 2>&1 | tee "$out/equality.log"
    joins 0 2>&1 | tee "$out/joins-$arch.log"
    seeds 600 2>&1 | tee "$out/seeds-$arch.log"
    ;;
*)
    echo "unknown stage: $stage" >&2
    exit 2
    ;;
esac
