#!/usr/bin/env bash
# Build the Containerfile's base, debian:bookworm-slim, from Debian's own packages and import it
# under the exact name the Containerfile's FROM resolves to: for machines that reach Debian's
# mirror but no container registry (`make image` runs this only when the pull fails).
#
#   deploy/image/debian-base.sh [NAME]      (root; ENGINE=podman|docker, DEBIAN_MIRROR=URL)
#
# debootstrap's minbase variant, then slimmed as the official slim image is: no docs but the
# copyright files, no man or info pages, no locales, and a dpkg configuration that keeps later
# `apt-get install`s (the Containerfile's) from adding them back.
set -euo pipefail
NAME=${1:-docker.io/library/debian:bookworm-slim}
ENGINE=${ENGINE:-podman}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
me=debian-base
[ "$(id -u)" = 0 ] || { echo "$me: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "$me: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
command -v "$ENGINE" >/dev/null || { echo "$me: $ENGINE is not installed" >&2; exit 1; }

root=$(mktemp -d "${TMPDIR:-/var/tmp}/network3-base.XXXXXX")
cleanup() {
  # A failed debootstrap can leave /proc or /sys mounted inside the tree: unmount before removing.
  local m
  for m in $(findmnt -rn -o TARGET | grep -F "$root/" | sort -r || true); do umount -l "$m" || true; done
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT

echo "$me: debootstrap --variant=minbase $SUITE from $MIRROR" >&2
debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 ||
  { tail -20 "$root.log" >&2; rm -f "$root.log"; echo "$me: debootstrap failed (log above)" >&2; exit 1; }
rm -f "$root.log"

cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
# As in the official slim images: no documentation but the licences, no manuals, no locales.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
CFG
# And as there, apt keeps no downloaded packages and no caches in the layers built on top.
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
cat >"$root/etc/apt/apt.conf.d/docker-no-languages" <<'CFG'
Acquire::Languages "none";
CFG
find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/{man,groff,info,lintian,linda,locale}/* "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* \
  "$root"/var/log/*.log "$root"/var/cache/debconf/*-old

# The suites the official image lists: the release, its updates and its security fixes.
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC

# /dev empty, as in the official image: the engine provides the devices at run and build time.
tar --numeric-owner --exclude="./dev/*" --exclude="./proc/*" --exclude="./sys/*" -C "$root" -c . | "$ENGINE" import --quiet --change 'CMD ["bash"]' - "$NAME" >/dev/null
echo "$me: imported as $NAME ($(du -sh --apparent-size "$root" | cut -f1))" >&2
