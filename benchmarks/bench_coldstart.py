"""Cold-start benchmark: what a user waits for, and how much memory it takes, per command.

Launch (from the repository root)::

    python benchmarks/bench_coldstart.py                    # this checkout, 7 runs per case
    python benchmarks/bench_coldstart.py --runs 15 --json coldstart.json
    python benchmarks/bench_coldstart.py --source /tmp/old  # another checkout (a worktree)
    python benchmarks/bench_coldstart.py --source /tmp/old --source .   # before / after

Every case below runs in its own new interpreter (``sys.executable``), so it pays for
everything it imports, as a user's command does. The cases take turns (round 1 runs each
case once, then round 2, ...), so background load hits them alike; each is measured
``--runs`` times after one warm-up run, and the table shows medians:

* ``python -c pass``, ``import napari`` and ``import napari.layers, napari.qt`` (the
  parts of napari the widget module needs): the floor that is not ours to cut;
* ``napari-lvunet --help``;
* ``napari-lvunet segment SAMPLE --out DIR`` on the bundled sample image (the default
  model, the default device), run as ``python -m napari_lvunet``;
* ``import napari_lvunet._widget``: what napari pays when the widget is first opened.

Wall time is the parent's clock from start to exit. CPU time (user + system) and peak
RSS are the child's own, from ``os.wait4`` (``ru_utime``, ``ru_stime``, ``ru_maxrss``),
so no other process (and no other case) is counted in them; CPU time also moves less
than wall time when other processes compete for the cores. The warm-up run is shown
apart ("first run"): it fills the disk cache and any on-disk cache of the code measured
(the ONNX graph the old engine exported on first use); the medians are a user's
every-day start after that.
Caches go to a temporary ``NAPARI_LVUNET_CACHE``, so the user's own are never touched.

Then, in one process, warm: the one-call API ``inference.segment(image, model)`` against
``Segmenter.segment(image)`` on the same image (the 530 x 621 RGB sample), alternating
calls, medians. With the pooled engine (``inference.default_pool``) ``model`` is the
registry name, as the README shows it; with the older engine it is the loaded model.

``--source DIR`` measures another checkout of the project with this environment's
packages (it goes first on ``PYTHONPATH``); ``git worktree add /tmp/old COMMIT`` makes one
without touching your working tree. Given more than once, the checkouts' runs take turns
in the same rounds, so a before / after comparison sees the same background load. Other
processes distort every figure: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: The sample image the segment case reads (the same file the CLI picks by default).
SAMPLE = "napari_lvunet/sample_data/kvasir_cju2hw5gjlr5h0988so2qqres.jpg"

#: Issue 9's targets for ``napari-lvunet segment`` on the sample.
TARGET_SECONDS, TARGET_MB = 2.0, 400

# Run in the child for the in-process comparison: prints one JSON line.
_API_SCRIPT = """
import json, statistics, sys, time
import numpy as np
import napari_lvunet.inference as inference
from napari_lvunet._sample_data import polyp

runs = int(sys.argv[1])
image = polyp()[0][0]
if hasattr(inference, "default_pool"):
    model = "lvunet-kvasir-seg"
    segmenter = inference.default_pool().get(model, device="cpu")
    model_arg = "registry name"
else:
    from napari_lvunet.weights import DEFAULT_MODEL, load_model
    model = load_model(DEFAULT_MODEL)
    segmenter = inference.Segmenter(model, device="cpu")
    model_arg = "loaded model"

def one_call():
    return inference.segment(image, model, device="cpu")

def method():
    return segmenter.segment(image)

for _ in range(3):
    same = np.array_equal(one_call(), method())
times = {"segment()": [], "Segmenter.segment": []}
for _ in range(runs):
    for name, func in (("segment()", one_call), ("Segmenter.segment", method)):
        start = time.perf_counter()
        func()
        times[name].append(time.perf_counter() - start)
print(json.dumps({
    "model_arg": model_arg,
    "shape": list(image.shape),
    "same_labels": bool(same),
    "ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
    "torch_loaded": "torch" in sys.modules,
}))
"""


def _cases(source: Path, out: Path) -> dict[str, list[str]]:
    py = sys.executable
    cli = [py, "-m", "napari_lvunet"]
    return {
        "python -c pass": [py, "-c", "pass"],
        "import napari": [py, "-c", "import napari"],
        "import napari.layers, napari.qt": [py, "-c", "import napari.layers, napari.qt"],
        "napari-lvunet --help": [*cli, "--help"],
        "napari-lvunet segment": [*cli, "segment", str(source / SAMPLE), "--out", str(out)],
        "import napari_lvunet._widget": [py, "-c", "import napari_lvunet._widget"],
    }


def run_once(cmd: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """One child: wall and CPU seconds, its own peak RSS in MB (``ru_maxrss`` is in KiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    stderr = proc.stderr.read()  # drained while it runs: a full pipe would block the child
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        lines = stderr.decode(errors="replace").strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"{' '.join(cmd[1:])} exited {proc.returncode}: {lines[-1]}")
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_head(source: Path) -> str:
    proc = subprocess.run(
        ["git", "-C", str(source), "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip()[:72] if proc.returncode == 0 else "(not a git checkout)"


def _measure_api(env: dict[str, str], cwd: Path, runs: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _API_SCRIPT, str(runs)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"API comparison failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_source(source: Path, table: dict[str, Any], api: dict[str, Any], args: Any) -> None:
    print(f"\n### {source} ({_git_head(source)})\n")
    print("| command (new process) | wall s | CPU s | peak RSS MB | first run s |")
    print("|---|---|---|---|---|")
    for name, row in table.items():
        print(
            f"| {name} | {row['seconds']:.2f} | {row['cpu_seconds']:.2f} "
            f"| {row['peak_rss_mb']:.0f} | {row['first_seconds']:.2f} |"
        )
    seg = table["napari-lvunet segment"]
    met = seg["seconds"] <= TARGET_SECONDS and seg["peak_rss_mb"] <= TARGET_MB
    print(
        f"\ntarget for `napari-lvunet segment` on the sample: <= {TARGET_SECONDS:.0f} s and "
        f"<= {TARGET_MB} MB: {'met' if met else 'MISSED'}"
    )
    ms = api["ms"]
    print(
        f"\nIn one process, warm, {api['shape']} RGB sample, device cpu, medians of "
        f"{args.api_runs} alternating calls (model passed as: {api['model_arg']}; "
        f"same labels: {api['same_labels']}; torch imported: {api['torch_loaded']}):\n"
    )
    print("| call | ms |")
    print("|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} |")
    ratio = ms["segment()"] / ms["Segmenter.segment"]
    print(f"\nsegment() / Segmenter.segment = {ratio:.2f} (target: within 10%, <= 1.10)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="measured runs per case (default 7)")
    parser.add_argument("--api-runs", type=int, default=30, help="calls per API (default 30)")
    parser.add_argument(
        "--source",
        type=Path,
        action="append",
        help="checkout to measure (default: this one); repeat it to measure several in the "
        "same interleaved rounds (before / after)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.api_runs < 1:
        parser.error("--runs and --api-runs must be at least 1")
    sources = [s.resolve() for s in args.source or [ROOT]]
    for source in sources:
        if not (source / "napari_lvunet" / "__init__.py").is_file():
            parser.error(f"{source} is not a napari-lvunet checkout")

    load_before = _load()
    first: dict[Path, dict[str, Any]] = {s: {} for s in sources}
    runs: dict[Path, dict[str, list[dict[str, Any]]]] = {s: {} for s in sources}
    api: dict[Path, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="lvunet-coldstart-") as tmp:
        work = {}
        for i, source in enumerate(sources):
            folder = Path(tmp, str(i))
            folder.mkdir()
            env = {**os.environ, "PYTHONPATH": str(source)}
            env["NAPARI_LVUNET_CACHE"] = str(folder / "cache")
            work[source] = (folder, env, _cases(source, folder / "out"))
        # Round 0 is the warm-up; every round runs every case of every source once.
        for round_ in range(args.runs + 1):
            for source, (folder, env, cases) in work.items():
                for name, cmd in cases.items():
                    if name == "napari-lvunet segment":  # a new folder: never --overwrite
                        cmd = [*cmd[:-1], str(folder / f"out{round_}")]
                    result = run_once(cmd, env, folder)
                    if round_ == 0:
                        first[source][name] = result
                    else:
                        runs[source].setdefault(name, []).append(result)
        for source, (folder, env, _) in work.items():
            api[source] = _measure_api(env, folder, args.api_runs)

    tables = {
        source: {
            name: {
                "seconds": statistics.median(r["seconds"] for r in results),
                "cpu_seconds": statistics.median(r["cpu_seconds"] for r in results),
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
                "first_seconds": first[source][name]["seconds"],
                "runs": results,
            }
            for name, results in runs[source].items()
        }
        for source in sources
    }
    print(
        f"\nnapari-lvunet cold start: {os.cpu_count()} CPUs ({_cpu_name()}), Python "
        f"{platform.python_version()}; load average before {load_before}, after {_load()}\n"
        f"each case a new process; medians of {args.runs} runs after 1 warm-up run"
        + (", the checkouts' runs interleaved" if len(sources) > 1 else "")
    )
    for source in sources:
        _print_source(source, tables[source], api[source], args)

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "cpu": _cpu_name(),
                    "cpus": os.cpu_count(),
                    "load_before": load_before,
                    "load_after": _load(),
                    "runs": args.runs,
                    "sources": [
                        {
                            "source": str(s),
                            "commit": _git_head(s),
                            "commands": tables[s],
                            "api": api[s],
                        }
                        for s in sources
                    ],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
