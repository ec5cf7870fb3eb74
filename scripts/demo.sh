#!/usr/bin/env bash
# `make demo`: bring up the local lab, provision every tier with `fab site`, show that a
# second run changes nothing, and tell the reader how to look around.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_BIN=.venv/bin
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# DEMO_BASTION=1: app and db hosts on a private network, every task through a bastion.
# DEMO_ACME=1: the proxy's certificate from an ACME CA (pebble in the outside namespace).
lab_flags=(--apps 3)
if [ "${DEMO_ACME:-0}" = 1 ]; then
  lab_flags+=(--acme)
fi
if [ "${DEMO_BASTION:-0}" = 1 ]; then
  lab_flags+=(--bastion)
  say "lab: proxy1 (public + private), app1..3, db1 on a private network, a 'bastion' jump host"
else
  say "lab: proxy1, app1, app2, app3 (app2 reached as a sudo user), db1 + an 'outside' namespace"
fi
# A fresh lab every time, so the demo always starts from unprovisioned hosts.
"$VENV_BIN/inv" lab.down
inventory=$("$VENV_BIN/inv" lab.up "${lab_flags[@]}" | tail -n1)
export RELEASY_INVENTORY="$inventory"
"$VENV_BIN/inv" lab.status

say "fab inventory.check (validation only, no connection)"
"$VENV_BIN/fab" inventory.check

say "fab site --version 1.0.0 (db -> app -> proxy -> firewall)"
"$VENV_BIN/fab" site --version 1.0.0

say "fab site again: nothing to change"
"$VENV_BIN/fab" site | tail -n 3

proxy=$(awk '/^  proxy1:/{getline; print $2}' "$inventory")
say "through the proxy: https://$proxy/version"
curl -ksS --max-time 5 "https://$proxy/version"; echo

say "fab deploy.rolling --version 1.1.0 (drain, migrate once on the first host, roll the rest)"
"$VENV_BIN/fab" deploy.rolling --version 1.1.0 --yes

say "every app host now runs 1.1.0"
for i in 1 2 3 4 5 6 7 8 9; do curl -ksS --max-time 5 "https://$proxy/version"; done |
  sed -E 's/.*"version": ?"([^"]+)".*"host": ?"([^"]+)".*/  \2 answers \1/' | sort | uniq -c
"$VENV_BIN/fab" deploy.lock

say "firewall, as seen from the 'outside' namespace"
for port in 22 80 443 8080 5432; do
  printf '  proxy1:%-5s %s\n' "$port" "$("$VENV_BIN/inv" lab.probe proxy1 "$port")"
done
printf '  db1:5432    %s\n' "$("$VENV_BIN/inv" lab.probe db1 5432)"

state_dir=$(dirname "$inventory")
outside_ns="lab${LAB_ID:-}-outside"
cat <<MSG

Done. Look around:
  export RELEASY_INVENTORY=$inventory
  .venv/bin/fab --list                     # every operator task
  ssh -F $state_dir/ssh_config app1   # a shell on a lab host (also proxy1, app2, app3, db1)
  .venv/bin/inv lab.probe db1 5432         # open/closed/filtered from the outside
  .venv/bin/fab firewall.audit --netns $outside_ns
  .venv/bin/fab deploy.rollback --restore-db --yes   # back to 1.0.0 and its database
  .venv/bin/inv lab.down                   # remove the lab
MSG
