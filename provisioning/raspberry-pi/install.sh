#!/usr/bin/env bash
# Install the Tessera agent on a Raspberry Pi (Raspberry Pi OS / Debian 12 or 13).
#
#   sudo ./install.sh [--bundle DIR] [--source DIR] [--dry-run] [--root DIR] [--skip-apt] [--skip-venv]
#
#   --bundle DIR  a factory bundle (agent.toml, fleet-root.pem, enroll-token) to install
#   --source DIR  the Tessera source tree to install into the venv (default: this repository)
#   --dry-run     print every action, change nothing
#   --root DIR    install into DIR instead of / (a throwaway root for testing; no apt, no users, no systemctl)
#   --skip-apt    do not install the apt packages (they are there already)
#   --skip-venv   do not create the venv in /opt/tessera (it is there already)
#   -h, --help    print this help and exit
#
# Then: sudo provisioning/factory/provision-device.sh (PIN, token, key, enroll, start; see its --help).
set -euo pipefail

SOURCE=$(cd "$(dirname "$0")/../.." && pwd)
BUNDLE=""
ROOT=""
DRY=0
SKIP_APT=0
SKIP_VENV=0
APT_PACKAGES=(python3 python3-venv softhsm2 libengine-pkcs11-openssl opensc ca-certificates)

usage() { sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-2}"; }  # the comment block above

while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE=$2; shift 2 ;;
    --source) SOURCE=$2; shift 2 ;;
    --root) ROOT=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --skip-apt) SKIP_APT=1; shift ;;
    --skip-venv) SKIP_VENV=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage ;;
  esac
done

run() {
  if [ "$DRY" -eq 1 ]; then
    printf '+ %s\n' "$*"
  else
    "$@"
  fi
}

# In a throwaway root we cannot create users or chown to them: say what would happen.
own() {  # own OWNER:GROUP MODE PATH
  run chmod "$2" "$3"
  if [ -z "$ROOT" ]; then
    run chown "$1" "$3"
  else
    printf '(root mode) chown %s %s\n' "$1" "$3"
  fi
}

if [ -z "$ROOT" ] && [ "$DRY" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (or use --dry-run / --root DIR)" >&2
  exit 1
fi
if [ -n "$BUNDLE" ] && [ ! -f "$BUNDLE/agent.toml" ]; then
  echo "install.sh: $BUNDLE is not a bundle (no agent.toml)" >&2
  exit 1
fi

ETC="$ROOT/etc/tessera"
STATE="$ROOT/var/lib/tessera-agent"
OPT="$ROOT/opt/tessera"
UNITS="$ROOT/etc/systemd/system"

# 1. packages
if [ -z "$ROOT" ] && [ "$SKIP_APT" -eq 0 ]; then
  run apt-get update -qq
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}"
fi

# 2. service user (no login, no home outside its state directory)
if [ -z "$ROOT" ] && ! id tessera >/dev/null 2>&1; then
  run useradd --system --home-dir /var/lib/tessera-agent --no-create-home --shell /usr/sbin/nologin tessera
fi

# 3. directories with tight permissions
run install -d -m 0755 "$ROOT/etc" "$ROOT/var/lib" "$ROOT/opt" "$UNITS"
run install -d -m 0750 "$ETC"
own root:tessera 0750 "$ETC"
run install -d -m 0700 "$STATE" "$STATE/softhsm" "$STATE/softhsm/tokens"
own tessera:tessera 0700 "$STATE"
own tessera:tessera 0700 "$STATE/softhsm"
own tessera:tessera 0700 "$STATE/softhsm/tokens"

# 4. the agent in its own venv on the system Python (its ssl links the system libssl: needed for token keys)
if [ "$SKIP_VENV" -eq 0 ]; then
  run python3 -m venv "$OPT"
  run "$OPT/bin/pip" install --quiet --disable-pip-version-check "$SOURCE"
fi
run install -d -m 0755 "$OPT/share"
run install -m 0644 "$SOURCE/README.md" "$OPT/share/README.md"

# 5. SoftHSM configuration for a bare Pi (a secure element replaces it: set token.module in agent.toml)
if [ "$DRY" -eq 1 ]; then
  printf '+ write %s\n' "$STATE/softhsm/softhsm2.conf"
else
  printf 'directories.tokendir = /var/lib/tessera-agent/softhsm/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' \
    > "$STATE/softhsm/softhsm2.conf"
fi
own tessera:tessera 0600 "$STATE/softhsm/softhsm2.conf"

# 6. the factory bundle
if [ -n "$BUNDLE" ]; then
  run install -m 0640 "$BUNDLE/agent.toml" "$ETC/agent.toml"
  own root:tessera 0640 "$ETC/agent.toml"
  run install -m 0644 "$BUNDLE/fleet-root.pem" "$STATE/fleet-root.pem"
  run install -m 0600 "$BUNDLE/enroll-token" "$ETC/enroll-token"
  own tessera:tessera 0600 "$ETC/enroll-token"
fi

# 7. systemd unit
run install -m 0644 "$SOURCE/provisioning/systemd/tessera-agent.service" "$UNITS/tessera-agent.service"
if [ -z "$ROOT" ] && command -v systemctl >/dev/null 2>&1; then
  run systemctl daemon-reload
  run systemctl enable tessera-agent.service
fi

echo "Tessera agent installed${ROOT:+ under $ROOT}. Next: provisioning/factory/provision-device.sh"
