"""Where a MAML meta-step's time goes: XLA operations by kind and the slowest ones, with shapes.

    python experiments/profile_maml.py [--first-order | --reptile] [--steps-per-call 10] [--top 30]

Builds the step of ``fsl-jax bench maml`` (Conv4, 28x28x1, 5-way 1-shot, 15 queries per class,
5 inner steps, 4 tasks), traces three calls with ``jax.profiler`` and sums the time of every
XLA operation (``ynn_fusion``: matrix products; ``*_fusion``, ``concatenate``, ``copy``,
``wrapped_broadcast``: memory-bound work), per meta-step. The slowest operations are listed
with their output shape and the JAX operation they came from (the HLO metadata). Writes
experiments/results/profile_maml.md (the defaults, which the README quotes; other settings write
profile_maml_<variant>.md beside it). Times are summed over threads: XLA runs unrolled tasks side
by side, so on a 2-core CPU the total can approach twice the wall time of a step. XLA's cost
analysis of one meta-step (FLOPs, bytes of memory read and written) heads the table.
"""
from __future__ import annotations

import argparse
import collections
import re
import tempfile
from pathlib import Path

import jax
import jax.profiler
import numpy as np
import optax

from common import machine
from fsl_jax.data.episodes import Episode
from fsl_jax.learner import first_task
from fsl_jax.meta import maml, reptile
from fsl_jax.nets import Conv4
from fsl_jax.train import make_train_steps

HERE = Path(__file__).resolve().parent
CALLS = 3


def hlo_origins(hlo: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (output shape, JAX operation) from optimised HLO text."""
    origins = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+|\([^)]*\)) [\w\-]+\(", line)
        if m:
            op = re.search(r'op_name="([^"]+)"', line)
            origins[m.group(1)] = (m.group(2).split("{")[0], op.group(1) if op else "")
    return origins


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--reptile", action="store_true")
    parser.add_argument("--steps-per-call", type=int, default=10)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    ways, tasks, k = 5, 4, args.steps_per_call
    learner = (reptile(Conv4(), 5, inner_lr=0.4) if args.reptile
               else maml(Conv4(), 5, inner_lr=0.4, first_order=args.first_order))
    rng = np.random.default_rng(0)
    labels = lambda per: np.tile(np.repeat(np.arange(ways, dtype=np.int32), per), (tasks, 1))
    batch = Episode(rng.random((tasks, ways, 28, 28, 1), np.float32), labels(1),
                    rng.random((tasks, ways * 15, 28, 28, 1), np.float32), labels(15),
                    np.tile(np.arange(ways, dtype=np.int32), (tasks, 1)))
    optimiser = optax.adam(1e-3)
    params = learner.init(jax.random.PRNGKey(0), first_task(batch))
    opt_state = optimiser.init(params)
    batches = jax.tree.map(lambda x: np.stack([x] * k), batch)
    keys = jax.random.split(jax.random.PRNGKey(0), k)
    steps = make_train_steps(learner, optimiser)
    origins = hlo_origins(steps.lower(params, opt_state, batches, keys).compile().as_text())
    # XLA's cost analysis counts a loop's body once: ask it about a single meta-step
    one = jax.tree.map(lambda x: x[:1], (batches, keys))
    cost = steps.lower(params, opt_state, *one).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # one entry per device in older jax
    jax.block_until_ready(steps(params, opt_state, batches, keys))
    with tempfile.TemporaryDirectory() as trace:
        with jax.profiler.trace(trace):
            for _ in range(CALLS):
                jax.block_until_ready(steps(params, opt_state, batches, keys))
        profile = jax.profiler.ProfileData.from_file(str(next(Path(trace).rglob("*.xplane.pb"))))
    per_op = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLAEigen"):  # XLA's worker threads; the rest is bookkeeping
                for event in line.events:
                    if event.name in origins:
                        per_op[event.name] += event.duration_ns / 1e6 / (CALLS * k)
    by_kind = collections.Counter()
    for name, ms in per_op.items():
        by_kind[re.sub(r"[.\d]+$", "", name)] += ms
    kind = "Reptile" if args.reptile else "first-order MAML" if args.first_order else "second-order MAML"
    lines = [f"{kind}, `fsl-jax bench maml` config, {k} meta-steps per call, on {machine()}; ms per meta-step "
             f"(summed over threads; total {sum(per_op.values()):.0f} ms). XLA's cost analysis of one "
             f"meta-step: {cost['flops'] / 1e9:.1f} GFLOP, {cost['bytes accessed'] / 1e9:.2f} GB of memory "
             "read and written.", "",
             "| operation kind | ms |", "|---|---|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in by_kind.most_common(15)]
    lines += ["", "| operation | ms | output | from |", "|---|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {origins[name][0]} | `{origins[name][1][-90:]}` |"
              for name, ms in per_op.most_common(args.top)]
    text = "\n".join(lines) + "\n"
    # the README quotes the second-order profile at the defaults; other variants are written beside it
    variant = ("_reptile" if args.reptile else "_first_order" if args.first_order else "") + \
        (f"_{args.steps_per_call}_per_call" if args.steps_per_call != 10 else "")
    (HERE / "results" / f"profile_maml{variant}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
