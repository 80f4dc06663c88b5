"""``fsl-jax bench``: throughput measurements, each printed as one JSON line."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from fsl_jax.errors import ConfigError

PEER = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_torch_maml.py"


def add_arguments(parser) -> list:
    """``bench train`` and ``bench maml``, each with its own flags; returns their parsers."""
    what = parser.add_subparsers(dest="what", required=True)
    train = what.add_parser("train", help="sampler and training-step episodes/s of a config")
    train.add_argument("--config", required=True, help="the config whose training step is timed")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    maml = what.add_parser("maml", help="seconds per MAML meta-step: Conv4, 28x28x1, 5-way 1-shot, 15 queries per class")
    for command, least in ((train, 1), (maml, 5)):
        command.add_argument("--steps", type=int, default=10,
                             help=f"timed calls after compilation (default %(default)s, at least {least})")
    maml.add_argument("--method", choices=["maml", "reptile"], default="maml")
    maml.add_argument("--first-order", action="store_true", help="FOMAML instead of second-order MAML")
    maml.add_argument("--tasks", type=int, default=4, help="tasks per meta-batch")
    maml.add_argument("--inner-steps", type=int, default=5)
    maml.add_argument("--task-map", choices=["vmap", "map", "unroll"], help="default: the library's for this backend")
    maml.add_argument("--inner-scan", action="store_true",
                      help="keep the inner loop a lax.scan (method option unroll: 1; default: unrolled, as the learners)")
    maml.add_argument("--steps-per-call", type=int, default=10,
                      help="meta-steps per XLA execution (train.steps_per_call; make_train_steps)")
    maml.add_argument("--peer", choices=["torch"], help="also time benchmarks/peer_torch_maml.py in this run")
    return [train, maml]


def bench_train(args) -> dict:
    """Sampler episodes/s next to training-step episodes/s for a config: is sampling the bottleneck?"""
    from fsl_jax.config import load_config
    from fsl_jax.meta.parallel import stack_batches
    from fsl_jax.train import Experiment, make_train_steps

    if args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}")
    overrides = list(args.set) + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
    config = load_config(args.config, overrides)
    experiment = Experiment(config)
    params = experiment.init_params()
    opt_state = experiment.optimiser.init(params)
    steps = make_train_steps(experiment.learner, experiment.optimiser)
    sampler, per_call = experiment.train_sampler, config["train"]["steps_per_call"]
    key = jax.random.PRNGKey(0)

    def call(i):
        nonlocal params, opt_state
        batches = stack_batches([sampler.sample(i * per_call + j) for j in range(per_call)])
        start = time.perf_counter()
        params, opt_state, losses, _ = steps(params, opt_state, batches, jax.random.split(key, per_call))
        losses.block_until_ready()
        return time.perf_counter() - start

    compile_s = call(0)
    times = [call(i) / per_call for i in range(1, args.steps + 1)]
    step_s = statistics.median(times)
    return {"benchmark": "train", "config": config["name"], "method": config["method"],
            "episode": config["episode"], "backend": jax.default_backend(),
            "steps_per_call": per_call, "compile_s": round(compile_s, 3), "step_s": round(step_s, 6),
            "train_episodes_per_s": round(sampler.tasks / step_s, 2),
            "sampler_episodes_per_s": round(sampler.throughput(), 1)}


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """What a CPU timing was taken on, e.g. 'AMD EPYC (family 26, model 2; AVX-512)': cloud CPUs
    often report only their brand, and one brand spans generations of very different speed."""
    if not cpuinfo.exists():
        return platform.processor() or platform.machine()
    fields = {}
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    details = ", ".join(f"{key.removeprefix('cpu ')} {fields[key]}" for key in ("cpu family", "model") if key in fields)
    details = "; ".join(filter(None, [details, vector]))
    return fields.get("model name", platform.machine()) + (f" ({details})" if details else "")


def page_faults() -> int:
    """Minor page faults of this process so far: on CPU, memory that a call touches for the first time."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def gemm_gflops(size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a float32 size x size matrix product (median of ``repeats``): the practical limit."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jax.numpy.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    timed(matmul, a, a)
    return 2 * size**3 / statistics.median(timed(matmul, a, a) for _ in range(repeats)) / 1e9


def run_peer(args, inner_lr: float) -> dict:
    """Run the torch.func peer on the same config and kind of device in a subprocess, timed over as many
    meta-steps as fsl_jax (``--steps`` samples of ``--steps-per-call`` each); its JSON result."""
    command = [sys.executable, str(PEER), "--method", args.method, "--tasks", str(args.tasks),
               "--inner-steps", str(args.inner_steps), "--inner-lr", str(inner_lr), "--steps", str(args.steps),
               "--steps-per-sample", str(args.steps_per_call), "--device", "cuda" if jax.default_backend() == "gpu" else "cpu"]
    if args.first_order:
        command.append("--first-order")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise ConfigError(f"the torch peer failed (is the `bench` extra installed? pip install -e '.[bench]'):\n"
                          f"{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_maml(args) -> dict:
    """Seconds per MAML meta-step, GFLOP/s against the same process's GEMM GFLOP/s, and the peer."""
    import optax

    from fsl_jax.data.episodes import Episode
    from fsl_jax.learner import first_task
    from fsl_jax.meta import MetaClassifier, maml, reptile
    from fsl_jax.meta.flops import forward_flops, meta_step_flops
    from fsl_jax.nets import Conv4
    from fsl_jax.train import make_train_steps

    if args.steps < 5:
        raise ConfigError(f"--steps must be at least 5, got {args.steps}")
    per_call = args.steps_per_call
    if per_call < 1:
        raise ConfigError(f"--steps-per-call must be at least 1, got {per_call}")
    if args.tasks < 1:
        raise ConfigError(f"--tasks must be at least 1, got {args.tasks}")
    ways, shots, queries, size, inner_lr = 5, 1, 15, 28, 0.4
    tasks, inner_steps = args.tasks, args.inner_steps
    backbone, unroll = Conv4(), 1 if args.inner_scan else True
    if args.method == "reptile":
        learner, kind = reptile(backbone, inner_steps, inner_lr=inner_lr, task_map=args.task_map,
                                unroll=unroll), "reptile"
    else:
        kind = "first_order" if args.first_order else "second_order"
        learner = maml(backbone, inner_steps, inner_lr=inner_lr, first_order=args.first_order, task_map=args.task_map,
                       unroll=unroll)
    rng = np.random.default_rng(0)
    labels = lambda per: np.tile(np.repeat(np.arange(ways, dtype=np.int32), per), (tasks, 1))
    batch = Episode(rng.random((tasks, ways * shots, size, size, 1), np.float32), labels(shots),
                    rng.random((tasks, ways * queries, size, size, 1), np.float32), labels(queries),
                    np.tile(np.arange(ways, dtype=np.int32), (tasks, 1)))
    optimiser = optax.adam(1e-3)
    params = learner.init(jax.random.PRNGKey(0), first_task(batch))
    opt_state = optimiser.init(params)
    steps = make_train_steps(learner, optimiser)
    batches = jax.tree.map(lambda x: np.stack([x] * per_call), batch)
    keys = jax.random.split(jax.random.PRNGKey(0), per_call)
    compile_s = timed(steps, params, opt_state, batches, keys)
    times, faults = [], page_faults()
    for _ in range(args.steps):
        start = time.perf_counter()
        params, opt_state, losses, _ = steps(params, opt_state, batches, keys)
        jax.block_until_ready((params, losses))
        times.append((time.perf_counter() - start) / per_call)
    faults = (page_faults() - faults) / (args.steps * per_call)
    step_s = statistics.median(times)
    model = MetaClassifier(backbone, ways)
    model_params = params["model"]
    apply = lambda p, x: model.apply({"params": p}, x)
    flops = meta_step_flops(forward_flops(apply, model_params, batch.support_x[0]),
                            forward_flops(apply, model_params, batch.query_x[0]), inner_steps, tasks, kind)
    gemm = gemm_gflops()
    result = {"benchmark": "maml", "config": {
        "method": args.method, "order": kind, "backbone": "conv4", "image": [size, size, 1], "ways": ways,
        "shots": shots, "queries": queries, "inner_steps": inner_steps, "inner_lr": inner_lr, "tasks": tasks,
        "task_map": learner.task_map, "inner_loop": "scan" if args.inner_scan else "unrolled", "steps_per_call": per_call},
        "jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(), "cpu": cpu_name(), "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "compile_s": round(compile_s, 2), "step_s": round(step_s, 6), "step_times_s": [round(t, 6) for t in times],
        "tasks_per_s": round(tasks / step_s, 3), "page_faults_per_step": round(faults), "flops_per_step": flops,
        "gflops_per_s": round(flops / step_s / 1e9, 2), "gemm_gflops_per_s": round(gemm, 2),
        "gemm_fraction": round(flops / step_s / 1e9 / gemm, 3)}
    if args.peer:
        peer = run_peer(args, inner_lr)
        result["peer"] = {**peer, "gflops_per_s": round(flops / peer["step_s"] / 1e9, 2)}
        result["speedup_vs_peer"] = round(peer["step_s"] / step_s, 2)
    return result


BENCHMARKS = {"train": bench_train, "maml": bench_maml}
