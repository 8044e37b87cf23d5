#!/usr/bin/env bash
# Build the Bento's OCI image on this machine with buildah, run it with the tiny model on the CPU, and
# check it as the Spark's compose file would: the health check turns healthy, /v1/tts/synthesize answers a
# WAV, the process runs as the non-root bentoml user with writable volumes, the decoder process runs, it
# stops within 10 s of SIGTERM, and a restart reuses the built tiny checkpoint and the start-up checks'
# verdicts. Prints a PASS/FAIL table.
#
#   sudo scripts/verify_image_local.sh            # as root: buildah with --isolation chroot and vfs
#   sudo ARCH=arm64 scripts/verify_image_local.sh # the Spark's arm64 image, built and run under emulation
#   sudo COMPILE_STEP=true scripts/verify_image_local.sh  # the service compiles its frame step in the image
#
# ARCH=arm64 on an x86_64 machine runs every arm64 binary (the build's RUN steps, the service) through
# qemu-aarch64-static, registered with binfmt_misc here if it is not already; the arm64 images live in
# their own buildah store, so both base images keep the name the Dockerfile expects. Emulation is slow
# (expect an hour); the figures then say what works on arm64, not how fast the Spark is.
#
# No Docker daemon and no image registry are needed: the base image the generated Dockerfile names
# (python:3.11-slim) is made here from Debian bookworm's packages (whose Python is 3.11) and stored under
# that name, so the recipe for the Spark stays unchanged. vfs copies whole layers: mind the disk (about
# 25 GB while it builds; `KEEP_IMAGE=1` keeps the image, else it is removed at the end).
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PORT="${PORT:-8000}"
case "$HOSTTYPE" in x86_64) HOST_ARCH=amd64 ;; aarch64) HOST_ARCH=arm64 ;; *) HOST_ARCH=$HOSTTYPE ;; esac
ARCH="${ARCH:-$HOST_ARCH}"
IMAGE="${IMAGE:-localhost/qwen3-tts:local-$ARCH}"
BASE="docker.io/library/python:3.11-slim"
WORK="${WORK:-/var/tmp/tts-image-check}"
BUILDAH=(buildah --storage-driver vfs)
LIMIT=600  # seconds to healthy
RUN_EMULATION=()
if [[ $ARCH != "$HOST_ARCH" ]]; then
  [[ $ARCH == arm64 ]] || { echo "ARCH is $HOST_ARCH (native) or arm64 (emulated)"; exit 2; }
  if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
    command -v qemu-aarch64-static >/dev/null || apt-get install -y qemu-user-static >/dev/null
    [[ -e /proc/sys/fs/binfmt_misc/register ]] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    # The kernel runs aarch64 ELF files through qemu; F: the interpreter is opened now, so it works in chroots.
    printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' \
      >/proc/sys/fs/binfmt_misc/register || { echo "cannot register qemu-aarch64 with binfmt_misc"; exit 2; }
  fi
  BUILDAH+=(--root "$WORK/storage-$ARCH" --runroot "$WORK/run-$ARCH")
  LIMIT=3600
  # The service runs on an emulated Neoverse N1 with an ARM cpuinfo and MIDR, served by qemu through
  # QEMU_LD_PREFIX (scripts/emulated_cpu.sh says why); the image itself is unchanged.
  EMULATION="$WORK/emulated-cpu"
  "$REPO_ROOT/scripts/emulated_cpu.sh" "$EMULATION"
  RUN_EMULATION=(-v "$EMULATION:/emulated-cpu" -e QEMU_LD_PREFIX=/emulated-cpu -e "QEMU_CPU=${QEMU_CPU:-neoverse-n1}")
fi
export BUILDAH_ISOLATION=chroot STORAGE_DRIVER=vfs BENTOML_DO_NOT_TRACK=True
RESULTS=()

record() { RESULTS+=("$1|$2|$3"); printf '%-28s %-4s %s\n' "$1" "$2" "$3"; }
finish() {
  echo
  printf '| %-28s | %-4s | %s\n' "check" "" "detail"
  for row in "${RESULTS[@]}"; do IFS='|' read -r name status detail <<<"$row"; printf '| %-28s | %-4s | %s\n' "$name" "$status" "$detail"; done
  [[ " ${RESULTS[*]} " != *"|FAIL|"* ]]
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[[ $(id -u) == 0 ]] || { echo "run as root (buildah with chroot isolation and vfs)"; exit 2; }
command -v buildah >/dev/null || { echo "needs buildah (apt-get install buildah)"; exit 2; }
mkdir -p "$WORK"

# 1. The base image, from Debian's packages, under the name the generated Dockerfile expects.
if ! "${BUILDAH[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { echo "needs debootstrap (apt-get install debootstrap)"; exit 2; }
  started=$(now)
  rootfs="$WORK/rootfs"
  rm -rf "$rootfs"
  debootstrap --arch="$ARCH" --variant=minbase --include=python3,python3-venv,python3-pip,python3-dev,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    || { record "base image" FAIL "debootstrap failed: $WORK/debootstrap.log"; finish; exit 1; }
  cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/" 2>/dev/null && rm -f "$rootfs/etc/apt/sources.list"
  cp /etc/apt/apt.conf.d/99artifact-registry "$rootfs/etc/apt/apt.conf.d/" 2>/dev/null || true
  # As in the official image: `python` and `pip` on PATH (and Python's headers, which torch.compile's
  # kernel builds include), and pip may install into the system Python.
  ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
  ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  # This machine reaches PyPI and Debian through a TLS-inspecting proxy: trust its CAs inside, as outside.
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$rootfs" update-ca-certificates >/dev/null 2>&1 || true
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  container=$("${BUILDAH[@]}" from scratch)
  cp -a "$rootfs/." "$("${BUILDAH[@]}" mount "$container")/"
  "${BUILDAH[@]}" config --os linux --arch "$ARCH" --env LANG=C.UTF-8 --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    --cmd python3 "$container"
  "${BUILDAH[@]}" commit -q "$container" "$BASE" >/dev/null
  "${BUILDAH[@]}" rm "$container" >/dev/null
  rm -rf "$rootfs"
  record "base image" PASS "$BASE ($ARCH) from Debian bookworm in $(since "$started") s"
else
  record "base image" PASS "$BASE already here"
fi

# 2. The Bento and its image, from the generated Dockerfile, unchanged.
export BENTOML_HOME="$WORK/bentoml-home"
started=$(now)
cd "$REPO_ROOT"
"$REPO_ROOT/.venv/bin/bentoml" build . >"$WORK/bentoml-build.log" 2>&1
tag=$(sed -n 's/.*Successfully built Bento(tag="\([^"]*\)").*/\1/p' "$WORK/bentoml-build.log")
[[ -n "$tag" ]] || { record "bentoml build" FAIL "no Bento built: $(tail -n 3 "$WORK/bentoml-build.log" | tr '\n' ' ')"; finish; exit 1; }
bento="$BENTOML_HOME/bentos/${tag%%:*}/${tag##*:}"
if "${BUILDAH[@]}" build --isolation chroot --layers=false --platform "linux/$ARCH" -q -t "$IMAGE" -f "$bento/env/docker/Dockerfile" "$bento" \
  >"$WORK/build.log" 2>&1; then
  size=$("${BUILDAH[@]}" images --format '{{.Size}}' "$IMAGE" 2>/dev/null | head -n 1)
  record "image build" PASS "$tag as $IMAGE in $(since "$started") s; image size ${size:-unknown}"
else
  record "image build" FAIL "see $WORK/build.log: $(tail -n 3 "$WORK/build.log" | tr '\n' ' ')"
  finish; exit 1
fi

# 3. Run it as compose would: port 8000 on loopback, volumes for weights and cache, the image's user.
data="$WORK/data"
rm -rf "$data"; mkdir -p "$data/hf-cache" "$data/tts-cache"
chown -R 1034:1034 "$data"  # the image's bentoml user (BENTO_USER_UID)
run_service() {
  local container
  container=$("${BUILDAH[@]}" from -q "$IMAGE")
  "${BUILDAH[@]}" run --isolation chroot --user bentoml \
    "${RUN_EMULATION[@]}" -e TTS_MODEL=tiny -e TTS_DEVICE=cpu -e TTS_HOST=127.0.0.1 -e TTS_PORT="$PORT" \
    -e TTS_COMPILE_STEP="${COMPILE_STEP:-false}" \
    -v "$data/hf-cache:/data/hf-cache" -v "$data/tts-cache:/data/tts-cache" \
    "$container" -- /home/bentoml/bento/env/docker/entrypoint.sh >>"$WORK/serve.log" 2>&1 &
  echo "$! $container"
}
healthy_within() {  # the compose health check, every second
  local started=$1 limit=$2
  until curl -fsS --max-time 5 "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; do
    (( $(date +%s) - ${started%.*} > limit )) && return 1
    sleep 1
  done
}
descendants() {  # every process below $1
  local child
  for child in $(pgrep -P "$1"); do echo "$child"; descendants "$child"; done
}
stop_within() {  # SIGTERM to the container's main process (`bentoml serve`), as `docker stop` sends it to PID 1
  local pid=$1 started procs main
  procs=$(descendants "$pid")
  # Docker's PID 1 is the entrypoint, which execs `bentoml serve`; under buildah run, buildah's own helper
  # processes sit above it and do not forward signals.
  main=$(for p in $procs; do tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q "bin/bentoml serve" && echo "$p"; done | head -n 1)
  started=$(now)
  kill -TERM "${main:-$pid}" 2>/dev/null
  for _ in $(seq 1 100); do
    alive=0
    for p in $procs; do kill -0 "$p" 2>/dev/null && [[ $(cut -d' ' -f3 "/proc/$p/stat" 2>/dev/null) != Z ]] && alive=1; done
    (( alive == 0 )) && { wait "$pid" 2>/dev/null; since "$started"; return 0; }
    sleep 0.1
  done
  kill -KILL $procs 2>/dev/null; wait "$pid" 2>/dev/null
  echo "over 10"; return 1
}

: >"$WORK/serve.log"
started=$(now)
read -r pid container < <(run_service)
if healthy_within "$started" "$LIMIT"; then
  record "healthy" PASS "curl -fsS /readyz after $(since "$started") s"
else
  record "healthy" FAIL "not healthy in $LIMIT s: $(tail -n 5 "$WORK/serve.log" | tr '\n' ' ')"
fi
status=$(curl -s -o "$WORK/hello.wav" -w '%{http_code}' -X POST "http://127.0.0.1:$PORT/v1/tts/synthesize" \
  -H 'Content-Type: application/json' -d '{"text": "Hello from the image.", "speaker": "Ryan"}')
if [[ $status == 200 && $(head -c 4 "$WORK/hello.wav") == RIFF ]]; then
  record "synthesize" PASS "HTTP 200, $(stat -c %s "$WORK/hello.wav") bytes of WAV"
else
  record "synthesize" FAIL "HTTP $status"
fi
machine=$("${BUILDAH[@]}" run --isolation chroot "$container" -- python -c \
  'import platform, torch; print(platform.machine(), "Python", platform.python_version(), "torch", torch.__version__)' 2>/dev/null | tail -n 1)
if [[ $machine == "$([[ $ARCH == arm64 ]] && echo aarch64 || echo x86_64) "* ]]; then
  record "architecture" PASS "$machine"
else
  record "architecture" FAIL "expected $ARCH, the image runs: ${machine:-nothing}"
fi
# the container's own workers (not another bentoml serve on this machine)
worker=$(for p in $(descendants "$pid"); do tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q "_bentoml_impl.worker.service" && echo "$p"; done | head -n 1)
user=$(stat -c %u "/proc/${worker:-none}" 2>/dev/null || echo "?")
owner=$(stat -c %u "$data/tts-cache/tiny-v2" 2>/dev/null || echo "none")
if [[ $owner == 1034 && $user == 1034 ]]; then
  record "non-root, writable volumes" PASS "workers run as uid $user; the tiny checkpoint written to the volume by uid 1034"
else
  record "non-root, writable volumes" FAIL "workers as $user; checkpoint owner $owner"
fi
# on a CPU the speech decoder runs in a child process of the synthesizer worker (TTS_DECODER_WORKER=auto)
decoders=$(for p in $(descendants "$pid"); do tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q "tts_service.decoder_process" && echo "$p"; done)
if [[ $(echo "$decoders" | grep -c .) == 1 && $(stat -c %u "/proc/$decoders" 2>/dev/null) == 1034 ]]; then
  record "decoder process" PASS "one, pid $decoders, uid 1034 (stopped with the rest below)"
else
  record "decoder process" FAIL "expected one decoder process, found: ${decoders:-none}"
fi
stopped=$(stop_within "$pid") && record "stop after SIGTERM" PASS "all processes gone in $stopped s" \
  || record "stop after SIGTERM" FAIL "still running after 10 s"
"${BUILDAH[@]}" rm "$container" >/dev/null

# 4. A restart reuses the checkpoint built on the volume.
before=$(grep -c "built tiny Qwen3-TTS checkpoint" "$WORK/serve.log")
started=$(now)
read -r pid container < <(run_service)
if healthy_within "$started" "$LIMIT" && [[ $(grep -c "built tiny Qwen3-TTS checkpoint" "$WORK/serve.log") == "$before" ]]; then
  record "restart reuses checkpoint" PASS "healthy again after $(since "$started") s, nothing rebuilt"
else
  record "restart reuses checkpoint" FAIL "see $WORK/serve.log"
fi
stop_within "$pid" >/dev/null
"${BUILDAH[@]}" rm "$container" >/dev/null
# The CPU's batch-invariance checks measured at the first start, their verdicts read from the volume after
kept=$(grep -c "kept in /data/tts-cache/start-up-verdicts.json" "$WORK/serve.log")
checked=$(grep -c "batch invariance: .*(checked in" "$WORK/serve.log")
if [[ $kept == 2 && $checked == 2 && $(stat -c %u "$data/tts-cache/start-up-verdicts.json" 2>/dev/null) == 1034 ]]; then
  record "restart reads verdicts" PASS "both start-up checks measured once, then read from the volume"
else
  record "restart reads verdicts" FAIL "$checked measured, $kept read (expected 2 and 2); see $WORK/serve.log"
fi
if [[ ${COMPILE_STEP:-false} == true ]]; then  # the step compiled in the image, then from the volume's cache
  mapfile -t compiles < <(grep -o "compiled the frame step .* in [0-9.]* s" "$WORK/serve.log" | grep -o "[0-9.]* s$")
  if (( ${#compiles[@]} >= 2 )); then
    record "frame step compiled" PASS "in ${compiles[0]} at the first start, ${compiles[-1]} after the restart (cache on the volume)"
  else
    record "frame step compiled" FAIL "${#compiles[@]} compile lines in $WORK/serve.log"
  fi
fi
[[ ${KEEP_IMAGE:-0} == 1 ]] || "${BUILDAH[@]}" rmi "$IMAGE" >/dev/null 2>&1
finish
