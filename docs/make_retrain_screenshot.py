"""Make ``docs/retrain_before_after.png``: the Retrain section after a real fine-tune.

Fine-tunes the bundled model, through the widget's Fine-tune button (a child process),
on frames of a simulated second centre (Kvasir-SEG val images with the fixed camera
shift of ``benchmarks/bench_adaptation.py``), then grabs the Retrain section with its
before/after panel. The numbers in the picture are the run's own. Needs the Kvasir-SEG
folder of the benchmark and a display, e.g.::

    xvfb-run -a python docs/make_retrain_screenshot.py --steps 40

A private models folder is used, so the user's versions are left alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, fine-tune in the widget, write the screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kvasir", type=Path, default=Path("/work/shared/datasets/kvasir-seg"))
    parser.add_argument("--frames", type=int, default=10, help="corrected frames (default 10)")
    parser.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    parser.add_argument("--out", type=Path, default=HERE / "retrain_before_after.png")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NAPARI_LVUNET_MODELS"] = str(Path(tmp) / "models")
        sys.path.insert(0, str(HERE.parent / "benchmarks"))
        from bench_adaptation import make_centre

        make_centre(args.kvasir, Path(tmp), n_corrected=args.frames, n_other=1, seed=0)
        data = Path(tmp) / "centre" / "corrected"

        import napari
        from qtpy.QtWidgets import QApplication

        from napari_lvunet.io import read_image
        from napari_lvunet.weights import DEFAULT_MODEL

        viewer = napari.Viewer(title="napari-lvunet")
        first = sorted((data / "images").iterdir())[0]
        viewer.add_image(read_image(first), name=first.stem, rgb=True)
        _dock, widget = viewer.window.add_plugin_dock_widget(
            "napari-lvunet", "LV-UNet segmentation"
        )
        widget.model.value = DEFAULT_MODEL
        widget.data_dir.value = data
        widget.steps.value = args.steps
        t0 = time.monotonic()
        widget.finetune()
        while widget.busy:
            QApplication.processEvents()
            if time.monotonic() - t0 > 1800:
                raise SystemExit("the fine-tune did not finish within 30 minutes")
            time.sleep(0.05)
        if widget.retrain.outcome is None:
            raise SystemExit(f"no result: {widget.details.value}")
        for _ in range(20):  # let the dock settle before grabbing
            QApplication.processEvents()
            time.sleep(0.05)
        widget.retrain.native.grab().save(str(args.out))
        o = widget.retrain.outcome
        print(
            f"wrote {args.out} after {time.monotonic() - t0:.0f} s: held-out {o.heldout}, "
            f"reference {o.reference}"
        )
        viewer.close()


if __name__ == "__main__":
    main()
