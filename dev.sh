#!/usr/bin/env bash
# Tessera developer entry point: `./dev.sh demo` runs the local demo, `./dev.sh test` runs the test suite.
# Both first install what is missing (apt packages, a venv on the system Python, the project in editable mode);
# a second run finds everything in place and goes straight to the work.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
STAMP="$VENV/.tessera-stamp"
SCAN_VENV="$ROOT/.venv-tlsscan"  # sslyze for tests/integration/test_tls_scan.py, apart from $VENV (see pyproject)

APT_PACKAGES=(python3 python3-venv python3-dev gcc openssl ca-certificates softhsm2 opensc mosquitto
              mosquitto-clients libengine-pkcs11-openssl curl procps shellcheck systemd
              libsqlite3-dev libssl-dev mosquitto-dev libmosquitto-dev uthash-dev
              chromium   # chromium: the console's browser tests (Playwright drives it, downloads no browser)
              # the TPM 2.0 test token (tests/integration/tpmfixtures.py): swtpm, tpm2-abrmd, tpm2-pkcs11
              swtpm swtpm-tools tpm2-abrmd libtss2-tcti-tabrmd0 libtss2-tcti-swtpm0 tpm2-tools
              libtpm2-pkcs11-1 libtpm2-pkcs11-tools python3-tpm2-pkcs11-tools dbus-daemon)

log() { printf '\033[1m[dev]\033[0m %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "dev.sh: installing system packages needs root (run as root or with sudo)" >&2
    exit 1
  fi
}

install_apt() {
  local missing=() pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  # pkcs11-provider exists from Debian 13 on; install it where the distribution has it.
  local want_provider=0
  if ! dpkg-query -W -f='${Status}' pkcs11-provider 2>/dev/null | grep -q "ok installed" \
     && [ ! -e "$ROOT/.dev-state/no-pkcs11-provider" ]; then
    want_provider=1
  fi
  if [ ${#missing[@]} -eq 0 ] && [ $want_provider -eq 0 ]; then
    return
  fi
  need_root
  export DEBIAN_FRONTEND=noninteractive
  log "apt: updating package lists"
  apt-get update -qq
  if [ $want_provider -eq 1 ]; then
    if apt-cache show pkcs11-provider >/dev/null 2>&1; then
      missing+=(pkcs11-provider)
    else
      mkdir -p "$ROOT/.dev-state" && touch "$ROOT/.dev-state/no-pkcs11-provider"  # Debian 12: engine route only
    fi
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt: installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # Tests and the demo start their own brokers; the packaged service must not hold port 1883.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
    systemctl disable --now mosquitto >/dev/null 2>&1 || true
  fi
}

# libtpm2-pkcs11-1 registers the module with p11-kit, so every p11-kit user (GnuTLS programs, the p11-kit proxy
# that OpenSSL's engine and provider fall back to, `p11-kit list-modules`) would load it, look for a TPM, log
# TCTI errors and create ~/.tpm2_pkcs11. A blank `module:` in the system config of the same name overrides the
# packaged one: p11-kit then ignores it, and Tessera and its tests load the module by its path.
keep_tpm2_pkcs11_private() {
  local conf=/etc/pkcs11/modules/tpm2_pkcs11.module
  [ -e /usr/share/p11-kit/modules/tpm2_pkcs11.module ] && [ ! -e "$conf" ] || return 0
  if [ "$(id -u)" -ne 0 ]; then
    log "p11-kit loads tpm2-pkcs11 everywhere; as root, dev.sh setup writes $conf to stop that"
    return 0
  fi
  mkdir -p /etc/pkcs11/modules
  printf '%s\n' '# Tessera dev.sh: tpm2-pkcs11 is loaded by path only, never through p11-kit.' 'module:' > "$conf"
}

install_venv() {
  # The venv must sit on the distribution's Python: its ssl module links the system libssl, which the
  # token-key TLS route (libp11 engine / pkcs11-provider through ctypes) needs.
  local want
  want=$( (cat pyproject.toml; /usr/bin/python3 -V) | sha256sum | cut -d' ' -f1)
  if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    return
  fi
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import ssl' 2>/dev/null; then
    log "venv: creating $VENV on /usr/bin/python3"
    rm -rf "$VENV"
    /usr/bin/python3 -m venv "$VENV"
  fi
  log "pip: installing tessera (editable) and test tools"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
  echo "$want" > "$STAMP"
}

install_scan_venv() {
  # sslyze pins its own cryptography and brings nassl's OpenSSL builds: its own venv, so that it never changes
  # what the hub's tests run with. Its requirements are pyproject's `tlsscan` extra.
  local stamp="$SCAN_VENV/.tessera-stamp" want reqs=()
  mapfile -t reqs < <(/usr/bin/python3 -c 'import tomllib
for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["tlsscan"]: print(r)')
  [ ${#reqs[@]} -gt 0 ] || { echo "dev.sh: pyproject.toml has no tlsscan extra" >&2; exit 1; }
  want=$( (printf '%s\n' "${reqs[@]}"; /usr/bin/python3 -V) | sha256sum | cut -d' ' -f1)
  if [ -x "$SCAN_VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  if [ ! -x "$SCAN_VENV/bin/python" ]; then
    log "venv: creating $SCAN_VENV (sslyze) on /usr/bin/python3"
    /usr/bin/python3 -m venv "$SCAN_VENV"
  fi
  log "pip: installing the TLS scanner (${reqs[*]}) into $SCAN_VENV"
  "$SCAN_VENV/bin/python" -m pip install -q --disable-pip-version-check "${reqs[@]}"
  echo "$want" > "$stamp"
}

setup() {
  install_apt
  keep_tpm2_pkcs11_private
  install_venv
  install_scan_venv
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest "$@" ;;
  demo)
    setup
    exec "$VENV/bin/python" -m demo "$@" ;;
  bench)
    setup
    exec "$VENV/bin/python" -m bench "$@" ;;
  *)
    echo "usage: ./dev.sh demo | test [pytest args] | bench [names] | setup" >&2
    exit 2 ;;
esac
