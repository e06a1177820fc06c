"""Make the README's screenshots: napari with the LV-UNet widget on the sample polyp.

Opens the plugin's sample data and dock widget the way a user does (through napari's plugin
machinery), ticks "Show results as outlines", presses Segment, waits for the Labels layer
and saves two pictures:

* ``docs/screenshot.png``: the whole window, the result drawn as an outline over the
  polyp, the widget's groups with the model panel open;
* ``docs/screenshot_widget.png``: the dock widget alone, every group open (Advanced too).

Run it under a display, e.g. on a headless machine::

    xvfb-run -a python docs/make_screenshot.py                      # the default model
    xvfb-run -a python docs/make_screenshot.py --weights my.safetensors
    xvfb-run -a python docs/make_screenshot.py --random-weights     # layout only

``--random-weights`` (an untrained network, meaningless mask) is for checking the layout
before trained weights exist; re-run without it once the default model is bundled.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_lvunet import weights

HERE = Path(__file__).resolve().parent


def _random_weights(folder: Path) -> Path:
    import torch

    from napari_lvunet.model import LVUNet

    torch.manual_seed(0)  # the same untrained network, hence the same picture, every run
    model = LVUNet(act_num=1)
    model.set_act_learn(1.0)
    return weights.save_weights(
        model, folder / "random.safetensors", {"dataset": "none: random weights"}
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, segment the sample, write the screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--weights", type=Path, help="a .safetensors file (default: the registry's default model)"
    )
    group.add_argument(
        "--random-weights", action="store_true", help="an untrained network, for layout checks"
    )
    parser.add_argument("--sample", default="polyp", choices=["polyp", "polyp_stack"])
    parser.add_argument("--out", type=Path, default=HERE / "screenshot.png")
    parser.add_argument("--widget-out", type=Path, default=HERE / "screenshot_widget.png")
    parser.add_argument("--size", type=int, nargs=2, default=(1400, 1000), metavar=("W", "H"))
    parser.add_argument("--filled", action="store_true", help="filled regions, not outlines")
    args = parser.parse_args(argv)

    def settle() -> None:
        for _ in range(20):  # let the canvas and the dock settle before grabbing
            QApplication.processEvents()
            time.sleep(0.05)

    with tempfile.TemporaryDirectory() as tmp:
        viewer = napari.Viewer(title="napari-lvunet")
        viewer.window.resize(*args.size)
        viewer.open_sample("napari-lvunet", args.sample)
        dock, widget = viewer.window.add_plugin_dock_widget("napari-lvunet", "LV-UNet segmentation")
        dock.setMaximumWidth(440)  # leave the canvas most of the window
        if args.random_weights:
            widget.add_weights_file(_random_weights(Path(tmp)))
        elif args.weights is not None:
            widget.add_weights_file(args.weights)
        elif weights.DEFAULT_MODEL in weights.registry():
            widget.model.value = weights.DEFAULT_MODEL
        else:
            parser.error(
                f"the default model {weights.DEFAULT_MODEL!r} is not bundled yet: "
                "pass --weights or --random-weights"
            )
        widget.image.value = viewer.layers[args.sample.replace("_", " ")]
        widget.outline.value = not args.filled
        before = len(viewer.layers)
        widget.segment()
        deadline = time.monotonic() + 300
        while widget.busy or len(viewer.layers) == before:
            QApplication.processEvents()
            if time.monotonic() > deadline:
                raise SystemExit("segmentation did not finish within 5 minutes")
            time.sleep(0.02)
        # Toasts about this machine's setup (napari's notices about the Qt backend) would
        # cover the canvas: close them, found by class name through public Qt calls.
        for toast in QApplication.allWidgets():
            if type(toast).__name__ == "NapariQtNotification":
                toast.close()
        viewer.layers.selection.active = viewer.layers[-1]
        viewer.reset_view()
        settle()
        viewer.screenshot(str(args.out), canvas_only=False)
        print(f"wrote {args.out} (model: {widget.model.current_choice})")
        # The widget alone, every group open, at the dock's width and its full height.
        widget.advanced.expanded = True
        native = widget.native
        native.setFixedWidth(dock.width())
        native.adjustSize()
        native.resize(dock.width(), native.sizeHint().height())
        settle()
        native.grab().save(str(args.widget_out))
        print(f"wrote {args.widget_out}")
        viewer.close()


if __name__ == "__main__":
    main()
