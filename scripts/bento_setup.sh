#!/bin/sh
# Runs as root while the image is built: make the volume mount points, owned by the user BentoML runs as,
# so that empty named volumes mounted there are writable (Docker copies ownership into a new volume).
set -eu
mkdir -p /data/hf-cache /data/tts-cache /data/voices
chown -R bentoml:bentoml /data
