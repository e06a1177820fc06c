"""The adaptation levers (training.adapt), the duplicate-safe held-out split, the shipped
reference/replay sets and their torch-free scoring (training.reference): real steps,
real files, tiny generated data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import adapt
from training.data import Augment, CachedSegmentationDataset, Pair, find_pairs
from training.finetune import split_heldout
from training.losses import BCEDiceLoss
from training.reference import (
    REFERENCE_DIR,
    ReferencePair,
    binary_dice,
    reference_pairs,
    replay_pairs,
    score_pairs,
)

REPO = Path(__file__).resolve().parent.parent
SIZE = 128


def _folder(root: Path, n: int = 6, seed: int = 7) -> Path:
    """n pairs at 128 px: a bright disc on noise, and its mask."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(n):
        image = (rng.random((SIZE, SIZE, 3)) * 60).astype(np.uint8)
        cy, cx = rng.integers(32, 96, size=2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 25**2
        image[disc] += np.array([170, 80, 40], np.uint8)
        Image.fromarray(image).save(root / "images" / f"c{i}.png")
        Image.fromarray(disc.astype(np.uint8) * 255).save(root / "masks" / f"c{i}.png")
    return root


def _fused(seed: int = 0) -> torch.nn.Module:
    from napari_lvunet.model import LVUNet

    torch.manual_seed(seed)
    return LVUNet(1, fused=True).eval()


# -- schedule -------------------------------------------------------------------------


def test_schedule_counts_steps_not_epochs() -> None:
    assert adapt.schedule(16, 4, steps=100) == (100, 25)
    assert adapt.schedule(16, 8, steps=5) == (5, 3)  # 2 steps an epoch: 5 steps, 3 passes
    assert adapt.schedule(16, 8, epochs=30) == (60, 30)  # the old default: 60 steps
    assert adapt.schedule(3, 2, epochs=2) == (4, 2)
    for kwargs in ({}, {"steps": 1, "epochs": 1}, {"steps": 0}, {"epochs": 0}):
        with pytest.raises(ValueError):
            adapt.schedule(16, 4, **kwargs)


def _step_shares(lr_scale: str) -> tuple[list[float], list[dict]]:
    """One Adam step on a fused model whose tensors have scales from 0.1x to 10x (as
    fusing leaves them): how far each tensor that moved moved, as a share of its RMS."""
    model = _fused()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.mul_(10.0 ** (i % 3 - 1))
    before = [p.detach().clone() for p in model.parameters()]
    groups = adapt.param_groups(model, 1e-3, lr_scale)
    optimizer = torch.optim.Adam(groups)
    model.train()
    model(torch.rand(2, 3, SIZE, SIZE))[:, :1].sigmoid().mean().backward()
    optimizer.step()
    shares = []
    for p, b in zip(model.parameters(), before, strict=True):
        rms, moved = float(b.pow(2).mean().sqrt()), float((p.detach() - b).pow(2).mean().sqrt())
        if rms >= adapt.RMS_FLOOR and moved > 0:
            shares.append(moved / rms)
    return shares, groups


def test_relative_learning_rates_move_every_tensor_by_the_same_share() -> None:
    shares, groups = _step_shares("relative")
    model = _fused()
    assert [g["name"] for g in groups] == [n for n, _ in model.named_parameters()]
    assert all(g["lr"] >= 1e-3 * adapt.RMS_FLOOR for g in groups)
    # Adam's first step moves each value by at most its group's rate: 1e-3 of the RMS
    assert len(shares) > 10 and 5e-4 < max(shares) <= 1e-3 * (1 + 1e-4)
    # one rate for all: the small tensors move by many times that share
    shares, groups = _step_shares("absolute")
    assert {g["lr"] for g in groups} == {1e-3}
    assert max(shares) > 5e-3
    with pytest.raises(ValueError, match="lr_scale"):
        adapt.param_groups(model, 1e-3, "per-layer")


def test_cosine_schedule_decays_every_group_to_one_percent() -> None:
    w = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.Adam([{"params": [w[0]], "lr": 1.0}, {"params": [w[1]], "lr": 0.1}])
    scheduler = adapt.cosine_schedule(optimizer, 10)
    seen = []
    for _ in range(12):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert seen[0] == [1.0, 0.1]
    assert seen[5] == pytest.approx([0.505, 0.0505])  # half way
    assert seen[10] == seen[11] == pytest.approx([0.01, 0.001])  # the end, then held


def test_replay_count_makes_the_share_of_the_batch() -> None:
    assert adapt.replay_count(4, 0.0) == 0
    assert adapt.replay_count(4, 0.25) == 1  # 1 of 5
    assert adapt.replay_count(6, 0.25) == 2  # 2 of 8
    assert adapt.replay_count(1, 0.01) == 1  # at least one when asked for
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError):
            adapt.replay_count(4, bad)


# -- batches ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("adapt")
    user = find_pairs(_folder(root / "user", 5, seed=1))
    replay = find_pairs(_folder(root / "replay", 3, seed=2))
    aug = adapt.AUGMENTS["camera"]
    return (
        CachedSegmentationDataset(user, (SIZE, SIZE), augment=aug, seed=0),
        CachedSegmentationDataset(replay, (SIZE, SIZE), augment=aug, seed=1),
    )


def test_recolour_gives_each_channel_the_target_mean_and_spread() -> None:
    gen = torch.Generator().manual_seed(0)
    image = 0.3 + 0.2 * torch.rand(3, 64, 64, generator=gen)
    colours = torch.tensor([[0.6, 0.35, 0.3], [0.08, 0.05, 0.04]])  # means, spreads
    out = adapt.recolour(image, colours)
    assert out.shape == image.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.allclose(out.mean((1, 2)), colours[0], rtol=1e-4)
    assert torch.allclose(out.std((1, 2)), colours[1], rtol=1e-3)
    stats = adapt.colour_stats((torch.stack([image, out]) * 255).round().to(torch.uint8))
    assert stats.shape == (2, 3)
    assert torch.allclose(stats[0], (image.mean((1, 2)) + colours[0]) / 2, atol=3e-3)


def test_replay_is_recoloured_in_its_share_of_draws_the_same_on_every_call(caches: tuple) -> None:
    _, replay_cache = caches
    colours = torch.tensor([[0.2, 0.5, 0.7], [0.1, 0.1, 0.1]])
    plain = adapt.PairDataset(replay_cache, None)
    keys = [(i, d) for i in range(len(replay_cache)) for d in range(20)]

    def recoloured(share: float) -> list[bool]:
        pairs = adapt.PairDataset(replay_cache, None, colours=colours, recolour_share=share)
        flags = []
        for key in keys:
            image, both = pairs[key]
            again, _ = pairs[key]
            assert torch.equal(image, again)  # a pure function of (seed, draw, index)
            assert torch.equal(both, plain[key][1])  # the masks are never touched
            flags.append(not torch.equal(image, plain[key][0]))
        return flags

    assert not any(recoloured(0.0)) and all(recoloured(1.0))
    half = recoloured(0.5)
    assert 0.3 < sum(half) / len(half) < 0.7
    with pytest.raises(ValueError, match="recolour"):
        adapt.PairDataset(replay_cache, None, recolour_share=0.5)  # no colours to move to


def test_mixed_batches_mix_the_share_and_see_every_user_pair_equally(caches: tuple) -> None:
    user_cache, replay_cache = caches
    changed = torch.zeros_like(user_cache.masks)
    changed[..., :72] = 1  # the left half: every crop keeps some of it
    user = adapt.PairDataset(user_cache, changed)
    replay = adapt.PairDataset(replay_cache, None)
    batches = adapt.MixedBatches(user, replay, user_per_batch=2, replay_per_batch=1, seed=3)
    first_images = []
    for _ in range(5):  # 10 user pairs: two passes over 5
        x, y, ch = batches.batch()
        assert x.shape == (3, 3, SIZE, SIZE) and y.shape == ch.shape == (3, 1, SIZE, SIZE)
        assert set(y.unique().tolist()) <= {0.0, 1.0}
        assert ch[:2].sum() > 0 and ch[2].sum() == 0  # a replay pair: nothing weighs more
        first_images.append(x[0])
    assert batches.user_passes == 1
    # Same seed, same batches.
    again = adapt.MixedBatches(user, replay, user_per_batch=2, replay_per_batch=1, seed=3)
    assert torch.equal(again.batch()[0][0], first_images[0])
    # Every pair equally often, each use with its own draw number.
    taken = adapt._Stream(5, 0).take(10)
    assert np.bincount([k for k, _ in taken]).tolist() == [2] * 5
    assert len(set(taken)) == 10 and {d for _, d in taken} == {0, 1}
    # A repeated pair is augmented afresh.
    a, _ = user[(0, 0)]
    b, _ = user[(0, 1)]
    assert not torch.equal(a, b)


def test_mixed_batches_refuse_impossible_requests(caches: tuple) -> None:
    user = adapt.PairDataset(caches[0], None)
    with pytest.raises(ValueError):
        adapt.MixedBatches(user, None, user_per_batch=6)  # 5 pairs only
    with pytest.raises(ValueError):
        adapt.MixedBatches(user, None, user_per_batch=2, replay_per_batch=1)


def test_camera_augment_changes_colour_gamma_blur_within_range(caches: tuple) -> None:
    cache = caches[0]
    gen = torch.Generator().manual_seed(0)
    base = Augment(min_scale=0.5, color=0.2)
    cam = adapt.CameraAugment(min_scale=0.5, color=0.2, gains=0.1, gamma=0.3, blur=1.0)
    img, msk = cam(cache.images[0], cache.masks[0], (SIZE, SIZE), gen)
    ref, ref_msk = base(
        cache.images[0], cache.masks[0], (SIZE, SIZE), torch.Generator().manual_seed(0)
    )
    assert img.shape == (3, SIZE, SIZE) and 0.0 <= float(img.min()) <= float(img.max()) <= 1.0
    assert torch.equal(msk, ref_msk)  # photometric only: the mask follows the geometry
    assert not torch.allclose(img, ref)

    # blur=1 always blurs: neighbouring pixels differ less than without it
    def roughness(t: torch.Tensor) -> float:
        return float((t[:, 1:] - t[:, :-1]).abs().mean())

    assert roughness(img) < roughness(ref)


# -- loss and changed pixels ---------------------------------------------------------------


def test_weighted_loss_is_plain_at_weight_one_and_pulls_harder_on_changed_pixels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 16, 16, requires_grad=True)
    target = (torch.rand(2, 1, 16, 16) > 0.5).float()
    changed = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    changed[:, :, :4] = 1
    plain = adapt.WeightedBCEDiceLoss(1.0)
    plain.set_changed(changed)
    assert torch.allclose(plain(logits, target), BCEDiceLoss(0.5)(logits, target))
    weighted = adapt.WeightedBCEDiceLoss(4.0)
    weighted.set_changed(changed)
    (grad,) = torch.autograd.grad(weighted(logits, target), logits)
    (grad_plain,) = torch.autograd.grad(plain(logits, target), logits)
    ratio_changed = grad[:, :, :4].abs().mean() / grad_plain[:, :, :4].abs().mean()
    ratio_kept = grad[:, :, 4:].abs().mean() / grad_plain[:, :, 4:].abs().mean()
    assert ratio_changed > 2.0 * ratio_kept
    weighted.set_changed(torch.ones(2, 1, 16, 16))  # all changed: the plain loss again
    assert torch.allclose(weighted(logits, target), BCEDiceLoss(0.5)(logits, target))
    with pytest.raises(ValueError):
        adapt.WeightedBCEDiceLoss(0.5)
    weighted.set_changed(torch.ones(1, 1, 16, 16))
    with pytest.raises(ValueError, match="changed map"):
        weighted(logits, target)


def test_changed_pixels_are_where_the_proposal_differs_from_the_mask() -> None:
    from napari_lvunet.preprocess import normalize, resize

    model = _fused()
    images = torch.randint(0, 256, (3, 3, 144, 144), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(normalize(resize(images.float() / 255, (SIZE, SIZE))))
        logits = torch.nn.functional.interpolate(logits, size=(144, 144), mode="bilinear")
    proposal = (logits > 0).to(torch.uint8)
    masks = proposal.clone()
    masks[:, :, :20] ^= 1  # the user repainted the top rows
    model.train()
    changed = adapt.changed_pixels(model, images, masks, (SIZE, SIZE), batch_size=2)
    assert model.training  # left as it was
    expected = torch.zeros_like(masks)
    expected[:, :, :20] = 1
    assert torch.equal(changed, expected)


# -- the held-out split keeps copies together ---------------------------------------------


def test_copies_of_one_image_never_straddle_the_heldout_split(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", 6)
    # The same picture saved again under other names, also as TIFF: one image, 4 pairs.
    for name, suffix in (("again", ".png"), ("third", ".png"), ("tif", ".tif")):
        Image.open(root / "images" / "c0.png").save(root / "images" / f"z{name}{suffix}")
        Image.open(root / "masks" / "c0.png").save(root / "masks" / f"z{name}.png")
    pairs = find_pairs(root)
    digest = {p.stem: adapt.content_digest(p.image) for p in pairs}
    assert len(set(digest.values())) == 6
    sides = set()
    for seed in range(12):
        train, hold = split_heldout(root, pairs, fraction=0.2, seed=seed)
        assert sorted(p.stem for p in train + hold) == sorted(p.stem for p in pairs)
        assert not {digest[p.stem] for p in train} & {digest[p.stem] for p in hold}
        sides.add("c0" in {p.stem for p in hold})
    assert sides == {True, False}  # the copies were held out together in some splits


def test_splits_json_twin_is_not_held_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _folder(tmp_path / "d", 4)
    Image.open(root / "images" / "c0.png").save(root / "images" / "copy.png")
    Image.open(root / "masks" / "c0.png").save(root / "masks" / "copy.png")
    (root / "splits.json").write_text(
        json.dumps({"train": ["c0", "c1", "c2"], "val": ["c3", "copy"], "test": []})
    )
    with caplog.at_level("WARNING", logger="training.finetune"):
        train, hold = split_heldout(root, find_pairs(root))
    assert [p.stem for p in train] == ["c0", "c1", "c2"]
    assert [p.stem for p in hold] == ["c3"] and "copy" in caplog.text
    one = _folder(tmp_path / "one", 1)
    Image.open(one / "images" / "c0.png").save(one / "images" / "c1.png")
    Image.open(one / "masks" / "c0.png").save(one / "masks" / "c1.png")
    with pytest.raises(ValueError, match="2 different images"):
        split_heldout(one, find_pairs(one))


# -- the command line with every lever ------------------------------------------------------


def test_finetune_command_with_replay_and_weights_records_them(tmp_path: Path) -> None:
    from napari_lvunet.model import LVUNet
    from napari_lvunet.weights import read_metadata, save_weights

    folder = _folder(tmp_path / "corr", 5)
    start = save_weights(
        LVUNet(1, fused=True), tmp_path / "start.safetensors", {"train_size": [SIZE, SIZE]}
    )
    cmd = [
        sys.executable, "-m", "training.finetune", "--data", str(folder), "--weights",
        str(start), "--out", str(tmp_path / "out"), "--steps", "3", "--batch-size", "2",
        "--replay", "0.34", "--changed-weight", "3", "--progress", "json", "--device", "cpu",
        "--precision", "fp32",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(x[8:]) for x in proc.stdout.splitlines() if x.startswith("@lvunet ")]
    start_event = events[0]
    assert start_event["event"] == "start" and start_event["total_steps"] == 3
    assert start_event["epochs"] == 2  # 4 training pairs at 2 a step: 3 steps, 2 passes
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert [e["epoch"] for e in events if e["event"] == "eval"] == [0, 2]  # before, after
    meta = read_metadata(events[-1]["weights"])["finetune"]
    assert meta["schedule"] == "steps" and meta["steps"] == 3
    assert meta["replay"] == {"share": 0.34, "per_batch": 1, "recolour": 0.5}
    assert meta["lr"] == 3e-3 and meta["lr_scale"] == "relative"
    assert meta["changed_weight"] == 3.0 and meta["augment"] == "camera"
    bad = subprocess.run(
        [*cmd[:-8], "--replay", "1"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "share in [0, 1)" in bad.stderr
    bad = subprocess.run(
        [*cmd[:-8], "--recolour", "1.5"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "share in [0, 1]" in bad.stderr


# -- the shipped sets and their scoring -------------------------------------------------------


def test_shipped_reference_and_replay_sets_are_disjoint_small_and_readable() -> None:
    from training.reference import read_mask

    ref, rep = reference_pairs(), replay_pairs()
    assert len(ref) == 32 and len(rep) == 40
    assert not {p.stem for p in ref} & {p.stem for p in rep}
    total = sum(f.stat().st_size for f in REFERENCE_DIR.rglob("*") if f.is_file())
    assert total < 2 * 1024**2
    assert "Jha" in (REFERENCE_DIR / "README.md").read_text()
    for pair in ref[:4] + rep[:4]:
        image = np.asarray(Image.open(pair.image))
        mask = read_mask(pair.mask)
        assert image.shape[:2] == mask.shape and max(mask.shape) == 320 and mask.any()


def test_score_pairs_is_the_engine_dice(tmp_path: Path) -> None:
    from napari_lvunet.inference import SegmenterPool
    from napari_lvunet.weights import save_weights

    weights = save_weights(_fused(1), tmp_path / "w.safetensors", {"train_size": [SIZE, SIZE]})
    root = _folder(tmp_path / "d", 3)
    pairs = [ReferencePair(p.stem, p.image, p.mask) for p in find_pairs(root)]
    pool = SegmenterPool()
    score = score_pairs(weights, pairs, pool=pool)
    seg = pool.get(weights, device="cpu")
    expected = [
        binary_dice(
            seg.segment(np.asarray(Image.open(p.image)), axes="YXC", sizing="resize") > 0,
            np.asarray(Image.open(p.mask)) > 0,
        )
        for p in pairs
    ]
    assert score.per_image == dict(zip([p.stem for p in pairs], expected, strict=True))
    assert score.dice == pytest.approx(float(np.mean(expected)), rel=1e-12)
    assert binary_dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    with pytest.raises(ValueError, match="no image/mask pairs"):
        score_pairs(weights, [])


def test_reference_score_of_the_bundled_model_without_torch() -> None:
    code = (
        "import sys\n"
        "from training.reference import reference_pairs, score_pairs\n"
        "s = score_pairs('lvunet-kvasir-seg', reference_pairs()[:3])\n"
        "print(s.n, round(s.dice, 6), 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    n, dice, torch_loaded = out.stdout.split()
    assert n == "3" and 0.5 < float(dice) <= 1.0 and torch_loaded == "False"


def test_pair_type_matches_training_pairs() -> None:
    # finetune turns reference pairs into training pairs field by field
    ref = reference_pairs()[0]
    pair = Pair(ref.stem, ref.image, ref.mask)
    assert CachedSegmentationDataset([pair], (SIZE, SIZE)).images.shape == (1, 3, SIZE, SIZE)
