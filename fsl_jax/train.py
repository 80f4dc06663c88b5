"""One training loop for every learner and kind of task: jitted optax step, orbax checkpoints, metrics as JSON lines.

A run directory holds ``config.yaml``, ``checkpoints/`` (orbax; written atomically, so a
killed run never leaves a broken one), ``metrics.jsonl`` (one record per log or evaluation;
a training record's ``elapsed_s`` is the run's training time so far, over all its resumptions)
and ``curves.png`` (each rewritten beside and moved into place, never truncated), and
``.lock``, which one training process at a time holds. Episodes and step keys depend only on
``(seed, step)``, so a run killed and resumed reaches exactly the metrics of an uninterrupted
one. Each checkpoint records the SHA-256 of its state and the config keys that trained it, so a
restore finds values altered since (finite or not) and a checkpoint copied in from another run.
What differs between classification and segmentation (samplers, evaluation, the held-out score)
comes from the config's task (:mod:`fsl_jax.tasks`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax._src import distributed  # the coordination client and preemption sync manager that
# jax.distributed.initialize made: jax has no public handle to them
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from fsl_jax.config import check, complete, dump_config, run_config
from fsl_jax.errors import ConfigError, DataError, Preempted, TrainingDiverged
from fsl_jax.learner import Learner, first_task
from fsl_jax.meta.parallel import replicate, shard_tasks, sharded_loss, stack_batches, task_mesh
from fsl_jax.methods import SEGMENTERS, make_learner
from fsl_jax.outputs import write_replacing
from fsl_jax.tasks import load_task


def make_optimiser(optim: dict, steps: int) -> optax.GradientTransformation:
    """The optax optimiser and learning-rate schedule an ``optim`` config block describes."""
    lr, schedule = optim["lr"], optim["schedule"]
    if schedule == "constant":
        rate = optax.constant_schedule(lr)
    elif schedule == "cosine":
        rate = optax.warmup_cosine_decay_schedule(0.0, lr, optim["warmup_steps"], max(steps, optim["warmup_steps"] + 1))
    elif schedule == "step":
        rate = optax.exponential_decay(lr, optim["decay_every"], 0.5, staircase=True)
    else:
        raise ConfigError(f"unknown optim.schedule {schedule!r}; available: ['constant', 'cosine', 'step']")
    if schedule != "cosine" and optim["warmup_steps"]:
        rate = optax.join_schedules([optax.linear_schedule(0.0, lr, optim["warmup_steps"]), rate], [optim["warmup_steps"]])
    factory = getattr(optax, optim["name"], None)
    if not callable(factory):
        raise ConfigError(f"unknown optim.name {optim['name']!r}: not an optax optimiser")
    optimiser = factory(rate)
    if optim["clip_norm"]:
        optimiser = optax.chain(optax.clip_by_global_norm(optim["clip_norm"]), optimiser)
    return optimiser


class Experiment:
    """What a config builds: its task (samplers, evaluation), learner, optimiser, initial parameters."""

    def __init__(self, config: dict):
        self.config = config
        self.task = load_task(config)
        if (config["method"] in SEGMENTERS) != (self.task.score == "iou"):
            kind = "a segmenter" if config["method"] in SEGMENTERS else "a classifier"
            raise ConfigError(f"method {config['method']!r} is {kind}; data.name {config['data']['name']!r} gives "
                              f"{'segmentation' if self.task.score == 'iou' else 'classification'} tasks")
        self.train_sampler = self.task.train_sampler
        self.learner: Learner = make_learner(config, num_train_classes=self.task.num_train_classes)
        if self.learner.batch_loss is not None and self.train_sampler.tasks < 2:
            raise ConfigError(f"method {config['method']!r} with {config['method_options']} compares the tasks of a "
                              f"batch (a contrastive term): episode.tasks must be at least 2, got {self.train_sampler.tasks}")
        self.optimiser = make_optimiser(config["optim"], config["train"]["steps"])

    def eval_sampler(self, episodes_per_batch: int = 10, **overrides):
        """A sampler of held-out episodes; overrides (``ways``, ``shots``, ...; None: as configured)."""
        return self.task.eval_sampler(episodes_per_batch, **overrides)

    def evaluate(self, params, sampler, episodes: int, progress: bool = True) -> dict:
        """The task's scores of ``params`` over ``episodes`` episodes of ``sampler``."""
        return self.task.evaluate(self.learner, params, sampler, episodes, progress)

    def init_params(self):
        key = jax.random.PRNGKey(self.config["train"]["seed"])
        return self.learner.init(key, first_task(self.train_sampler.sample(0)))


def make_train_step(learner: Learner, optimiser: optax.GradientTransformation, mesh=None):
    """``step(params, opt_state, batch, rng) -> (params, opt_state, loss, metrics)``, jitted.

    mesh: a task mesh (:func:`fsl_jax.meta.task_mesh`): each batch's tasks are split over its
    devices (place batches with :func:`fsl_jax.meta.shard_tasks`), parameters replicated. Not for
    a ``batch_loss`` that couples the tasks (:func:`fsl_jax.meta.sharded_loss` refuses it).
    """
    loss_fn = learner.loss if mesh is None else sharded_loss(learner.loss, mesh)

    @jax.jit
    def step(params, opt_state, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    return step


def make_train_steps(learner: Learner, optimiser: optax.GradientTransformation, mesh=None):
    """Several training steps in one XLA execution: ``steps(params, opt_state, batches, rngs)
    -> (params, opt_state, losses, metrics)``, jitted; ``batches`` and ``rngs`` have a leading
    axis of steps, and so do ``losses`` and each metric.

    The steps run in a ``lax.scan`` of :func:`make_train_step`'s step (a single step is that
    step, bit for bit). One execution allocates its working memory once for all its steps: on
    CPU a fresh allocation is paid in page faults on first touch, about a quarter of a MAML
    meta-step's time when each step is its own execution (``fsl-jax bench maml
    --steps-per-call``). But inside XLA:CPU's loop (jaxlib 0.10) ``lax.conv_general_dilated``
    (``nn.Conv``, ``nn.ConvTranspose``: the U-Nets) runs without its YNNPACK path, over ten times
    slower for the Siamese-U-Net, so those models want one step per call; models on
    :class:`fsl_jax.nets.layers.Conv` (Conv4 on CPU) do not use it.

    Divergence: from the first step whose loss is not finite on, the state is left unchanged, so
    a call returns the state after the last good step; if the call's first loss is not finite,
    the last good state is the one passed in. Losses are reported either way.
    """
    step = make_train_step(learner, optimiser, mesh)

    def body(carry, inputs):
        params, opt_state, healthy = carry
        new_params, new_opt_state, loss, metrics = step(params, opt_state, *inputs)
        healthy = healthy & jnp.isfinite(loss)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(healthy, n, o), new, old)
        return (keep(new_params, params), keep(new_opt_state, opt_state), healthy), (loss, metrics)

    @jax.jit
    def steps(params, opt_state, batches, rngs):
        if len(rngs) == 1:
            params, opt_state, loss, metrics = step(params, opt_state, *jax.tree.map(lambda x: x[0], (batches, rngs)))
            return params, opt_state, loss[None], jax.tree.map(lambda m: m[None], metrics)
        (params, opt_state, _), (losses, metrics) = jax.lax.scan(body, (params, opt_state, jnp.array(True)),
                                                                 (batches, rngs))
        return params, opt_state, losses, metrics

    return steps


def _non_finite(tree) -> list[str]:
    """The paths of a pytree's leaves that hold a NaN or an infinity: no checkpoint is written with any."""
    return [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if not np.isfinite(np.asarray(leaf)).all()]


def check_schedule(config: dict) -> None:
    """Every value of ``config`` (``fsl_jax.config.check``), and logs that fit the checkpoints."""
    check(config)
    if config["train"]["checkpoint_every"] % config["train"]["log_every"]:
        raise ConfigError("train.checkpoint_every must be a multiple of train.log_every, so that a resumed "
                          "run logs the same windows as an uninterrupted one")


def _config_differences(saved: dict, config: dict, path: str = "", source: str = "the run") -> list[str]:
    """``"key: <saved> in <source>, <now> now"`` for each dotted key where two full configs differ."""
    out = []
    for key in sorted(saved.keys() | config.keys()):
        a, b = saved.get(key), config.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{path}{key}.", source)
        elif a != b:
            out.append(f"{path}{key}: {a!r} in {source}, {b!r} now")
    return out


def _trained_by(config: dict) -> dict:
    """The keys of a config that determine the state it trains, which each checkpoint records. Not where the
    run and its data lie (out, data.dir), its name, its evaluation, nor how often it logs and checkpoints or
    how many steps one XLA call runs (float rounding at most): a moved run resumes, and eval and export,
    which build their config from the run's, restore it whatever their flags."""
    return {**{key: config[key] for key in ("method", "method_options", "backbone", "backbone_options", "episode",
                                            "optim")},
            "data": {key: value for key, value in config["data"].items() if key != "dir"},
            "train": {key: config["train"][key] for key in ("seed", "steps")}}


def _digest(state) -> str:
    """The SHA-256 of a state's leaves in tree order, each its dtype, shape and bytes, read on the host."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        array = np.asarray(leaf)
        digest.update(f"{array.dtype.name}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _checkpoint_manager(run_dir: Path, config: dict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config["train"]["keep_checkpoints"], create=True)
    return ocp.CheckpointManager(run_dir.resolve() / "checkpoints", options=options)


def restore_params(run_dir: Path, experiment: Experiment, step: int | None = None):
    """Parameters of a run's latest (or given) checkpoint."""
    def initial_state():
        params = experiment.init_params()
        return {"params": params, "opt_state": experiment.optimiser.init(params)}

    checkpoints = Path(run_dir) / "checkpoints"
    missing = DataError(f"run {run_dir} has no checkpoint in {checkpoints}: train it first (fsl-jax train)")
    if not checkpoints.is_dir():  # looked for, not created
        raise missing
    with _checkpoint_manager(run_dir, experiment.config) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise missing
        abstract = jax.eval_shape(initial_state)  # the structure only: no initialisation is run
        params = _restore(manager, step, abstract, run_dir, experiment.config)["params"]
    return params, step


def _cause(error: BaseException) -> str:
    """The root of an orbax error (TensorStore's, which orbax may wrap), without TensorStore's spec (a line of JSON)."""
    return re.sub(r" \[tensorstore_spec='.*?'\]", "", str(error.__cause__ or error))


def _fallback(manager: ocp.CheckpointManager, step: int, run_dir: Path) -> str:
    """What to delete to get past the damaged checkpoint of ``step``: back to the one before it, if one is kept."""
    path = run_dir / "checkpoints" / str(step)
    older = [s for s in manager.all_steps() if s < step]
    return (f"delete {path} to fall back to the checkpoint of step {max(older)}" if older
            else f"no older checkpoint is kept (delete {path} to start the run afresh)")


def _restore(manager: ocp.CheckpointManager, step: int, abstract, run_dir: Path, config: dict):
    """A checkpoint restored into ``abstract``'s structure (its leaves' shapes and dtypes), or an error
    naming the parameters that differ, the config keys another run's checkpoint was trained with, or
    what is damaged and what to delete to fall back to the checkpoint before it. A checkpoint written
    without a record (before they were kept) is checked for values that are not finite only.

    The state is read onto this host's first device, whatever devices wrote it: a run trained on
    several devices or hosts is evaluated, exported or resumed on any number."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), abstract)
    try:
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        recorded = manager.metadata(step).custom_metadata
    except Exception as error:  # orbax raises TensorStore's read errors wrapped in a bare Exception
        paths = lambda tree: {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
        try:
            saved = paths(manager.item_metadata(step)["params"])
        except Exception:
            saved = None
        expected = paths(abstract["params"])
        if saved is None or saved == expected:
            raise DataError(f"the checkpoint of step {step} in {run_dir / 'checkpoints'} cannot be restored into the "
                            f"model this config builds ({_cause(error)}): damaged or incomplete, or the config was "
                            f"edited since training; {_fallback(manager, step, run_dir)}") from error
        raise ConfigError(f"the checkpoint of step {step} in {run_dir} does not fit the model this config builds; "
                          f"parameters only in the checkpoint: {', '.join(sorted(saved - expected)) or 'none'}; "
                          f"only in the model: {', '.join(sorted(expected - saved)) or 'none'}") from error
    if "trained_by" in recorded:  # completed as config.yaml is: keys added to the defaults since take theirs
        differences = _config_differences(_trained_by(complete(recorded["trained_by"])), _trained_by(config),
                                          source="the checkpoint")
        if differences:
            raise DataError(f"the checkpoint of step {step} in {run_dir / 'checkpoints'} was written by another "
                            f"run's config ({'; '.join(differences)}): move {run_dir / 'checkpoints' / str(step)} "
                            "out of this run, or choose another `out`")
    broken = _non_finite(state)
    if broken:  # a checkpoint is written only when finite: its bytes were damaged since
        raise DataError(f"the checkpoint of step {step} in {run_dir / 'checkpoints'} is damaged: it holds values that "
                        f"are not finite (in {', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}); "
                        f"{_fallback(manager, step, run_dir)}")
    if "state_sha256" in recorded and _digest(state) != recorded["state_sha256"]:
        raise DataError(f"the checkpoint of step {step} in {run_dir / 'checkpoints'} is damaged: its values are not "
                        f"those written (their SHA-256 is not the one recorded); {_fallback(manager, step, run_dir)}")
    return state


def _wait(manager: ocp.CheckpointManager, run_dir: Path) -> None:
    """Wait for the checkpoint being written in the background, if one is; a write that failed (a full disk,
    say) is a DataError naming its step. The checkpoints before it are kept: the run resumes from them."""
    step = manager.latest_step()  # the one being written, if one is
    try:
        manager.wait_until_finished()
    except Exception as error:
        raise _unwritten(step, run_dir, error) from error


def _save(manager: ocp.CheckpointManager, step: int, state, run_dir: Path, config: dict) -> None:
    """Start writing the checkpoint of ``step`` once the one before it is written, so that a failed
    write is reported with its own step; it records the state's digest and the config keys that trained it."""
    _wait(manager, run_dir)
    try:
        manager.save(step, args=ocp.args.StandardSave(state),
                     custom_metadata={"state_sha256": _digest(state), "trained_by": _trained_by(config)})
    except Exception as error:
        raise _unwritten(step, run_dir, error) from error


def _unwritten(step: int, run_dir: Path, error: Exception) -> DataError:
    """The error for a checkpoint that could not be written: its step, the cause, and that nothing is lost."""
    return DataError(f"could not write the checkpoint of step {step} to {run_dir / 'checkpoints'} ({_cause(error)}); "
                     "once that is fixed, the same command resumes the run from its last checkpoint")


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``, in order.

    A last line that is not a record is an append that a kill cut short: it is left out (resuming
    rewrites the file without it). Any other line that is not a record is a DataError naming it.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_bytes().splitlines(), 1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and {"step", "split"} <= record.keys():
            records.append(record)
        elif index < len(lines) - 1:
            raise DataError(f"line {number} of {path} is not a metrics record ({line[:40]!r}): repair or remove it")
    return records


def plot_curves(run_dir: Path, score: str = "accuracy") -> Path:
    """``curves.png``: training loss and ``score`` (accuracy, IoU), and held-out ``score``, against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    held_out = [r for r in records if r["split"] == "test"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log")
    ax_acc.plot([r["step"] for r in train], [r[score] for r in train], label="training episodes")
    if held_out:
        ax_acc.errorbar([r["step"] for r in held_out], [r[score] for r in held_out],
                        yerr=[r["ci95"] for r in held_out], marker="o", label="held-out classes")
    ax_acc.set(xlabel="step", ylabel=score)
    ax_acc.legend()
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    write_replacing(out, lambda partial: fig.savefig(partial, dpi=100, format="png"))
    plt.close(fig)
    return out


def _on_each_host(flag: bool, hosts: int) -> list[bool]:
    """Every host's ``flag``, in host order: how the hosts agree on what each found (a collective
    that every host must call at the same point)."""
    return multihost_utils.process_allgather(np.array([flag]))[:, 0].tolist() if hosts > 1 else [flag]


@contextlib.contextmanager
def _exclusive(run_dir: Path, host: int, hosts: int):
    """Hold ``run_dir/.lock`` for the block: two processes training into one run directory would mix
    their metrics and checkpoints. The lock goes with its process, so a killed run leaves none
    behind; reading a run (``fsl-jax eval``) takes none. Each host of a run takes its own
    (``.lock`` on the first, ``.lock.host<i>`` on host i), so two runs cannot share one directory;
    where one host is refused, every host stops with an error (the others would wait for it)."""
    with open(run_dir / (f".lock.host{host}" if host else ".lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            refused = None
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            refused = DataError(f"another process{f' (pid {holder})' if holder else ''} is training into {run_dir}: "
                                "wait for it to end, or choose another `out`")
        taken = _on_each_host(refused is None, hosts)
        if refused is not None:
            raise refused
        if not all(taken):
            others = ", ".join(str(h) for h, ok in enumerate(taken) if not ok)
            raise DataError(f"host {others} could not take its lock on {run_dir}: another process is training into "
                            "it (that host's error names it)")
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def _every_host(error: BaseException) -> BaseException:
    """``error`` marked as one that every host raises by itself at the same point (from values or
    files they all share), so that :func:`_stop_together` ends no other host with it: a host not yet
    at that point would be ended by the word of a faster one, and a program that catches the error
    and trains again (a sweep that lowers the learning rate after a divergence, say) would lose it."""
    error.on_every_host = True
    return error


def _raise_where_found(error: Exception | None, hosts: int) -> None:
    """Raise ``error``, what this host found wrong in a check that every host makes of the same files
    (``None``: nothing). The hosts first agree on whether each found one: where all did, each stops
    with its own (:func:`_every_host`); where only some did, those stop the rest, as any error does."""
    found = _on_each_host(error is not None, hosts)
    if error is not None:
        raise _every_host(error) if all(found) else error


_TRAIN_CALLS = itertools.count()  # each train() of a process: all hosts make the same calls in the same order


@contextlib.contextmanager
def _stop_together(host: int, hosts: int):
    """On several hosts, a host whose training stops early (an error, Ctrl-C) makes every host stop
    at once, each saying which host stopped and why; the others used to wait in their next
    collective for minutes, until jax's heartbeat timeout aborted them with a stack trace.

    The stopping host first finishes as one host would (the others are still there for a checkpoint
    being written), then sets a key in jax's coordination service. A watcher thread on each other
    host waits for that key, then writes the reason and ends its process (``os._exit``: its main
    thread is blocked in a collective it cannot leave); host 0, which runs the service, ends last.
    A checkpoint the others were writing is left unfinished, and orbax ignores it: the run resumes
    from the one before. A host killed outright says nothing: jax's heartbeat check ends the others
    (at once where it was host 0, which runs the service; after its heartbeat timeout otherwise).
    An error that every host raises by itself (:func:`_every_host`) sets no key: each host stops
    with its own, host 0 still last.
    """
    if hosts == 1:
        yield
        return
    client, stopping, finished = distributed.global_state.client, threading.Event(), threading.Event()
    stopped = f"fsl_jax/train/{next(_TRAIN_CALLS)}/stopped"  # the key a host sets when its training stops early

    def watch() -> None:
        while not finished.is_set():
            try:
                stopper, why = client.blocking_key_value_get(stopped, 1000).split("\n", 1)
            except Exception as error:  # a second without word, or the service has ended (with host 0)
                if "DEADLINE_EXCEEDED" in str(error):
                    continue
                return
            with contextlib.suppress(Exception):  # the service may be ending
                client.key_value_set(f"{stopped}/seen/{host}", "")
            if stopping.is_set():  # this host is stopping too, and says why itself
                return
            sys.stderr.write(f"fsl-jax: error: {why}; host {host} stops too: the run resumes from its last "
                             "checkpoint with the same command\n")
            sys.stderr.flush()
            if host == 0 and stopper != "0":
                time.sleep(2.0)  # the stopper's last words: the service ends with this process
            os._exit(1)

    watcher = threading.Thread(target=watch, name="fsl_jax-stop-together", daemon=True)
    watcher.start()
    try:
        yield
    except BaseException as error:
        stopping.set()
        if not getattr(error, "on_every_host", False):
            why = "was interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt) else f"stopped ({error})"
            with contextlib.suppress(Exception):  # another host stopped first and has said so
                client.key_value_set(stopped, f"{host}\nhost {host} {why}")
        elif host:  # each host stops with its own error (_every_host); host 0 waits for this word below
            with contextlib.suppress(Exception):
                client.key_value_set(f"{stopped}/seen/{host}", "")
        for other in range(1, hosts) if host == 0 else ():  # host 0's end takes the service with it
            try:
                client.blocking_key_value_get(f"{stopped}/seen/{other}", 10_000)
            except Exception:
                break
        raise
    finally:  # a thread still waiting in the service when the process exits would abort it
        finished.set()
        watcher.join()


@contextlib.contextmanager
def _preemption(hosts: int):
    """``noticed(step) -> bool`` for the block: whether training, having done ``step``, should write
    a checkpoint and stop because the job had notice of preemption (SIGTERM, which cluster
    schedulers send before they evict a job, and which would otherwise lose the steps since the
    last checkpoint). On several hosts it is jax's preemption sync point, the step all hosts agree
    on after any of them had notice; it must be asked of every step, in order. On one host, a
    SIGTERM handler for the block (in the main thread, the one signals reach)."""
    if hosts > 1:
        sync = distributed.global_state.preemption_sync_manager  # None where jax_enable_preemption_service is off
        yield sync.reached_sync_point if sync is not None else (lambda step: False)
        return
    if threading.current_thread() is not threading.main_thread():
        yield lambda step: False
        return
    notice = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: notice.set())
    try:
        yield lambda step: notice.is_set()
    finally:
        signal.signal(signal.SIGTERM, previous)


def split_over_devices(tasks_per_host: int, learner: Learner) -> bool:
    """Whether training splits each batch's tasks over all devices (a 1-D task mesh).

    It does where there are several devices, the batch's tasks (all hosts' together) divide among
    them, and the loss does not couple the tasks. Otherwise one host trains on one device, with a
    warning saying why; several hosts cannot (each would train its own parameters apart from the
    others'), so there it is a ConfigError.
    """
    devices, hosts = jax.device_count(), jax.process_count()
    tasks = tasks_per_host * hosts
    if devices == 1:
        return False
    if learner.batch_loss is not None:
        reason = "its loss couples a batch's tasks (a contrastive term), so they cannot be split over devices"
    elif tasks % devices:
        reason = f"its {tasks} tasks per batch are not a multiple of the {devices} devices"
    else:
        return True
    if hosts > 1:
        raise ConfigError(f"cannot train on {hosts} hosts: {reason}")
    warnings.warn(f"training on one of the {devices} devices: {reason}", stacklevel=3)
    return False


def train(config: dict, progress: bool = True, stop_after: int | None = None) -> Path:
    """Train (or resume) the run a config describes; returns the run directory.

    One process at a time trains into a run directory: a second is refused (a DataError).
    stop_after: return after this many steps of this call, as if killed (for tests of resumption).

    Several hosts (``jax.distributed.initialize()`` called first) run the same config into one run
    directory on a filesystem they all see, as orbax's checkpoints need: each host draws its own
    ``episode.tasks`` tasks per step (host i of H draws the sampler's batch ``step * H + i``) and
    writes its part of the checkpoints; the first host alone writes the config, metrics and
    pictures.
    """
    # Everything a config can get wrong is found before the run directory is written: a corrected
    # config must not find it claimed by the one that failed.
    check_schedule(config)
    per_call = config["train"]["steps_per_call"]
    experiment = Experiment(config)
    steps, log_every = config["train"]["steps"], config["train"]["log_every"]
    eval_sampler = experiment.eval_sampler()
    params = experiment.init_params()
    opt_state = experiment.optimiser.init(params)
    try:  # an optax optimiser that wants more than gradients (L-BFGS's value_fn, say) fails here, not in step 1
        jax.eval_shape(experiment.optimiser.update, params, opt_state, params)
    except TypeError as err:
        raise ConfigError(f"optim.name {config['optim']['name']!r} is not an optimiser of gradients alone: {err}") from err
    split = split_over_devices(experiment.train_sampler.tasks, experiment.learner)
    host, hosts = jax.process_index(), jax.process_count()
    primary = host == 0  # the host that writes the run's config, metrics and pictures
    run_dir = Path(config["out"])
    run_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(run_dir, host, hosts), _stop_together(host, hosts), _preemption(hosts) as preempted, \
            _checkpoint_manager(run_dir, config) as manager:
        start = manager.latest_step() or 0
        records = read_metrics(run_dir)
        saved = run_dir / "config.yaml"
        differences = []
        if (start or records) and saved.exists():  # a run that holds nothing yet is started afresh
            # where the run and its data lie (out, data.dir) may change: a moved run resumes
            differences = [d for d in _config_differences(run_config(run_dir), config)
                           if not d.startswith(("out:", "data.dir:"))]
        _raise_where_found(ConfigError(f"run directory {run_dir} holds a run of a different config "
                                       f"({'; '.join(differences)}); choose another `out`") if differences else None,
                           hosts)
        if primary:
            write_replacing(saved, lambda partial: partial.write_text(dump_config(config)))
        if start:
            restored = _restore(manager, start, {"params": params, "opt_state": opt_state}, run_dir, config)
            params, opt_state = restored["params"], restored["opt_state"]
        # Records after the checkpoint were written by a run that died later; they will be rewritten.
        metrics_path = run_dir / "metrics.jsonl"
        kept = [r for r in records if r["step"] <= start]
        if primary:
            lines = "".join(json.dumps(r) + "\n" for r in kept)
            write_replacing(metrics_path, lambda partial: partial.write_text(lines))
        earlier, resumed_at = max([r["elapsed_s"] for r in kept if "elapsed_s" in r], default=0.0), time.perf_counter()
        elapsed = lambda: earlier + time.perf_counter() - resumed_at  # the run's training time, resumptions included

        base_key = jax.random.PRNGKey(config["train"]["seed"])
        sampler = experiment.train_sampler
        mesh = task_mesh() if split else None
        steps_fn = make_train_steps(experiment.learner, experiment.optimiser, mesh)
        if mesh is not None:
            params, opt_state = replicate((params, opt_state), mesh)
        window = {"loss": [], "metrics": [], "sample_s": 0.0, "step_s": 0.0}
        end = steps if stop_after is None else min(steps, start + stop_after)
        every = (log_every, config["eval"]["every"], config["train"]["checkpoint_every"])

        def log(record):
            if primary:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")

        bar = tqdm(initial=start, total=steps, desc=config["name"], disable=not (progress and primary))
        try:
            first = start + 1
            while first <= end:
                # One call runs steps first..last: at most steps_per_call, never past a log, evaluation or checkpoint.
                last = min([first + per_call - 1, end] + [-(-first // m) * m for m in every])
                t0 = time.perf_counter()
                chunk = [sampler.sample(step * hosts + host) for step in range(first, last + 1)]
                batches = stack_batches(chunk)
                if mesh is not None:
                    batches = shard_tasks(batches, mesh, axis=1)
                t1 = time.perf_counter()  # the sampler's time ends here: the keys below are the step's
                rngs = jnp.stack([jax.random.fold_in(base_key, step) for step in range(first, last + 1)])
                before = params, opt_state
                params, opt_state, losses, metrics = steps_fn(params, opt_state, batches, rngs)
                losses, metrics = np.asarray(losses), {k: np.asarray(v) for k, v in metrics.items()}
                window["sample_s"] += t1 - t0
                window["step_s"] += time.perf_counter() - t1
                for i, loss in enumerate(losses.tolist()):
                    if not math.isfinite(loss):  # keep the state before this step, then stop
                        step = first + i
                        good_params, good_opt_state = before if i == 0 else (params, opt_state)
                        if step - 1 > (manager.latest_step() or 0) and not _non_finite(good_params):
                            _save(manager, step - 1, {"params": good_params, "opt_state": good_opt_state}, run_dir, config)
                        _wait(manager, run_dir)
                        raise _every_host(TrainingDiverged(step, loss, manager.latest_step()))
                    window["loss"].append(loss)
                    window["metrics"].append({k: float(v[i]) for k, v in metrics.items()})
                bar.update(last - first + 1)
                if last % log_every == 0 or last == steps:
                    n = len(window["loss"])
                    log({"step": last, "split": "train", "loss": float(np.mean(window["loss"])),
                         **{k: float(np.mean([m[k] for m in window["metrics"]])) for k in window["metrics"][0]},
                         "episodes_per_s": n * sampler.tasks * hosts / window["step_s"],  # all hosts' tasks
                         "sampler_episodes_per_s": n * sampler.tasks * hosts / max(window["sample_s"], 1e-9),
                         "elapsed_s": elapsed()})
                    window = {"loss": [], "metrics": [], "sample_s": 0.0, "step_s": 0.0}
                if last % config["eval"]["every"] == 0 or last == steps:
                    result = experiment.evaluate(params, eval_sampler, config["eval"]["curve_episodes"], progress=False)
                    log({"step": last, "split": "test", **result})
                # every step is asked, in order: on several hosts that is how they agree on one
                notice = any([preempted(step) for step in range(first, last + 1)]) and last < steps
                if last % config["train"]["checkpoint_every"] == 0 or last == steps or notice:
                    if _non_finite(params):  # a finite loss, then an update that broke the parameters
                        _wait(manager, run_dir)
                        raise _every_host(TrainingDiverged(last, None, manager.latest_step()))
                    _save(manager, last, {"params": params, "opt_state": opt_state}, run_dir, config)
                if notice:
                    _wait(manager, run_dir)
                    raise _every_host(Preempted(last))
                first = last + 1
        except (TrainingDiverged, Preempted):
            if primary:
                plot_curves(run_dir, experiment.task.score)  # the curves up to the divergence or notice
            raise
        except KeyboardInterrupt:  # Ctrl-C: say where the run resumes from (the CLI prints it as one line)
            _wait(manager, run_dir)
            checkpoint = manager.latest_step()
            raise KeyboardInterrupt(
                f"the run resumes from its last checkpoint (step {checkpoint}) with the same command" if checkpoint
                else "no checkpoint was written yet: the same command starts the run again") from None
        finally:
            bar.close()
            _wait(manager, run_dir)
        if primary:
            plot_curves(run_dir, experiment.task.score)
    return run_dir
