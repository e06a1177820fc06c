"""The weights file format, the registry's downloads, and every way a file is rejected.

Downloads are served for real by ``http.server`` on 127.0.0.1 (an ephemeral port) in a
thread; the cache is a per-test folder named by ``NAPARI_LVUNET_CACHE``.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import pickle
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from lvunet_test_helpers import randomize_batchnorms
from safetensors.torch import load_file, save_file

from napari_lvunet import __version__
from napari_lvunet.model import LVUNet, reparameterize_model
from napari_lvunet.weights import (
    DEFAULT_MODEL,
    FORMAT_VERSION,
    LoadedModel,
    ModelEntry,
    WeightsError,
    base_url,
    bundled_dir,
    cache_dir,
    code_version,
    fetch_weights,
    file_sha256,
    is_available_offline,
    load_model,
    open_weights,
    read_metadata,
    registry,
    save_weights,
    tensors_sha256,
)

SIZE = 128
CALLER_META = {"dataset": "tiny-test", "split": {"train": ["a", "b"]}, "metrics": {"dice": 0.5}}


@pytest.fixture(scope="module")
def trained() -> LVUNet:
    """An unfused model at the end of deep training (act_learn == 1)."""
    model = LVUNet()
    randomize_batchnorms(model)
    model.set_act_learn(1.0)
    return model.eval()


@pytest.fixture(scope="module")
def weights_file(trained: LVUNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid weights file; tests copy it before damaging it."""
    return save_weights(trained, tmp_path_factory.mktemp("w") / "good.safetensors", CALLER_META)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test downloads into its own empty cache, from nowhere unless it says so."""
    monkeypatch.setenv("NAPARI_LVUNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NAPARI_LVUNET_BASE_URL", raising=False)
    return tmp_path / "cache"


def _image() -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


def _copy(src: Path, dst: Path, edit: Callable[[bytes], bytes] = lambda b: b) -> Path:
    dst.write_bytes(edit(src.read_bytes()))
    return dst


def _rewrite(src: Path, dst: Path, *, tensors=None, meta=None, raw_meta=None) -> Path:
    """Write a safetensors file with some of ``src``'s parts replaced."""
    tensors = load_file(src) if tensors is None else tensors
    if raw_meta is None:
        meta = read_metadata(src) if meta is None else meta
        raw_meta = {"napari_lvunet": json.dumps(meta)}
    save_file(tensors, dst, metadata=raw_meta)
    return dst


# ------------------------------------------------------------------ save and load


def test_roundtrip_reproduces_the_fused_model(trained: LVUNet, weights_file: Path) -> None:
    loaded = load_model(weights_file)
    assert isinstance(loaded, LoadedModel)
    assert loaded.model.fused and not loaded.model.training
    assert next(loaded.model.parameters()).device.type == "cpu"
    assert loaded.name == "good" and loaded.path == weights_file
    assert loaded.sha256 == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert loaded.sha256 == file_sha256(weights_file)
    with torch.no_grad():
        expected = reparameterize_model(trained)(_image())
        torch.testing.assert_close(loaded.model(_image()), expected, rtol=0, atol=0)
        # and the fused model still computes what was trained (float32 rounding only)
        torch.testing.assert_close(expected, trained(_image()), rtol=1e-4, atol=1e-4)


def test_metadata_holds_architecture_recipe_and_callers_facts(weights_file: Path) -> None:
    meta = read_metadata(weights_file)
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["architecture"] == {"num_classes": 1, "act_num": 1, "fused": True, "in_chans": 3}
    assert meta["act_learn"] == 1.0
    assert meta["train_size"] == [256, 256]
    assert meta["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert meta["code_version"].startswith(__version__)
    for key, value in CALLER_META.items():
        assert meta[key] == value
    assert load_model(weights_file).metadata == meta


def test_save_accepts_numpy_and_torch_scalars_and_multiclass(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    model = LVUNet(3, fused=True)
    meta = {
        "metrics": {"dice": np.float32(0.25), "iou": torch.tensor(0.125)},
        "train_size": (128, 256),
    }
    path = save_weights(model, tmp_path / "three.safetensors", meta)
    loaded = load_model(path)
    assert loaded.model.num_classes == 3
    assert loaded.metadata["metrics"] == {"dice": 0.25, "iou": 0.125}
    assert loaded.train_size == (128, 256)


def test_save_fuses_a_copy_and_leaves_the_model_untouched(trained: LVUNet, tmp_path: Path) -> None:
    save_weights(trained, tmp_path / "m.safetensors", {})
    assert not trained.fused and trained.act_learn == 1.0


def test_save_refuses_unfinished_deep_training(tmp_path: Path) -> None:
    model = LVUNet()
    model.set_act_learn(0.5)
    with pytest.raises(ValueError, match="act_learn"):
        save_weights(model, tmp_path / "m.safetensors", {})
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_overwrite(trained: LVUNet, weights_file: Path, tmp_path: Path) -> None:
    target = _copy(weights_file, tmp_path / "kept.safetensors")
    before = target.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_weights(LVUNet(fused=True), target, {})
    assert target.read_bytes() == before
    save_weights(LVUNet(fused=True), target, {}, overwrite=True)
    assert target.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["kept.safetensors"]  # no temp files left


@pytest.mark.parametrize(
    ("name", "meta", "match"),
    [
        ("m.pt", {}, r"\.safetensors"),
        ("m.safetensors", {"act_learn": 0.5}, "derived from the model"),
        ("m.safetensors", {"architecture": {}}, "derived from the model"),
        ("m.safetensors", {"metrics": {"dice": float("nan")}}, "JSON"),
        ("m.safetensors", {"note": object()}, "JSON"),
        ("m.safetensors", {"train_size": [256]}, "train_size"),
    ],
)
def test_save_rejects_bad_arguments_before_writing(
    tmp_path: Path, name: str, meta: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        save_weights(LVUNet(fused=True), tmp_path / name, meta)
    assert list(tmp_path.iterdir()) == []


def test_code_version_names_the_package_version() -> None:
    version = code_version()
    assert version == __version__ or version.startswith(f"{__version__}+g")


# ------------------------------------------------------------------ rejected files


def _flip_data_bytes(data: bytes) -> bytes:
    # Flip bits in the middle of the tensor data; the header stays valid.
    mid = len(data) - len(data) // 3
    return data[:mid] + bytes(b ^ 0x55 for b in data[mid : mid + 64]) + data[mid + 64 :]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_flip_data_bytes, "corrupted"),
        (lambda b: b[:8] + b"\x00" * 32 + b[40:], "not a safetensors"),
        (lambda b: b[:8] + b"{" + b"\xff" * 20 + b[29:], "corrupted"),
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:200], "truncated"),
        (lambda b: b[:5], "empty or truncated"),
        (lambda b: b"", "empty or truncated"),
        (lambda b: b"\x89PNG\r\n\x1a\n" + b[8:], "not a safetensors"),
    ],
    ids=[
        "bitflip",
        "header-zeroed",
        "header-garbage",
        "half",
        "header-cut",
        "5-bytes",
        "empty",
        "png",
    ],
)
def test_damaged_files_are_rejected(
    weights_file: Path, tmp_path: Path, edit: Callable[[bytes], bytes], match: str
) -> None:
    bad = _copy(weights_file, tmp_path / "bad.safetensors", edit)
    with pytest.raises(WeightsError, match=match) as info:
        load_model(bad)
    assert str(bad) in str(info.value)


def test_wrong_architecture_shapes_are_rejected(tmp_path: Path) -> None:
    two = save_weights(LVUNet(2, fused=True), tmp_path / "two.safetensors", {})
    meta = read_metadata(two)
    meta["architecture"]["num_classes"] = 1
    bad = _rewrite(two, tmp_path / "claims-one.safetensors", meta=meta)
    with pytest.raises(WeightsError, match=r"wrong shapes.*head\.weight"):
        load_model(bad)


def test_missing_and_unexpected_tensors_are_rejected(weights_file: Path, tmp_path: Path) -> None:
    tensors = load_file(weights_file)
    missing = {k: v for k, v in tensors.items() if k != "head.bias"}
    with pytest.raises(WeightsError, match=r"missing tensors \(e\.g\. head\.bias\)"):
        load_model(_rewrite(weights_file, tmp_path / "a.safetensors", tensors=missing))
    extra = {**tensors, "spare.weight": torch.zeros(3)}
    with pytest.raises(WeightsError, match=r"unexpected tensors \(e\.g\. spare\.weight\)"):
        load_model(_rewrite(weights_file, tmp_path / "b.safetensors", tensors=extra))


def test_unfused_training_weights_are_rejected(trained: LVUNet, tmp_path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in trained.state_dict().items()}
    path = tmp_path / "unfused.safetensors"
    save_file(tensors, path)
    with pytest.raises(WeightsError, match="no napari-lvunet metadata"):
        load_model(path)


def test_changed_values_with_valid_layout_are_rejected(weights_file: Path, tmp_path: Path) -> None:
    tensors = load_file(weights_file)
    tensors["head.bias"] = tensors["head.bias"] + 1.0
    with pytest.raises(WeightsError, match="tensors_sha256 mismatch"):
        load_model(_rewrite(weights_file, tmp_path / "edited.safetensors", tensors=tensors))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.pop("format"), "format"),
        (lambda m: m.update(format_version=FORMAT_VERSION + 1), "newer napari-lvunet"),
        (lambda m: m.update(format_version="1"), "format_version"),
        (lambda m: m.pop("architecture"), "no architecture"),
        (lambda m: m["architecture"].update(fused=False), "not fused"),
        (lambda m: m["architecture"].update(num_classes=0), "num_classes"),
        (lambda m: m["architecture"].update(depth=5), "unknown architecture keys"),
        (lambda m: m["architecture"].update(in_chans=1), "in_chans"),
        (lambda m: m.update(act_learn=0.5), "act_learn"),
        (lambda m: m.update(train_size="256"), "train_size"),
        (lambda m: m.update(train_size=[200, 200]), "multiples of 128"),
        (lambda m: m["normalization"].update(mean=[0.5, 0.5, 0.5]), "normalization"),
        (lambda m: m.pop("tensors_sha256"), "tensors_sha256"),
    ],
)
def test_invalid_metadata_is_rejected(
    weights_file: Path, tmp_path: Path, change: Callable[[dict], object], match: str
) -> None:
    meta = read_metadata(weights_file)
    change(meta)
    bad = _rewrite(weights_file, tmp_path / "meta.safetensors", meta=meta)
    for reader in (read_metadata, load_model):
        with pytest.raises(WeightsError, match=match):
            reader(bad)


@pytest.mark.parametrize(
    ("raw", "match"),
    [(None, "no napari-lvunet metadata"), ({"napari_lvunet": "{not json"}, "not valid JSON")],
)
def test_missing_or_unparsable_metadata_is_rejected(
    weights_file: Path, tmp_path: Path, raw: dict | None, match: str
) -> None:
    bad = tmp_path / "raw.safetensors"
    save_file(load_file(weights_file), bad, metadata=raw)
    with pytest.raises(WeightsError, match=match):
        load_model(bad)


class _Payload:
    """Unpickling this object creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_refused_without_being_unpickled(
    trained: LVUNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must not be called on a weights file")

    monkeypatch.setattr(torch, "load", no_torch_load)
    marker = tmp_path / "code-ran"
    raw = tmp_path / "evil.pt"
    raw.write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    zipped = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": trained.state_dict(), "payload": _Payload(marker)}, zipped)
    renamed = _copy(zipped, tmp_path / "renamed.safetensors")
    for path in (raw, zipped, renamed):
        with pytest.raises(WeightsError, match="unpickling"):
            load_model(path)
        with pytest.raises(WeightsError, match="unpickling"):
            read_metadata(path)
    assert not marker.exists()


def test_missing_paths_and_unknown_names_are_explained(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "absent.safetensors")
    with pytest.raises(WeightsError, match="not a file"):
        load_model(tmp_path)
    with pytest.raises(WeightsError, match=r"unknown model 'no-such-model'.*\.safetensors"):
        load_model("no-such-model")


# ------------------------------------------------------------------ registry and downloads


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, Callable[[], None]]]:
    """Serve a folder over HTTP on 127.0.0.1; yields (base URL, folder, stop)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    stopped = threading.Event()

    def stop() -> None:
        if not stopped.is_set():
            stopped.set()
            httpd.shutdown()
            httpd.server_close()
            thread.join()

    yield f"http://127.0.0.1:{httpd.server_address[1]}/models", root, stop
    stop()


def _entry(filename: str, sha256: str, *, bundled: bool = False) -> dict[str, ModelEntry]:
    entry = ModelEntry("remote", filename, sha256, "a test model", bundled, {"dataset": "tiny"})
    return {entry.name: entry}


def _serve(weights_file: Path, root: Path) -> str:
    (root / "models").mkdir(exist_ok=True)
    _copy(weights_file, root / "models" / "remote.safetensors")
    return file_sha256(weights_file)


def test_download_verifies_caches_and_then_works_offline(
    weights_file: Path, server, monkeypatch: pytest.MonkeyPatch, _private_cache: Path
) -> None:
    url, root, stop = server
    models = _entry("remote.safetensors", _serve(weights_file, root))
    monkeypatch.setenv("NAPARI_LVUNET_BASE_URL", url)
    assert base_url() == url and cache_dir() == _private_cache
    assert not is_available_offline("remote", registry=models)

    first = load_model("remote", registry=models, progressbar=False)
    assert first.name == "remote" and first.path == _private_cache / "remote.safetensors"
    assert first.sha256 == models["remote"].sha256
    assert is_available_offline("remote", registry=models)

    stop()  # the server is gone: the cached file must be enough
    second = load_model("remote", registry=models, progressbar=False)
    with torch.no_grad():
        torch.testing.assert_close(second.model(_image()), first.model(_image()), rtol=0, atol=0)


def test_download_with_wrong_hash_is_rejected_and_deleted(
    weights_file: Path, server, monkeypatch: pytest.MonkeyPatch, _private_cache: Path
) -> None:
    url, root, _ = server
    _serve(weights_file, root)
    models = _entry("remote.safetensors", "0" * 64)
    monkeypatch.setenv("NAPARI_LVUNET_BASE_URL", url)
    with pytest.raises(WeightsError, match=r"does not match the registered sha256.*deleted"):
        fetch_weights("remote", registry=models, progressbar=False)
    assert not _private_cache.exists() or not any(_private_cache.iterdir())
    assert not is_available_offline("remote", registry=models)


def test_download_404_names_the_url(server, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _, _ = server
    monkeypatch.setenv("NAPARI_LVUNET_BASE_URL", url)
    models = _entry("absent.safetensors", "0" * 64)
    with pytest.raises(WeightsError, match=rf"not found at {url}/absent\.safetensors \(HTTP 404\)"):
        load_model("remote", registry=models, progressbar=False)


def test_server_down_says_offline_and_what_to_do(
    monkeypatch: pytest.MonkeyPatch, _private_cache: Path
) -> None:
    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("NAPARI_LVUNET_BASE_URL", f"http://127.0.0.1:{port}/")
    models = _entry("remote.safetensors", "0" * 64)
    with pytest.raises(WeightsError, match="appears to be offline") as info:
        load_model("remote", registry=models, progressbar=False)
    message = str(info.value)
    assert str(_private_cache) in message and "Load weights from file" in message


def test_no_download_location_configured(_private_cache: Path) -> None:
    models = _entry("remote.safetensors", "0" * 64)
    with pytest.raises(WeightsError, match="no download location is configured") as info:
        fetch_weights("remote", registry=models, progressbar=False)
    message = str(info.value)
    assert "NAPARI_LVUNET_BASE_URL" in message and "Load weights from file" in message
    assert str(_private_cache) in message


def test_a_file_copied_into_the_cache_needs_no_network(
    weights_file: Path, _private_cache: Path
) -> None:
    models = _entry("remote.safetensors", file_sha256(weights_file))
    _private_cache.mkdir()
    _copy(weights_file, _private_cache / "remote.safetensors")
    assert is_available_offline("remote", registry=models)
    assert load_model("remote", registry=models).sha256 == models["remote"].sha256


def test_a_damaged_cached_file_is_downloaded_again(
    weights_file: Path, server, monkeypatch: pytest.MonkeyPatch, _private_cache: Path
) -> None:
    url, root, _ = server
    models = _entry("remote.safetensors", _serve(weights_file, root))
    _private_cache.mkdir()
    cached = _copy(weights_file, _private_cache / "remote.safetensors", _flip_data_bytes)
    assert not is_available_offline("remote", registry=models)
    monkeypatch.setenv("NAPARI_LVUNET_BASE_URL", url)
    assert load_model("remote", registry=models, progressbar=False).sha256 == file_sha256(cached)
    assert is_available_offline("remote", registry=models)


def test_a_missing_bundled_file_is_reported() -> None:
    models = _entry("not-shipped-in-the-package.safetensors", "0" * 64, bundled=True)
    assert not is_available_offline("remote", registry=models)
    with pytest.raises(WeightsError, match=r"bundled weights .* missing.*reinstall"):
        load_model("remote", registry=models)


@pytest.mark.parametrize("name", sorted(registry()))
def test_registered_models_are_consistent(name: str) -> None:
    entry = registry()[name]
    assert entry.name == name and len(entry.sha256) == 64
    if entry.bundled:  # shipped models must load offline, straight from the package
        assert is_available_offline(name)
        loaded = load_model(name)
        assert loaded.sha256 == entry.sha256 and loaded.model.fused


class _RecordingProgress:
    """The tqdm-like interface pooch reports to (napari's ``progress`` has it too)."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.closed = False

    def update(self, n: int) -> None:
        self.done += n

    def reset(self) -> None:
        self.done = 0

    def close(self) -> None:
        self.closed = True


def test_download_reports_progress_to_a_given_bar(
    weights_file: Path, server, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, root, _ = server
    models = _entry("remote.safetensors", _serve(weights_file, root))
    monkeypatch.setenv("NAPARI_LVUNET_BASE_URL", url)
    bar = _RecordingProgress()
    fetch_weights("remote", registry=models, progressbar=bar)
    size = weights_file.stat().st_size
    assert bar.total == size and bar.done == size and bar.closed


def test_default_model_is_bundled_and_loads_offline() -> None:
    # The plugin must segment on first use without a network (closed hospital networks).
    assert DEFAULT_MODEL in registry()
    entry = registry()[DEFAULT_MODEL]
    assert entry.bundled and is_available_offline(DEFAULT_MODEL)
    loaded = load_model(DEFAULT_MODEL)
    assert loaded.sha256 == entry.sha256
    assert loaded.metadata["act_learn"] == 1.0


# ------------------------------------------------------------------ bounds, torch-free reading


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["architecture"].update(act_num=10**9), "act_num is 1000000000"),
        (lambda m: m["architecture"].update(num_classes=3 * 10**7), "num_classes is 30000000"),
        (lambda m: m.update(train_size=[512000, 512000]), "train_size is"),
        (lambda m: m.update(source_size=[0, 10]), "source_size is"),
        (lambda m: m.update(deep=json.loads("[" * 40 + "]" * 40)), "nested more than 32"),
    ],
)
def test_metadata_is_bounded_before_anything_is_built(
    weights_file: Path, tmp_path: Path, edit: Callable, message: str
) -> None:
    """Each of these once cost gigabytes or crashed; now each is one WeightsError, fast."""
    meta = read_metadata(weights_file)
    edit(meta)
    bad = _rewrite(weights_file, tmp_path / "bad.safetensors", meta=meta)
    for reader in (open_weights, load_model):
        start = time.perf_counter()
        with pytest.raises(WeightsError, match=message):
            reader(bad)
        assert time.perf_counter() - start < 5


def test_json_nested_past_the_recursion_limit_is_a_weights_error(
    weights_file: Path, tmp_path: Path
) -> None:
    raw = {"napari_lvunet": "[" * 100_000 + "]" * 100_000}
    bad = _rewrite(weights_file, tmp_path / "deep.safetensors", raw_meta=raw)
    with pytest.raises(WeightsError, match="nested too deeply"):
        open_weights(bad)


def test_declared_architecture_must_match_the_tensor_headers(
    weights_file: Path, tmp_path: Path
) -> None:
    """A file that claims 2 classes but holds a 1-class head is refused before any model
    (and its memory) is built."""
    meta = read_metadata(weights_file)
    meta["architecture"]["num_classes"] = 2
    bad = _rewrite(weights_file, tmp_path / "claims2.safetensors", meta=meta)
    with pytest.raises(WeightsError, match=r"head\.weight \(1, 16, 1, 1\) \(expected \(2, 16"):
        open_weights(bad)


def test_open_weights_checks_like_load_model_without_building_a_model(weights_file: Path) -> None:
    opened = open_weights(weights_file)
    loaded = load_model(weights_file)
    assert (opened.sha256, opened.metadata, opened.path) == (
        loaded.sha256,
        loaded.metadata,
        loaded.path,
    )
    assert opened.onnx_path is None  # not a registry model: the engine makes a graph
    # The numpy tensor hash equals the torch one: one digest for both readers.
    from safetensors.numpy import load_file as load_numpy

    numpy_tensors = load_numpy(weights_file)
    assert tensors_sha256(numpy_tensors) == tensors_sha256(load_file(weights_file))
    assert tensors_sha256(numpy_tensors) == opened.tensors_sha256


def test_registry_models_ship_a_verified_graph() -> None:
    opened = open_weights(DEFAULT_MODEL)
    entry = registry()[DEFAULT_MODEL]
    assert opened.onnx_path == bundled_dir() / entry.onnx_filename
    assert file_sha256(opened.onnx_path) == entry.onnx_sha256 == opened.onnx_sha256
    # The same file opened by its path is recognised by its bytes and gets the graph too.
    assert open_weights(opened.path).onnx_path == opened.onnx_path


def test_downloaded_graph_is_hash_checked_and_damage_is_refused_at_session_time(
    weights_file: Path, server, monkeypatch: pytest.MonkeyPatch, _private_cache: Path
) -> None:
    from napari_lvunet.inference import Segmenter

    url, root, _ = server
    good_graph = bundled_dir() / registry()[DEFAULT_MODEL].onnx_filename
    weights_sha = _serve(weights_file, root)
    _copy(good_graph, root / "models" / "remote.onnx")
    entry = ModelEntry(
        "remote",
        "remote.safetensors",
        weights_sha,
        "a test model",
        onnx_filename="remote.onnx",
        onnx_sha256=file_sha256(good_graph),
    )
    monkeypatch.setenv("NAPARI_LVUNET_BASE_URL", url)
    opened = open_weights("remote", registry={"remote": entry})
    assert opened.onnx_path == _private_cache / "remote.onnx"
    # Downloads are readable like any other cached file, not private temporaries (0600).
    assert opened.onnx_path.stat().st_mode & 0o044 == 0o044
    data = bytearray(opened.onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle: still parses
    opened.onnx_path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match its registered sha256"):
        Segmenter(opened, device="cpu")


def test_nan_weights_are_refused_even_with_a_matching_hash(
    weights_file: Path, tmp_path: Path
) -> None:
    """A diverged run's weights, saved with their own (correct) tensor hash."""
    tensors = load_file(weights_file)
    tensors["head.bias"] = torch.full_like(tensors["head.bias"], float("nan"))
    meta = read_metadata(weights_file)
    meta["tensors_sha256"] = tensors_sha256(tensors)
    bad = _rewrite(weights_file, tmp_path / "nan.safetensors", tensors=tensors, meta=meta)
    for reader in (open_weights, load_model):
        with pytest.raises(WeightsError, match="NaN or infinite weights"):
            reader(bad)
