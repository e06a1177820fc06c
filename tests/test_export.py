"""export_onnx: a fused, dynamic-shape ONNX graph equal to PyTorch, written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from lvunet_test_helpers import randomize_batchnorms

from napari_lvunet import export
from napari_lvunet.export import INPUT_NAME, OUTPUT_NAME, export_onnx, fused_cpu_copy
from napari_lvunet.model import LVUNet, reparameterize_model
from napari_lvunet.preprocess import normalize


@pytest.fixture(scope="module")
def unfused() -> LVUNet:
    torch.manual_seed(3)
    model = LVUNet(num_classes=3)
    randomize_batchnorms(model)
    model.set_act_learn(1.0)
    model.train()  # export must not depend on (or change) the caller's mode
    return model


@pytest.fixture(scope="module")
def exported(unfused: LVUNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    return export_onnx(unfused, folder / "model.onnx", metadata={"weights": "test"})


def test_export_is_one_checked_file_with_dynamic_shapes(exported: Path) -> None:
    assert exported.is_file()
    assert sorted(p.name for p in exported.parent.iterdir()) == ["model.onnx"]  # no side files
    proto = onnx.load(exported)
    onnx.checker.check_model(proto)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    (graph_input,) = proto.graph.input
    assert graph_input.name == INPUT_NAME
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[1].dim_value == 3
    assert all(d.dim_param for d in (dims[0], dims[2], dims[3])), "batch, H, W must be dynamic"
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props == {
        "num_classes": "3",
        "size_divisor": "128",
        "input": "normalized",
        "weights": "test",
    }
    no_bn = [n.op_type for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert no_bn == [], "the exported graph must be the fused model"


@pytest.mark.parametrize("shape", [(1, 3, 128, 128), (4, 3, 256, 384), (2, 3, 640, 128)])
def test_export_matches_pytorch(exported: Path, unfused: LVUNet, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    with torch.inference_mode():
        expected = unfused.eval()(x).numpy()
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    assert got.shape == (shape[0], 3, *shape[2:])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_caller_model_is_untouched(unfused: LVUNet, exported: Path) -> None:
    assert not unfused.fused and unfused.act_learn == 1.0


def test_refuses_what_it_cannot_export(tmp_path: Path) -> None:
    model = LVUNet()
    model.set_act_learn(0.7)
    with pytest.raises(ValueError, match="act_learn"):
        export_onnx(model, tmp_path / "m.onnx")
    model.set_act_learn(1.0)
    with pytest.raises(ValueError, match="opset must be >= 17"):
        export_onnx(model, tmp_path / "m.onnx", opset=16)
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(model, tmp_path / "missing" / "m.onnx")
    with pytest.raises(TypeError, match="expected an LVUNet"):
        export_onnx(torch.nn.Conv2d(3, 1, 1), tmp_path / "m.onnx")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_the_existing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous export")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("exporter bug")

    monkeypatch.setattr(torch.onnx, "export", broken)
    model = LVUNet(fused=True)
    with pytest.raises(RuntimeError, match=r"ONNX export failed .*exporter bug"):
        export_onnx(model, target)
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_fused_cpu_copy(unfused: LVUNet) -> None:
    fused = fused_cpu_copy(unfused)
    assert fused.fused and not fused.training and fused is not unfused
    again = fused_cpu_copy(fused)
    assert again is not fused
    reference = reparameterize_model(unfused)
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        torch.testing.assert_close(again(x), reference(x))
    assert export.MIN_OPSET == 17


def test_fast_exporter_is_used_quietly(
    unfused: LVUNet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO", "napari_lvunet"):
        warnings.simplefilter("always")
        path = export_onnx(unfused, tmp_path / "m.onnx", include_normalization=True)
    assert "exported with the TorchScript ONNX exporter" in caplog.text
    noisy = [
        w for w in caught if issubclass(w.category, (DeprecationWarning, torch.jit.TracerWarning))
    ]
    assert noisy == [], [str(w.message) for w in noisy]
    x = torch.rand(3, 3, 256, 384)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {INPUT_NAME: x.numpy()}
    )[0]
    with torch.inference_mode():
        expected = unfused.eval()(normalize(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_falls_back_to_the_torch_export_exporter(
    unfused: LVUNet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def unavailable(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("no TorchScript exporter in this torch")

    monkeypatch.setattr(export, "_export_torchscript", unavailable)
    with caplog.at_level("INFO", "napari_lvunet"):
        path = export_onnx(unfused, tmp_path / "m.onnx", metadata={"weights": "test"})
    assert "no TorchScript exporter in this torch" in caplog.text
    assert "exported with the torch.export-based ONNX exporter" in caplog.text
    proto = onnx.load(path)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in (dims[0], dims[2], dims[3]))
    assert {p.key: p.value for p in proto.metadata_props}["weights"] == "test"
    x = torch.randn(1, 3, 128, 256)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {INPUT_NAME: x.numpy()}
    )[0]
    with torch.inference_mode():
        np.testing.assert_allclose(got, unfused.eval()(x).numpy(), atol=1e-4, rtol=1e-4)
