"""Task batches over many devices, and the default way to map over tasks on one.

Data parallelism over tasks: a 1-D mesh named ``"tasks"``, the batch's leading (task) axis
sharded over it, parameters replicated. Each device maps the learner over its own tasks
(``vmap`` or ``lax.map``, the learner's ``task_map``) and the per-device means are averaged
(``pmean``), so with equal shards the loss is the mean over the whole batch and ``jax.grad``
of it, taken outside, is the mean meta-gradient (JAX's ``shard_map`` transposes the
replicated parameters into a cross-device sum).

Several hosts: call ``jax.distributed.initialize()`` at the start of the program on every
host (it reads the coordinator address, process count and id from the cluster environment
or its arguments: SLURM, Open MPI, Kubernetes, Cloud TPU); ``jax.devices()`` then lists
every device of every host, :func:`task_mesh` spans them all, and each host passes its own
tasks to :func:`shard_tasks`, which assembles the global batch with
``jax.make_array_from_process_local_data``. The hosts must draw different tasks: ``fsl-jax
train --distributed`` has host i of H draw the sampler's batch ``step * H + i``.

Evaluation (:func:`map_batches`) spreads whole batches instead: each device computes its own
batch on its own copy of the parameters, and the hosts exchange the results.
"""
from __future__ import annotations

import collections
import functools
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from fsl_jax.errors import ConfigError
from fsl_jax.learner import Learner

AXIS = "tasks"

# Measured with the default `fsl-jax bench maml` config (second-order Conv4 MAML) on a 2-core
# CPU (experiments/bench_maml.py, README: speed): "unroll" (each task traced on its own, the
# tasks run side by side on XLA's CPU threads) takes less time per meta-step than vmap, so CPU
# unrolls, for a compilation up to twice as long (tens of seconds, once per run); lax.map runs
# the tasks one after another (`fsl-jax bench maml --task-map map` times it). Accelerators: vmap,
# which keeps the device busy where lax.map would run the tasks one at a time and unrolling would
# launch many small kernels.
DEFAULT_TASK_MAP = {"cpu": "unroll"}


def default_task_map(backend: str | None = None) -> str:
    """The default way to map over tasks on ``backend`` (default: JAX's); see ``DEFAULT_TASK_MAP``."""
    return DEFAULT_TASK_MAP.get(backend or jax.default_backend(), "vmap")


def task_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"tasks"`` over ``devices`` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def shard_tasks(batch, mesh: Mesh, axis: int = 0):
    """Place a batch (any pytree whose ``axis`` is the task axis: 0, or 1 for a stack of
    batches) sharded over the mesh's tasks.

    On one host ``batch`` is the whole batch; on several, each host's own part of it.
    The number of tasks must be a multiple of the number of devices.
    """
    devices = mesh.devices.size
    tasks = jax.tree.leaves(batch)[0].shape[axis] * jax.process_count()
    if tasks % devices:
        raise ConfigError(f"tasks per batch ({tasks}) must be a multiple of the number of devices ({devices})")
    sharding = NamedSharding(mesh, P(*[None] * axis, AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree, mesh: Mesh):
    """Place a pytree (parameters, optimiser state) replicated on every device of the mesh. On
    several hosts each passes its own copy of the same values (read back to the host: arrays on
    one host's devices cannot be sent to another's)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def sharded_loss(loss: Callable, mesh: Mesh) -> Callable:
    """``loss(params, batch, rng) -> (mean loss, metrics)`` (e.g. ``Learner.loss``) computed
    with the tasks split over the mesh: same signature and, for learners that do not draw
    random numbers, the same values and gradients as ``loss`` on one device. Random keys
    differ: each device folds its index into ``rng``. Refuses a learner's ``loss`` whose
    ``batch_loss`` couples the tasks (a contrastive term would see only each device's tasks).
    """
    owner = getattr(loss, "__self__", None)
    if isinstance(owner, Learner) and owner.batch_loss is not None:
        raise ConfigError("this learner's loss couples the tasks of a batch (a contrastive term): its tasks cannot "
                          "be split over devices")

    def local(params, batch, rng):
        # Mark the replicated parameters device-varying: otherwise a gradient taken *inside*
        # the loss (MAML's inner loop) would be summed over devices, i.e. over other tasks.
        params = jax.lax.pcast(params, AXIS, to="varying")
        rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
        return jax.lax.pmean(loss(params, batch, rng), AXIS)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=P())


BATCHES = "batches"  # the mesh axis of evaluation's batches (one per local device)


def stack_batches(batches):
    """Batches (pytrees of equal shapes) stacked along a new leading axis, as numpy arrays."""
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


@functools.lru_cache(maxsize=None)
def _on_local_devices(fn: Callable, devices: tuple) -> tuple[Callable, Mesh]:
    """``fn`` run by each of ``devices`` on its own batch of a stack of them: one program (one
    compilation) for all of them, where jitting ``fn`` on each device would compile it per device."""
    mesh = Mesh(np.asarray(devices), (BATCHES,))

    def one(params, batch, rng):
        params = jax.lax.pcast(params, BATCHES, to="varying")  # as in sharded_loss: gradients inside fn stay per device
        out = fn(params, jax.tree.map(lambda x: x[0], batch), rng[0])
        return jax.tree.map(lambda y: y[None], out)

    specs = (P(), P(BATCHES), P(BATCHES))
    return jax.jit(jax.shard_map(one, mesh=mesh, in_specs=specs, out_specs=P(BATCHES))), mesh


def map_batches(fn: Callable, params, sampler, batches: int, progress: bool = False) -> list:
    """``[fn(params, sampler.sample(i), jax.random.PRNGKey(i)) for i in range(batches)]``, each
    result a pytree of numpy arrays, the same list on every host: evaluation over all devices.

    Batch i is drawn by host ``i % H`` of H; each host's local devices compute its batches side by
    side, one each, on their own copy of ``params`` (parameters replicated on a training mesh
    would have every device compute every batch). The hosts then exchange their results
    (``multihost_utils.process_allgather``), so every host must call this at the same point.
    ``fn`` must be hashable and the same object from call to call (its program is kept).
    progress: a bar of this host's episodes.
    """
    host, hosts = jax.process_index(), jax.process_count()
    owned = [list(range(h, batches, hosts)) for h in range(hosts)]
    mine = owned[host] or [0]  # a host without a batch computes batch 0 so that it has shapes to exchange
    run, mesh = _on_local_devices(fn, tuple(jax.local_devices()[:len(mine)]))
    width = mesh.devices.size
    local = jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, params)
    local, stacked = jax.device_put(local, NamedSharding(mesh, P())), NamedSharding(mesh, P(BATCHES))
    results, pending = [], collections.deque()
    with tqdm(total=len(mine) * sampler.tasks, desc="eval", disable=not progress, leave=False) as bar:
        def collect():
            count, out = pending.popleft()
            out = jax.tree.map(np.asarray, out)
            results.extend(jax.tree.map(lambda x: x[j], out) for j in range(count))
            bar.update(count * sampler.tasks)

        for start in range(0, len(mine), width):
            indices = mine[start:start + width]
            drawn = [sampler.sample(i) for i in indices]
            drawn += drawn[-1:] * (width - len(drawn))  # the last group's idle devices repeat a batch, dropped
            keys = [jax.random.PRNGKey(i) for i in indices]
            keys += keys[-1:] * (width - len(keys))
            pending.append((len(indices), run(local, jax.device_put(stack_batches(drawn), stacked),
                                              jax.device_put(np.stack(keys), stacked))))
            if len(pending) > 1:  # dispatch is asynchronous: the next group is drawn while this one runs
                collect()
        while pending:
            collect()
    if hosts == 1:
        return results
    longest = max(len(o) for o in owned)
    padded = results + [results[-1]] * (longest - len(results))
    gathered = multihost_utils.process_allgather(stack_batches(padded))  # [host, k, ...]
    where = {index: (h, k) for h, indices in enumerate(owned) for k, index in enumerate(indices)}
    return [jax.tree.map(lambda x: x[where[i]], gathered) for i in range(batches)]
