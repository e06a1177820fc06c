"""Make ``docs/effort_plot.png``: the correction-effort plot after two model versions.

Everything in the picture is measured, nothing is typed in:

1. The bundled model (through the inference engine) proposes masks for the five frames
   of ``kvasir_stack5.tif`` and the single sample frame; each is "corrected" to its
   ground-truth mask and saved with
   :func:`napari_lvunet._annotations.save_for_training`, with the proposal and the
   model run, as the widget saves them.
2. ``python -m training.finetune`` fine-tunes the bundled model on those pairs (a child
   process, ``--steps``), and the result is registered as a model version
   (:func:`napari_lvunet.versions.register`) in a private models folder.
3. That version proposes masks for other frames, the first ``--later`` images of the
   shipped reference set (never trained on), saved the same way. For comparison, the
   bundled model's mean Dice on those same frames is printed (it is not in the plot).
4. A napari viewer with the LV-UNet widget gets that dataset folder, and its
   "Correct and save" group (with the effort plot) is grabbed.

Needs a display, e.g.::

    xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python docs/make_effort_screenshot.py

The user's model versions are left alone; the data live in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent / "napari_lvunet" / "sample_data"


def _save(segmenter, image: np.ndarray, truth: np.ndarray, folder: Path, stem: str) -> None:
    """Propose a mask for ``image`` (a frame or a stack), save it corrected to ``truth``."""
    from napari_lvunet._annotations import iter_slices, save_for_training

    threshold, sizing, output = 0.5, "auto", "semantic"
    axes = "ZYXC" if image.ndim == 4 else "YXC"
    proposal = np.asarray(
        segmenter.segment(image, axes=axes, threshold=threshold, sizing=sizing, output=output)
    )
    info = segmenter.info
    run = {
        "weights_name": info.name,
        "weights_sha256": info.sha256,
        "threshold": threshold,
        "sizing": sizing,
        "output": output,
    }
    slices = list(iter_slices(truth.shape[:-2]))
    save_for_training(
        image,
        (truth > 0).astype(np.uint8),
        folder,
        stem,
        rgb=True,
        proposals={index: proposal[index] > 0 for index in slices},
        provenance={index: run for index in slices},
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, make the records of two versions, write the screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps (default 20)")
    parser.add_argument(
        "--later", type=int, default=8, help="reference frames proposed by the fine-tune"
    )
    parser.add_argument("--out", type=Path, default=HERE / "effort_plot.png")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="lvunet-effort-") as tmp:
        os.environ["NAPARI_LVUNET_MODELS"] = str(Path(tmp) / "models")
        data = Path(tmp) / "corrections"

        from napari_lvunet import effort, versions
        from napari_lvunet._annotations import _dice
        from napari_lvunet.inference import default_pool
        from napari_lvunet.io import read_image
        from napari_lvunet.weights import DEFAULT_MODEL

        t0 = time.monotonic()
        bundled = default_pool().get(DEFAULT_MODEL, device="cpu")
        _save(
            bundled,
            read_image(SAMPLES / "kvasir_stack5.tif"),
            read_image(SAMPLES / "kvasir_stack5_masks.tif"),
            data,
            "kvasir_stack5",
        )
        single = "kvasir_cju2hw5gjlr5h0988so2qqres"
        _save(
            bundled,
            read_image(SAMPLES / f"{single}.jpg"),
            read_image(SAMPLES / f"{single}_mask.png"),
            data,
            single,
        )

        finetuned = Path(tmp) / "finetuned"
        command = [
            sys.executable,
            "-m",
            "training.finetune",
            "--data",
            str(data),
            "--weights",
            DEFAULT_MODEL,
            "--steps",
            str(args.steps),
            "--out",
            str(finetuned),
            "--device",
            "cpu",
            "--progress",
            "none",
        ]
        subprocess.run(command, check=True, cwd=HERE.parent)
        (weights,) = sorted(finetuned.glob("*.safetensors"))
        # A short name: the plot's legend has room for about 20 characters a version.
        version = versions.register(weights, name="fine-tuned", data_folder=data)
        print(f"registered {version.label}")

        tuned = default_pool().get(version.weights, device="cpu")
        reference = SAMPLES / "reference"
        later = sorted((reference / "images").iterdir())[: args.later]
        for path in later:
            _save(
                tuned,
                read_image(path),
                read_image(reference / "masks" / f"{path.stem}.png"),
                data,
                path.stem,
            )
        # Not in the plot: the bundled model on the same later frames, like for like.
        same = [
            _dice(
                np.asarray(bundled.segment(read_image(path), axes="YXC")) > 0,
                read_image(reference / "masks" / f"{path.stem}.png") > 0,
            )
            for path in later
        ]
        print(f"bundled model on the same {len(later)} later frames: mean Dice {np.mean(same):.3f}")
        rows = effort.read_records(data)
        print(effort.trend_table(effort.trend(rows)))
        print(f"records made in {time.monotonic() - t0:.0f} s")

        import napari
        from qtpy.QtWidgets import QApplication

        viewer = napari.Viewer(title="napari-lvunet")
        last = later[-1]
        viewer.add_image(read_image(last), name=last.stem, rgb=True)
        truth = read_image(reference / "masks" / f"{last.stem}.png") > 0
        viewer.add_labels(truth.astype(np.uint8), name=f"{last.stem} corrected")
        _dock, widget = viewer.window.add_plugin_dock_widget(
            "napari-lvunet", "LV-UNet segmentation"
        )
        widget.data_dir.value = data
        for _ in range(20):  # let the dock settle before grabbing
            QApplication.processEvents()
            time.sleep(0.05)
        plotted = widget.correct_section.effort_plot.series
        if not plotted:
            raise SystemExit("the effort plot is empty")
        for label, _colour, points, mean in plotted:
            print(f"plotted {label}: {len(points)} pairs, mean Dice {mean:.3f}")
        widget.correct_group.native.grab().save(str(args.out))
        print(f"wrote {args.out}")
        viewer.close()


if __name__ == "__main__":
    main()
