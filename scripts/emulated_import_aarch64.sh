#!/usr/bin/env bash
# Import the Bento's Python stack as the Spark would run it (aarch64, Python 3.11, the pinned wheels),
# under QEMU user-mode emulation, on an x86_64 machine with no binfmt_misc and no container engine.
#
#   sudo scripts/emulated_import_aarch64.sh [WORK_DIR]      (root: apt-get and debootstrap)
#
# 1. Debian bookworm's arm64 Python 3.11: `debootstrap --foreign` downloads and unpacks the packages
#    without running any arm64 binary, then every downloaded .deb is unpacked with dpkg -x;
# 2. the Bento's pinned packages for aarch64-manylinux_2_28 (scripts/resolve_aarch64.py's list), with
#    `uv pip install --target`, wheels only;
# 3. `qemu-aarch64-static -L ROOT python3.11` imports them one by one and prints torch's CUDA arch list.
#    Each import is its own process, so one crash does not hide the others;
# 4. the step engine synthesizes two lines on the tiny checkpoint, on the emulated CPU, and its codes are
#    compared with qwen-tts's own generate (scripts/emulated_synthesis_check.py).
#
# The emulated CPU is a Neoverse N1 with an ARM cpuinfo and MIDR under ROOT (scripts/emulated_cpu.sh says
# why: with the host's x86 ones onnxruntime, and so qwen_tts, crashed on import).
set -euo pipefail

WORK=${1:-/tmp/aarch64-import}
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$WORK/root SITE=$WORK/site UVENV=$WORK/uv
mkdir -p "$WORK"

command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null ||
    apt-get install -y qemu-user-static debootstrap >/dev/null
if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
    debootstrap --foreign --arch=arm64 --variant=minbase --include=python3.11 bookworm "$ROOT" \
        http://deb.debian.org/debian >"$WORK/debootstrap.log"
    for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg -x "$deb" "$ROOT"; done
fi
if [ ! -x "$UVENV/bin/uv" ]; then
    python3 -m venv "$UVENV" && "$UVENV/bin/pip" install -q uv pyyaml
fi
"$REPO/scripts/emulated_cpu.sh" "$ROOT"  # an ARM cpuinfo and MIDR in place of the host's (see there)
"$UVENV/bin/python" -c "import sys; sys.path.insert(0, '$REPO/scripts'); import resolve_aarch64 as r; print('\n'.join(r.requirements()))" \
    >"$WORK/requirements.txt"
"$UVENV/bin/uv" pip install -q --python-platform aarch64-manylinux_2_28 --python-version 3.11 --no-build \
    --target "$SITE" -r "$WORK/requirements.txt"

emulated() {
    qemu-aarch64-static -cpu neoverse-n1 -L "$ROOT" -E PYTHONPATH="$SITE:$REPO/src" -E HOME="$WORK/home" "$ROOT/usr/bin/python3.11" "$@"
}
run() {
    emulated -c "$1" 2>&1 | tail -1
}
echo "python: $(run 'import platform; print(platform.machine(), platform.python_version())')"
echo "torch:  $(run 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, "archs", " ".join(torch._C._cuda_getArchFlags().split()))')"
for module in torchaudio transformers accelerate bentoml fastapi av soundfile numba librosa onnxruntime qwen_tts; do
    printf '%-13s %s\n' "$module" "$(run "import $module; print('imported', getattr($module, '__version__', ''))")"
done

# The tiny checkpoint is built natively (its files are the same on any machine), then used on aarch64.
TINY=$(python3 -c "import sys; sys.path.insert(0, '$REPO/src'); from tts_service.dev.tiny_checkpoint import ensure_tiny_checkpoint as e; print(e('$WORK/cache'))" 2>/dev/null ||
    "$REPO/.venv/bin/python" -c "from tts_service.dev.tiny_checkpoint import ensure_tiny_checkpoint as e; print(e('$WORK/cache'))")
echo "synthesis on the emulated CPU (tiny checkpoint, greedy; minutes):"
started=$SECONDS
status=0
emulated "$REPO/scripts/emulated_synthesis_check.py" "$TINY" "$WORK/out" >"$WORK/synthesis.log" 2>&1 || status=$?
grep -E '^(aarch64|request|[A-Za-z]*Error|qemu)' "$WORK/synthesis.log" | sed 's/^/  /' || true
echo "  exit status $status, $((SECONDS - started)) s (full log: $WORK/synthesis.log)"
exit "$status"
