#!/usr/bin/env bash
# Set everything up, then open napari on the sample image with the LV-UNet widget docked.
# With --headless, or on a machine without a display, segment the sample image instead
# and write its mask and an overlay PNG (into runs/demo/ unless --out says otherwise).
#
#   bash scripts/demo.sh                 # napari with the widget
#   bash scripts/demo.sh --headless      # mask + overlay PNG, no window
#   bash scripts/demo.sh my_image.png    # your own image instead of the sample
#
# Other options are those of `napari-lvunet view` (see `.venv/bin/napari-lvunet view -h`).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh"

args=("$@")
own_out=1
for a in "$@"; do
    [[ "$a" == --out || "$a" == --out=* ]] && own_out=0
done
if ((own_out)); then
    # The demo's own folder (git-ignored): re-running the demo replaces its previous
    # outputs there, and never touches files anywhere else.
    args+=(--out "$REPO/runs/demo" --overwrite)
fi
exec "${LVUNET_VENV:-$REPO/.venv}/bin/napari-lvunet" view "${args[@]}"
