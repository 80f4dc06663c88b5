"""Reproduce the README's MAML speed table: ours against the torch.func peer, side by side.

    pip install -e ".[bench]"          # torch, for the peer
    python experiments/bench_maml.py   # 20-25 minutes on a 2-core CPU

Runs ``fsl-jax bench maml`` with the library's defaults at 10 and at 1 meta-steps per XLA
execution (``--steps-per-call``, the training loop's ``train.steps_per_call``), at 10 with the
inner loop kept a ``lax.scan`` (``--inner-scan``), and at 10 with the tasks mapped by
``vmap`` or unrolled (``--task-map``: whichever is not the default), where glibc can back its
large allocations with transparent huge pages (glibc 2.35 on, THP not ``never``), at 1 and 10
with both implementations on them (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), and, where jemalloc
is installed (``apt install libjemalloc2``), at 1 with both implementations on jemalloc instead of
glibc's malloc (``LD_PRELOAD``, freed memory kept mapped), for second-order MAML,
first-order MAML and Reptile (default config: Conv4, 28x28x1, 5-way 1-shot, 15 queries per
class, 5 inner steps, 4 tasks per meta-batch). Each run is its own process and times the
``--peer torch`` after fsl_jax, so every speed-up is against the peer timed minutes apart at
most. Writes experiments/results/bench_maml.json (the raw JSON lines) and
experiments/results/bench_maml.md (the table); on an accelerator, bench_maml_gpu.json and .md
(the peer then runs on CUDA). Timings are only comparable on a quiet machine: the JSON records
the load average and the GEMM speed of each run. ``--defaults-only`` times the library's
defaults alone, at 10 and 1 meta-steps per call, with glibc's malloc (a short lease on a GPU); on
a CPU it writes bench_maml_cpu_defaults.json and .md, leaving the full table as it was.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {"MAML, second order": [], "MAML, first order": ["--first-order"], "Reptile": ["--method", "reptile"]}
# fsl_jax settings timed for each method: the defaults at 10 and 1 meta-steps per XLA execution
# (train.steps_per_call), the inner loop as a scan (unroll: 1), then (in main) the task map that
# is not the backend's default.
SETTINGS = (["--steps-per-call", "10"], ["--steps-per-call", "1"], ["--steps-per-call", "10", "--inner-scan"])


# glibc returns a call's large buffers to the kernel and page-faults them in afresh on the next
# call, 4 KB at a time. Asked to (a tunable read at process start), glibc 2.35 and later backs
# them with transparent huge pages, one fault per 2 MB; jemalloc with decay off keeps them
# mapped. Each environment reaches the peer's subprocess too.
MALLOCS = {"glibc": {}}
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
LIBC, LIBC_VERSION = platform.libc_ver()
if (LIBC == "glibc" and tuple(map(int, LIBC_VERSION.split("."))) >= (2, 35)
        and THP.exists() and "[never]" not in THP.read_text()):
    MALLOCS["glibc, huge pages"] = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
JEMALLOC = min(Path("/usr/lib").glob("*/libjemalloc.so.2"), default=None)
if JEMALLOC:
    MALLOCS["jemalloc"] = {"LD_PRELOAD": str(JEMALLOC), "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
# The meta-steps per call each other allocator is timed at, where it is available.
MALLOC_CALLS = {"glibc, huge pages": ("10", "1"), "jemalloc": ("1",)}


def bench(extra: list[str], steps: int, malloc: str = "glibc") -> dict:
    command = [sys.executable, "-m", "fsl_jax.cli", "bench", "maml", "--steps", str(steps), *extra]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **MALLOCS[malloc]})
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "malloc": malloc}


def short(x: float) -> str:
    """Two decimals, or two significant digits below 0.1 (GPU steps take milliseconds)."""
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def percent(fraction: float) -> str:
    return f"{100 * fraction:.0f}%" if fraction >= 0.01 else f"{100 * fraction:.1g}%"


def malloc_note(r: dict) -> str:
    """'; <allocator>' for a run on another allocator than glibc's default, else ''."""
    return "" if r["malloc"] == "glibc" else f"; {r['malloc']}"


def row(name: str, r: dict) -> str:
    c = r["config"]
    tasks = "tasks unrolled" if c["task_map"] == "unroll" else f"tasks by {c['task_map']}"
    calls = f"{c['steps_per_call']} meta-step{'s' * (c['steps_per_call'] > 1)} per call"
    return (f"| {name} | fsl_jax ({tasks}, inner loop {c['inner_loop']}, {calls}{malloc_note(r)}; compiles in "
            f"{r['compile_s']:.0f} s) | {short(r['step_s'])} | {r['tasks_per_s']:.2f} | {r['gflops_per_s']:.1f} | "
            f"{percent(r['gemm_fraction'])} | {r['page_faults_per_step']:,} | {r['speedup_vs_peer']:.1f}x |")


def peer_row(name: str, runs: list[dict]) -> str:
    """The peer's median over the runs beside ``runs`` (speed-ups use each run's own peer)."""
    peers = [r["peer"] for r in runs]
    step = statistics.median(p["step_s"] for p in peers)
    gemm = statistics.median(p["gflops_per_s"] / r["gemm_gflops_per_s"] for p, r in zip(peers, runs))
    median = f"median of its {len(peers)} runs" if len(peers) > 1 else "its run"
    return (f"| {name} | torch.func peer (torch {peers[0]['torch']}{malloc_note(runs[0])}; {median}) | {short(step)} | "
            f"{runs[0]['config']['tasks'] / step:.2f} | {statistics.median(p['gflops_per_s'] for p in peers):.1f} | "
            f"{percent(gemm)} | {round(statistics.median(p['page_faults_per_step'] for p in peers)):,} | 1.0x |")


def markdown(results: dict[str, list[dict]]) -> str:
    first = next(iter(results.values()))[0]
    c = first["config"]
    device = f"{first['cpu']}, {first['cpu_count']} cores" if first["backend"] == "cpu" else f"{first['device']}, default precision"
    lines = [f"Conv4, {c['image'][0]}x{c['image'][1]}x{c['image'][2]}, {c['ways']}-way {c['shots']}-shot, "
             f"{c['queries']} queries per class, {c['inner_steps']} inner steps, {c['tasks']} tasks per meta-step "
             f"({device}; float32 2048x2048 GEMM measured in the same process; "
             f"per meta-step: the median of {len(first['step_times_s'])} calls after compilation, each call's time "
             f"divided by its meta-steps; the peer: timed the same way over as many meta-steps, after "
             f"{first['peer']['warmup_steps']} untimed ones, in each run after fsl_jax; speed-up: the peer's time in the same run over fsl_jax's).", "",
             "| method | implementation | s / meta-step | tasks / s | GFLOP/s | % of GEMM | page faults / meta-step | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        for malloc in MALLOCS:
            group = [r for r in runs if r["malloc"] == malloc]
            if group:
                lines += [row(name, r) for r in group] + [peer_row(name, group)]
    runs = [r for rs in results.values() for r in rs]
    gemm = ", ".join(f"{r['gemm_gflops_per_s']:.0f}" for r in runs)
    lines += ["", f"GEMM limit measured in each run: {gemm} GFLOP/s; load average at the end of each run: "
              + ", ".join(str(r["load_avg_1m"]) for r in runs) + ". FLOPs are analytic "
              "(see `fsl_jax.meta.flops`): the same count is used for both implementations."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7, help="timed calls per implementation (at least 5)")
    parser.add_argument("--defaults-only", action="store_true", help="only the defaults, at 10 and 1 meta-steps per call")
    args = parser.parse_args()
    settings = SETTINGS[:2] if args.defaults_only else SETTINGS
    results = {}
    for name, extra in RUNS.items():
        results[name] = [bench([*extra, *setting, "--peer", "torch"], args.steps) for setting in settings]
        if not args.defaults_only:
            # the default's own run says which map it used (unroll on CPU, vmap elsewhere)
            other = "unroll" if results[name][0]["config"]["task_map"] == "vmap" else "vmap"
            results[name].append(bench([*extra, "--steps-per-call", "10", "--task-map", other, "--peer", "torch"],
                                       args.steps))
            for malloc, per_calls in MALLOC_CALLS.items():
                if malloc in MALLOCS:
                    results[name] += [bench([*extra, "--steps-per-call", per_call, "--peer", "torch"], args.steps,
                                            malloc) for per_call in per_calls]
        print(name, json.dumps(results[name]), flush=True)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    backend = results["MAML, second order"][0]["backend"]
    # the README's tables: the CPU's full set and an accelerator's defaults; a CPU's defaults alone are their own
    stem = f"bench_maml_{backend}" if backend != "cpu" else "bench_maml_cpu_defaults" if args.defaults_only else "bench_maml"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
