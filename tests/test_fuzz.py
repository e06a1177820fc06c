"""Fuzz the readers of untrusted files: weights (open_weights, load_model) and images (read_image).

Seeded loops over mutated real files (issue 13): the bundled model, a small multi-class
file written by ``save_weights``, and the sample JPEG, PNG mask and TIFF stacks, with bytes
flipped in header and body, truncated, extended, headers spliced from other files, the
weights' JSON metadata and tensor headers rewritten (random types, huge numbers, deep
nesting, other dtypes, shapes and offsets), and image dimensions forged.

Every case must end in one of two ways, within a time limit:
- a clean result: for weights, tensors whose hash is the one recorded and equals the
  original's (no mutation here recomputes a hash, so a file that loads must hold exactly
  the original values), finite, and a registry graph only for the registry's own bytes;
  for images, a non-empty numeric array of sane size, equal to the original wherever the
  format can tell damage (appended bytes, a cut file, a flipped byte in a PNG or in a
  TIFF's deflated pixel data);
- a clean error: ``WeightsError`` with one line naming the file, or ``ValueError`` /
  ``OSError`` with a message for images.
Anything else (another exception type, a hang, a wrong answer) fails the test, which then
lists each bad case with its seed, mutation and the file kept for reproducing it.

Limits the formats set: JPEG data and TIFF tags carry no checksum, so a flipped byte there
can decode into a different picture; for those the test checks only that the result is a
sane array.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import math
import random
import signal
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from lvunet_test_helpers import randomize_batchnorms
from safetensors.numpy import load as load_safetensors_bytes

from napari_lvunet.io import read_image
from napari_lvunet.model import LVUNet
from napari_lvunet.weights import (
    DEFAULT_MODEL,
    WeightsError,
    bundled_dir,
    file_tensors,
    load_model,
    open_weights,
    registry,
    save_weights,
    tensors_sha256,
)

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"
JPEG = SAMPLES / "kvasir_cju2hw5gjlr5h0988so2qqres.jpg"
PNG_MASK = SAMPLES / "kvasir_cju2hw5gjlr5h0988so2qqres_mask.png"
TIFF_STACK = SAMPLES / "kvasir_stack5.tif"
TIFF_MASKS = SAMPLES / "kvasir_stack5_masks.tif"
IMAGES = (JPEG, PNG_MASK, TIFF_STACK, TIFF_MASKS)

SEED = 13
WEIGHTS_CASES = 300  # per source file; about 20 ms each on a 2-core EPYC
IMAGE_CASES = 150  # per sample file; a few ms to 100 ms each
# load_model builds a model (about 0.4 s): it re-checks every accepted file and a sample
# of refused ones, at most this many per test.
LOAD_MODEL_CHECKS = 12
# A case that takes longer has hung: every case here takes well under a second.
CASE_SECONDS = 10.0
# Far larger than any sample decodes to (the masks stack is 0.4 MB): a bigger array means
# a forged header was believed.
MAX_DECODED_BYTES = 256 * 1024**2


pytestmark = pytest.mark.skipif(
    not hasattr(signal, "setitimer"), reason="the per-case time guard needs SIGALRM"
)


# ------------------------------------------------------------------ time guard


class CaseTimeout(BaseException):
    """Raised into a case that ran too long (a BaseException: readers catch Exception)."""


@contextmanager
def time_guard(seconds: float) -> Iterator[None]:
    """Stop a hanging case: SIGALRM interrupts Python code; a hang inside C code (which
    never returns to the interpreter) ends the process with every thread's stack."""

    def interrupt(signum: int, frame: object) -> None:
        raise CaseTimeout(f"no outcome after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(3 * seconds, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Findings:
    """Bad outcomes, each kept as a file for reproducing it."""

    folder: Path
    bad: list[str]

    def add(self, case: int, what: str, problem: str, data: bytes, suffix: str) -> None:
        kept = self.folder / f"case{case}{suffix}"
        kept.write_bytes(data)
        self.bad.append(f"case {case} ({what}): {problem} [file: {kept}]")

    def check(self, cases: int) -> None:
        if self.bad:
            listed = "\n".join(self.bad[:20])
            pytest.fail(f"{len(self.bad)} of {cases} cases went wrong:\n{listed}")


@pytest.fixture
def findings(tmp_path: Path) -> Findings:
    folder = tmp_path / "bad-cases"
    folder.mkdir()
    return Findings(folder, [])


# ------------------------------------------------------------------ byte-level mutations


def flip_bytes(rng: random.Random, data: bytes, start: int, stop: int) -> tuple[bytes, str]:
    """XOR 1-8 random bytes in ``data[start:stop]`` with non-zero values (each one changes)."""
    out = bytearray(data)
    stop = min(stop, len(out))
    spots = sorted(rng.sample(range(start, stop), min(stop - start, rng.randint(1, 8))))
    for spot in spots:
        out[spot] ^= rng.randrange(1, 256)
    return bytes(out), f"flipped bytes at {spots}"


def truncate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    size = rng.choice([0, 1, 7, 8, 9, rng.randrange(len(data)), len(data) - rng.randint(1, 16)])
    return data[:size], f"cut to {size} of {len(data)} bytes"


def extend(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    tail = rng.choice([b"\0" * rng.randint(1, 4096), rng.randbytes(rng.randint(1, 4096)), data])
    return data + tail, f"{len(tail)} bytes appended"


FOREIGN_HEADS = {
    "jpeg": JPEG.read_bytes()[:512],
    "png": PNG_MASK.read_bytes()[:512],
    "tiff": TIFF_MASKS.read_bytes()[:512],
    "zip (torch.save)": b"PK\x03\x04" + bytes(60),
    "pickle": b"\x80\x04\x95" + bytes(61),
}


def splice_head(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Another file's first bytes over this file's start."""
    name = rng.choice(sorted(FOREIGN_HEADS))
    head = FOREIGN_HEADS[name][: rng.randint(1, len(FOREIGN_HEADS[name]))]
    return head + data[len(head) :], f"first {len(head)} bytes from a {name} file"


def extreme_int(rng: random.Random, data: bytes, stop: int) -> tuple[bytes, str]:
    """An extreme 2- or 4-byte integer over a random spot (sizes, counts and offsets)."""
    out = bytearray(data)
    spot = rng.randrange(0, min(stop, len(out) - 4))
    value = rng.choice([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 65536 * 3])
    code, order = rng.choice("HI"), rng.choice("<>")
    value &= 0xFFFF if code == "H" else 0xFFFFFFFF
    packed = struct.pack(order + code, value)
    out[spot : spot + len(packed)] = packed
    return bytes(out), f"{order}{code} {value:#x} at {spot}"


# ------------------------------------------------------------------ weights


@dataclass(frozen=True)
class WeightsSource:
    """A valid weights file taken apart: bytes, header and metadata, tensor hash."""

    name: str
    data: bytes
    header: dict
    metadata: dict
    tensors_sha256: str

    @property
    def header_end(self) -> int:
        return 8 + struct.unpack("<Q", self.data[:8])[0]

    @classmethod
    def read(cls, name: str, path: Path) -> WeightsSource:
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        metadata = json.loads(header["__metadata__"]["napari_lvunet"])
        return cls(name, data, header, metadata, metadata["tensors_sha256"])

    def with_header(self, header: dict | str) -> bytes:
        text = (header if isinstance(header, str) else json.dumps(header)).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + self.data[self.header_end :]


@pytest.fixture(scope="module")
def weights_sources(tmp_path_factory: pytest.TempPathFactory) -> list[WeightsSource]:
    """The bundled model, and a 2-class, act_num=2 model written by save_weights."""
    model = LVUNet(2, act_num=2)
    randomize_batchnorms(model, seed=3)
    model.set_act_learn(1.0)
    small = save_weights(
        model.eval(), tmp_path_factory.mktemp("fuzz") / "small.safetensors", {"dataset": "fuzz"}
    )
    bundled = bundled_dir() / registry()[DEFAULT_MODEL].filename
    return [WeightsSource.read("bundled", bundled), WeightsSource.read("save_weights", small)]


def random_json(rng: random.Random, depth: int = 0) -> object:
    """A JSON value of a random type, from the harmless to the absurd."""
    leaves = [
        None,
        True,
        False,
        0,
        -1,
        1,
        rng.randint(-(2**70), 2**70),
        10 ** rng.randint(3, 400),
        1e9,
        3e7,
        rng.uniform(-1e308, 1e308),
        0.5,
        math.nan,
        math.inf,
        "",
        "x" * rng.randint(1, 100),
        [512000, 512000],
        [128, 128],
    ]
    if depth < 3 and rng.random() < 0.3:
        if rng.random() < 0.5:
            return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
        return {f"k{i}": random_json(rng, depth + 1) for i in range(rng.randint(0, 3))}
    return rng.choice(leaves)


DEEP = "__deep__"


def rewrite_metadata(rng: random.Random, source: WeightsSource) -> tuple[bytes, str]:
    """The napari-lvunet JSON with one field replaced, removed or nested very deeply."""
    meta = json.loads(json.dumps(source.metadata))
    fields = [
        ("architecture", "num_classes"),
        ("architecture", "act_num"),
        ("architecture", "fused"),
        ("architecture", "in_chans"),
        ("architecture", "extra"),
        ("architecture",),
        ("train_size",),
        ("source_size",),
        ("source_size_max",),
        ("act_learn",),
        ("format",),
        ("format_version",),
        ("normalization",),
        ("normalization", "mean"),
        ("normalization", "std"),
        ("tensors_sha256",),
        ("dataset",),
        ("metrics",),
    ]
    field = rng.choice(fields)
    action = rng.choice(["value", "value", "delete", "deep"])
    parent = meta
    for key in field[:-1]:
        parent = parent[key]
    depth = rng.choice([33, 200, 5000, 200_000])
    if action == "delete":
        parent.pop(field[-1], None)
        what = f"removed {'.'.join(field)}"
    elif action == "deep":
        parent[field[-1]] = DEEP
        what = f"{'.'.join(field)} nested {depth} deep"
    else:
        parent[field[-1]] = random_json(rng)
        what = f"{'.'.join(field)} = {json.dumps(parent[field[-1]])[:60]}"
    text = json.dumps(meta).replace(json.dumps(DEEP), "[" * depth + "]" * depth)
    if rng.random() < 0.1:  # the whole metadata not an object, or not even a string
        text = rng.choice([json.dumps(random_json(rng)), "{", "[" * depth])
        what = f"metadata = {text[:40]!r}"
    header = json.loads(json.dumps(source.header))
    header["__metadata__"]["napari_lvunet"] = text
    if rng.random() < 0.05:
        header["__metadata__"] = random_json(rng)
        what = f"__metadata__ = {json.dumps(header['__metadata__'])[:40]}"
    return source.with_header(json.dumps(header)), what


def rewrite_tensor_header(rng: random.Random, source: WeightsSource) -> tuple[bytes, str]:
    """One tensor's dtype, shape or offsets changed, two tensors swapped, one renamed,
    removed or added."""
    header = json.loads(json.dumps(source.header))
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    entry = header[name]
    action = rng.choice(["dtype", "shape", "offsets", "offsets", "swap", "rename", "drop", "add"])
    if action == "dtype":
        entry["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "X", 4])
        what = f"{name} dtype {entry['dtype']}"
    elif action == "shape":
        shape = entry["shape"]
        entry["shape"] = rng.choice(
            [[], [0], [-1], [2**40], shape[::-1], [*shape, 1], [math.prod(shape)], "a", None]
        )
        what = f"{name} shape {entry['shape']}"
    elif action == "offsets":
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(
            [
                [begin + 4, end + 4],
                [begin - 4, end - 4],
                [begin, end + 4],
                [end, begin],
                [0, end - begin],
                [begin, 2**64 - 1],
                [-begin, end],
                [begin],
                "x",
            ]
        )
        what = f"{name} data_offsets {entry['data_offsets']}"
    elif action == "swap":  # both keep their shapes: only the values move
        same = [n for n in names if n != name and header[n]["shape"] == entry["shape"]]
        other = rng.choice(same) if same else rng.choice(names)
        entry["data_offsets"], header[other]["data_offsets"] = (
            header[other]["data_offsets"],
            entry["data_offsets"],
        )
        what = f"offsets of {name} and {other} swapped"
    elif action == "rename":
        header[name + ".x"] = header.pop(name)
        what = f"{name} renamed"
    elif action == "drop":
        del header[name]
        what = f"{name} removed"
    else:
        header["extra.weight"] = dict(entry)
        what = f"extra tensor over the bytes of {name}"
    return source.with_header(header), what


def header_length(rng: random.Random, source: WeightsSource) -> tuple[bytes, str]:
    length = source.header_end - 8
    value = rng.choice([0, 1, length - 1, length + 1, length + 8, 2**63, 2**64 - 1, 100 * 2**20])
    return struct.pack("<Q", value) + source.data[8:], f"header length {value}"


WEIGHTS_MUTATIONS: dict[str, Callable[[random.Random, WeightsSource], tuple[bytes, str]]] = {
    "flip header": lambda rng, s: flip_bytes(rng, s.data, 0, s.header_end),
    "flip tensor bytes": lambda rng, s: flip_bytes(rng, s.data, s.header_end, len(s.data)),
    "header length": header_length,
    "truncate": lambda rng, s: truncate(rng, s.data),
    "extend": lambda rng, s: extend(rng, s.data),
    "splice": lambda rng, s: splice_head(rng, s.data),
    "metadata": rewrite_metadata,
    "tensor header": rewrite_tensor_header,
}


def weights_problem(path: Path, data: bytes, source: WeightsSource) -> tuple[str | None, bool]:
    """What is wrong with open_weights' outcome on ``path`` (None: nothing), and whether
    it accepted the file."""
    try:
        with time_guard(CASE_SECONDS):
            opened = open_weights(path)
    except WeightsError as err:
        message = str(err)
        if str(path) not in message or "\n" in message:
            return f"WeightsError message is not one line naming the file: {message!r}", False
        return None, False
    except CaseTimeout as err:
        return f"open_weights hung: {err}", False
    except Exception as err:
        return f"open_weights raised {type(err).__module__}.{type(err).__name__}: {err}", False
    tensors = load_safetensors_bytes(data)
    digest = tensors_sha256(tensors)
    registered = hashlib.sha256(data).hexdigest() == registry()[DEFAULT_MODEL].sha256
    if digest != opened.tensors_sha256:
        return "accepted tensors whose hash is not the recorded one", True
    if digest != source.tensors_sha256:
        return "accepted a file whose tensors differ from the original's", True
    if not all(np.isfinite(t).all() and t.dtype == np.float32 for t in tensors.values()):
        return "accepted non-finite or non-float32 tensors", True
    if opened.sha256 != hashlib.sha256(data).hexdigest():
        return "reported a sha256 that is not the file's", True
    if (opened.onnx_path is not None) != registered:
        return "paired a registry graph with bytes that are not the registry's", True
    return None, True


def load_model_problem(path: Path, accepted: bool, source: WeightsSource) -> str | None:
    """load_model must agree with open_weights, and load exactly the original values."""
    try:
        with time_guard(CASE_SECONDS):
            loaded = load_model(path, progressbar=False)
    except WeightsError:
        return "open_weights accepted the file, load_model refused it" if accepted else None
    except CaseTimeout as err:
        return f"load_model hung: {err}"
    except Exception as err:
        return f"load_model raised {type(err).__module__}.{type(err).__name__}: {err}"
    if not accepted:
        return "open_weights refused the file, load_model accepted it"
    if tensors_sha256(file_tensors(loaded.model)) != source.tensors_sha256:
        return "load_model built a model whose values differ from the original's"
    return None


@pytest.mark.parametrize("index", [0, 1], ids=["bundled", "save_weights"])
def test_mutated_weights_are_read_exactly_or_refused_cleanly(
    weights_sources: list[WeightsSource], index: int, tmp_path: Path, findings: Findings
) -> None:
    source = weights_sources[index]
    rng = random.Random(f"{SEED}-weights-{source.name}")
    kinds, load_checks, refused = sorted(WEIGHTS_MUTATIONS), 0, 0
    for case in range(WEIGHTS_CASES):
        kind = kinds[case % len(kinds)]
        data, what = WEIGHTS_MUTATIONS[kind](rng, source)
        what = f"{kind}: {what}"
        path = tmp_path / f"{source.name}-{case}.safetensors"
        path.write_bytes(data)
        problem, accepted = weights_problem(path, data, source)
        refused += not accepted
        if kind == "flip tensor bytes" and accepted:  # every body byte is a tensor byte
            problem = problem or "accepted a file with flipped tensor bytes"
        # load_model on every accepted file, and on a sample of refused ones.
        if problem is None and load_checks < LOAD_MODEL_CHECKS and (accepted or case % 25 == 0):
            load_checks += 1
            problem = load_model_problem(path, accepted, source)
        if problem is not None:
            findings.add(case, what, problem, data, ".safetensors")
        path.unlink()
    findings.check(WEIGHTS_CASES)
    # The loop exercised both outcomes: most mutations are refused, a few (harmless
    # metadata such as the dataset name) are not.
    assert 0.5 * WEIGHTS_CASES < refused < WEIGHTS_CASES
    assert load_checks >= 5


def test_a_file_whose_tensor_hash_was_recomputed_loads_its_own_values(
    weights_sources: list[WeightsSource], tmp_path: Path
) -> None:
    """The control for the invariant above: the readers compare values against the
    recorded hash, not against some other copy, so a consistent edit is a new model."""
    source = weights_sources[1]
    tensors = load_safetensors_bytes(source.data)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + np.float32(0.25)
    metadata = dict(source.metadata, tensors_sha256=tensors_sha256(tensors))
    from safetensors.numpy import save

    path = tmp_path / "edited.safetensors"
    path.write_bytes(save(tensors, metadata={"napari_lvunet": json.dumps(metadata)}))
    assert open_weights(path).tensors_sha256 == tensors_sha256(tensors) != source.tensors_sha256
    model = load_model(path, progressbar=False).model
    torch.testing.assert_close(
        model.state_dict()[name], torch.from_numpy(tensors[name]), rtol=0, atol=0
    )


# ------------------------------------------------------------------ images


def png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, start of data, length) of each chunk of a PNG."""
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        yield data[pos + 4 : pos + 8], pos + 8, length
        pos += 12 + length


def forge_png_size(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """New IHDR width and height with a correct CRC: only the pixel data can disagree."""
    _, start, length = next(png_chunks(data))
    width, height = struct.unpack(">II", data[start : start + 8])
    new = rng.choice([(width, height + 1), (width * 2, height), (1, 1), (30000, 30000), (0, 5)])
    ihdr = struct.pack(">II", *new) + data[start + 8 : start + length]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return data[:start] + ihdr + crc + data[start + length + 4 :], f"IHDR size {new}"


def rewrite_tiff_description(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """tifffile's shape description rewritten in place, within its stored length."""
    start = data.index(b'{"shape"')
    stop = data.index(b"\0", start)
    shape = rng.choice(
        [[1], [0, 0], [5, 256, 320, 3, 1], [2**40, 2], [-5, 256], [10, 256, 320], "x", None]
    )
    text = json.dumps({"shape": shape}).encode()[: stop - start].ljust(stop - start)
    return data[:start] + text + data[stop:], f"description {text!r}"


def tiff_pixel_ranges(path: Path) -> list[tuple[int, int]]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return [
            (offset, offset + count)
            for page in tif.pages
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True)
        ]


def flip_tiff_pixels(rng: random.Random, data: bytes, ranges: list) -> tuple[bytes, str]:
    """A flipped byte inside a page's deflated pixel data (guarded by zlib's checksum)."""
    begin, end = rng.choice(ranges)
    return flip_bytes(rng, data, begin, end)


IMAGE_MUTATIONS = {
    "flip header": lambda rng, data, path: flip_bytes(rng, data, 0, 256),
    "flip anywhere": lambda rng, data, path: flip_bytes(rng, data, 0, len(data)),
    "extreme int": lambda rng, data, path: extreme_int(rng, data, 1024),
    "truncate": lambda rng, data, path: truncate(rng, data),
    "extend": lambda rng, data, path: extend(rng, data),
    "splice": lambda rng, data, path: splice_head(rng, data),
}
PNG_MUTATIONS = {"forge size": lambda rng, data, path: forge_png_size(rng, data)}
TIFF_MUTATIONS = {
    "description": lambda rng, data, path: rewrite_tiff_description(rng, data),
    "flip pixel data": lambda rng, data, path: flip_tiff_pixels(rng, data, tiff_pixel_ranges(path)),
}


def must_be_identical(kind: str, suffix: str) -> bool:
    """Whether the format can tell this damage, so the only acceptable result is the
    original picture: bytes after the end change nothing, a cut file lacks data, a PNG
    checks every chunk's CRC, a TIFF's deflated pixels carry zlib's checksum."""
    if kind in ("extend", "truncate"):
        return True
    if suffix == ".png":
        return kind in ("flip header", "flip anywhere", "extreme int")
    return suffix == ".tif" and kind == "flip pixel data"


def image_problem(
    path: Path, mask: bool, reference: np.ndarray, exact: bool
) -> tuple[str | None, bool]:
    """What is wrong with read_image's outcome on ``path`` (None: nothing), and whether
    it refused the file."""
    try:
        with time_guard(CASE_SECONDS):
            array = read_image(path, mask=mask)
    except (ValueError, OSError) as err:
        return (None if str(err).strip() else f"{type(err).__name__} without a message"), True
    except CaseTimeout as err:
        return f"read_image hung: {err}", True
    except Exception as err:
        return f"read_image raised {type(err).__module__}.{type(err).__name__}: {err}", True
    return array_problem(array, reference, exact), False


def array_problem(array: object, reference: np.ndarray, exact: bool) -> str | None:
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        return f"returned {type(array).__name__} of {getattr(array, 'dtype', '?')}"
    if array.size == 0 or not 2 <= array.ndim <= 5:
        return f"returned an array of shape {array.shape}"
    if array.nbytes > MAX_DECODED_BYTES:
        return f"believed a forged size: {array.shape} ({array.nbytes / 1024**2:.0f} MB)"
    if exact and not (array.shape == reference.shape and np.array_equal(array, reference)):
        return f"damage the format can detect gave a different picture {array.shape}"
    return None


@pytest.mark.parametrize("source", IMAGES, ids=lambda p: p.name)
def test_mutated_images_decode_sanely_or_are_refused_cleanly(
    source: Path, tmp_path: Path, findings: Findings
) -> None:
    data = source.read_bytes()
    mutations = dict(IMAGE_MUTATIONS)
    mutations.update(PNG_MUTATIONS if source.suffix == ".png" else {})
    mutations.update(TIFF_MUTATIONS if source.suffix == ".tif" else {})
    kinds = sorted(mutations)
    rng = random.Random(f"{SEED}-image-{source.name}")
    references = {mask: read_image(source, mask=mask) for mask in (False, True)}
    refused = 0
    start = time.perf_counter()
    for case in range(IMAGE_CASES):
        kind = kinds[case % len(kinds)]
        mutated, what = mutations[kind](rng, data, source)
        mask = rng.random() < 0.3
        path = tmp_path / f"case{source.suffix}"
        path.write_bytes(mutated)
        exact = must_be_identical(kind, source.suffix)
        problem, was_refused = image_problem(path, mask, references[mask], exact)
        refused += was_refused
        if problem is not None:
            findings.add(case, f"{kind}: {what}, mask={mask}", problem, mutated, source.suffix)
    findings.check(IMAGE_CASES)
    assert 0 < refused < IMAGE_CASES
    assert time.perf_counter() - start < 60 * CASE_SECONDS  # bounded overall, not timed


def test_a_broken_page_chain_is_refused_not_cut_short(tmp_path: Path) -> None:
    """One of the fuzz findings, pinned: a stack whose next-page offset points nowhere
    used to come back with fewer frames than it holds, with only a log line."""
    import tifffile

    data = bytearray(TIFF_MASKS.read_bytes())
    with tifffile.TiffFile(TIFF_MASKS) as tif:
        assert tif.byteorder == "<" and not tif.is_bigtiff and tif.pages[0].offset == 8
        second = tif.pages[1].offset
    # The first IFD's next-page pointer is the 4 bytes after its tag list.
    (count,) = struct.unpack("<H", data[8:10])
    pointer = 8 + 2 + 12 * count
    assert struct.unpack("<I", data[pointer : pointer + 4])[0] == second
    data[pointer : pointer + 4] = struct.pack("<I", len(data) + 1000)
    path = tmp_path / "chain.tif"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged TIFF"):
        read_image(path)


def test_a_forged_strip_count_is_refused_before_allocating(tmp_path: Path) -> None:
    """One of the fuzz findings, pinned: ImageLength 256 -> 2,621,696 (one flipped byte)
    made tifffile pad the stack to 2.5 GB of zeros in 11 s; now it is refused at once."""
    import tifffile

    data = bytearray(TIFF_STACK.read_bytes())
    with tifffile.TiffFile(TIFF_STACK) as tif:
        spot = tif.pages[0].tags["ImageLength"].valueoffset
    assert data[spot : spot + 4] == struct.pack("<I", 256)  # a LONG, stored in the tag
    data[spot : spot + 4] = struct.pack("<I", 2_621_696)
    path = tmp_path / "tall.tif"
    path.write_bytes(bytes(data))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"damaged TIFF.*incorrect Strip"):
        read_image(path)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("cut", ["crc", "idat"])
def test_a_damaged_png_is_refused_not_decoded_wrong(tmp_path: Path, cut: str) -> None:
    """A flipped byte in a PNG's pixel data decoded into wrong pixels before its CRC was
    checked; a flipped CRC must be refused as well."""
    data = bytearray(PNG_MASK.read_bytes())
    _, start, length = next(c for c in png_chunks(bytes(data)) if c[0] == b"IDAT")
    spot = start + length + 1 if cut == "crc" else start + length // 2
    data[spot] ^= 0x10
    path = tmp_path / "damaged.png"
    path.write_bytes(bytes(data))
    with pytest.raises((ValueError, OSError)):
        read_image(path, mask=True)
