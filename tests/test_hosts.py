"""Training on two hosts (two processes of two CPU devices each, joined by jax.distributed): one
run, split batches, checkpoints of one step, and every host stopping together, whatever stops one.
They share one file so that `make test` (--dist loadfile) runs them one after another, never side
by side: each starts both hosts."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest


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
    assert code0 == 143 and f"fsl-jax: preempted (SIGTERM) at step {step}" in err0, err0[-3000:]  # its own word
    assert restore_params(run, Experiment(config))[1] == step > 5


TRAIN_AGAIN = textwrap.dedent("""
    import sys
    import time
    from pathlib import Path
    import fsl_jax.train
    from fsl_jax.cli import _join_hosts
    from fsl_jax.config import load_config
    from fsl_jax.errors import ConfigError, TrainingDiverged
    from fsl_jax.train import train

    root, coordinator, host = Path(sys.argv[1]), sys.argv[3], int(sys.argv[-1])
    _join_hosts(coordinator, 2, host)
    if host == 1:  # the second host is the slower to compare the configs, as a loaded machine may make it
        compare = fsl_jax.train._config_differences
        fsl_jax.train._config_differences = lambda *args: time.sleep(3) or compare(*args)
    base = ["episode.tasks=2", "backbone_options={width: 16}", "train.steps=2", "eval.every=2", "eval.curve_episodes=5"]
    train(load_config(None, base + [f"out={root / 'a'}"]), progress=False)
    try:
        train(load_config(None, base + ["train.seed=1", f"out={root / 'a'}"]), progress=False)
    except ConfigError as error:
        assert "holds a run of a different config" in str(error), error
    else:
        raise AssertionError("trained another config into run a")
    try:  # every host sees the same loss, so every host stops with the divergence
        train(load_config(None, base + ["optim.lr=1e30", "train.steps=30", "eval.every=30", f"out={root / 'c'}"]),
              progress=False)
    except TrainingDiverged:
        pass
    else:
        raise AssertionError("trained run c at a learning rate of 1e30 without diverging")
    train(load_config(None, base + [f"out={root / 'b'}"]), progress=False)
    print("trained b", file=sys.stderr)
""")


@pytest.mark.slow
def test_hosts_that_stopped_together_train_again_in_the_same_processes(tmp_path):
    """Trainings that stopped on every host (a ConfigError on resumption, a divergence) leave no
    word behind: the next train() of the same processes trains to its end, not stopped by an old
    word. Each host stops with its own error, so the slower one to find it (host 1 here, by 3 s, in
    the config check) is not ended by the other's: it used to be, and the host left then waited
    alone in its next training until jax's heartbeat aborted it."""
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
