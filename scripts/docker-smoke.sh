#!/usr/bin/env bash
# Build the CPU image and check it end to end: `loratui --help`, a tiny model trained, merged and exported
# to GGUF (verified in llama.cpp inside the image), then `loratui serve` on that GGUF until Docker's own
# HEALTHCHECK reports it healthy and a chat completion answers. Prints the image size and the timings.
#
# usage: scripts/docker-smoke.sh [--tag TAG] [--base IMAGE | --local-base] [--no-cache] [--keep]
#   --tag TAG       image to build (default loratui:cpu-smoke)
#   --base IMAGE    base image for Dockerfile.cpu's BASE_IMAGE (default: the Dockerfile's own)
#   --local-base    build the base here instead, for machines that cannot pull from a registry: Debian
#                   bookworm by debootstrap from this machine's apt mirror, with this machine's CA bundle
#                   at /etc/ssl/host-ca.pem for pip (PIP_CERT). Cached as loratui-local/debian:bookworm.
#   --no-cache      build every layer again (the figure for a first build)
#   --keep          keep the smoke volumes (runs, tiny model, cache) for a look afterwards
# Environment: PIP_INDEX_URL, PIP_EXTRA_INDEX_URL and TORCH_INDEX_URL are passed through as build
# arguments when set. PIP_FIND_LINKS naming a local folder of wheels (as on the machines this project is
# built on, which keep a CPU torch wheel there) is served to the build over http on 127.0.0.1.
#
# Needs a running Docker engine. Builds and runs use --network host, so the build reaches that local
# wheel server and engines started with --bridge=none work too.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=loratui:cpu-smoke
base=""
local_base=0
keep=0
no_cache=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    --base) base=${2:?--base needs a value}; shift 2 ;;
    --local-base) local_base=1; shift ;;
    --no-cache) no_cache=(--no-cache); shift ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "docker-smoke: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf '\n== %s\n' "$*" >&2; }
fail() { printf 'docker-smoke: FAILED: %s\n' "$*" >&2; exit 1; }
now() { date +%s; }

docker info >/dev/null 2>&1 || fail "no Docker engine answers. Start one (as root): dockerd --iptables=false --bridge=none &"

build_args=(--build-arg "LORATUI_VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)")

# ---- base image ---------------------------------------------------------------------------------------
if [ "$local_base" = 1 ]; then
  base=loratui-local/debian:bookworm
  if ! docker image inspect "$base" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || fail "--local-base needs debootstrap (apt-get install -y debootstrap)"
    mirror=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
             | grep -oE 'https?://[^ ]+' | head -n1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "building $base with debootstrap from $mirror"
    rootfs=$(mktemp -d /var/tmp/loratui-rootfs.XXXX)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/tmp/loratui-debootstrap.log 2>&1 \
      || fail "debootstrap failed, see /tmp/loratui-debootstrap.log"
    ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
    [ -f "$ca" ] && mkdir -p "$rootfs/etc/ssl" && cp "$ca" "$rootfs/etc/ssl/host-ca.pem"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$base" >/dev/null
    rm -rf "$rootfs"; trap - EXIT
  fi
  docker run --rm --network host "$base" test -f /etc/ssl/host-ca.pem \
    && build_args+=(--build-arg PIP_CERT=/etc/ssl/host-ca.pem)
fi
[ -n "$base" ] && build_args+=(--build-arg "BASE_IMAGE=$base")

# ---- package indexes ----------------------------------------------------------------------------------
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
  [ -n "${!var:-}" ] && build_args+=(--build-arg "$var=${!var}")
done
server_pid=""
volumes=(loratui-smoke-runs loratui-smoke-data loratui-smoke-cache)
forget() { docker rm -f loratui-smoke-serve >/dev/null 2>&1 || true; docker volume rm -f "${volumes[@]}" >/dev/null 2>&1 || true; }
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  if [ "$keep" = 1 ]; then docker rm -f loratui-smoke-serve >/dev/null 2>&1 || true; else forget; fi
}
trap cleanup EXIT
links=${PIP_FIND_LINKS:-}
if [ -n "$links" ] && [ -d "$links" ]; then
  # A fixed port: build arguments are part of Docker's cache key, so a new port would rebuild every layer.
  port=${LORATUI_SMOKE_WHEELS_PORT:-46991}
  python3 -m http.server --bind 127.0.0.1 --directory "$links" "$port" >/dev/null 2>&1 &
  server_pid=$!
  sleep 1
  kill -0 "$server_pid" 2>/dev/null || fail "cannot serve $links on 127.0.0.1:$port (busy? set LORATUI_SMOKE_WHEELS_PORT)"
  build_args+=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/")
  say "serving the wheels in $links to the build at http://127.0.0.1:$port/"
fi
if [ -n "${TORCH_INDEX_URL+set}" ]; then
  build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
elif ! python3 -c 'import urllib.request as u; u.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=10)' 2>/dev/null; then
  # The PyTorch CPU index is out of reach: take torch from PyPI and the local wheels. The Dockerfile
  # refuses a CUDA build, so this cannot silently pull several GB of CUDA libraries into the CPU image.
  build_args+=(--build-arg "TORCH_INDEX_URL=")
  say "download.pytorch.org is out of reach: torch comes from the package index and local wheels"
fi

# ---- build --------------------------------------------------------------------------------------------
say "docker build -f Dockerfile.cpu -t $tag ${build_args[*]} ."
t0=$(now)
docker build --network host ${no_cache[@]+"${no_cache[@]}"} -f Dockerfile.cpu -t "$tag" "${build_args[@]}" . || fail "docker build"
build_s=$(( $(now) - t0 ))
size=$(docker image inspect -f '{{.Size}}' "$tag")

# ---- checks inside the image ---------------------------------------------------------------------------
# the image's three volumes, named so that one step's output is there for the next
mounts=(-v loratui-smoke-runs:/work/runs -v loratui-smoke-data:/data -v loratui-smoke-cache:/cache)
run() { docker run --rm --network host "${mounts[@]}" -v "$PWD/tests:/smoke/tests:ro" "$@"; }
forget  # volumes a --keep run left would turn this run's training into a resume

say "1/3 loratui --help"
help=$(run "$tag" --help) || fail "loratui --help"
printf '%s\n' "$help" | head -n 3
run --entrypoint python "$tag" -c "from llama_cpp import llama_cpp as l; l.llama_backend_init(); \
print('llama.cpp in the image:', l.llama_print_system_info().decode())" || fail "llama.cpp does not load"

say "2/3 tiny model: train, merge, export to GGUF (verified in llama.cpp inside the image)"
t0=$(now)
run --entrypoint python -e PYTHONPATH=/smoke "$tag" -c \
  "from pathlib import Path; from tests.tiny_models import make_tiny_model; make_tiny_model(Path('/data/tiny'), tokenizer='smollm2')" \
  || fail "building the tiny model"
args=(runs_dir=/work/runs name=smoke model.base=/data/tiny data.source=quickstart train.max_steps=3 train.batch_size=8
      train.grad_accum=1 export.verify_samples=4 eval.max_new_tokens=8)
run "$tag" train "${args[@]}" || fail "loratui train"
run "$tag" export --format gguf --quant q8_0 "${args[@]}" || fail "loratui export --format gguf"
gguf=$(run --entrypoint sh "$tag" -c 'ls /work/runs/smoke/exports/gguf/*q8_0*.gguf' | head -n1 || true)
[ -n "$gguf" ] || fail "no q8_0 GGUF in /work/runs/smoke/exports/gguf"
export_s=$(( $(now) - t0 ))

say "3/3 loratui serve $gguf, until Docker's HEALTHCHECK says healthy"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
docker run -d --name loratui-smoke-serve --network host "${mounts[@]}" --health-interval 2s \
  "$tag" serve "$gguf" --port "$port" --model-name smoke >/dev/null || fail "docker run serve"
t0=$(now); health=starting
while [ "$health" != healthy ]; do
  health=$(docker inspect -f '{{.State.Health.Status}}' loratui-smoke-serve 2>/dev/null || echo gone)
  [ "$(docker inspect -f '{{.State.Running}}' loratui-smoke-serve)" = true ] \
    || { docker logs loratui-smoke-serve >&2; fail "the server exited"; }
  [ $(( $(now) - t0 )) -lt 180 ] || { docker logs loratui-smoke-serve >&2; fail "not healthy after 180 s ($health)"; }
  sleep 1
done
healthy_s=$(( $(now) - t0 ))
curl -sf "http://127.0.0.1:$port/health" || fail "/health"
echo
curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "smoke", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}' \
  | python3 -c 'import json, sys; r = json.load(sys.stdin); print("chat completion:", r["usage"])' \
  || fail "/v1/chat/completions"

say "passed"
printf 'image %s: %d MiB; build %d s; tiny train+export %d s; serve healthy after %d s\n' \
  "$tag" "$(( size / 1048576 ))" "$build_s" "$export_s" "$healthy_s"
