#!/usr/bin/env bash
# End-to-end check of the deployment, to run on the DGX Spark from the repository root:
#   prerequisites -> build the Bento and its arm64 image -> docker compose up -> wait for readiness
#   -> synthesize with every speaker from the host and validate each WAV -> UI answers -> PASS/FAIL table
#   -> docker compose down (KEEP_RUNNING=1 leaves it up).
# On a machine without a Docker engine it stops at that step with one clear message and exit status 2.
#
# Environment: TTS_URL (default http://localhost:8000), UI_URL (http://localhost:8501),
# READY_TIMEOUT_S (1800: first start downloads the weights), SKIP_BUILD=1 (use existing images),
# PLATFORM (linux/arm64), BENTOML (bentoml CLI; default .venv/bin/bentoml, else bentoml on PATH).
set -uo pipefail
cd "$(dirname "$0")/.."

TTS_URL=${TTS_URL:-http://localhost:8000}
UI_URL=${UI_URL:-http://localhost:8501}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-1800}
PLATFORM=${PLATFORM:-linux/arm64}
IMAGE=${TTS_IMAGE:-qwen3-tts:latest}
WORK_DIR=$(mktemp -d)
RESULTS=()
STARTED=0

record() { RESULTS+=("$1|$2|$3"); printf '[%s] %s: %s\n' "$2" "$1" "$3"; }

table() {
    printf '\n%-34s %-5s %s\n' "CHECK" "RESULT" "DETAIL"
    printf '%-34s %-5s %s\n' "-----" "------" "------"
    local row name status detail
    for row in "${RESULTS[@]}"; do
        IFS='|' read -r name status detail <<<"$row"
        printf '%-34s %-5s %s\n' "$name" "$status" "$detail"
    done
}

cleanup() {
    if [ "$STARTED" = 1 ] && [ "${KEEP_RUNNING:-0}" != 1 ]; then
        echo "Stopping the deployment (KEEP_RUNNING=1 leaves it up)..."
        "${COMPOSE[@]}" down >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK_DIR"
}
trap cleanup EXIT

stop_here() {  # a prerequisite is missing: say which and what to do, then stop
    record "$1" FAIL "$2"
    table
    echo
    echo "STOPPED: $2"
    exit 2
}

finish() {
    table
    local row failed=0
    for row in "${RESULTS[@]}"; do [[ "$row" == *"|FAIL|"* ]] && failed=1; done
    echo
    if [ "$failed" = 0 ]; then echo "PASS: the deployment works end to end."; exit 0; fi
    echo "FAIL: see the table above (logs: ${COMPOSE[*]} logs tts)."
    exit 1
}

# --- 1. prerequisites -------------------------------------------------------------------------------
command -v curl >/dev/null || stop_here "curl" "curl is not installed (apt-get install curl)."
command -v python3 >/dev/null || stop_here "python3" "python3 is needed to validate the WAV files."
command -v docker >/dev/null || stop_here "docker CLI" "Docker is not installed: https://docs.docker.com/engine/install/"
record "docker CLI" PASS "$(docker --version 2>/dev/null)"
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    stop_here "docker compose" "The Docker Compose plugin is not installed (apt-get install docker-compose-plugin)."
fi
if ! "${COMPOSE[@]}" config -q >/dev/null 2>"$WORK_DIR/compose.err"; then
    stop_here "compose file" "docker-compose.yml is invalid: $(head -c 300 "$WORK_DIR/compose.err")"
fi
record "compose file" PASS "docker-compose.yml is valid (${COMPOSE[*]})"
if ! docker info >/dev/null 2>"$WORK_DIR/docker.err"; then
    stop_here "docker engine" "The Docker engine is not reachable ($(grep -m1 -i 'cannot connect\|permission denied\|error' "$WORK_DIR/docker.err" | head -c 200 || true)). Start it (sudo systemctl start docker) or add this user to the docker group; this step and the ones after it need a Docker engine."
fi
record "docker engine" PASS "server $(docker info --format '{{.ServerVersion}}' 2>/dev/null)"
if ! docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia; then
    stop_here "NVIDIA container toolkit" "Docker has no 'nvidia' runtime: install nvidia-container-toolkit and run 'sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker'."
fi
record "NVIDIA container toolkit" PASS "nvidia runtime registered"
if ! GPU=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1) || [ -z "$GPU" ]; then
    stop_here "GPU visible" "nvidia-smi does not list a GPU on the host."
fi
record "GPU visible" PASS "$GPU"

# --- 2. build ---------------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    BENTOML=${BENTOML:-$( [ -x .venv/bin/bentoml ] && echo .venv/bin/bentoml || command -v bentoml )}
    [ -n "$BENTOML" ] || stop_here "bentoml CLI" "bentoml is not installed: run the README's set-up command first."
    if "$BENTOML" build . >"$WORK_DIR/build.log" 2>&1 \
        && "$BENTOML" containerize qwen3-tts:latest --platform "$PLATFORM" -t "$IMAGE" >>"$WORK_DIR/build.log" 2>&1; then
        record "build TTS image" PASS "$IMAGE ($PLATFORM)"
    else
        tail -20 "$WORK_DIR/build.log"
        record "build TTS image" FAIL "bentoml build/containerize failed (log above)"
        finish
    fi
    if "${COMPOSE[@]}" build ui >"$WORK_DIR/ui-build.log" 2>&1; then
        record "build UI image" PASS "ui/Dockerfile"
    else
        tail -20 "$WORK_DIR/ui-build.log"
        record "build UI image" FAIL "docker compose build ui failed (log above)"
        finish
    fi
fi

# --- 3. start and wait ------------------------------------------------------------------------------
if ! "${COMPOSE[@]}" up -d >"$WORK_DIR/up.log" 2>&1; then
    tail -20 "$WORK_DIR/up.log"
    record "start" FAIL "docker compose up failed (log above)"
    finish
fi
STARTED=1
record "start" PASS "docker compose up -d"
started_at=$(date +%s)
until curl -fsS --max-time 5 "$TTS_URL/readyz" >/dev/null 2>&1; do
    if [ $(( $(date +%s) - started_at )) -ge "$READY_TIMEOUT_S" ]; then
        "${COMPOSE[@]}" logs --tail 40 tts
        record "ready" FAIL "not ready after ${READY_TIMEOUT_S} s (logs above)"
        finish
    fi
    sleep 10
done
record "ready" PASS "$TTS_URL/readyz after $(( $(date +%s) - started_at )) s"

# --- 4. every speaker from the host -----------------------------------------------------------------
if ! SPEAKERS=$(curl -fsS --max-time 30 "$TTS_URL/v1/tts/speakers" \
    | python3 -c 'import json, sys; print(" ".join(json.load(sys.stdin)["speakers"]))'); then
    record "list speakers" FAIL "GET /v1/tts/speakers failed"
    finish
fi
record "list speakers" PASS "$(wc -w <<<"$SPEAKERS") speakers"
for speaker in $SPEAKERS; do
    out="$WORK_DIR/$speaker.wav"
    started=$(date +%s.%N)
    code=$(curl -sS --max-time 300 -o "$out" -w '%{http_code}' -X POST "$TTS_URL/v1/tts/synthesize" \
        -H 'Content-Type: application/json' \
        -d "{\"text\": \"Hello, this is $speaker speaking from the DGX Spark.\", \"speaker\": \"$speaker\"}")
    took=$(python3 -c "import time; print(f'{time.time() - $started:.2f}')")
    if [ "$code" != 200 ]; then
        record "synthesize $speaker" FAIL "HTTP $code: $(head -c 200 "$out")"
        continue
    fi
    if detail=$(python3 - "$out" <<'PY'
import sys, wave
with wave.open(sys.argv[1]) as wav:
    rate, channels, width, frames = wav.getframerate(), wav.getnchannels(), wav.getsampwidth(), wav.getnframes()
seconds = frames / rate
problems = [p for p, bad in [("rate", rate != 24000), ("channels", channels != 1), ("16-bit", width != 2),
                             ("duration", not 0.5 <= seconds <= 30)] if bad]
print(f"{rate} Hz, {channels} ch, {8 * width}-bit, {seconds:.2f} s" + (f" (bad: {', '.join(problems)})" if problems else ""))
sys.exit(1 if problems else 0)
PY
    ); then
        record "synthesize $speaker" PASS "$detail in $took s"
    else
        record "synthesize $speaker" FAIL "${detail:-not a WAV file}"
    fi
done

# --- 5. the UI --------------------------------------------------------------------------------------
ui_ok=0
for _ in $(seq 1 30); do
    if curl -fsS --max-time 5 "$UI_URL/_stcore/health" >/dev/null 2>&1; then ui_ok=1; break; fi
    sleep 2
done
if [ "$ui_ok" = 1 ]; then record "UI" PASS "$UI_URL answers"; else record "UI" FAIL "$UI_URL/_stcore/health does not answer"; fi

finish
