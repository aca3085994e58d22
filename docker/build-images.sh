#!/usr/bin/env bash
# Build fedsec's Docker images from scratch, with no container registry.
#
#   docker/build-images.sh                  # prints the fedsec image's tag on its last line
#   BASE_IMAGE=debian:bookworm docker/build-images.sh   # use a base image you already have
#
# 1. Base image (only when BASE_IMAGE is not given): Debian bookworm made with debootstrap
#    from the mirror apt uses, with python3 + venv, imported as $FEDSEC_BASE_TAG.
# 2. Wheels: the pinned stack (constraints.txt) downloaded on this host with pip (which
#    honours this machine's pip configuration, e.g. the CPU torch), plus fedsec's own wheel.
#    Nothing is downloaded inside the build: containers do not trust the host's extra CA.
# 3. The fedsec image (docker/Dockerfile, BuildKit, wheels bind-mounted so they are not a
#    layer), tagged fedsec:<version>-<hash of the sources, pins and Dockerfile>.
#
# Reuse: an image whose tag exists is not rebuilt; the base image and the wheels are also
# kept in $FEDSEC_DOCKER_CACHE (default ~/.cache/fedsec-docker), which a reused machine keeps
# (the cache is never required: anything missing is made again).
# Progress goes to stderr; stdout's last line is the image tag.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${FEDSEC_DOCKER_CACHE:-$HOME/.cache/fedsec-docker}"
base_tag="${FEDSEC_BASE_TAG:-fedsec/base:bookworm}"
# Debian's client has BuildKit built in; a newer client elsewhere on PATH may lack buildx.
DOCKER="${DOCKER:-$(command -v /usr/bin/docker || command -v docker)}"
PY="${PYTHON:-$( [[ -x "$root/.venv/bin/python" ]] && echo "$root/.venv/bin/python" || command -v python3.11 || echo python3)}"
say() { echo "[build-images] $*" >&2; }
t_all=$(date +%s)
mkdir -p "$cache"

# ---------------------------------------------------------------- the image's tag
src_hash=$(cd "$root" && find constraints.txt pyproject.toml README.md docker/Dockerfile src scenarios attacks strategies \
             -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' -print0 \
           | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
version=$("$PY" -c "import tomllib;print(tomllib.load(open('$root/pyproject.toml','rb'))['project']['version'])")
image="${FEDSEC_IMAGE:-fedsec:${version}-${src_hash}}"
if "$DOCKER" image inspect "$image" >/dev/null 2>&1; then
  say "reusing $image"; echo "$image"; exit 0
fi
if [[ -f "$cache/$image.tar.zst" ]] && command -v zstd >/dev/null; then
  say "loading $image from $cache"
  if zstd -dc "$cache/${image}.tar.zst" | "$DOCKER" load >&2; then echo "$image"; exit 0; fi
fi

# ---------------------------------------------------------------- 1. base image
if [[ -z "${BASE_IMAGE:-}" ]]; then
  BASE_IMAGE="$base_tag"
  if "$DOCKER" image inspect "$base_tag" >/dev/null 2>&1; then
    say "reusing base image $base_tag"
  elif [[ -f "$cache/base-bookworm.tar" ]] && "$DOCKER" load -i "$cache/base-bookworm.tar" >&2; then
    say "loaded base image $base_tag from $cache"
  else
    command -v debootstrap >/dev/null || { say "debootstrap not found: apt-get install debootstrap (or pass BASE_IMAGE)"; exit 3; }
    mirror="${DEBIAN_MIRROR:-$( (grep -rhoE '(URIs:|^deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list \
              /etc/apt/sources.list.d/ 2>/dev/null || true) | head -1 | awk '{print $2}')}"
    mirror="${mirror:-http://deb.debian.org/debian}"
    rootfs="$(mktemp -d /var/tmp/fedsec-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    say "debootstrap bookworm from $mirror (about 2.5 min)"
    t0=$(date +%s)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" \
      > "$cache/debootstrap.log" 2>&1 || { say "debootstrap failed; see $cache/debootstrap.log"; tail -5 "$cache/debootstrap.log" >&2; exit 3; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$DOCKER" import -c 'ENV LANG=C.UTF-8' - "$base_tag" >&2
    rm -rf "$rootfs"; trap - EXIT
    "$DOCKER" save -o "$cache/base-bookworm.tar.part" "$base_tag" && mv "$cache/base-bookworm.tar.part" "$cache/base-bookworm.tar"
    say "base image $base_tag in $(( $(date +%s) - t0 )) s"
  fi
fi

# ---------------------------------------------------------------- 2. wheels
wkey=$(cat "$root/constraints.txt" "$root/pyproject.toml" | sha256sum | cut -c1-12)
wheels="$cache/wheels-$wkey"
if [[ ! -f "$wheels/.complete" ]]; then
  say "downloading the pinned stack's wheels into $wheels"
  t0=$(date +%s)
  rm -rf "$wheels"; mkdir -p "$wheels"
  reqs=$("$PY" - "$root/pyproject.toml" <<'PYEOF'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(p["dependencies"] + p.get("optional-dependencies", {}).get("dev", [])))
PYEOF
)
  printf '%s\n' "$reqs" > "$wheels/requirements.txt"
  "$PY" -m pip download -q --only-binary=:all: -d "$wheels" -c "$root/constraints.txt" torch==2.13.0 -r "$wheels/requirements.txt" >&2
  touch "$wheels/.complete"
  say "$(ls "$wheels"/*.whl | wc -l) wheels in $(( $(date +%s) - t0 )) s"
fi

# ---------------------------------------------------------------- 3. fedsec image
ctx="$(mktemp -d /var/tmp/fedsec-ctx.XXXXXX)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/wheels" "$ctx/app"
cp -l "$wheels"/*.whl "$ctx/wheels/" 2>/dev/null || cp "$wheels"/*.whl "$ctx/wheels/"
cp "$root/constraints.txt" "$wheels/requirements.txt" "$ctx/wheels/"
touch -d @0 "$ctx"/wheels/*  # same content, same build cache key for the stack's layer
# fedsec's wheel from a clean copy of its sources (an in-tree build/ folder could carry
# stale files into the wheel).
mkdir -p "$ctx/fedsec-src"
cp -r "$root/pyproject.toml" "$root/README.md" "$root/src" "$ctx/fedsec-src/"
find "$ctx/fedsec-src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
"$PY" -m pip wheel -q --no-deps --no-build-isolation "$ctx/fedsec-src/" -w "$ctx/app" >&2 2>/dev/null \
  || "$PY" -m pip wheel -q --no-deps "$ctx/fedsec-src/" -w "$ctx/app" >&2
rm -rf "$ctx/fedsec-src"
cp -r "$root/scenarios" "$root/attacks" "$root/strategies" "$ctx/"
cp "$root/docker/Dockerfile" "$ctx/Dockerfile"
find "$ctx" -name __pycache__ -prune -exec rm -rf {} +
say "building $image from $BASE_IMAGE"
t0=$(date +%s)
DOCKER_BUILDKIT=1 "$DOCKER" build -q --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  --label "org.fedsec.source-hash=$src_hash" -t "$image" "$ctx" >&2
say "built $image in $(( $(date +%s) - t0 )) s (total $(( $(date +%s) - t_all )) s)"
if [[ "${FEDSEC_CACHE_IMAGE:-0}" == 1 ]] && command -v zstd >/dev/null; then
  rm -f "$cache"/fedsec:*.tar.zst
  "$DOCKER" save "$image" | zstd -q -T0 -o "$cache/${image}.tar.zst.part" && mv "$cache/${image}.tar.zst.part" "$cache/${image}.tar.zst"
fi
echo "$image"
