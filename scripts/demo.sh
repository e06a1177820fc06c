#!/usr/bin/env bash
# Set everything up, then open napari on the sample image with the LV-UNet widget docked.
# With --headless, or on a machine without a display, segment the sample image instead
# and write its mask and an overlay PNG (napari-lvunet view decides and says where).
#
#   bash scripts/demo.sh                 # napari with the widget
#   bash scripts/demo.sh --headless      # mask + overlay PNG, no window
#   bash scripts/demo.sh my_image.png    # your own image instead of the sample
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh"
exec "${LVUNET_VENV:-$REPO/.venv}/bin/napari-lvunet" view "$@"
