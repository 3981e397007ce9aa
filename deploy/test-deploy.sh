#!/usr/bin/env bash
# `make test-deploy`: build the image and run deploy/docker-compose.yml with real containers.
#
# Offline from Docker Hub: the base image is built here (debootstrap of Debian bookworm, whose
# python3 is 3.11, from Debian's mirror, then `docker import`) and passed as BASE_IMAGE; users
# keep the Dockerfile's python:3.11 default. Its own dockerd (private data root and socket, no
# bridge: every container uses the host's network) unless DOCKER_HOST already answers.
#
# Substituted for a test machine (the rest is the compose file's): PostgreSQL and vLLM are not
# started by compose (Docker Hub images): PostgreSQL runs from Debian's binaries on a loopback port,
# the gateway uses its transformers backend; with host networking the services' host names become
# 127.0.0.1 and each listens on a free loopback port; Slack is the local Slack double; the models
# volume gets the tiny test model (models/tiny-llama) under the compose file's folder name.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${DOCKER_WORK_DIR:-/var/tmp/flywheel-docker}
BASE=${BASE_IMAGE:-flywheel-base:bookworm}
IMAGE=flywheel:0.1.0
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$WORK"
t0=$(date +%s)
step() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

# 1. A Docker daemon.
if ! docker info >/dev/null 2>&1; then
  export DOCKER_HOST="unix://$WORK/docker.sock"
  if ! docker info >/dev/null 2>&1; then
    step "starting dockerd (data in $WORK/data, log $WORK/dockerd.log)"
    dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
      -H "$DOCKER_HOST" --bridge=none --iptables=false >"$WORK/dockerd.log" 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start; see $WORK/dockerd.log" >&2; exit 1; }
  fi
fi

# 2. The base image, built offline from Debian's packages.
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  if [ ! -x "$WORK/rootfs/usr/bin/python3" ]; then
    step "debootstrap bookworm (python3, pip) from $MIRROR"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-pip,python-is-python3,ca-certificates \
      bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
      || { echo "debootstrap failed; see $WORK/debootstrap.log" >&2; exit 1; }
  fi
  # This machine's CA bundle: where HTTPS goes through an intercepting proxy, pip in the build
  # must trust it as the host does.
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
  step "docker import $BASE"
  tar -C "$WORK/rootfs" -c . | docker import --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' --change 'CMD ["python3"]' - "$BASE" >/dev/null
fi

# 3. The image. torch: the CPU wheel from a local wheel folder when there is one (PyPI's
# torch==2.13.0 is the multi-GB CUDA build), served on loopback for the build.
TORCH_SPEC=${TORCH_SPEC:-}
SERVER_PID=
if [ -z "$TORCH_SPEC" ]; then
  wheel=$(ls "${WHEELS_DIR:-/opt/wheels}"/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
  if [ -n "$wheel" ]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m http.server --bind 127.0.0.1 --directory "$(dirname "$wheel")" "$port" >/dev/null 2>&1 &
    SERVER_PID=$!
    TORCH_SPEC="torch @ http://127.0.0.1:$port/$(basename "$wheel" | sed 's/+/%2B/')"
  else
    TORCH_SPEC="torch==2.13.0"
  fi
fi
cleanup() { [ -z "$SERVER_PID" ] || kill "$SERVER_PID" 2>/dev/null || true; }
trap cleanup EXIT
step "docker build $IMAGE on $BASE ($TORCH_SPEC)"
docker build --network host --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_SPEC="$TORCH_SPEC" \
  -f "$ROOT/deploy/Dockerfile" -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log" >&2; echo "docker build failed; see $WORK/build.log" >&2; exit 1; }
step "image built: $(docker image inspect "$IMAGE" --format '{{.Size}}') bytes"

# 4. The compose file's services, in containers (tests/test_deploy_run.py drives the same
# services as processes through the whole loop; here: they start from the image and answer).
step "running the compose services in containers"
(cd "$ROOT" && .venv/bin/python -m tests.support.compose_containers --image "$IMAGE" --work "$WORK")
step "done"
