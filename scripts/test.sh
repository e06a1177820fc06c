#!/usr/bin/env bash
# Set everything up, then run every check: ruff lint, ruff format, the whole pytest suite
# under a virtual X server (napari's OpenGL canvas needs one; Qt's "offscreen" platform
# cannot start it). Exits non-zero if any check fails.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -k fuse -x      # extra arguments go to pytest
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
bash scripts/setup.sh || {
    echo "test.sh: FAILED: setup did not complete (see above)" >&2
    exit 1
}
VENV="${LVUNET_VENV:-$REPO/.venv}"

failed=()

echo "== ruff check"
"$VENV/bin/ruff" check . || failed+=("ruff check")
echo "== ruff format --check"
"$VENV/bin/ruff" format --check . || failed+=("ruff format")

echo "== pytest"
# A user's QT_QPA_PLATFORM=offscreen would stop napari's canvas from starting.
unset QT_QPA_PLATFORM
pytest_cmd=("$VENV/bin/python" -m pytest -ra "$@")
if command -v xvfb-run >/dev/null; then
    # 24-bit colour: xvfb-run's default 8-bit screen has no OpenGL-capable visual.
    xvfb-run -a -s "-screen 0 1280x1024x24" "${pytest_cmd[@]}"
    status=$?
elif [[ -n "${DISPLAY:-}" ]]; then
    echo "test.sh: xvfb-run not found; using the display $DISPLAY"
    "${pytest_cmd[@]}"
    status=$?
else
    echo "test.sh: neither xvfb-run nor a display: run scripts/setup.sh as root to install Xvfb" >&2
    status=1
fi
case $status in
    0) ;;
    5) failed+=("pytest (no tests were collected)") ;;
    *) failed+=("pytest (exit $status)") ;;
esac

if ((${#failed[@]})); then
    msg="$(printf '%s; ' "${failed[@]}")"
    echo "test.sh: FAILED: ${msg%; }"
    exit 1
fi
echo "test.sh: ALL CHECKS PASSED (ruff check, ruff format, pytest)"
