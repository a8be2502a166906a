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
# The venvs install only from hash-checked locks, one per lock group and Python minor version:
# requirements/py3.11.lock (pyproject's dependencies, the test extra, the build backend) and
# requirements/tlsscan-py3.11.lock (the tlsscan extra). `./dev.sh lock` makes them (requirements/lockinput.py
# says from what); setup refuses a lock that no longer matches pyproject.toml.
LOCK_DIR="$ROOT/requirements"
LOCK_PYTHONS=(3.11 3.13)           # Debian 12 and Debian 13; `./dev.sh lock` adds the running one
LOCK_PLATFORM=x86_64-manylinux_2_36  # wheels must exist for glibc 2.36 (Debian 12) on x86_64
LOCK_SDIST_ONLY=(sslyze)           # packages that publish no wheel (pure Python): the only ones built at install
UV_VERSION=0.13.8                  # the lock tool, in .dev-state/uv (./dev.sh lock only)

APT_PACKAGES=(python3 python3-venv python3-dev gcc openssl ca-certificates softhsm2 opensc mosquitto
              mosquitto-clients libengine-pkcs11-openssl curl procps shellcheck systemd
              libsqlite3-dev libssl-dev mosquitto-dev libmosquitto-dev uthash-dev
              chromium   # chromium: the console's browser tests (Playwright drives it, downloads no browser)
              # the TPM 2.0 test token (tests/integration/tpmfixtures.py): swtpm, tpm2-abrmd, tpm2-pkcs11
              swtpm swtpm-tools tpm2-abrmd libtss2-tcti-tabrmd0 libtss2-tcti-swtpm0 tpm2-tools
              libtpm2-pkcs11-1 libtpm2-pkcs11-tools python3-tpm2-pkcs11-tools dbus-daemon
              postgresql  # postgresql: the registry's PostgreSQL tests (tests/integration/pgfixtures.py)
              rabbitmq-server)  # the RabbitMQ broker driver's cluster tests (tests/integration/rabbitfixtures.py)

log() { printf '\033[1m[dev]\033[0m %s\n' "$*" >&2; }

# This machine's pip configuration may name file:// indexes that hold only some packages; pip then prints
# "WARNING: Location 'file:///.../simple/<name>/' is ignored" for every other package it looks up. Those lines
# (and only those) are dropped; every other message, and pip's exit status, passes through.
PIP_NOISE="^WARNING: Location 'file:[^']*' is ignored: "
pip_quiet() {
  local py=$1 rc=0
  shift
  { "$py" -m pip "$@" 2>&1 1>&3 3>&- | { grep -v -E "$PIP_NOISE" || true; } >&2; } 3>&1 || rc=$?
  return $rc
}

py_minor() {  # the system Python's minor version (asked when needed: on a fresh machine apt installs it first)
  /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])'
}

lock_file() {  # lock_file GROUP [PYTHON_MINOR]
  local prefix=""
  [ "$1" = main ] || prefix="$1-"
  echo "$LOCK_DIR/${prefix}py${2:-$(py_minor)}.lock"
}

check_lock() {  # check_lock GROUP: one line and exit 1 if the lock is missing or older than pyproject's lists
  /usr/bin/python3 "$LOCK_DIR/lockinput.py" check "$1" "$(lock_file "$1")" || exit 1
}

# Installs the lock of GROUP into the venv whose python is $1, removes what the lock does not name, so the venv
# holds exactly the locked set.
install_locked() {  # install_locked PYTHON GROUP
  local py=$1 lock extra=()
  lock=$(lock_file "$2")
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 pip_quiet "$py" install -q --disable-pip-version-check --require-hashes \
    -r "$lock"
  mapfile -t extra < <("$py" "$LOCK_DIR/lockinput.py" extraneous "$lock")
  if [ ${#extra[@]} -gt 0 ]; then
    log "pip: removing what $(basename "$lock") does not name: ${extra[*]}"
    pip_quiet "$py" uninstall -q -y "${extra[@]}"
  fi
}

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "dev.sh: installing system packages needs root (run as root or with sudo)" >&2
    exit 1
  fi
}

codename() { sed -n "s/^VERSION_CODENAME=//p" /etc/os-release | tr -d '"'; }

# Debian 12 has pkcs11-provider in bookworm-backports only: add that suite (deb822, signed by the Debian archive
# keyring) unless a source names it already. Backports are never preferred (priority 100): only what is asked for
# with -t bookworm-backports comes from there.
BACKPORTS_SOURCE=/etc/apt/sources.list.d/bookworm-backports.sources
add_backports() {
  [ "$(codename)" = bookworm ] || return 0
  grep -rqs --include='*.list' --include='*.sources' bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d \
    && return 0
  if [ ! -s /usr/share/keyrings/debian-archive-keyring.gpg ]; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends debian-archive-keyring >/dev/null
  fi
  log "apt: adding bookworm-backports ($BACKPORTS_SOURCE) for pkcs11-provider"
  printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' 'Components: main' \
    'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' > "$BACKPORTS_SOURCE"
}

install_provider() {
  local target=()
  [ "$(codename)" = bookworm ] && target=(-t bookworm-backports)
  if ! apt-cache show pkcs11-provider >/dev/null 2>&1; then
    echo "dev.sh: no pkcs11-provider package for this distribution ($(codename)); Tessera's tests need it" >&2
    exit 1
  fi
  log "apt: installing pkcs11-provider${target:+ from ${target[1]}}"
  apt-get install -y -qq --no-install-recommends "${target[@]}" pkcs11-provider >/dev/null
}

install_apt() {
  local missing=() pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  # pkcs11-provider, the token-key TLS route the agent prefers (the tests run both routes): Debian 13 has it in
  # main, Debian 12 in bookworm-backports only (install_provider).
  local want_provider=0
  dpkg-query -W -f='${Status}' pkcs11-provider 2>/dev/null | grep -q "ok installed" || want_provider=1
  if [ ${#missing[@]} -eq 0 ] && [ $want_provider -eq 0 ]; then
    return
  fi
  need_root
  export DEBIAN_FRONTEND=noninteractive
  [ $want_provider -eq 0 ] || add_backports
  log "apt: updating package lists"
  apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt: installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  [ $want_provider -eq 0 ] || install_provider
  # Tests and the demo start their own brokers; the packaged service must not hold port 1883.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
    systemctl disable --now mosquitto >/dev/null 2>&1 || true
  fi
  # The same for RabbitMQ: the tests start their own nodes (own ports, own epmd port, own cookie).
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
    systemctl disable --now rabbitmq-server >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/rabbitmq-server ] && /etc/init.d/rabbitmq-server status >/dev/null 2>&1; then
    /etc/init.d/rabbitmq-server stop >/dev/null 2>&1 || true
  fi
  # Tests start their own PostgreSQL servers on free ports; the packaged cluster is stopped and left to start by
  # hand only (start.conf), so it neither runs nor holds port 5432.
  if command -v pg_lsclusters >/dev/null 2>&1; then
    local ver name
    while read -r ver name _; do
      pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true
      if [ -f "/etc/postgresql/$ver/$name/start.conf" ]; then
        echo manual > "/etc/postgresql/$ver/$name/start.conf"
      fi
    done < <(pg_lsclusters -h 2>/dev/null)
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
  local want lock
  check_lock main
  lock=$(lock_file main)
  want=$( (cat pyproject.toml "$lock"; /usr/bin/python3 -V) | sha256sum | cut -d' ' -f1)
  if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    return
  fi
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import ssl' 2>/dev/null; then
    log "venv: creating $VENV on /usr/bin/python3"
    rm -rf "$VENV"
    /usr/bin/python3 -m venv "$VENV"
  fi
  log "pip: installing ${lock#"$ROOT"/} (hash-checked), then tessera (editable, no dependencies)"
  install_locked "$VENV/bin/python" main
  # (setuptools' "Editable installation ... be careful with folders" notice is not for this checkout)
  PYTHONWARNINGS="ignore:Editable installation" \
    pip_quiet "$VENV/bin/python" install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$STAMP"
}

install_scan_venv() {
  # sslyze pins its own cryptography and brings nassl's OpenSSL builds: its own venv, so that it never changes
  # what the hub's tests run with. Its requirements are pyproject's `tlsscan` extra, locked apart.
  local stamp="$SCAN_VENV/.tessera-stamp" want lock
  check_lock tlsscan
  lock=$(lock_file tlsscan)
  want=$( (cat "$lock"; /usr/bin/python3 -V) | sha256sum | cut -d' ' -f1)
  if [ -x "$SCAN_VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  if [ ! -x "$SCAN_VENV/bin/python" ]; then
    log "venv: creating $SCAN_VENV (sslyze) on /usr/bin/python3"
    /usr/bin/python3 -m venv "$SCAN_VENV"
  fi
  log "pip: installing the TLS scanner from ${lock#"$ROOT"/} into $SCAN_VENV"
  install_locked "$SCAN_VENV/bin/python" tlsscan
  echo "$want" > "$stamp"
}

# ./dev.sh lock [--upgrade | --upgrade-package NAME ...]: (re)make every lock with uv. Without options the pins
# already in a lock are kept and only what pyproject.toml added, removed or re-ranged changes; --upgrade moves
# everything to the newest versions that have wheels for $LOCK_PLATFORM (sdists only for $LOCK_SDIST_ONLY).
lock() {
  local uv="$ROOT/.dev-state/uv/bin/uv" pythons=("${LOCK_PYTHONS[@]}") py group out tmp digest nobin=()
  if [ ! -x "$uv" ] || [ "$("$uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    log "lock: installing uv $UV_VERSION into .dev-state/uv"
    /usr/bin/python3 -m venv "$ROOT/.dev-state/uv"
    pip_quiet "$ROOT/.dev-state/uv/bin/python" install -q --disable-pip-version-check "uv==$UV_VERSION"
  fi
  py=$(py_minor)
  [[ " ${pythons[*]} " == *" $py "* ]] || pythons+=("$py")
  for py in "${LOCK_SDIST_ONLY[@]}"; do nobin+=(--no-binary "$py"); done
  mkdir -p "$LOCK_DIR"
  for group in main tlsscan; do
    digest=$(/usr/bin/python3 "$LOCK_DIR/lockinput.py" digest "$group")
    for py in "${pythons[@]}"; do
      out=$(lock_file "$group" "$py")
      tmp=$(mktemp "$LOCK_DIR/.lock.XXXXXX")
      [ -f "$out" ] && grep -v '^# lock-input-sha256: ' "$out" > "$tmp"   # the current pins are uv's preferences
      /usr/bin/python3 "$LOCK_DIR/lockinput.py" requirements "$group" \
        | "$uv" pip compile - --quiet --generate-hashes --python-version "$py" --python-platform "$LOCK_PLATFORM" \
            --only-binary :all: "${nobin[@]}" --no-annotate --custom-compile-command "./dev.sh lock" \
            --output-file "$tmp" "$@" \
        || { rm -f "$tmp"; echo "dev.sh lock: uv could not lock $group for Python $py" >&2; exit 1; }
      { echo "# Tessera's $group dependencies for CPython $py on Linux ($LOCK_PLATFORM wheels), hash-checked."
        echo "# Made by ./dev.sh lock from pyproject.toml (requirements/lockinput.py); do not edit by hand."
        echo "# lock-input-sha256: $digest"
        cat "$tmp"; } > "$out"
      rm -f "$tmp"
      log "lock: ${out#"$ROOT"/} ($(grep -c '==' "$out") pins)"
    done
  done
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
  lock) lock "$@" ;;
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
    echo "usage: ./dev.sh demo | test [pytest args] | bench [names] | setup | lock [--upgrade]" >&2
    exit 2 ;;
esac
