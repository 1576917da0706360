"""One GPU run that measures everything, in priority order, each phase in a process of its own.

    python3 benchmarks/gpu_run.py                    # on the GPU machine: results under $OUT
    python3 benchmarks/gpu_run.py --tiny             # the rehearsal on a CPU (CI), under a minute

1. installs the wheelhouse (`make gpu-wheels`, .gpu-wheels/) into a private path, if it is there;
2. prints its time estimate per phase (from the 2026-11-26 H200 figures in docs/gpu.md) and admits
   phases in priority order while they fit the budget (default 580 s: one command of the GPU
   machine); an explicit `--phases` list that does not fit is refused before anything starts;
3. runs each phase (benchmarks/gpu_phases.py) with its own time limit and fresh inductor and Triton
   cache dirs; each writes its JSON under $OUT as it ends, and one that overruns or fails is
   recorded as such while the files of earlier phases stay;
4. writes `run.json`: every phase's status and time, and the headline comparisons.

This script imports nothing beyond the standard library: it must run before the wheels are in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.outpaths import result_path  # noqa: E402 - standard library only

PHASES = ["plain", "service", "warm_start", "fp8", "quality"]  # priority order
FILES = {"plain": "p1-plain.json", "service": "p2-service.json", "warm_start": "p3-warm-start.json",
         "fp8": "p4-fp8.json", "quality": "p5-quality.json"}  # fmt: skip

# Seconds on one H200, from the figures of 2026-11-26 (docs/gpu.md): plain fp16 at 50 steps takes
# 1.24 / 5.0 s per call at batch 1 / 16 (batch 32 taken as twice 16); ours saturated 4.36 images/s;
# reduce-overhead compiled two buckets in 120 s (taken as 45 s per bucket plus the probes).
STARTUP = 20  # a phase's process: imports, then 1.3 B random parameters built on the GPU
CALL = {1: 1.24, 16: 5.0, 32: 10.0}
COMPILE_PER_BUCKET, WARM_PER_BUCKET = 45, 12  # cold; from the compile cache (tracing, CUDA graphs)
WORKER_BUCKETS = 6  # 1, 2, 4, 8, 16, 32
SATURATED_64 = 64 / 4.36
ESTIMATE_S = {
    "plain": STARTUP + 7 * sum(CALL.values()),  # 2 warm-ups + 5 repetitions per batch
    "service": STARTUP
    + WORKER_BUCKETS * COMPILE_PER_BUCKET
    + 6 * CALL[1]
    + 2
    + CALL[32]
    + SATURATED_64
    + 3 * CALL[32],  # cold compile, baseline + single job, saturated, the 17- and 40-job mix
    "warm_start": STARTUP + WORKER_BUCKETS * WARM_PER_BUCKET + 3 * 0.45,
    "fp8": STARTUP + 10 + 6 * CALL[1] + 2 * COMPILE_PER_BUCKET + 2 + CALL[32] + SATURATED_64,
    "quality": STARTUP + 5 * 4 * CALL[1] + COMPILE_PER_BUCKET + 10,  # 4 cases × 5 paths, one compile
}
TINY_ESTIMATE_S = {"plain": 12, "service": 15, "warm_start": 4, "fp8": 4, "quality": 12}
INSTALL_S = 15
SLACK = 1.5  # a phase's limit: its estimate times this, within what is left of the budget


# The GPU machine's interpreter and platforms (the wheelhouse's, `make gpu-wheels`).
GPU_PYTHON = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                                "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")
]  # fmt: skip


def install_wheels(wheels: Path, site: Path, log: Any, tiny: bool) -> str:
    """The wheelhouse into `site` (no index: the GPU machine reaches none); what happened, in words.
    With `tiny` it is installed for the GPU machine's Python into a scratch dir and not used: the
    rehearsal checks that the set installs there (one version each, every platform tag matched)."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return f"no wheelhouse at {wheels}: using what is installed"
    target = Path(tempfile.mkdtemp(prefix="gpu-run-wheels-")) if tiny else site
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--find-links", str(wheels), "--target", str(target), *(GPU_PYTHON if tiny else []), *map(str, found)]  # fmt: skip
    try:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=300)
    finally:
        if tiny:
            shutil.rmtree(target, ignore_errors=True)
    if tiny:
        return f"{len(found)} wheels from {wheels} install for cp312 manylinux (checked, not used on this CPU)"
    return f"installed {len(found)} wheels from {wheels} into {site}"


def plan(asked: list[str] | None, tiny: bool, budget: float) -> tuple[list[str], list[str], dict[str, float]]:
    """(phases to run, phases left out, estimates): an asked list must fit whole; else the priority
    prefix that fits (the others still run if earlier phases leave them the time)."""
    est = {p: float(TINY_ESTIMATE_S[p] if tiny else round(ESTIMATE_S[p])) for p in PHASES}
    total = 0 if tiny else INSTALL_S
    if asked:
        need = total + sum(est[p] for p in asked)
        if need > budget:
            raise SystemExit(f"gpu_run: the phases asked for need ~{need:.0f} s by estimate, over the {budget:.0f} s "
                             f"budget: ask for fewer (--phases) or a larger --budget")  # fmt: skip
        return asked, [p for p in PHASES if p not in asked], est
    run: list[str] = []
    for p in PHASES:
        if total + est[p] > budget:
            break
        run.append(p)
        total += est[p]
    if not run:
        raise SystemExit(f"gpu_run: not even the first phase fits the {budget:.0f} s budget by estimate")
    return run, PHASES[len(run) :], est


def run_phase(phase: str, tiny: bool, limit: float, env: dict[str, str], cache_dir: str, log: Any) -> dict[str, Any]:
    """One phase in its own process with fresh compile caches; its file, or a record of why none."""
    out = result_path(FILES[phase], "phase")
    fresh = tempfile.mkdtemp(prefix=f"gpu-run-{phase}-")
    penv = {**env, "TORCHINDUCTOR_CACHE_DIR": f"{fresh}/inductor", "TRITON_CACHE_DIR": f"{fresh}/triton"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_phases.py"), phase, "--out", str(out),
           "--compile-cache", cache_dir] + (["--tiny"] if tiny else [])  # fmt: skip
    t = time.perf_counter()
    status = "ok"
    try:
        proc = subprocess.run(cmd, env=penv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
        if proc.returncode != 0:
            status = f"failed (exit {proc.returncode}; see run.log)"
    except subprocess.TimeoutExpired:
        status = f"timeout after {limit:.0f} s"
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    elapsed = round(time.perf_counter() - t, 1)
    res: dict[str, Any] = {}
    if out.exists():
        try:
            res = json.loads(out.read_text())
        except ValueError:
            res = {}
    if status != "ok" or not res:  # what finished stays; the file says how the phase ended
        res = {**res, "phase": phase, "status": status if status != "ok" else "failed (no result)"}
        out.write_text(json.dumps(res, indent=1, default=str))
    return {"file": out.name, "status": res.get("status"), "elapsed_s": elapsed, "limit_s": round(limit), "res": res}


def headline(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The comparisons the run is for: ours against plain diffusers at each batch, warm against cold."""
    out: dict[str, Any] = {}
    plain = {b["batch"]: b["images_per_s"] for b in results.get("plain", {}).get("batches", [])}
    svc, warm, f8 = (results.get(p, {}) for p in ("service", "warm_start", "fp8"))
    out["plain_images_per_s"] = plain
    if (ours := svc.get("throughput_images_per_s")) is not None:
        out["ours_saturated_images_per_s"] = ours
        out["speedup_vs_plain"] = {str(b): ours / v for b, v in plain.items()}
    if svc.get("warmup_s") is not None:
        out["cold_warmup_s"], out["warm_start_warmup_s"] = svc["warmup_s"], warm.get("warmup_s")
    if f8.get("throughput_images_per_s") and ours:
        out["fp8_vs_fp16_saturated"] = f8["throughput_images_per_s"] / ours
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny-random on the CPU: the rehearsal")
    ap.add_argument("--budget", type=float, default=580.0, help="seconds for the whole run (default 580)")
    ap.add_argument("--phases", default="", help=f"a comma list of {', '.join(PHASES)} (default: all that fit)")
    ap.add_argument("--limit", action="append", default=[], metavar="PHASE=S", help="cap a phase's time (rehearsal)")
    ap.add_argument("--wheels", default=str(ROOT / ".gpu-wheels"), help="the wheelhouse (make gpu-wheels)")
    a = ap.parse_args(argv)
    started = time.monotonic()
    # Every file of the run in one folder: $OUT on the GPU machine (what comes back), else a new one here.
    os.environ.setdefault("OUT", str(ROOT / "benchmarks" / "results" / f"gpu-run-{time.strftime('%Y-%m-%d-%H%M%S')}"))
    limits = {k: float(v) for k, v in (x.split("=", 1) for x in a.limit)}
    asked = [p for p in a.phases.split(",") if p]
    if unknown := set(asked) - set(PHASES):
        raise SystemExit(f"gpu_run: unknown phases {sorted(unknown)}")
    run, left, est = plan(asked, a.tiny, a.budget)
    print(f"gpu_run estimate (s, one H200 unless --tiny): {est}; install {0 if a.tiny else INSTALL_S}")
    print(f"gpu_run: running {run} in {sum(est[p] for p in run):.0f} s of {a.budget:.0f} s; left out: {left}",
          flush=True)  # fmt: skip
    log_path = result_path("run.log", "run")
    summary: dict[str, Any] = {"budget_s": a.budget, "tiny": a.tiny, "estimate_s": est, "phases": {},
                               "left_out": {p: "over budget by estimate" for p in left}}  # fmt: skip
    summary_path = result_path("run.json", "run")
    site = Path(tempfile.gettempdir()) / "gpu-run-site"
    cache_dir = tempfile.mkdtemp(prefix="gpu-run-compile-cache-")
    with log_path.open("a") as log:
        try:
            summary["wheels"] = install_wheels(Path(a.wheels), site, log, a.tiny)
        except (subprocess.SubprocessError, OSError) as exc:
            summary["wheels"] = f"install failed: {exc}"
            summary_path.write_text(json.dumps(summary, indent=1))
            raise SystemExit(f"gpu_run: the wheelhouse did not install ({exc}); see {log_path}") from exc
        paths = ([] if a.tiny else [str(site)]) + [str(ROOT), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths),
               "PYTHONUNBUFFERED": "1"}  # fmt: skip
        results: dict[str, dict[str, Any]] = {}
        # The admitted phases, then any left out whose estimate fits the time the run has actually left.
        for phase in run + left if not asked else run:
            remaining = a.budget - (time.monotonic() - started) - 5
            if remaining < (est[phase] / 2 if phase in run else est[phase]):
                summary["left_out"][phase] = f"not started: {remaining:.0f} s left, estimate {est[phase]:.0f} s"
                continue
            summary["left_out"].pop(phase, None)
            # A busy CI machine may take many times the tiny estimate: there the budget is the only cap.
            own = remaining if a.tiny else est[phase] * SLACK + 30
            limit = min(remaining, own, limits.get(phase, remaining))
            got = run_phase(phase, a.tiny, limit, env, cache_dir, log)
            results[phase] = got.pop("res")
            summary["phases"][phase] = got
            print(f"[{time.monotonic() - started:6.1f} s] {phase}: {got['status']} in {got['elapsed_s']} s "
                  f"-> {got['file']}", flush=True)  # fmt: skip
            summary_path.write_text(json.dumps(summary, indent=1, default=str))
    shutil.rmtree(cache_dir, ignore_errors=True)
    summary["headline"] = headline(results)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    summary_path.write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary["headline"], indent=1, default=str))
    print(f"gpu_run: {summary['wall_s']} s; wrote {summary_path.parent}")
    return (
        0
        if all(r["status"] == "ok" or str(r["status"]).startswith("skipped") for r in summary["phases"].values())
        else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
