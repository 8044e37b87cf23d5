#!/usr/bin/env bash
# Fetch Docker Compose v2 (Debian trixie's docker-compose 2.x: the `docker compose` CLI plugin, a static
# binary) into a folder, without touching this machine's apt sources, and print its path. Bookworm, this
# machine's release, packages only Compose v1 (1.29); the Spark runs v2.
#
#   scripts/compose_v2.sh [DIR]        # then: TTS_COMPOSE_V2=$(scripts/compose_v2.sh) pytest tests/test_deployment.py
set -euo pipefail

DIR=${1:-/tmp/compose-v2}
PLUGIN=$DIR/root/usr/libexec/docker/cli-plugins/docker-compose
if [ ! -x "$PLUGIN" ]; then
    mkdir -p "$DIR/parts" "$DIR/lists/partial" "$DIR/cache/archives/partial"
    cat >"$DIR/parts/trixie.sources" <<SOURCES
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    APT=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$DIR/parts" -o "Dir::State::Lists=$DIR/lists"
        -o "Dir::Cache=$DIR/cache" -o APT::Sandbox::User=root)
    apt-get "${APT[@]}" update >"$DIR/apt.log" 2>&1
    (cd "$DIR" && apt-get "${APT[@]}" download docker-compose >>"$DIR/apt.log" 2>&1)
    dpkg -x "$DIR"/docker-compose_2*.deb "$DIR/root"
fi
"$PLUGIN" version >&2
echo "$PLUGIN"
