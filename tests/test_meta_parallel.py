"""The task batch sharded over 8 (forced host) devices, or over two hosts, gives the single-device
parameters and gradients; evaluation spread over them gives the single-device scores."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from fsl_jax.data.episodes import Episode
    from fsl_jax.errors import ConfigError
    from fsl_jax.learner import first_task
    from fsl_jax.meta import map_batches, maml, replicate, shard_tasks, sharded_loss, task_mesh
    from fsl_jax.meta.parallel import BATCHES
    from fsl_jax.metric import matching
    from fsl_jax.seg import siamese_unet
    from fsl_jax.nets import Conv4
    from fsl_jax.tasks import _episode_accuracy, accuracy_ci95, evaluate
    from fsl_jax.train import make_train_step

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    tasks, ways = 8, 3
    labels = lambda per: np.tile(np.repeat(np.arange(ways, dtype=np.int32), per), (tasks, 1))
    batches = [Episode(rng.random((tasks, ways, 8, 8, 1), np.float32), labels(1),
                       rng.random((tasks, 2 * ways, 8, 8, 1), np.float32), labels(2),
                       np.tile(np.arange(ways, dtype=np.int32), (tasks, 1))) for _ in range(2)]
    mesh = task_mesh()
    out = {}
    for how in ("vmap", "map"):
        learner = maml(Conv4(width=4, blocks=2), inner_steps=2, inner_lr=0.3, task_map=how)
        optimiser = optax.sgd(0.5)  # linear in the gradient (Adam would blow up float noise in
        # the gradients of the conv biases, which BatchNorm cancels, into full-size steps)
        init = learner.init(jax.random.PRNGKey(0), first_task(batches[0]))
        single, sharded = make_train_step(learner, optimiser), make_train_step(learner, optimiser, mesh)
        params, state = init, optimiser.init(init)
        shared, shared_state = replicate((init, optimiser.init(init)), mesh)
        for i, batch in enumerate(batches):
            params, state, loss, _ = single(params, state, batch, jax.random.PRNGKey(i))
            placed = shard_tasks(batch, mesh)
            assert len(placed.support_x.sharding.device_set) == 8
            shared, shared_state, shared_loss, _ = sharded(shared, shared_state, placed, jax.random.PRNGKey(i))
        flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
        out[how] = {"max_abs_diff": float(np.abs(flat(params) - flat(shared)).max()),
                    "moved": float(np.abs(flat(params) - flat(init)).max()),
                    "loss_diff": abs(float(loss) - float(shared_loss))}
    try:
        shard_tasks(jax.tree.map(lambda x: x[:6], batches[0]), mesh)
    except ConfigError as err:
        out["error"] = str(err)
    # full-context embeddings scan an LSTM: its carry must vary across devices like its inputs
    fce = matching(Conv4(width=4, blocks=2), full_context=True, fce_steps=2)
    params = fce.init(jax.random.PRNGKey(0), first_task(batches[0]))
    grad = lambda loss, *args: jax.jit(jax.value_and_grad(loss, has_aux=True))(*args, jax.random.PRNGKey(0))
    (one, _), g_one = grad(fce.loss, params, batches[0])
    (many, _), g_many = grad(sharded_loss(fce.loss, mesh), replicate(params, mesh), shard_tasks(batches[0], mesh))
    out["fce"] = {"loss_diff": abs(float(one) - float(many)),
                  "grad_diff": max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_one), jax.tree.leaves(g_many)))}
    segmenter = siamese_unet(widths=(4, 8), contrast_weight=1.0)
    try:
        sharded_loss(segmenter.loss, mesh)
    except ConfigError as err:
        out["coupled"] = str(err)

    class Numbered:  # batch i: two tasks drawn from seed i
        tasks = 2

        def sample(self, i):
            r = np.random.default_rng(i)
            return Episode(r.random((2, ways, 8, 8, 1), np.float32), labels(1)[:2],
                           r.random((2, 2 * ways, 8, 8, 1), np.float32), labels(2)[:2],
                           np.tile(np.arange(ways, dtype=np.int32), (2, 1)))

    learner = maml(Conv4(width=4, blocks=2), inner_steps=2, inner_lr=0.3)
    init = learner.init(jax.random.PRNGKey(0), first_task(batches[0]))

    def support_sums(params, batch, rng):  # and which device computed the batch
        return batch.support_x.sum((1, 2, 3, 4)), jax.lax.axis_index(BATCHES)

    sums = map_batches(support_sums, replicate(init, mesh), Numbered(), 19)
    out["map_batches"] = {"devices": sorted({int(d) for _, d in sums}), "batches": len(sums), "max_abs_diff": max(
        float(np.abs(s - Numbered().sample(i).support_x.sum((1, 2, 3, 4))).max()) for i, (s, _) in enumerate(sums))}
    accuracy = _episode_accuracy(learner)  # evaluation's loop on one device, batch by batch
    one = np.concatenate([accuracy(init, Numbered().sample(i), jax.random.PRNGKey(i)) for i in range(19)])[:37]
    spread = evaluate(learner, replicate(init, mesh), Numbered(), 37, progress=False)
    out["evaluate"] = {"episodes": spread["episodes"], "diff": abs(spread["accuracy"] - float(one.mean())),
                       "ci_diff": abs(spread["ci95"] - accuracy_ci95(one)["ci95"]), "spread": float(one.std())}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_sharded_meta_step_equals_single_device_step():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for how in ("vmap", "map"):
        assert result[how]["moved"] > 1e-3  # two SGD steps did change the parameters
        assert result[how]["max_abs_diff"] < 1e-5, result
        assert result[how]["loss_diff"] < 1e-5, result
    assert "multiple of the number of devices (8)" in result["error"]
    assert result["fce"]["loss_diff"] < 1e-5 and result["fce"]["grad_diff"] < 1e-5, result["fce"]
    assert "cannot be split over devices" in result["coupled"]
    # evaluation spreads its batches over the 8 devices, in order: the one-device loop's scores
    batches = result["map_batches"]  # a batch's sum is about 120, so another batch's would be far off
    assert batches["devices"] == list(range(8)) and batches["batches"] == 19 and batches["max_abs_diff"] < 1e-3, batches
    assert result["evaluate"]["episodes"] == 37 and result["evaluate"]["spread"] > 0.05, result["evaluate"]
    assert result["evaluate"]["diff"] < 1e-6 and result["evaluate"]["ci_diff"] < 1e-6, result["evaluate"]


@pytest.mark.parametrize("hosts", [1, 2])
def test_training_splits_tasks_over_devices_or_says_why_not(monkeypatch, hosts):
    """Training's choice of devices counts all hosts' tasks; where it cannot split them, one host is
    warned that it trains on one device, and several hosts are refused (they would train apart)."""
    import jax

    from fsl_jax.errors import ConfigError
    from fsl_jax.meta import maml
    from fsl_jax.nets import Conv4
    from fsl_jax.seg import siamese_unet
    from fsl_jax.train import split_over_devices

    monkeypatch.setattr(jax, "device_count", lambda: 8)
    monkeypatch.setattr(jax, "process_count", lambda: hosts)
    learner, coupled = maml(Conv4(width=4, blocks=2)), siamese_unet(widths=(4, 8), contrast_weight=1.0)
    assert split_over_devices(8 // hosts, learner)  # 8 tasks in all, on 8 devices
    for tasks, model, reason in ((6 // hosts, learner, f"{6 // hosts * hosts} tasks per batch are not a multiple of the 8"),
                                 (8 // hosts, coupled, "couples a batch's tasks")):
        if hosts == 1:
            with pytest.warns(UserWarning, match=f"training on one of the 8 devices: .*{reason}"):
                assert not split_over_devices(tasks, model)
        else:
            with pytest.raises(ConfigError, match=f"cannot train on 2 hosts: .*{reason}"):
                split_over_devices(tasks, model)
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not split_over_devices(3, learner)  # one device: nothing to split, nothing to say


def _two_hosts(config_path, timeout=600, interrupt=None, script=None) -> list[tuple[int, str]]:
    """``fsl-jax train --config config_path`` as two hosts of two CPU devices each, side by side;
    each host's exit status and standard error. interrupt: ``(host, ready, signal)``, send that host
    the signal as soon as ``ready()`` holds; ``timeout`` then counts from it. script: run this Python program
    instead, with the same arguments."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        coordinator = f"localhost:{s.getsockname()[1]}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    program = ["-c", script] if script else ["-m", "fsl_jax.cli", "train", "--no-progress", "--config"]
    command = [sys.executable, *program, str(config_path), "--coordinator", coordinator, "--hosts", "2"]
    hosts = [subprocess.Popen(command + ["--host", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    try:
        if interrupt is not None:
            host, ready, signum = interrupt
            while not ready():
                assert all(h.poll() is None for h in hosts), "a host ended before it was interrupted"
                time.sleep(0.1)
            hosts[host].send_signal(signum)
        errors = [host.communicate(timeout=timeout)[1] for host in hosts]
    finally:  # a host left waiting for one that failed
        for host in hosts:
            host.kill()
    return [(host.returncode, err) for host, err in zip(hosts, errors)]


def _train_on_two_hosts(config_path):
    for code, err in _two_hosts(config_path):
        assert code == 0, err[-3000:]


@pytest.mark.slow
def test_two_hosts_train_one_run(tmp_path):
    """`fsl-jax train --hosts 2` on two hosts trains one run into one directory: host i draws the
    sampler's batch 2*step+i (not both the same tasks), each checkpoint holds the parameters of one
    step from the one before taken on those tasks on one device, read back on one device, and the
    two hosts resume from them; the hosts split the evaluation's batches and log the scores one
    host gives.

    Each checkpoint is checked against one step from the one before, not the whole run against a
    run on one device: Omniglot's binary strokes give pooling windows that tie exactly, so the
    gradient jumps where float rounding (which differs between one device and four) breaks a tie;
    six steps of SGD at a rate of 0.1 grew that to 1.5e-3 in the parameters, though each step agrees."""
    import shutil

    import jax
    import numpy as np

    from fsl_jax.config import dump_config, load_config
    from fsl_jax.train import Experiment, make_train_step, read_metrics, restore_params

    run, config_path = tmp_path / "run", tmp_path / "config.yaml"
    config = load_config(None, ["episode.ways=5", "episode.queries=5", "episode.tasks=2", "backbone_options={width: 16}",
                                "optim.name=sgd", "optim.lr=0.02", "train.steps=6", "train.log_every=1",
                                "train.checkpoint_every=1", "train.keep_checkpoints=6", "eval.every=3",
                                "eval.curve_episodes=25", f"out={run}"])
    config_path.write_text(dump_config(config))
    experiment = Experiment(config)
    train_step, sampler = make_train_step(experiment.learner, experiment.optimiser), experiment.train_sampler
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])

    def one_step(params, step):  # plain SGD: no optimiser state to carry between steps
        batch = jax.tree.map(lambda *xs: np.concatenate(xs), sampler.sample(2 * step), sampler.sample(2 * step + 1))
        rng = jax.random.fold_in(jax.random.PRNGKey(0), step)  # train.seed 0
        return train_step(params, experiment.optimiser.init(params), batch, rng)[0]

    def assert_steps(steps):
        for step in steps:
            before = experiment.init_params() if step == 1 else restore_params(run, experiment, step - 1)[0]
            params, _ = restore_params(run, experiment, step)
            assert np.abs(flat(params) - flat(before)).max() > 1e-3, step  # a step does move the parameters
            assert np.abs(flat(params) - flat(one_step(before, step))).max() < 1e-5, step

    _train_on_two_hosts(config_path)
    records = read_metrics(run)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]  # written once, by host 0
    assert [r["step"] for r in records if r["split"] == "test"] == [3, 6]
    assert_steps(range(1, 7))
    shutil.rmtree(run / "checkpoints" / "6")  # back to step 5: the hosts resume from it
    _train_on_two_hosts(config_path)
    params, step = restore_params(run, experiment)
    assert step == 6
    assert_steps([6])
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    logged = [r for r in read_metrics(run) if r["split"] == "test"][-1]  # batches 0 and 2 on host 0, 1 on host 1
    alone = experiment.evaluate(params, experiment.eval_sampler(), 25, progress=False)
    assert logged["episodes"] == 25 and abs(logged["accuracy"] - alone["accuracy"]) < 1e-6, (logged, alone)
    assert abs(logged["ci95"] - alone["ci95"]) < 1e-6


@pytest.mark.slow
def test_a_host_refused_the_run_directory_stops_every_host(tmp_path):
    """Where host 0 finds the run directory held by another process, both hosts stop with an error
    saying so (host 1 used to wait 30 s for host 0, then end in a Gloo traceback)."""
    import fcntl

    from fsl_jax.config import dump_config, load_config

    run, config_path = tmp_path / "run", tmp_path / "config.yaml"
    run.mkdir()
    config_path.write_text(dump_config(load_config(None, ["episode.tasks=2", "backbone_options={width: 16}", f"out={run}"])))
    with open(run / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        (code0, err0), (code1, err1) = _two_hosts(config_path, timeout=120)
    assert code0 == 1 and f"another process (pid 4242) is training into {run}" in err0, err0[-3000:]
    assert code1 == 1 and f"host 0 could not take its lock on {run}" in err1, err1[-3000:]
    assert not (run / "config.yaml").exists()  # the held run is left as it was


@pytest.mark.slow
def test_a_host_interrupted_in_training_stops_every_host(tmp_path):
    """Ctrl-C on host 1 in the middle of training: within seconds host 1 says where the run resumes
    from and host 0 says that host 1 was interrupted (host 0 used to wait in a collective for
    minutes, and host 1 at jax's shutdown, then both aborted); that checkpoint reads back."""
    from fsl_jax.train import Experiment, restore_params

    run, config, config_path = _endless_run(tmp_path, checkpoint_every=10)
    (code0, err0), (code1, err1) = _two_hosts(config_path, timeout=60, interrupt=(1, _past(run, 12), signal.SIGINT))
    resumes = re.search(r"fsl-jax: interrupted; the run resumes from its last checkpoint \(step (\d+)\)", err1)
    assert code1 == 130 and resumes, err1[-3000:]
    assert code0 == 1 and "host 1 was interrupted (Ctrl-C); host 0 stops too" in err0, err0[-3000:]
    step = int(resumes.group(1))
    assert step >= 10 and restore_params(run, Experiment(config))[1] == step


def _endless_run(tmp_path, checkpoint_every):
    """A run directory, config and its file for two hosts to train until they are stopped."""
    from fsl_jax.config import dump_config, load_config

    run, config_path = tmp_path / "run", tmp_path / "config.yaml"
    config = load_config(None, ["episode.ways=5", "episode.queries=5", "episode.tasks=2", "backbone_options={width: 16}",
                                "train.steps=100000", "train.log_every=1", f"train.checkpoint_every={checkpoint_every}",
                                "eval.every=100000", f"out={run}"])
    config_path.write_text(dump_config(config))
    return run, config, config_path


def _past(run, step):
    """Whether the run's metrics show a step beyond ``step``."""
    from fsl_jax.train import read_metrics

    return lambda: (run / "metrics.jsonl").exists() and any(r["step"] > step for r in read_metrics(run))


@pytest.mark.slow
def test_sigterm_on_one_host_checkpoints_every_host_at_one_step(tmp_path):
    """A preemption notice (SIGTERM) on host 1 alone: through jax's preemption sync point both hosts
    write the checkpoint of the same step (there is no periodic one) and stop, saying so."""
    from fsl_jax.train import Experiment, restore_params

    run, config, config_path = _endless_run(tmp_path, checkpoint_every=100000)
    (code0, err0), (code1, err1) = _two_hosts(config_path, timeout=60, interrupt=(1, _past(run, 5), signal.SIGTERM))
    said = re.search(r"fsl-jax: preempted \(SIGTERM\) at step (\d+): its checkpoint is written", err1)
    assert code1 == 143 and said, err1[-3000:]
    step = int(said.group(1))
    assert code0 in (1, 143) and f"preempted (SIGTERM) at step {step}" in err0, err0[-3000:]
    assert restore_params(run, Experiment(config))[1] == step > 5


TRAIN_AGAIN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from fsl_jax.cli import _join_hosts
    from fsl_jax.config import load_config
    from fsl_jax.errors import ConfigError
    from fsl_jax.train import train

    root, coordinator, host = Path(sys.argv[1]), sys.argv[3], int(sys.argv[-1])
    _join_hosts(coordinator, 2, host)
    base = ["episode.tasks=2", "backbone_options={width: 16}", "train.steps=2", "eval.every=2", "eval.curve_episodes=5"]
    train(load_config(None, base + [f"out={root / 'a'}"]), progress=False)
    try:
        train(load_config(None, base + ["train.seed=1", f"out={root / 'a'}"]), progress=False)
    except ConfigError as error:
        assert "holds a run of a different config" in str(error), error
    else:
        raise AssertionError("trained another config into run a")
    train(load_config(None, base + [f"out={root / 'b'}"]), progress=False)
    print("trained b", file=sys.stderr)
""")


@pytest.mark.slow
def test_hosts_that_stopped_together_train_again_in_the_same_processes(tmp_path):
    """A training that stopped on every host (a ConfigError on resumption) leaves no word behind:
    the next train() of the same processes trains to its end, not stopped by the old word."""
    for code, err in _two_hosts(tmp_path, timeout=300, script=TRAIN_AGAIN):
        assert code == 0 and "trained b" in err, err[-3000:]


def test_distributed_training_outside_a_cluster_says_what_to_give(tmp_path):
    from fsl_jax.config import dump_config, load_config

    (tmp_path / "config.yaml").write_text(dump_config(load_config(None, [f"out={tmp_path / 'run'}"])))
    clusters = ("SLURM_", "OMPI_", "KUBERNETES_", "JAX_COORDINATOR")  # what jax.distributed would detect
    env = {k: v for k, v in os.environ.items() if not k.startswith(clusters)}
    done = subprocess.run([sys.executable, "-m", "fsl_jax.cli", "train", "--config", str(tmp_path / "config.yaml"),
                           "--distributed"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert "cannot join the other hosts" in done.stderr and "--coordinator HOST:PORT, --hosts and --host" in done.stderr
    assert not (tmp_path / "run").exists()
