#!/usr/bin/env bash
# Set up everything napari-lvunet needs, idempotently, on Debian/Ubuntu:
#   1. the Debian packages for Qt + OpenGL under Xvfb (skipped when present),
#   2. a virtual environment in .venv with torch, torchvision and this package
#      installed editable with its [all,test] extras: everything, training and the
#      test tools included (skipped when up to date).
#
#   bash scripts/setup.sh
#
# Environment:
#   PYTHON       interpreter to build .venv with (default: newest python3.1x >= 3.10 found)
#   LVUNET_VENV  where to put the virtual environment (default: <repo>/.venv)
#
# Re-running is cheap: a stamp in the venv records what was installed (keyed on
# pyproject.toml and the torch pins), and apt runs only for missing packages.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LVUNET_VENV:-$REPO/.venv}"

# torch first, pinned, so that torchvision's compiled ops match torch. On x86_64 Linux
# PyPI's torch is the CUDA build (several GB; the CUDA libraries simply go unused on a
# CPU-only machine): the build machines keep these two releases' wheels on disk, so pip
# installs them without a download there. Elsewhere, to save the download, install a CPU
# build of the same releases from PyTorch's own index before running this script.
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

# What napari's Qt window and vispy's OpenGL canvas need on a headless machine: an X
# server (Xvfb), Mesa's software OpenGL, and the X/xcb libraries Qt's xcb platform
# plugin loads. Checked against `ldd` of PyQt6's Qt libraries and plugins
# (libxcb-cursor0 is new in Qt 6.5; only Qt's unused multimedia/Wayland parts lack libs).
APT_PACKAGES=(
    xvfb xauth
    libgl1-mesa-dri libglx-mesa0 libegl1 libgl1
    libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
    libxcb-render-util0 libxcb-xinerama0 libxcb-xinput0 libxcb-xfixes0 libxcb-shape0
    libxcb-cursor0 libdbus-1-3 libfontconfig1 libxrender1 libxi6 libglib2.0-0
    fonts-dejavu-core
)

log() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: ERROR: %s\n' "$*" >&2
    exit 1
}

# ----------------------------------------------------------------------------- apt

pkg_installed() {
    # Ubuntu 24.04 renamed some libraries with a "t64" suffix (64-bit time_t).
    local p
    for p in "$1" "$1t64"; do
        if [[ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" == installed ]]; then
            return 0
        fi
    done
    return 1
}

apt_install() {
    local sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        if ! command -v sudo >/dev/null; then
            die "not root and no sudo: install these Debian packages, then re-run: $*"
        fi
        sudo=(sudo)
        # Without a terminal nobody can type a password: fail fast instead of hanging.
        [[ -t 0 ]] || sudo=(sudo -n)
    fi
    log "installing Debian packages: $*"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q \
        || die "apt-get update failed (packages needed: $*)"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@" \
        || die "apt-get install failed (packages needed: $*)"
}

# Python: $PYTHON, else the newest python3.x >= 3.10 on PATH.
find_python() {
    local candidates=() c
    [[ -n "${PYTHON:-}" ]] && candidates+=("$PYTHON")
    candidates+=(python3.13 python3.12 python3.11 python3.10 python3)
    for c in "${candidates[@]}"; do
        if command -v "$c" >/dev/null \
            && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            command -v "$c"
            return 0
        fi
    done
    [[ -z "${PYTHON:-}" ]] || die "PYTHON=$PYTHON is not a Python >= 3.10"
    return 1
}

missing=()
if command -v dpkg-query >/dev/null; then
    for p in "${APT_PACKAGES[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    PY="$(find_python || true)"
    if [[ -z "$PY" ]]; then
        missing+=(python3 python3-venv)
    elif [[ ! -x "$VENV/bin/python" ]] && ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
        # Debian splits `python3 -m venv` (ensurepip) into its own package.
        missing+=(python3-venv)
    fi
    if ((${#missing[@]})); then
        apt_install "${missing[@]}"
    else
        log "Debian packages already installed"
    fi
else
    log "not a Debian/Ubuntu system (no dpkg): skipping system packages; napari needs" \
        "an X server (or Xvfb) and OpenGL libraries"
fi

PY="$(find_python)" || die "no Python >= 3.10 found; install one or set PYTHON=/path/to/python3"

# ----------------------------------------------------------------------------- venv

if [[ -e "$VENV" ]] && ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    die "$VENV exists but its python does not run (moved or its base Python removed);" \
        "delete it and re-run"
fi
if [[ ! -e "$VENV" ]]; then
    log "creating $VENV with $PY ($("$PY" -V 2>&1))"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

stamp_file="$VENV/.napari-lvunet-setup"
stamp="$(
    {
        cat "$REPO/pyproject.toml"
        echo "${TORCH_PINS[*]}"
        "$VPY" -V 2>&1
        echo "$REPO"
    } | sha256sum | cut -d' ' -f1
)"

# The installed package must be this checkout's (editable), or tests would run another copy.
installed_here() {
    "$VPY" - "$REPO" <<'EOF' 2>/dev/null
# find_spec locates without importing: this check runs on every test run, importing torch would not.
import importlib.util, pathlib, sys
specs = [importlib.util.find_spec(m) for m in ("torch", "torchvision", "napari", "napari_lvunet")]
here = pathlib.Path(sys.argv[1]).resolve()
sys.exit(None in specs or pathlib.Path(specs[-1].origin).resolve().parents[1] != here)
EOF
}

if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]] && installed_here; then
    log "$VENV is up to date"
    exit 0
fi

pip=("$VPY" -m pip install --quiet --no-input --progress-bar off)
log "installing ${TORCH_PINS[*]}"
"${pip[@]}" "${TORCH_PINS[@]}"
log "installing napari-lvunet (editable) with its [all,test] extras"
# Keep the pins in force while the rest resolves, so nothing upgrades torch.
"${pip[@]}" -e "${REPO}[all,test]" "${TORCH_PINS[@]}"
installed_here || die "napari_lvunet does not import from $REPO after installing"
echo "$stamp" >"$stamp_file"
log "done: $VENV"
