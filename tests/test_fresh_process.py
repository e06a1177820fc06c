"""What a user meets in a fresh interpreter, where import order is not pytest's.

pytest imports torch (and with torchvision, triton) before any napari viewer exists, so a
crash that depends on import order never shows inside the test process: triton's bundled
LLVM segfaults a process whose OpenGL driver (Mesa with llvmpipe: virtual machines,
remote desktops, many laptops) has already loaded its own libLLVM (issue 9). Each test
here runs a new interpreter (``sys.executable``) and checks its exit status: a segfault
is a negative return code.

- The README route: viewer first, then the widget and every sample through napari's own
  plugin commands, a segmentation through the widget, close, exit 0.
- CPU inference, the widget module, the sample data and ``napari-lvunet segment`` never
  import torch or torchvision.
- The GPU path inside napari: torch imported through ``import_torch(gui_safe=True)``
  after a viewer exists does not crash.

To see the README route on another checkout (an older commit, say)::

    git worktree add /tmp/old COMMIT
    xvfb-run -a -s "-screen 0 1280x1024x24" python tests/test_fresh_process.py /tmp/old
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Where a script's one-line JSON result starts on stdout (napari may print before it).
_RESULT = "RESULT "

# Helpers every GUI script needs: wait for Qt while work finishes, and say whether Mesa's
# libLLVM is mapped (then the crash this file guards against is possible here at all).
_GUI_PRELUDE = textwrap.dedent(
    """
    import faulthandler, json, sys, time
    faulthandler.enable()  # a crash prints the Python stack that led to it
    from qtpy.QtWidgets import QApplication

    def pump(until, timeout, what):
        app = QApplication.instance()
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                sys.exit(f"timed out after {timeout} s waiting for {what}")
            app.processEvents()
            time.sleep(0.01)

    def settle(seconds=0.5):
        # Let Qt draw (the window, its OpenGL canvas) for a moment.
        app = QApplication.instance()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)

    def llvm_mapped():
        with open("/proc/self/maps") as maps:
            return any("libLLVM" in line for line in maps)
    """
)

#: The README's napari route (README "Use in napari"): start napari, open the widget from
#: the Plugins menu and both samples from File > Open Sample, press Segment.
README_ROUTE = _GUI_PRELUDE + textwrap.dedent(
    """
    import napari
    from napari.layers import Labels
    from napari.utils.notifications import notification_manager

    def dice(labels, truth):
        labels, truth = labels > 0, truth > 0
        return float(2 * (labels & truth).sum() / max(labels.sum() + truth.sum(), 1))

    viewer = napari.Viewer()  # first, as a user starts napari before anything else
    settle()  # let the window and its OpenGL canvas come up
    print("step: viewer open", flush=True)  # the last step printed says where a crash hit
    _dock, widget = viewer.window.add_plugin_dock_widget(
        "napari-lvunet", "LV-UNet segmentation"
    )
    print("step: widget docked", flush=True)
    for key in ("polyp", "polyp_stack", "polyp_video"):  # File > Open Sample > LV-UNet
        viewer.open_sample("napari-lvunet", key)
    settle()
    print("step: samples open", flush=True)
    before = set(map(id, viewer.layers))
    widget.image.value = viewer.layers["polyp"]
    widget.segment()
    pump(lambda: not widget.busy, 300, "the Segment worker")
    print("step: segmented", flush=True)
    truth = viewer.layers["polyp ground truth"].data
    new_labels = [
        layer for layer in viewer.layers
        if isinstance(layer, Labels) and id(layer) not in before
    ]
    result = {
        "layers": [layer.name for layer in viewer.layers],
        "new_labels": [layer.name for layer in new_labels],
        "foreground": [int((layer.data > 0).sum()) for layer in new_labels],
        "dice": [dice(layer.data, truth) for layer in new_labels],
        "status": str(widget.status.value),
        "model": widget.model.value,
        "notifications": [str(n.message) for n in notification_manager.records],
        "package": sys.modules["napari_lvunet"].__file__,
        "llvm_mapped": llvm_mapped(),
        "torch_loaded": "torch" in sys.modules,
    }
    viewer.close()
    print("RESULT " + json.dumps(result), flush=True)
    """
)

#: CPU inference, the widget and the sample data, in one process that must stay torch-free.
_TORCH_FREE_API = textwrap.dedent(
    """
    import faulthandler, json, sys
    faulthandler.enable()
    from pathlib import Path

    import napari_lvunet._widget
    import napari_lvunet._sample_data
    import napari_lvunet.cli
    import napari_lvunet.inference

    image = napari_lvunet._sample_data.polyp()[0][0]
    labels = napari_lvunet.inference.segment(image, "lvunet-kvasir-seg", device="cpu")
    out = Path(sys.argv[1])
    status = napari_lvunet.cli.main([
        "segment", str(napari_lvunet.cli.sample_image_path()), "--out", str(out),
        "--device", "cpu",
    ])
    print("RESULT " + json.dumps({
        "shape": list(labels.shape),
        "foreground": int((labels > 0).sum()),
        "cli_status": status,
        "written": sorted(p.name for p in out.iterdir()),
        "loaded": [m for m in ("torch", "torchvision", "triton") if m in sys.modules],
    }), flush=True)
    """
)

#: A user picks CUDA in the widget: torch comes in after napari's OpenGL canvas is up.
_GPU_PATH_IN_GUI = _GUI_PRELUDE + textwrap.dedent(
    """
    import napari

    viewer = napari.Viewer()
    settle()
    from napari_lvunet._torch import import_torch

    torch = import_torch("CUDA inference", gui_safe=True)
    import torchvision  # noqa: F401  (what crashed napari)
    import napari_lvunet.model

    model = napari_lvunet.model.LVUNet(act_num=1).eval()
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 128, 128))
    settle()
    viewer.close()
    print("RESULT " + json.dumps({
        "logits": list(logits.shape),
        "triton": repr(sys.modules.get("triton", "absent")),
        "llvm_mapped": llvm_mapped(),
    }), flush=True)
    """
)


def run_fresh(
    code: str,
    *args: str,
    source: Path = ROOT,
    cwd: Path | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter that imports napari_lvunet from ``source``."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    env.pop("QT_QPA_PLATFORM", None)  # "offscreen" cannot start napari's OpenGL canvas
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd or source,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    """The exit status (with the signal's name for a crash) and the output's tail."""
    code = proc.returncode
    status = f"exit {code}"
    if code < 0:
        status = f"killed by {signal.Signals(-code).name} (return code {code})"
    return f"{status}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"


def result_of(proc: subprocess.CompletedProcess[str]) -> dict:
    """The script's RESULT line, after checking it exited cleanly."""
    assert proc.returncode == 0, describe(proc)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT)]
    assert lines, describe(proc)
    return json.loads(lines[-1].removeprefix(_RESULT))


def _needs_display() -> None:
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        pytest.skip("needs a display: run under xvfb-run (scripts/test.sh does)")


@pytest.mark.gui
@pytest.mark.slow
def test_readme_route_in_fresh_napari(tmp_path: Path) -> None:
    _needs_display()
    result = result_of(run_fresh(README_ROUTE, cwd=tmp_path))
    assert Path(result["package"]).resolve().is_relative_to(ROOT)
    samples = {"polyp", "polyp ground truth", "polyp stack", "polyp stack ground truth"}
    assert samples | {"polyp video"} <= set(result["layers"]), result["layers"]
    assert result["model"] == "lvunet-kvasir-seg"
    assert result["status"].startswith("done"), result
    assert len(result["new_labels"]) == 1, result
    # The bundled model finds the sample's polyp (its test Dice is 0.87; this frame's is
    # well above 0.5), not an empty or a full mask.
    assert result["foreground"][0] > 1000, result
    assert result["dice"][0] > 0.5, result


def test_cpu_inference_widget_and_cli_import_no_torch(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = result_of(run_fresh(_TORCH_FREE_API, str(out), cwd=tmp_path))
    assert result["loaded"] == [], f"imported {result['loaded']} for CPU inference"
    assert result["shape"] == [530, 621]
    assert result["foreground"] > 1000
    assert result["cli_status"] == 0
    assert any(name.endswith("_mask.png") for name in result["written"]), result


def test_segment_command_imports_no_torch(tmp_path: Path) -> None:
    """The real command, its every import listed by ``-X importtime``."""
    from napari_lvunet.cli import sample_image_path

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-X", "importtime", "-m", "napari_lvunet", "segment",
           str(sample_image_path()), "--out", str(tmp_path / "out"), "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, describe(proc)
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "napari_lvunet.cli" in imported  # the listing works
    heavy = {"torch", "torchvision"} & imported
    assert not heavy, f"`napari-lvunet segment --device cpu` imported {sorted(heavy)}"
    assert any(p.name.endswith("_mask.png") for p in (tmp_path / "out").iterdir())


@pytest.mark.gui
def test_gpu_path_imports_torch_safely_after_a_viewer(tmp_path: Path) -> None:
    _needs_display()
    result = result_of(run_fresh(_GPU_PATH_IN_GUI, cwd=tmp_path))
    assert result["logits"] == [1, 1, 128, 128]
    assert result["triton"] == "None", result  # blocked: torch and torchvision run without it


def main(argv: list[str]) -> int:
    """Run the README route against the checkout ``argv[0]`` and report how it ended."""
    source = Path(argv[0] if argv else ROOT).resolve()
    proc = run_fresh(README_ROUTE, source=source)
    print(describe(proc))
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
