#!/usr/bin/env bash
# Debian packages the lab and the test suite need on the machine running them.
# Idempotent: installs only what is missing, and runs apt-get update only then.
set -euo pipefail
# pebble: the lab's ACME CA (`inv lab.up --acme`; RFC 8555 test server, with its DNS helper).
packages=(mmdebstrap systemd-container dpkg-dev iproute2 openssh-client python3-venv curl pebble)
missing=()
for p in "${packages[@]}"; do
  if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Lab hosts of Debian 13 (inv lab.up --suite trixie) are built with mmdebstrap, which needs
# no per-suite script, only trixie's archive keys. Debian 12's debian-archive-keyring has
# them since 2023.3+deb12u1; an older machine gets the current one from its own mirror.
if [ ! -e /usr/share/keyrings/debian-archive-trixie-stable.gpg ]; then
  echo "setup: upgrading debian-archive-keyring (Debian 13 archive keys for the lab)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --only-upgrade debian-archive-keyring >/dev/null
fi
