"""Exactness of LV-UNet's re-parameterization, and the model's contract.

Fusion is checked the way RepVGG's ``tools/verify.py`` does it, but asserted: every
BatchNorm's running statistics and affine parameters are randomised first, so that a
fold that ignores any of them (or gets eps wrong) shows up as a numeric difference.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lvunet_test_helpers import randomize_batchnorms
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights

from napari_lvunet.model import (
    SIZE_DIVISOR,
    FusibleBlock,
    LVUNet,
    SeriesActivation,
    reparameterize_model,
)

# float32 agreement required between the training and the deployment form.
ATOL = 1e-4
RTOL = 1e-4

UNFUSED_PARAMS = 934_545
FUSED_PARAMS = 510_985


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained_like_model() -> LVUNet:
    """An unfused model at act_learn=1 with randomised BatchNorms (not to be mutated)."""
    torch.manual_seed(0)
    model = LVUNet(num_classes=1)
    randomize_batchnorms(model)
    model.set_act_learn(1.0)
    return model.eval()


# --------------------------------------------------------------------------- blocks


@pytest.mark.parametrize(
    ("resample", "in_ch", "out_ch", "size"),
    [
        ("down", 80, 160, 16),
        ("up", 480, 240, 8),
        ("up", 16, 16, 32),
        ("none", 24, 40, 20),
    ],
)
@pytest.mark.parametrize("act_num", [1, 2])
def test_fusible_block_fuses_exactly(
    resample: str, in_ch: int, out_ch: int, size: int, act_num: int
) -> None:
    torch.manual_seed(1)
    block = FusibleBlock(in_ch, out_ch, resample, act_num)
    randomize_batchnorms(block, seed=2)
    block.set_act_learn(1.0)
    block.eval()
    x = torch.randn(2, in_ch, size, size + 4)
    with torch.no_grad():
        expected = block(x)
        block.reparameterize()
        actual = block(x)
    assert block.fused
    assert block.conv1 is None and block.conv2 is None and block.act.bn is None
    assert not has_batchnorm(block)
    scale = {"down": 0.5, "up": 2.0, "none": 1.0}[resample]
    assert actual.shape == (2, out_ch, int(size * scale), int((size + 4) * scale))
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def test_fusible_block_built_fused_matches_reparameterized() -> None:
    block = FusibleBlock(40, 24, "up")
    block.set_act_learn(1.0)
    block.eval().reparameterize()
    direct = FusibleBlock(40, 24, "up", fused=True)
    direct.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(1, 40, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(direct(x), block(x), atol=0, rtol=0)


def test_reparameterize_is_idempotent() -> None:
    block = FusibleBlock(16, 16, "none")
    block.set_act_learn(1.0)
    block.eval().reparameterize()
    before = copy.deepcopy(block.state_dict())
    block.reparameterize()
    assert state_dicts_equal(before, block.state_dict())


@pytest.mark.parametrize("act_num", [1, 2])
def test_series_activation_fuses_exactly(act_num: int) -> None:
    torch.manual_seed(3)
    act = SeriesActivation(24, act_num)
    nn.init.normal_(act.weight)  # the default init is tiny; make the kernel matter
    randomize_batchnorms(act, seed=4)
    act.eval()
    x = torch.randn(2, 24, 12, 10)
    with torch.no_grad():
        expected = act(x)
        act.reparameterize()
        actual = act(x)
    assert act.fused and act.bias is not None
    assert not has_batchnorm(act)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("slope", [0.0, 0.5, 0.999])
def test_block_refuses_to_fuse_below_act_learn_one(slope: float) -> None:
    block = FusibleBlock(16, 24, "down")
    block.set_act_learn(slope)
    with pytest.raises(ValueError, match="act_learn"):
        block.reparameterize()
    assert not block.fused  # nothing half-fused left behind


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_set_act_learn_rejects_out_of_range(value: float) -> None:
    model = LVUNet()
    with pytest.raises(ValueError, match="act_learn"):
        model.set_act_learn(value)
    assert model.act_learn == 0.0


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("hw", [(128, 128), (128, 256), (256, 256)])
def test_model_fuses_exactly(num_classes: int, hw: tuple[int, int]) -> None:
    torch.manual_seed(5)
    model = LVUNet(num_classes=num_classes)
    randomize_batchnorms(model, seed=6)
    model.set_act_learn(1.0)
    model.eval()
    fused = reparameterize_model(model)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        expected = model(x)
        actual = fused(x)
    assert actual.shape == (2, num_classes, *hw)
    assert fused.fused and not has_batchnorm(fused)
    assert not fused.training
    # The comparison must not be trivially satisfied by near-zero outputs.
    assert expected.abs().max() > 10 * ATOL
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def test_reparameterize_model_leaves_original_untouched(trained_like_model: LVUNet) -> None:
    before = copy.deepcopy(trained_like_model.state_dict())
    fused = reparameterize_model(trained_like_model)
    assert fused is not trained_like_model
    assert not trained_like_model.fused and trained_like_model.act_learn == 1.0
    assert has_batchnorm(trained_like_model)
    assert state_dicts_equal(before, trained_like_model.state_dict())


def test_reparameterize_model_keeps_training_mode_of_original() -> None:
    model = LVUNet()
    model.set_act_learn(1.0)
    model.train()
    fused = reparameterize_model(model)
    assert model.training and not fused.training


@pytest.mark.parametrize("slope", [0.0, 0.5])
def test_model_refuses_to_fuse_below_act_learn_one(slope: float) -> None:
    model = LVUNet()
    model.set_act_learn(slope)
    with pytest.raises(ValueError, match="act_learn"):
        reparameterize_model(model)
    assert not model.fused and model.act_learn == slope


def test_fused_built_model_has_reparameterized_keys_and_loads_strictly(
    trained_like_model: LVUNet,
) -> None:
    fused = reparameterize_model(trained_like_model)
    direct = LVUNet(**fused.config)
    assert direct.fused and not has_batchnorm(direct)
    assert direct.act_learn == fused.act_learn == 1.0
    want = {k: v.shape for k, v in fused.state_dict().items()}
    got = {k: v.shape for k, v in direct.state_dict().items()}
    assert got == want
    direct.load_state_dict(fused.state_dict(), strict=True)
    direct.eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(direct(x), fused(x), atol=0, rtol=0)


def test_fused_model_rejects_unfused_state_dict(trained_like_model: LVUNet) -> None:
    with pytest.raises(RuntimeError, match="Unexpected key"):
        LVUNet(fused=True).load_state_dict(trained_like_model.state_dict(), strict=True)


def test_parameter_counts_are_pinned(trained_like_model: LVUNet) -> None:
    assert count_params(LVUNet()) == UNFUSED_PARAMS
    assert count_params(reparameterize_model(trained_like_model)) == FUSED_PARAMS
    assert count_params(LVUNet(fused=True)) == FUSED_PARAMS


def test_config_rebuilds_architecture() -> None:
    model = LVUNet(num_classes=3, act_num=2)
    assert model.config == {"num_classes": 3, "act_num": 2, "fused": False}
    rebuilt = LVUNet(**model.config)
    assert count_params(rebuilt) == count_params(model)


def test_act_learn_reports_disagreeing_blocks() -> None:
    model = LVUNet()
    model.set_act_learn(0.5)
    model.final.set_act_learn(0.25)
    with pytest.raises(RuntimeError, match="disagree"):
        _ = model.act_learn


def test_act_learn_round_trips_through_state_dict(tmp_path) -> None:
    torch.manual_seed(7)
    model = LVUNet()
    randomize_batchnorms(model, seed=8)
    model.set_act_learn(0.5)
    model.eval()
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)

    fresh = LVUNet()
    assert fresh.act_learn == 0.0  # deep training starts from a ReLU
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    fresh.eval()
    assert fresh.act_learn == 0.5
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
        # The slope matters: at a ReLU the same weights compute something else.
        fresh.set_act_learn(0.0)
        assert not torch.allclose(fresh(x), model(x), atol=ATOL)


def test_act_learn_round_trips_through_safetensors(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    model = LVUNet()
    model.set_act_learn(0.25)
    path = tmp_path / "ckpt.safetensors"
    save_file(model.state_dict(), str(path))
    fresh = LVUNet()
    fresh.load_state_dict(load_file(str(path)), strict=True)
    assert fresh.act_learn == 0.25


@pytest.mark.parametrize("hw", [(100, 128), (128, 200), (64, 64), (129, 256)])
def test_input_not_multiple_of_divisor_raises(hw: tuple[int, int]) -> None:
    model = LVUNet().eval()
    with pytest.raises(ValueError, match=rf"multiples of {SIZE_DIVISOR}.*{hw[0]}x{hw[1]}"):
        model(torch.zeros(1, 3, *hw))


def test_invalid_constructor_arguments_raise() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        LVUNet(num_classes=0)
    with pytest.raises(ValueError, match="weights"):
        LVUNet(fused=True, weights=MobileNet_V3_Large_Weights.IMAGENET1K_V1)
    with pytest.raises(ValueError, match="resample"):
        FusibleBlock(8, 8, "sideways")


def test_imagenet_weights_offline_fail_with_clear_message(tmp_path, monkeypatch) -> None:
    # An empty TORCH_HOME (nothing cached) and a network that refuses every request, so
    # the test checks the offline message on any machine, online ones included.
    import urllib.error

    import torch.hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable (simulated)")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(RuntimeError, match="could not load the ImageNet weights") as info:
        LVUNet(weights=MobileNet_V3_Large_Weights.IMAGENET1K_V1)
    assert "weights=None" in str(info.value)
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_default_builds_without_download(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    LVUNet()
    assert not any(tmp_path.rglob("*.pth"))
