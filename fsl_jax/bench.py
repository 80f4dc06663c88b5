"""``fsl-jax bench``: throughput measurements, each printed as one JSON line."""
from __future__ import annotations

import statistics
import time

import jax


def add_arguments(parser) -> None:
    parser.add_argument("what", choices=sorted(BENCHMARKS))
    parser.add_argument("--config", help="train: the config whose training step is timed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after compilation")


def bench_train(args) -> dict:
    """Sampler episodes/s next to training-step episodes/s for a config: is sampling the bottleneck?"""
    from fsl_jax.config import load_config
    from fsl_jax.train import Experiment, make_train_step

    overrides = list(args.set) + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
    config = load_config(args.config, overrides)
    experiment = Experiment(config)
    params = experiment.init_params()
    opt_state = experiment.optimiser.init(params)
    step = make_train_step(experiment.learner, experiment.optimiser)
    sampler = experiment.train_sampler
    key = jax.random.PRNGKey(0)
    start = time.perf_counter()
    params, opt_state, loss, _ = step(params, opt_state, sampler.sample(0), key)
    loss.block_until_ready()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(1, args.steps + 1):
        batch = sampler.sample(i)
        start = time.perf_counter()
        params, opt_state, loss, _ = step(params, opt_state, batch, key)
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"benchmark": "train", "config": config["name"], "method": config["method"],
            "episode": config["episode"], "backend": jax.default_backend(),
            "compile_s": round(compile_s, 3), "step_s": round(step_s, 5),
            "train_episodes_per_s": round(sampler.tasks / step_s, 2),
            "sampler_episodes_per_s": round(sampler.throughput(), 1)}


BENCHMARKS = {"train": bench_train}
