"""The task batch sharded over 8 (forced host) devices gives the single-device parameters and
gradients; evaluation spread over them gives the single-device scores. Two hosts: test_hosts.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
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
