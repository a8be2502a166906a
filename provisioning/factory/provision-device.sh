#!/usr/bin/env bash
# Provision one device after install.sh: create its token PIN, initialize its token, enroll, start the agent.
set -euo pipefail

CONFIG=/etc/tessera/agent.toml
TOKEN_FILE=/etc/tessera/enroll-token
PIN_FILE=/etc/tessera/token-pin
AGENT=/opt/tessera/bin/tessera-agent
SERVICE_USER=tessera
SWITCH_USER=1
CREATE_USER=0
DRY=0

usage() {
  cat <<EOF
Usage: sudo provision-device.sh [OPTIONS]

Provision this device after install.sh: create a random token PIN (0600, owned
by the service user, never in argv), initialize the SoftHSM token, generate the
device key in it and enroll with the hub (EST) using the one-time token, then
enable and start tessera-agent.service. With a secure element or HSM instead of
SoftHSM, set token.module in agent.toml and initialize the token with the
vendor's tool; this script then only enrolls.

Options:
  --config FILE      the agent configuration (default: $CONFIG)
  --token-file FILE  the one-time enrollment token, destroyed once used
                     (default: $TOKEN_FILE)
  --pin-file FILE    where the token PIN is kept, created if missing
                     (default: $PIN_FILE)
  --agent PATH       the tessera-agent program
                     (default: $AGENT)
  --user NAME        the service user the agent runs as
                     (default: $SERVICE_USER; install.sh creates it)
  --create-user      create the service user if it does not exist
                     (a system user without login)
  --no-user-switch   run every step as the calling user
                     (no service user, no chown, no systemctl)
  --dry-run          print every action, change nothing
  -h, --help         print this help and exit
EOF
}

die() { echo "provision-device.sh: $*" >&2; exit 1; }
need_arg() {  # need_arg OPTION [VALUE]: the option's value is there
  if [ $# -lt 2 ] || [ -z "$2" ]; then
    echo "provision-device.sh: $1 needs a value" >&2
    usage >&2
    exit 2
  fi
}

while [ $# -gt 0 ]; do
  case "$1" in
    --config) need_arg "$@"; CONFIG=$2; shift 2 ;;
    --token-file) need_arg "$@"; TOKEN_FILE=$2; shift 2 ;;
    --pin-file) need_arg "$@"; PIN_FILE=$2; shift 2 ;;
    --agent) need_arg "$@"; AGENT=$2; shift 2 ;;
    --user) need_arg "$@"; SERVICE_USER=$2; shift 2 ;;
    --create-user) CREATE_USER=1; shift ;;
    --no-user-switch) SWITCH_USER=0; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "provision-device.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

run() {  # run CMD...: do it, or with --dry-run print it
  if [ "$DRY" -eq 1 ]; then
    printf '+ %s\n' "$*"
  else
    "$@"
  fi
}

# --- checks first: a missing piece is one line saying what to do, before anything is changed ---------------------
[ -f "$CONFIG" ] || die "no agent configuration $CONFIG (install a bundle with install.sh --bundle DIR, or give --config)"
[ -f "$TOKEN_FILE" ] || die "no enrollment token $TOKEN_FILE (it is in the device's bundle; give --token-file)"
[ -x "$AGENT" ] || die "no tessera-agent at $AGENT (run install.sh, or give --agent)"

AS_USER=()
if [ "$SWITCH_USER" -eq 1 ]; then
  if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    if [ "$CREATE_USER" -eq 0 ]; then
      die "no user '$SERVICE_USER' to run the agent as: run install.sh first (it creates it), give --create-user to create it here, or --no-user-switch to run as $(id -un)"
    fi
    run useradd --system --home-dir /var/lib/tessera-agent --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
  fi
  if [ "$DRY" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (the steps run as '$SERVICE_USER' through runuser), or give --no-user-switch"
  fi
  AS_USER=(runuser -u "$SERVICE_USER" --)
fi

conf_value() {  # conf_value KEY: a top-level or [token] string value from agent.toml
  sed -n "s/^$1 *= *\"\(.*\)\"/\1/p" "$CONFIG" | head -n 1
}

label=$(conf_value label)
softhsm_conf=$(conf_value softhsm_conf)
module=$(conf_value module)
[ -n "$label" ] || die "no token label in $CONFIG ([token] label)"

# --- 1. the token PIN ----------------------------------------------------------------------------------------------
if [ ! -s "$PIN_FILE" ]; then
  if [ "$DRY" -eq 1 ]; then
    printf '+ create %s (0600): 16 random bytes from /dev/urandom as hex\n' "$PIN_FILE"
  else
    (umask 077; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$PIN_FILE")
  fi
  if [ ${#AS_USER[@]} -gt 0 ]; then run chown "$SERVICE_USER:$SERVICE_USER" "$PIN_FILE"; fi
fi

# --- 2. the token (SoftHSM: initialized here unless it already holds the device key) -------------------------------
if [ -z "$module" ]; then
  if [ "$DRY" -eq 1 ]; then
    printf '+ %s\n' "(unless token '$label' already holds the device key)"
    run "${AS_USER[@]}" "$AGENT" token init --token-label "$label" --pin-source "file:$PIN_FILE" \
      --softhsm-conf "$softhsm_conf"
  elif ! "${AS_USER[@]}" env SOFTHSM2_CONF="$softhsm_conf" "$AGENT" key show --label device-key \
        --token-label "$label" --pin-source "file:$PIN_FILE" >/dev/null 2>&1; then
    "${AS_USER[@]}" "$AGENT" token init --token-label "$label" --pin-source "file:$PIN_FILE" \
      --softhsm-conf "$softhsm_conf" || true   # "already exists" on a retry is fine
  fi
fi

# --- 3. enroll (the key is generated in the token), 4. start the agent ---------------------------------------------
run "${AS_USER[@]}" "$AGENT" enroll --config "$CONFIG" --token-file "$TOKEN_FILE"
if [ ${#AS_USER[@]} -gt 0 ] && command -v systemctl >/dev/null 2>&1; then
  run systemctl enable --now tessera-agent.service
fi
if [ "$DRY" -eq 1 ]; then
  echo "dry run: nothing was changed"
else
  echo "device provisioned"
fi
