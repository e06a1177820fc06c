"""Widget latency, measured the way a user experiences it, in a real napari window.

* Segment click -> Labels layer, for a 1024 x 1024 RGB image, with the "resize" sizing
  (targets: <= 50 ms in the layer, <= 80 ms shown) and with tiles (for comparison).
* Live preview: slice slider moved -> that 512 x 512 slice segmented and shown (<= 50 ms).

Each timing starts when the widget's Segment action (what the button calls) is invoked, or
when the slider's step changes. "in layer" ends when the result has been written into the
Labels layer (the widget's result callback returned); "shown" ends after the Qt event loop
has also processed the repaint (on Xvfb that is Mesa's software OpenGL, slower than a GPU).
The model is warm (the ONNX export and session are made once, before timing, as they are
cached after a user's first click). The engine's own time for the same input
(``Segmenter.segment``, no napari) is printed beside.

Run on a display (headless: ``xvfb-run -a``)::

    xvfb-run -a python benchmarks/bench_widget.py
    xvfb-run -a python benchmarks/bench_widget.py --weights my.safetensors --repeats 30

Without ``--weights`` the bundled default model is used. napari's process never imports
torch here, as in a user's napari. ``--pause-pid-file FILE``
names a background job (a training run, say) to pause (SIGSTOP) while timing; it is always
resumed (SIGCONT), and one that is already stopped is left as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def paused_training(pid_file: Path | None) -> Iterator[None]:
    """SIGSTOP the process named in ``pid_file`` (if given) and always SIGCONT it after."""
    pid = None
    if pid_file is None:
        yield
        return
    with contextlib.suppress(OSError, ValueError, IndexError):
        candidate = int(pid_file.read_text().strip())
        state = Path(f"/proc/{candidate}/stat").read_text().rsplit(")", 1)[1].split()[0]
        # Already stopped by someone else's benchmark: leave it to them to resume.
        if state not in ("T", "t"):
            os.kill(candidate, signal.SIGSTOP)
            pid = candidate
            print(f"paused background process {pid}")
    previous = {}

    def resume_and_exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, resume_and_exit)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
                print(f"resumed background process {pid}")


def _load() -> str:
    """The 1-minute load average (other processes competing for the CPU)."""
    return f"{os.getloadavg()[0]:.2f}"


def _stats(times_s: list[float]) -> tuple[float, float, float]:
    ms = sorted(t * 1000 for t in times_s)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return statistics.median(ms), p90, ms[0]


def _weights(args: argparse.Namespace) -> tuple[str, str]:
    """(picker key, description) of the weights to time: a file, or the bundled model."""
    from napari_lvunet import weights

    if args.weights is not None:
        return str(args.weights.resolve()), args.weights.name
    return weights.DEFAULT_MODEL, weights.DEFAULT_MODEL


def main(argv: list[str] | None = None) -> None:
    """Time the widget and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, help="a .safetensors file")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024, help="click benchmark image side")
    parser.add_argument("--preview-size", type=int, default=512)
    parser.add_argument(
        "--pause-pid-file",
        type=Path,
        help="file holding the pid of a background job to pause while timing",
    )
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_lvunet._widget import LVUNetWidget
    from napari_lvunet.inference import Segmenter

    load_before = _load()
    rng = np.random.default_rng(0)
    rows: list[tuple[str, str, list[tuple[float, float, float]], list[float]]] = []
    with paused_training(args.pause_pid_file):
        key, described = _weights(args)
        viewer = napari.Viewer(title="bench")
        widget = LVUNetWidget(viewer)
        viewer.window.add_dock_widget(widget, name="LV-UNet segmentation")
        if Path(key).suffix == ".safetensors":
            widget.add_weights_file(key)
        else:
            widget.model.value = key
        widget.device.value = "cpu"
        app = QApplication.instance()

        def wait_idle() -> None:
            # Sleep in the Qt event loop until the widget's job has delivered its result.
            # The fallback timer is slow on purpose: a timer waking the GUI thread every
            # few ms takes the GIL from the job thread as often, and slows the job.
            loop = QEventLoop()
            for job in (widget._worker, widget._preview_worker):
                if job is None:
                    continue
                if hasattr(job, "when_finished"):
                    job.when_finished(loop.quit)
                else:  # a napari thread worker (the widget before its job thread)
                    job.finished.connect(loop.quit)
            fallback = QTimer()
            fallback.timeout.connect(lambda: None if widget.busy else loop.quit())
            fallback.start(200)
            if widget.busy:
                loop.exec_()
            fallback.stop()
            app.processEvents()  # the repaint of the updated layer

        def settle() -> None:
            # Not timed: what napari does a little later (the layer list's thumbnail, on
            # a timer) ends before the next measurement, as between a user's clicks.
            deadline = time.perf_counter() + 0.2
            while time.perf_counter() < deadline:
                app.processEvents()
                time.sleep(0.01)

        written: list[float] = []

        def record_write(name: str) -> None:
            # Workers look the result callback up when they start, so wrapping the
            # instance attribute times exactly the widget's own write into the layer.
            original = getattr(widget, name)

            def wrapped(result: object) -> None:
                original(result)
                written.append(time.perf_counter())

            setattr(widget, name, wrapped)

        record_write("_on_segmented")
        record_write("_on_preview")
        in_worker: list[float] = []
        run = widget._run

        def timed_run(*run_args: object) -> object:
            start = time.perf_counter()
            try:
                return run(*run_args)
            finally:
                in_worker.append(time.perf_counter() - start)

        widget._run = timed_run  # the worker body: model lookup + Segmenter.segment

        def timed(action: Callable[[], None]) -> tuple[float, float, float]:
            written.clear()
            in_worker.clear()
            start = time.perf_counter()
            action()
            wait_idle()
            end = time.perf_counter()
            if len(written) != 1:
                raise RuntimeError(f"expected one result written, got {len(written)}")
            settle()
            return written[0] - start, end - start, in_worker[0]

        def napari_alone(action: Callable[[], None]) -> float:
            # napari's own share: the same change to a layer, and its repaint, without
            # the widget (the floor that "shown" cannot go below on this display).
            start = time.perf_counter()
            action()
            app.processEvents()
            end = time.perf_counter()
            settle()
            return end - start

        # The engine alone, for reference: torch-free, as in napari (torch in a process
        # that has loaded Mesa's OpenGL crashes in triton's LLVM).
        segmenter = Segmenter(key, device="cpu")

        def engine_time(data: np.ndarray, sizing: str) -> float:
            start = time.perf_counter()
            segmenter.segment(data, axes="YXC", sizing=sizing)
            return time.perf_counter() - start

        image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
        layer = viewer.add_image(image, name="big", rgb=True)
        widget.image.value = layer
        widget.overwrite.value = True  # rewrite one layer instead of piling up layers
        for sizing in ("resize", "tiles"):
            widget.sizing.value = sizing
            for _ in range(2):  # warm: ONNX export/session, first layer creation
                timed(widget.segment)
                segmenter.segment(image, axes="YXC", sizing=sizing)
            clicks, engine = [], []
            for _ in range(args.repeats):  # interleaved: both see the same load
                clicks.append(timed(widget.segment))
                engine.append(engine_time(image, sizing))
            rows.append((f"click -> Labels {args.size}^2 RGB", sizing, clicks, engine))
        result = viewer.layers[-1]
        masks = [
            (engine_mask != 0).astype(result.data.dtype)
            for engine_mask in (
                segmenter.segment(image, axes="YXC"),
                np.zeros(image.shape[:2], np.uint8),
            )
        ]

        def write_labels(i: int) -> None:
            result.data[...] = masks[i % 2]
            result.refresh()

        floors = [
            (
                f"Labels {args.size}^2 written + shown",
                [napari_alone(lambda i=i: write_labels(i)) for i in range(args.repeats)],
            )
        ]

        n = args.repeats + 3
        side = args.preview_size
        stack = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
        widget.image.value = viewer.add_image(stack, name="stack", rgb=True)
        widget.sizing.value = "resize"
        viewer.dims.set_current_step(0, 0)
        floors.append(
            (
                f"slider step, {side}^2 RGB shown",
                [
                    napari_alone(lambda s=step: viewer.dims.set_current_step(0, s))
                    for step in range(1, n)
                ],
            )
        )
        viewer.dims.set_current_step(0, 0)
        widget.live.value = True
        wait_idle()
        for step in (1, 2):  # warm
            timed(lambda s=step: viewer.dims.set_current_step(0, s))
        slides, engine = [], []
        for step in range(3, n):
            slides.append(timed(lambda s=step: viewer.dims.set_current_step(0, s)))
            engine.append(engine_time(stack[step], "resize"))
        rows.append((f"live preview {side}^2 RGB", "resize", slides, engine))
        backend = f"{segmenter.device} ({segmenter.backend})"
        viewer.close()

    print()
    print(f"LV-UNet widget latency: {described}, {backend}, {args.repeats} runs each")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average before / after: {load_before} / {_load()}"
    )
    header = (
        f"| {'what':29} | {'sizing':6} | {'in layer':>8} | {'p90':>5} | {'shown':>5} "
        f"| {'p90':>5} | {'worker':>6} | {'engine alone':>12} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for what, sizing, times, engine_times in rows:
        in_layer, in_layer_p90, _ = _stats([t[0] for t in times])
        shown, shown_p90, _ = _stats([t[1] for t in times])
        worker = _stats([t[2] for t in times])[0]
        print(
            f"| {what:29} | {sizing:6} | {in_layer:8.1f} | {in_layer_p90:5.1f} | {shown:5.1f} "
            f"| {shown_p90:5.1f} | {worker:6.1f} | {_stats(engine_times)[0]:12.1f} |"
        )
    print(
        "medians in ms; in layer: until the result is in the Labels layer; shown: plus the\n"
        "repaint; worker: the job's own time (model lookup + Segmenter.segment); engine\n"
        "alone: Segmenter.segment on the same input in the main thread, napari idle, timed\n"
        "between the clicks (the same load)"
    )
    print()
    print("napari alone (no widget, no model), the floor of 'shown' on this display:")
    for what, times in floors:
        median, p90, _ = _stats(times)
        print(f"| {what:33} | median {median:6.1f} ms | p90 {p90:6.1f} ms |")


if __name__ == "__main__":
    main()
