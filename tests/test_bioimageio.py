"""The bioimage.io package (python -m training.bioimageio): validated offline with
bioimageio.spec, its test output equal to the plugin's engine on the same image."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="training.bioimageio reads the graph's opset with onnx")
spec = pytest.importorskip("bioimageio.spec", reason="pip install 'bioimageio.spec>=0.5.14'")

from training import bioimageio  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bioimageio") / "lvunet-kvasir-seg.zip"
    proc = subprocess.run(
        [sys.executable, "-m", "training.bioimageio", "--weights", "lvunet-kvasir-seg",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}")
    return out


def test_package_validates_offline(package: Path) -> None:
    description = spec.load_description(package, perform_io_checks=True)
    summary = description.validation_summary
    assert summary.status in ("valid-format", "passed"), summary.format()
    assert type(description).__name__ == "ModelDescr"
    assert [t.id for t in description.inputs] == ["image"]
    assert [t.id for t in description.outputs] == ["probability"]
    assert description.weights.onnx is not None and description.license == "MIT"
    assert len(description.cite) == 2


def test_test_output_equals_the_engine(package: Path) -> None:
    from napari_lvunet.inference import default_pool

    with zipfile.ZipFile(package) as archive:
        names = set(archive.namelist())
        assert {"rdf.yaml", "lvunet.onnx", "cover.png", "README.md"} <= names
        test_input = np.load(io.BytesIO(archive.read("test_input.npy")))
        test_output = np.load(io.BytesIO(archive.read("test_output.npy")))
        card = archive.read("README.md").decode()
    assert test_input.dtype == np.uint8 and test_input.shape == (1, 3, 256, 256)
    assert test_output.dtype == np.float32 and test_output.shape == (1, 1, 256, 256)
    assert "Not for diagnosis" in card and "## Validation" in card
    image = test_input[0].transpose(1, 2, 0)
    segmenter = default_pool().get("lvunet-kvasir-seg", device="cpu")
    labels, probs = segmenter.segment(image, sizing="resize", return_probabilities=True)
    np.testing.assert_allclose(test_output[0, 0], probs, rtol=1e-4, atol=1e-5)
    assert ((test_output[0, 0] > 0.5) == (labels > 0)).mean() > 0.999
    assert 0.05 < (labels > 0).mean() < 0.6, "the sample's polyp is found"


def test_existing_package_is_kept(package: Path) -> None:
    before = package.read_bytes()
    assert bioimageio.main(["--weights", "lvunet-kvasir-seg", "--out", str(package)]) == 1
    assert package.read_bytes() == before
