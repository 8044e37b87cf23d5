#!/usr/bin/env bash
# Download, here, the wheels that issue15.sh installs on a lent GPU machine (whose image has torch 2.11,
# transformers 5.17 and huggingface-hub 1.x, but not this project's pins). Three sets, in the git-ignored
# .whl/ that the device tool carries (about 35 MB in all; its limit is 64 MiB with the working tree):
#   .whl/common   both environments: audio I/O, librosa, pydantic
#   .whl/engine   this project's engine: qwen-tts 0.1.1 and transformers 4.57.3 with their pins
#   .whl/http     bentoml and fastapi, and what the image lacks of their needs (`bentoml serve` on the GPU)
#   .whl/faster   faster-qwen3-tts 0.5.4: qwen-tts-hf and transformers 5.15.1 (5.17 cannot load a
#                 Qwen3-TTS speech tokenizer: its MimiConfig has no rope_theta)
# Versions of the engine's set are this checkout's venv's, so the GPU runs what the tests ran.
#   scripts/gpu/fetch_wheels.sh [PYTHON_VERSION]      (default 3.12, the GPU image's Python)
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${1:-3.12}
venv_pip=.venv/bin/pip
pinned() {  # NAME==VERSION as installed in .venv, for each name given
    local freeze
    freeze=$($venv_pip freeze 2>/dev/null)
    for name in "$@"; do
        local line
        line=$(grep -i "^${name//-/[-_]}==" <<<"$freeze") || { echo "not in .venv: $name" >&2; exit 1; }
        echo "$line"
    done
}
download() {  # DIR REQUIREMENT...
    local dir=$1
    shift
    mkdir -p "$dir"
    "$venv_pip" download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "$@"
}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.whl/' >>.git/info/exclude; }
rm -rf .whl
# sox: qwen-tts imports it (for its 25 Hz tokenizer only); 1.5.0 ships no wheel, 1.4.1 does.
download .whl/common sox==1.4.1 $(pinned soundfile cffi pycparser librosa soxr audioread pooch platformdirs decorator \
    pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection)
download .whl/engine $(pinned qwen-tts transformers tokenizers huggingface-hub accelerate)
# bentoml serve over HTTP (the `http` stage): bentoml and fastapi with what the GPU image lacks of their needs.
download .whl/http $(pinned bentoml fastapi starlette uvicorn a2wsgi aiohttp-asgi-connector aiosqlite asgiref cattrs \
    click-option-group httpx-ws kantoku opentelemetry-api opentelemetry-instrumentation \
    opentelemetry-instrumentation-aiohttp-client opentelemetry-instrumentation-asgi opentelemetry-sdk \
    opentelemetry-semantic-conventions opentelemetry-util-http pip-requirements-parser python-json-logger \
    python-multipart pyzmq rich-toolkit schema simple-di tomli-w tornado tzdata watchfiles wsproto)
download .whl/faster faster-qwen3-tts==0.5.4 qwen-tts-hf==0.1.1.post1 transformers==5.15.1 tokenizers==0.22.1
du -sh .whl .whl/*
