"""Refitting LV-UNet: folder datasets, training, fine-tuning, evaluation and export.

Command-line tools: ``python -m training.train``, ``training.finetune``,
``training.evaluate`` and ``training.export`` (each with ``--help``). This package
imports :mod:`napari_lvunet`; the plugin never imports it (the widget runs
``python -m training.finetune`` as a child process).

Every tool needs PyTorch. Without it, ``python -m training.<tool>`` prints one line
with the install command and exits with code 1, instead of an import traceback.
"""

import sys

if sys.argv[:1] == ["-m"]:
    # Python sets argv[0] to "-m" while it locates the module of ``python -m``, which
    # imports this package first: so this runs for the command line only. A library
    # import without torch gets the ImportError of its own module as usual.
    from napari_lvunet._torch import MissingTorchError, import_torch

    try:
        import_torch("training")
    except MissingTorchError as _err:
        print(f"error: {_err}", file=sys.stderr)
        raise SystemExit(1) from None
