"""Peak memory of segmenting huge 2D images, each case in a fresh process.

The target (issue "wrong answers must be impossible"): any 2D image peaks at no more
than 2 GB plus the size of its input and output arrays. Printed per case: input and
output sizes, the process's peak resident memory (``VmHWM``) and its baseline after
imports and model loading, time, and what the segmentation itself added
(``peak - baseline - input - output``), which the target bounds by 2 GB.

    python benchmarks/bench_memory.py            # API cases and the CLI on a 10000^2 TIFF
    python benchmarks/bench_memory.py --quick    # 8000^2 instead of 20000^2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1024**3


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _child(case: dict) -> dict:
    """Run one case in this (fresh) process and report its memory."""
    import numpy as np

    from napari_lvunet.inference import Segmenter

    seg = Segmenter("lvunet-kvasir-seg", device="cpu")
    seg.segment(np.zeros((256, 256, 3), np.uint8))  # warm: session, kernels, arenas
    side, channels = case["side"], case["channels"]
    shape = (side, side, channels) if channels > 1 else (side, side)
    rng = np.random.default_rng(0)
    dtype = np.dtype(case["dtype"])
    image = np.empty(shape, dtype)
    for r0 in range(0, side, 1024):  # filled in blocks: no float temporaries
        image[r0 : r0 + 1024] = rng.integers(0, 255, image[r0 : r0 + 1024].shape, dtype=np.uint8)
    baseline = _status_kb("VmRSS") * 1024 - image.nbytes
    start = time.perf_counter()
    labels = seg.segment(image, sizing=case["sizing"])
    seconds = time.perf_counter() - start
    return {
        "input": image.nbytes,
        "output": labels.nbytes,
        "baseline": baseline,
        "peak": _status_kb("VmHWM") * 1024,
        "seconds": seconds,
    }


def _run_child(case: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(case)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cli_case(side: int) -> dict:
    """``napari-lvunet segment`` on a greyscale TIFF of side x side, overlay included."""
    import numpy as np
    import tifffile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.tif"
        image = np.random.default_rng(0).integers(0, 255, (side, side), dtype=np.uint8)
        tifffile.imwrite(path, image)
        del image
        command = [
            sys.executable,
            "-c",
            "import resource, sys, runpy; sys.argv = ['napari-lvunet', *sys.argv[1:]];"
            "code = 0\n"
            "try:\n    runpy.run_module('napari_lvunet', run_name='__main__')\n"
            "except SystemExit as e:\n    code = e.code or 0\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,"
            " file=sys.stderr); sys.exit(code)",
            "segment",
            str(path),
            "--out",
            str(Path(tmp) / "out"),
        ]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        peak = [ln for ln in done.stderr.splitlines() if ln.startswith("PEAK")]
        if done.returncode != 0 or not peak:
            return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
        return {
            "input": side * side,
            "output": side * side,
            "baseline": 0,
            "peak": int(peak[-1].split()[1]),
            "seconds": seconds,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8000^2 instead of 20000^2")
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI case")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    big = 8000 if args.quick else 20000
    cases = [
        {
            "name": f"API {big}^2 RGB uint8, auto",
            "side": big,
            "channels": 3,
            "dtype": "uint8",
            "sizing": "auto",
        },
        {
            "name": f"API {big}^2 RGB uint8, resize",
            "side": big,
            "channels": 3,
            "dtype": "uint8",
            "sizing": "resize",
        },
        {
            "name": "API 10000^2 grey uint16, auto",
            "side": 10000,
            "channels": 1,
            "dtype": "uint16",
            "sizing": "auto",
        },
        {
            "name": "API 10000^2 grey uint16, tiles",
            "side": 10000,
            "channels": 1,
            "dtype": "uint16",
            "sizing": "tiles",
        },
    ]
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}\n")
    print("| case | input MB | output MB | baseline MB | peak MB | added MB | s | <= 2 GB added |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(c["name"], _run_child(c)) for c in cases]
    if not args.no_cli:
        rows.append(("CLI segment 10000^2 grey TIFF (mask + overlay)", _cli_case(10000)))
    for name, r in rows:
        if "error" in r:
            print(f"| {name} | error: {r['error']} |")
            continue
        added = r["peak"] - r["baseline"] - r["input"] - r["output"]
        mb = 1024**2
        print(
            f"| {name} | {r['input'] / mb:.0f} | {r['output'] / mb:.0f} | {r['baseline'] / mb:.0f} "
            f"| {r['peak'] / mb:.0f} | {added / mb:.0f} | {r['seconds']:.1f} | "
            f"{'yes' if added <= 2 * GB else 'NO'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
