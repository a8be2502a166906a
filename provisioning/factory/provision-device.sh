#!/usr/bin/env bash
# Provision one device after install.sh: create its token PIN, initialize its token, enroll, start the agent.
#
#   sudo ./provision-device.sh [--config /etc/tessera/agent.toml] [--token-file /etc/tessera/enroll-token]
#
# The PIN is random, lives in /etc/tessera/token-pin (0600, owner tessera) and never appears in argv.
# With a secure element or HSM instead of SoftHSM, set token.module in agent.toml and initialize the token
# with the vendor's tool; this script then only enrolls.
set -euo pipefail

CONFIG=/etc/tessera/agent.toml
TOKEN_FILE=/etc/tessera/enroll-token
PIN_FILE=/etc/tessera/token-pin
AGENT=/opt/tessera/bin/tessera-agent
AS_USER=(runuser -u tessera --)

while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG=$2; shift 2 ;;
    --token-file) TOKEN_FILE=$2; shift 2 ;;
    --pin-file) PIN_FILE=$2; shift 2 ;;
    --agent) AGENT=$2; shift 2 ;;
    --no-user-switch) AS_USER=(); shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
    *) echo "provision-device.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

conf_value() {  # conf_value KEY: a top-level or [token] string value from agent.toml
  sed -n "s/^$1 *= *\"\(.*\)\"/\1/p" "$CONFIG" | head -n 1
}

label=$(conf_value label)
softhsm_conf=$(conf_value softhsm_conf)
module=$(conf_value module)
[ -n "$label" ] || { echo "provision-device.sh: no token label in $CONFIG" >&2; exit 1; }

if [ ! -s "$PIN_FILE" ]; then
  (umask 077; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$PIN_FILE")
  if [ ${#AS_USER[@]} -gt 0 ]; then chown tessera:tessera "$PIN_FILE"; fi
fi

if [ -z "$module" ]; then  # SoftHSM: initialize the token unless it exists
  if ! "${AS_USER[@]}" env SOFTHSM2_CONF="$softhsm_conf" "$AGENT" key show --label device-key \
        --token-label "$label" --pin-source "file:$PIN_FILE" >/dev/null 2>&1; then
    "${AS_USER[@]}" "$AGENT" token init --token-label "$label" --pin-source "file:$PIN_FILE" \
      --softhsm-conf "$softhsm_conf" || true   # "already exists" on a retry is fine
  fi
fi

"${AS_USER[@]}" "$AGENT" enroll --config "$CONFIG" --token-file "$TOKEN_FILE"
if [ ${#AS_USER[@]} -gt 0 ] && command -v systemctl >/dev/null 2>&1; then
  systemctl enable --now tessera-agent.service
fi
echo "device provisioned"
