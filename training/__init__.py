"""Refitting LV-UNet: folder datasets, training, fine-tuning, evaluation and export.

Command-line tools: ``python -m training.train``, ``training.finetune``,
``training.evaluate`` and ``training.export`` (each with ``--help``). This package
imports :mod:`napari_lvunet`; the plugin imports it only lazily, for fine-tuning.
"""
