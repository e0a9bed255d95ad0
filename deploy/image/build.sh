#!/usr/bin/env bash
# `make image`: build the Containerfile into IMAGE:latest and IMAGE:<version in pyproject.toml>
# with podman (else docker), from MODEL, with the OCI labels filled in (version, git revision,
# source, the model's sha256).  Where the base (debian:bookworm-slim) cannot be pulled, it is
# built from Debian's packages (deploy/image/debian-base.sh).  Where pip's configuration names a
# CA bundle (a TLS-intercepting proxy) and the engine is podman, the build's pip is given it.
#
#   deploy/image/build.sh MODEL          (env: IMAGE=network3, ENGINE=podman|docker)
set -euo pipefail
cd "$(dirname "$0")/../.."
me=image
MODEL=${1:?usage: deploy/image/build.sh MODEL}
IMAGE=${IMAGE:-network3}
BASE=docker.io/library/debian:bookworm-slim  # what the Containerfile's FROM debian:bookworm-slim resolves to

if [ -z "${ENGINE:-}" ]; then
  if command -v podman >/dev/null; then ENGINE=podman
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
  else echo "$me: neither podman nor a running docker; install one (apt-get install podman)" >&2; exit 1
  fi
fi
# The build context is the repository: the model must lie inside it to be copied in.
[ -f "$MODEL" ] || { echo "$me: MODEL=$MODEL: no such file" >&2; exit 1; }
model_rel=$(realpath --relative-to=. "$MODEL")
case "$model_rel" in ../*|/*) echo "$me: MODEL=$MODEL lies outside the repository (the build context); copy it under models/" >&2; exit 1 ;; esac
# A build's RUN steps write to /dev/null, bound in from this machine.
[ -c /dev/null ] || { echo "$me: /dev/null is not a character device on this machine (fix: mknod -m 666 /dev/null c 1 3)" >&2; exit 1; }

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
revision=$(git rev-parse HEAD 2>/dev/null || echo "")
source=$(git config --get remote.origin.url 2>/dev/null || echo "")
sha=$(sha256sum "$model_rel" | cut -d' ' -f1)

if ! "$ENGINE" image inspect "$BASE" >/dev/null 2>&1; then
  if ! "$ENGINE" pull -q "$BASE" >/dev/null 2>&1; then
    echo "$me: $BASE cannot be pulled here; building it from Debian's packages" >&2
    ENGINE=$ENGINE deploy/image/debian-base.sh "$BASE"
  fi
fi

args=(build -f Containerfile -t "$IMAGE:latest" -t "$IMAGE:$version"
      --build-arg "MODEL=$model_rel" --build-arg "MODEL_SHA256=$sha" --build-arg "VERSION=$version"
      --build-arg "REVISION=$revision" --build-arg "SOURCE=$source")
if [ "$ENGINE" = podman ]; then
  # docker format: podman's default OCI format drops HEALTHCHECK.  chroot isolation: builds as
  # root where no user namespace or OCI runtime can be set up.
  args+=(--format docker --isolation chroot)
  # The CA bundle pip is told to trust here (PIP_CERT, else pip's configuration), if any.
  cert=${PIP_CERT:-$({ pip config list || python3 -m pip config list; } 2>/dev/null | sed -n "s/^[^=]*\.cert='\(.*\)'$/\1/p" | head -1)}
  if [ -n "$cert" ] && [ -f "$cert" ]; then
    args+=(--volume "$(realpath "$cert"):/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
  fi
fi
if [ "$ENGINE" = podman ]; then
  # buildah (podman 4.3) reuses a cached LABEL step whatever the build args now say: the labels
  # made of a build arg are given with --label as well (names and args read from the Containerfile).
  declare -A value=([MODEL_SHA256]=$sha [VERSION]=$version [REVISION]=$revision [SOURCE]=$source)
  while read -r key arg; do
    [ -n "${value[$arg]+set}" ] && args+=(--label "$key=${value[$arg]}")
  done < <(sed -n 's/^[[:space:]]*\(LABEL[[:space:]]\+\)\?\([a-z0-9.]\+\)="\${\([A-Z0-9_]\+\)}".*/\2 \3/p' Containerfile)
fi
echo "$me: $ENGINE ${args[*]} ." >&2
"$ENGINE" "${args[@]}" .
echo "$me: built $IMAGE:latest and $IMAGE:$version from $model_rel (sha256 $sha)" >&2
