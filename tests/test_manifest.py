"""The npe2 manifest reaches napari from an editable install and from a built wheel.

Each check runs in a fresh interpreter whose working directory is a temporary folder and
whose PYTHONPATH is unset, so napari can only find the plugin the way a user's napari
would: through the installed distribution's ``napari.manifest`` entry point.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Run in the child interpreter: what napari lists, and where the files came from.
_PROBE = textwrap.dedent(
    """
    import json, sys
    import napari.plugins
    from napari.plugins import _npe2

    napari.plugins._initialize_plugins()
    widgets = {p: list(names) for kind, (p, names) in _npe2.widget_iterator() if kind == "dock"}
    samples = {p: sorted(d) for p, d in _npe2.sample_iterator()}
    import napari_lvunet, napari_lvunet._sample_data as sd
    layers = sd.polyp() + sd.polyp_stack()
    print(json.dumps({
        "widgets": widgets.get("napari-lvunet"),
        "samples": samples.get("napari-lvunet"),
        "package": napari_lvunet.__file__,
        "shapes": [list(data.shape) for data, _, _ in layers],
        "kinds": [kind for _, _, kind in layers],
    }))
    """
)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=_child_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _check_probe(python: str, cwd: Path) -> dict:
    validated = _run([python, "-m", "npe2", "validate", "napari-lvunet"], cwd)
    assert "valid" in validated
    probe = json.loads(_run([python, "-c", _PROBE], cwd).strip().splitlines()[-1])
    assert probe["widgets"] == ["LV-UNet segmentation"]
    assert probe["samples"] == ["polyp", "polyp_stack", "polyp_video"]
    assert probe["kinds"] == ["image", "labels", "image", "labels"]
    assert probe["shapes"] == [[530, 621, 3], [530, 621], [5, 256, 320, 3], [5, 256, 320]]
    return probe


def test_manifest_contents() -> None:
    manifest = yaml.safe_load((ROOT / "napari.yaml").read_text())
    assert manifest["name"] == "napari-lvunet"
    assert set(manifest["categories"]) == {"Segmentation", "Annotation"}
    widgets = manifest["contributions"]["widgets"]
    assert [w["display_name"] for w in widgets] == ["LV-UNet segmentation"]
    # The copy inside the package is the same file, so the two can never drift apart.
    assert (ROOT / "napari_lvunet" / "napari.yaml").resolve() == (ROOT / "napari.yaml")
    assert (ROOT / "napari_lvunet" / "sample_data").resolve() == (ROOT / "sample_data")
    assert (ROOT / "sample_data" / "README.md").read_text().count("Kvasir-SEG") >= 1


def test_sample_data_from_test_split() -> None:
    """The sample ids must come from the test split, never seen in training."""
    splits_file = ROOT.parent / "shared" / "datasets" / "kvasir-seg" / "splits.json"
    if not splits_file.exists():
        pytest.skip(f"{splits_file} not present on this machine")
    test_ids = set(json.loads(splits_file.read_text())["test"])
    readme = (ROOT / "sample_data" / "README.md").read_text()
    ids = {tok.strip("`,") for tok in readme.split() if tok.strip("`,").startswith("cju")}
    ids = {i.removeprefix("kvasir_").split(".")[0].removesuffix("_mask") for i in ids}
    assert len(ids) == 9  # the image, the five stack frames, the video's three frames
    assert ids <= test_ids


def test_editable_install_lists_widget(tmp_path: Path) -> None:
    try:
        dist = importlib.metadata.distribution("napari-lvunet")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("napari-lvunet is not installed (pip install -e .)")
    assert any(ep.group == "napari.manifest" for ep in dist.entry_points)
    probe = _check_probe(sys.executable, tmp_path)
    assert Path(probe["package"]).resolve().parent == ROOT / "napari_lvunet"


@pytest.mark.slow
def test_wheel_carries_manifest_and_samples(tmp_path: Path) -> None:
    # Build from a copy of the checkout's files (tracked and new, not ignored) so the
    # build's scratch folders never land in the shared working tree.
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        source = ROOT / name
        if source.is_file() or source.is_symlink():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, src / name, follow_symlinks=False)
    dist_dir = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(dist_dir), str(src)],
        tmp_path,
    )  # fmt: skip
    (wheel,) = dist_dir.glob("napari_lvunet-*.whl")
    _check_wheel_metadata(wheel)

    # A throwaway venv that sees this venv's packages (no downloads) but not its editable
    # napari-lvunet: a plain path line in a .pth adds the folder without running the
    # editable finder that its own .pth files install.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = str(venv / "bin" / "python")
    child_site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                      tmp_path).strip()  # fmt: skip
    Path(child_site, "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
         "--no-index", str(wheel)],
        tmp_path,
    )  # fmt: skip
    probe = _check_probe(python, tmp_path)
    assert Path(probe["package"]).is_relative_to(child_site)
    installed = Path(child_site, "napari_lvunet")
    assert (installed / "napari.yaml").is_file() and not (installed / "napari.yaml").is_symlink()
    assert (installed / "sample_data" / "README.md").is_file()
    # The bundled model's weights and its ONNX graph: CPU inference runs from the graph.
    weights_dir = src / "napari_lvunet" / "_weights"
    shipped = sorted(p.name for p in weights_dir.iterdir() if p.suffix in {".safetensors", ".onnx"})
    assert {Path(n).suffix for n in shipped} == {".safetensors", ".onnx"}, shipped
    for name in shipped:
        copy = installed / "_weights" / name
        assert copy.is_file(), f"the wheel lacks _weights/{name}"
        assert copy.read_bytes() == (weights_dir / name).read_bytes()


def _check_wheel_metadata(wheel: Path) -> None:
    """A core install needs no PyTorch; the train extra brings it, and all includes train."""
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = zf.read(name).decode()
    requires = [
        line.split(":", 1)[1].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    core = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requires if ";" not in r}
    assert {"numpy", "onnxruntime", "napari", "safetensors", "pooch", "av"} <= core, core
    assert not core & {"torch", "torchvision", "onnx", "onnxscript", "matplotlib"}, core
    train = {
        re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower()
        for r in requires
        if r.endswith('extra == "train"')
    }
    assert {"torch", "torchvision", "onnx", "onnxscript", "matplotlib"} <= train, train
    assert any(r.endswith('extra == "all"') and "train" in r for r in requires), requires
