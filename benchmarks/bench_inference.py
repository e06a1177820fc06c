"""CPU inference benchmark: latency and peak memory of LV-UNet, as a table.

Launch (from the repository root)::

    python benchmarks/bench_inference.py
    python benchmarks/bench_inference.py --authors-repo /path/to/LV-UNet   # + authors' code
    python benchmarks/bench_inference.py --quick                            # fewer repeats

What is measured, per image (batch 1) at 256, 512 and 1024 px square:

* the network alone, on an ImageNet-normalised float tensor: unfused PyTorch (training
  form at act_learn = 1), fused PyTorch float32 and bfloat16 (where the CPU supports it;
  both channels_last, ``torch.inference_mode``), fused ONNX Runtime (the engine's default
  CPU path; its graph includes the normalisation), and, with ``--authors-repo``, the
  authors' ``LV_UNet(deploy=True)`` in PyTorch float32 (their final block ignores
  ``deploy`` and runs unfused: measured as is);
* end to end through ``Segmenter.segment`` (uint8 RGB numpy in, labels out, pre- and
  post-processing included) at native resolution (``sizing="tiles"``) and resized;
* a 100-slice 512 x 512 RGB stack through ``Segmenter.segment``;
* an 8000 x 8000 RGB image in native-resolution tiles (peak memory must stay < 3 GB).

Latency: all per-image cases of one size are built in one process and timed in
interleaved rounds (each round runs every case a few times), so that other load on a
shared machine hits them alike; the median over all runs is reported, after warm-up.
Peak memory: every case runs again in a fresh subprocess, where the kernel's resident-set
high-water mark (``VmHWM``) is reset (``/proc/self/clear_refs``) after the model is built
and warmed up, and read after the runs; "MB" is that peak minus the resident set just
before the runs (inputs already allocated); "peak RSS" is the process total (Python,
torch, the model, inputs). ``tracemalloc`` cannot see torch's or ONNX Runtime's native
allocations, so it is not used. The stack and the 8000 x 8000 image are timed in their
memory subprocess (one run after a warm-up frame).

The authors' ``LV_UNet.py`` is imported from their repository at run time (never copied
into this one). It needs ``timm``, and builds its encoder with
``mobilenet_v3_large(pretrained=True)``, a download: this script patches that call to
build the same network with random weights (weights do not change the timing).

Ratios printed under the table (targets from the issue): fused PyTorch vs unfused
(>= 1.4x faster), the default CPU path (fused ONNX Runtime) vs the authors' deploy-mode
PyTorch (<= 0.2x the time), and 512 x 512 end to end at native resolution (< 30 ms).
Other processes compete for the CPU: pause them for clean figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from napari_lvunet.inference import Segmenter, bf16_supported  # noqa: E402
from napari_lvunet.model import LVUNet, reparameterize_model  # noqa: E402

SIZES = (256, 512, 1024)
MODEL_CASES = ("unfused", "fused_fp32", "fused_bf16", "fused_ort", "authors_deploy")
LABELS = {
    "unfused": "unfused PyTorch fp32",
    "fused_fp32": "fused PyTorch fp32",
    "fused_bf16": "fused PyTorch bf16",
    "fused_ort": "fused ONNX Runtime (default CPU path)",
    "authors_deploy": "authors' deploy-mode PyTorch fp32",
    "e2e_tiles": "end to end, numpy in, labels out, native tiles",
    "e2e_resize": "end to end, numpy in, labels out, resize to 256",
}


# --------------------------------------------------------------------------- memory


def _rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def _peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # "5" resets the resident-set high-water mark to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


# --------------------------------------------------------------------------- models


def _our_model(fused: bool) -> LVUNet:
    torch.manual_seed(0)
    model = LVUNet()
    model.set_act_learn(1.0)
    model.eval()
    return reparameterize_model(model) if fused else model


def _authors_model(repo: Path) -> torch.nn.Module:
    """The authors' LV_UNet(deploy=True), imported from their checkout, no download."""
    import torchvision.models

    real_builder = torchvision.models.mobilenet_v3_large

    def no_download(*args: Any, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        return real_builder(weights=None)

    torchvision.models.mobilenet_v3_large = no_download  # their module calls models.<name>
    try:
        spec = importlib.util.spec_from_file_location("authors_lv_unet", repo / "LV_UNet.py")
        if spec is None or spec.loader is None:
            raise FileNotFoundError(repo / "LV_UNet.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        torch.manual_seed(0)
        return module.LV_UNet(deploy=True).eval()
    finally:
        torchvision.models.mobilenet_v3_large = real_builder


def _torch_runner(model: torch.nn.Module, bf16: bool, channels_last: bool) -> Any:
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> Any:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(x)

    return run


# --------------------------------------------------------------------------- cases


def _build(case: dict[str, Any]) -> tuple[Any, Any]:
    """``(run, warm)``: run the case once; a cheaper call that warms the same code up."""
    kind, size, cache = case["kind"], case["size"], Path(case["onnx_cache"])
    threads = case.get("threads")
    if threads:
        torch.set_num_threads(threads)
    if kind in MODEL_CASES:
        x = torch.randn(1, 3, size, size)
        if kind == "fused_ort":
            seg = Segmenter(
                _our_model(fused=True), device="cpu", cache_dir=cache, num_threads=threads
            )
            if seg.backend != "onnxruntime":
                raise RuntimeError(f"expected ONNX Runtime, got {seg.backend}")
            session, unit = seg._runner, torch.rand(1, 3, size, size).numpy()
            # The engine's graph (normalisation included) alone: no other pre/post.
            return (lambda: session(unit)), (lambda: session(unit))
        if kind == "authors_deploy":
            # As their code runs: default memory format, float32.
            runner = _torch_runner(_authors_model(Path(case["authors_repo"])), False, False)
        else:
            model = _our_model(fused=kind != "unfused")
            runner = _torch_runner(model, bf16=kind == "fused_bf16", channels_last=True)
        return (lambda: runner(x)), (lambda: runner(x))
    seg = Segmenter(_our_model(fused=True), device="cpu", cache_dir=cache, num_threads=threads)
    rng = np.random.default_rng(0)
    sizing = "resize" if kind == "e2e_resize" or case.get("sizing") == "resize" else "tiles"
    shape = {"stack": (100, 512, 512, 3), "huge": (8000, 8000, 3)}.get(kind, (size, size, 3))
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    frame = image[0] if kind == "stack" else image[:512, :512]
    return (lambda: seg.segment(image, sizing=sizing)), (lambda: seg.segment(frame, sizing=sizing))


def _rounds(size: int, quick: bool) -> tuple[int, int, int]:
    """(warm-up runs, rounds, runs per round) for one image size."""
    warmup, rounds, per_round = {256: (3, 6, 5), 512: (2, 5, 3), 1024: (1, 4, 2)}[size]
    return (1, max(2, rounds // 2), per_round) if quick else (warmup, rounds, per_round)


def measure_latency(cases: list[dict[str, Any]], quick: bool) -> dict[str, float]:
    """Median ms per run of each case (same size), timed in interleaved rounds."""
    warmup, rounds, per_round = _rounds(cases[0]["size"], quick)
    runs = {c["kind"]: _build(c)[0] for c in cases}
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {kind: [] for kind in runs}
    for _ in range(rounds):
        for kind, run in runs.items():
            for _ in range(per_round):
                start = time.perf_counter()
                run()
                times[kind].append(time.perf_counter() - start)
    return {kind: 1000 * float(np.median(t)) for kind, t in times.items()}


def measure_memory(case: dict[str, Any]) -> dict[str, Any]:
    """Peak resident-set growth over one run (after a warm-up), in this process."""
    run, warm = _build(case)
    warm()
    before = _rss_mb()
    _reset_peak()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    peak = _peak_mb()
    return {**case, "seconds": seconds, "peak_delta_mb": peak - before, "peak_rss_mb": peak}


# --------------------------------------------------------------------------- driver


def _spawn(mode: str, payload: Any) -> Any:
    proc = subprocess.run(
        [sys.executable, __file__, f"--{mode}", json.dumps(payload)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cell(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "error"


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors-repo", type=Path, help="checkout of juntaoJianggavin/LV-UNet")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--no-huge", action="store_true", help="skip the 8000 x 8000 image")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for PyTorch and ONNX Runtime (default: their own defaults)",
    )
    parser.add_argument("--latency", help=argparse.SUPPRESS)
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.latency:
        payload = json.loads(args.latency)
        print(json.dumps(measure_latency(payload["cases"], payload["quick"])))
        return 0
    if args.memory:
        print(json.dumps(measure_memory(json.loads(args.memory))))
        return 0
    if args.authors_repo is not None and not (args.authors_repo / "LV_UNet.py").is_file():
        parser.error(f"{args.authors_repo} has no LV_UNet.py")

    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="lvunet-bench-") as cache:
        # Export once here, so that no measured process pays for it.
        Segmenter(_our_model(fused=True), device="cpu", cache_dir=cache)
        base = {
            "onnx_cache": cache,
            "authors_repo": str(args.authors_repo),
            "threads": args.threads,
        }
        kinds = [k for k in MODEL_CASES if k != "authors_deploy" or args.authors_repo]
        if not bf16_supported("cpu"):
            kinds.remove("fused_bf16")
        kinds += ["e2e_tiles", "e2e_resize"]
        latency: dict[int, Any] = {}
        memory: dict[tuple[str, int], Any] = {}
        for size in SIZES:
            cases = [{**base, "kind": k, "size": size} for k in kinds]
            latency[size] = _spawn("latency", {"cases": cases, "quick": args.quick})
            for case in cases:
                memory[(case["kind"], size)] = _spawn("memory", case)
        stack = {
            s: _spawn("memory", {**base, "kind": "stack", "size": 512, "sizing": s})
            for s in ("tiles", "resize")
        }
        huge = None
        if not args.no_huge:
            huge = _spawn("memory", {**base, "kind": "huge", "size": 8000, "sizing": "tiles"})

    threads = args.threads or f"default ({torch.get_num_threads()} for PyTorch)"
    print(
        f"\nLV-UNet CPU inference, {os.cpu_count()} CPUs ({_cpu_name()}), torch "
        f"{torch.__version__}, onnxruntime {_ort_version()}, threads: {threads}; "
        f"load average before {load_before}, after {_load()}"
    )
    print("batch 1; ms: median latency per image; MB: peak memory growth during one run\n")
    print("| case | " + " | ".join(f"{s} ms | {s} MB" for s in SIZES) + " |")
    print("|" + "---|" * (1 + 2 * len(SIZES)))
    for kind in kinds:
        cells = []
        for size in SIZES:
            ms = latency[size].get(kind) if "error" not in latency[size] else None
            cells += [_cell(ms), _cell(memory[(kind, size)].get("peak_delta_mb"), 0)]
        print(f"| {LABELS[kind]} | " + " | ".join(cells) + " |")

    print("\n100-slice 512 x 512 RGB uint8 stack through Segmenter.segment (default backend):\n")
    print("| sizing | total s | ms per slice | peak MB | peak RSS MB |")
    print("|---|---|---|---|---|")
    for sizing, r in stack.items():
        per_slice = 10 * r["seconds"] if "seconds" in r else None
        print(
            f"| {sizing} | {_cell(r.get('seconds'), 2)} | {_cell(per_slice)} "
            f"| {_cell(r.get('peak_delta_mb'), 0)} | {_cell(r.get('peak_rss_mb'), 0)} |"
        )
    if huge is not None:
        print(
            f"\n8000 x 8000 RGB uint8, native tiles (512 px, overlap 0.25), default backend: "
            f"{_cell(huge.get('seconds'))} s, peak RSS {_cell(huge.get('peak_rss_mb'), 0)} MB "
            f"(growth {_cell(huge.get('peak_delta_mb'), 0)} MB); target < 3000 MB"
        )

    print("\nRatios (targets from the issue):\n")
    print(
        "| size | unfused / fused PyTorch time (>= 1.4) "
        "| default path / authors' deploy time (<= 0.2) |"
    )
    print("|---|---|---|")
    for size in SIZES:
        ms = latency[size]
        speedup = _ratio(ms.get("unfused"), ms.get("fused_fp32"))
        versus = _ratio(ms.get("fused_ort"), ms.get("authors_deploy"))
        print(f"| {size} | {speedup} | {versus} |")
    e2e = latency[512].get("e2e_tiles")
    print(f"\n512 x 512 RGB end to end, native resolution: {_cell(e2e)} ms (target < 30 ms)")
    if args.json:
        figures = {
            "latency_ms": {str(k): v for k, v in latency.items()},
            "memory": [{**v, "kind": k[0], "size": k[1]} for k, v in memory.items()],
            "stack": stack,
            "huge": huge,
        }
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if not isinstance(numerator, float) or not isinstance(denominator, float):
        return "-"
    return f"{numerator / denominator:.2f}"


if __name__ == "__main__":
    sys.exit(main())
