"""The training loop on Omniglot: run directories, checkpoints, resumption, divergence."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fsl_jax.cli import main
from fsl_jax.config import dump_config, load_config
from fsl_jax.errors import ConfigError, DataError, TrainingDiverged
from fsl_jax.train import Experiment, read_metrics, restore_params, train

from tiny import tiny_config


def test_run_directory_contents(tmp_path):
    run = train(tiny_config(tmp_path), progress=False)
    assert (run / "config.yaml").is_file() and (run / "curves.png").stat().st_size > 1000
    records = read_metrics(run)
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["split"] == "test"] == [3, 6]
    assert all(r["episodes_per_s"] > 0 and r["sampler_episodes_per_s"] > 0 for r in records if r["split"] == "train")
    _, step = restore_params(run, Experiment(load_config(run / "config.yaml")))
    assert step == 6
    # a checkpoint restored into another model is refused with the parameters that differ, not half-loaded
    with pytest.raises(ConfigError, match=r"only in the checkpoint: .*\['conv0'\]\['kernel'\].*only in the model: .*block0"):
        restore_params(run, Experiment(load_config(run / "config.yaml", ["backbone=resnet12", "backbone_options={widths: [8, 8, 8, 8]}"])))


def test_a_damaged_checkpoint_is_named(tmp_path, capsys):
    """A checkpoint that cannot be read (TensorStore's error, which orbax wraps in a bare Exception), or
    that reads as values never written (not finite), is a DataError naming it and what to delete to
    fall back to the checkpoint before it; done, the run resumes from that one."""
    import orbax.checkpoint as ocp

    config = tiny_config(tmp_path)
    run = train(config, progress=False)  # checkpoints of steps 3 and 6
    experiment = Experiment(config)
    sixth = run / "checkpoints" / "6"
    advice = f"delete {re.escape(str(sixth))} to fall back to the checkpoint of step 3"
    data = max((p for p in sixth.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(data, data.stat().st_size // 2)
    unreadable = rf"checkpoint of step 6 in .*checkpoints cannot be restored .*OUT_OF_RANGE.*{advice}"
    with pytest.raises(DataError, match=unreadable):
        restore_params(run, experiment)
    assert main(["eval", "--run", str(run), "--episodes", "2", "--no-progress"]) == 1
    assert "checkpoint of step 6" in capsys.readouterr().err

    params = experiment.init_params()
    like = {"params": params, "opt_state": experiment.optimiser.init(params)}
    shutil.rmtree(sixth)
    with ocp.CheckpointManager((run / "checkpoints").resolve()) as manager:  # step 3's state, its Adam moments broken
        state = manager.restore(3, args=ocp.args.StandardRestore(like))
        broken = jax.tree.map(lambda x: np.full_like(x, np.inf) if np.issubdtype(x.dtype, np.floating) else x,
                              state["opt_state"])
        manager.save(6, args=ocp.args.StandardSave({"params": state["params"], "opt_state": broken}))
    not_finite = rf"step 6 .* is damaged: it holds values that are not finite \(in \['opt_state'\].*{advice}"
    with pytest.raises(DataError, match=not_finite):
        train(config, progress=False)
    shutil.rmtree(sixth)
    assert restore_params(train(config, progress=False), experiment)[1] == 6


def _state(run, step, experiment):
    """The state a run's checkpoint of ``step`` holds, read with orbax alone."""
    import orbax.checkpoint as ocp

    params = experiment.init_params()
    like = {"params": params, "opt_state": experiment.optimiser.init(params)}
    with ocp.CheckpointManager((run / "checkpoints").resolve()) as manager:
        return manager.restore(step, args=ocp.args.StandardRestore(like))


def test_a_finitely_altered_checkpoint_is_named(tmp_path, capsys):
    """A checkpoint whose array files now hold other values, all finite (one bit of one weight flipped:
    0.01 becomes about 3e36), is found by its recorded digest on resume and on eval's restore, with
    what to delete to fall back to the checkpoint before it."""
    import orbax.checkpoint as ocp

    config = tiny_config(tmp_path)
    run = train(config, progress=False)  # checkpoints of steps 3 and 6
    experiment = Experiment(config)
    state = _state(run, 6, experiment)
    kernel = np.array(state["params"]["conv0"]["kernel"])
    flat = kernel.reshape(-1).view(np.uint32)
    flat[np.flatnonzero(np.abs(kernel.reshape(-1)) < 1)[0]] ^= 1 << 30  # the exponent's top bit
    assert np.isfinite(kernel).all() and np.abs(kernel).max() > 1e30
    state["params"]["conv0"]["kernel"] = kernel
    with ocp.CheckpointManager((tmp_path / "altered").resolve()) as manager:
        manager.save(6, args=ocp.args.StandardSave(state))
    sixth = run / "checkpoints" / "6"
    shutil.rmtree(sixth / "default")  # the arrays replaced; the step's record (digest, config) kept
    shutil.copytree(tmp_path / "altered" / "6" / "default", sixth / "default")
    damaged = (rf"checkpoint of step 6 in .*checkpoints is damaged: its values are not those written .*"
               rf"delete {re.escape(str(sixth))} to fall back to the checkpoint of step 3")
    with pytest.raises(DataError, match=damaged):
        train(config, progress=False)
    with pytest.raises(DataError, match=damaged):
        restore_params(run, experiment)
    assert main(["eval", "--run", str(run), "--episodes", "2", "--no-progress"]) == 1
    assert "checkpoint of step 6" in capsys.readouterr().err


def test_a_checkpoint_of_another_run_is_refused(tmp_path, capsys):
    """A checkpoint copied in from a run of the same model but another seed is refused on resume and by
    eval, naming the key that differs; moved out, the run resumes from its own."""
    other = train(tiny_config(tmp_path, "train.seed=1", name="other"), progress=False)
    config = tiny_config(tmp_path)
    run = train(config, progress=False, stop_after=3)  # its own checkpoint of step 3
    shutil.copytree(other / "checkpoints" / "6", run / "checkpoints" / "6")
    foreign = (rf"checkpoint of step 6 in .*checkpoints was written by another run's config \(train.seed: 1 in the "
               rf"checkpoint, 0 now\): move {re.escape(str(run / 'checkpoints' / '6'))} out of this run")
    with pytest.raises(DataError, match=foreign):
        train(config, progress=False)
    assert main(["eval", "--run", str(run), "--episodes", "2", "--no-progress"]) == 1
    assert re.search(foreign, capsys.readouterr().err)
    shutil.rmtree(run / "checkpoints" / "6")
    assert restore_params(train(config, progress=False), Experiment(config))[1] == 6


def test_a_checkpoint_without_its_record_still_restores(tmp_path):
    """Checkpoints written before they recorded their digest and config (orbax's plain save) resume and
    evaluate as before, unverified."""
    import orbax.checkpoint as ocp

    config = tiny_config(tmp_path)
    experiment = Experiment(config)
    run = train(config, progress=False, stop_after=3)
    state = _state(run, 3, experiment)
    shutil.rmtree(run / "checkpoints" / "3")
    with ocp.CheckpointManager((run / "checkpoints").resolve()) as manager:
        manager.save(3, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        assert manager.metadata(3).custom_metadata == {}
    train(config, progress=False)
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    params, step = restore_params(run, experiment, step=3)
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, params, state["params"])


def test_only_export_needs_the_export_extra(tmp_path, monkeypatch, capsys):
    """Without tensorflow and coremltools (the `export` extra) the CLI still builds and its other
    commands run; export says what to install."""
    script = ("import sys; sys.modules['tensorflow'] = sys.modules['coremltools'] = None\n"
              "from fsl_jax.cli import build_parser\n"
              "print(build_parser().parse_args(['bench', 'maml']).what)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "maml", done.stderr
    find_spec = importlib.util.find_spec
    extra = ("tensorflow", "coremltools")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in extra else find_spec(name, *a))
    assert main(["export", "--run", str(tmp_path), "--format", "coreml"]) == 1
    assert "exporting to coreml needs tensorflow and coremltools: pip install 'fsl_jax[export]'" in capsys.readouterr().err


def test_killed_run_resumes_to_the_same_result(tmp_path):
    whole = train(tiny_config(tmp_path, name="whole"), progress=False)
    config = tiny_config(tmp_path, name="killed")
    train(config, progress=False, stop_after=4)  # killed after step 4: checkpoint at 3, records up to 4
    assert max(r["step"] for r in read_metrics(tmp_path / "killed")) == 4
    resumed = train(config, progress=False)
    timed = [r["elapsed_s"] for r in read_metrics(resumed) if r["split"] == "train"]
    assert all(0 < a < b for a, b in zip(timed, timed[1:]))  # the run's time goes on from the kept records'
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs]
    assert strip(read_metrics(resumed)) == strip(read_metrics(whole))
    experiment = Experiment(config)
    a, _ = restore_params(whole, experiment)
    b, _ = restore_params(resumed, experiment)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_several_steps_per_call_follow_the_same_path(tmp_path):
    """Steps run in chunks of one XLA execution (stopping at log, eval and checkpoint steps) give
    the records and parameters of one step per call, to float rounding (SGD: Adam would blow
    the rounding of zero gradients up to its step size)."""
    common = ["optim.name=sgd", "optim.lr=0.05", "train.steps=7", "train.log_every=3", "train.checkpoint_every=3",
              "eval.every=6"]
    one = train(tiny_config(tmp_path, *common, name="one"), progress=False)
    config = tiny_config(tmp_path, *common, "train.steps_per_call=4", name="chunked")
    chunked = train(config, progress=False)
    records_one, records_chunked = read_metrics(one), read_metrics(chunked)
    assert [(r["step"], r["split"]) for r in records_chunked] == [(r["step"], r["split"]) for r in records_one]
    assert [r["step"] for r in records_chunked if r["split"] == "train"] == [3, 6, 7]
    np.testing.assert_allclose([r["loss"] for r in records_chunked if r["split"] == "train"],
                               [r["loss"] for r in records_one if r["split"] == "train"], rtol=1e-5)
    experiment = Experiment(config)
    a, step_a = restore_params(one, experiment)
    b, step_b = restore_params(chunked, experiment)
    assert step_a == step_b == 7
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a, b)


def test_steps_per_call_must_be_a_positive_integer(tmp_path):
    with pytest.raises(ConfigError, match="train.steps_per_call must be a positive integer, got 0"):
        train(tiny_config(tmp_path, "train.steps_per_call=0"), progress=False)


@pytest.mark.parametrize("per_call", [1, 4])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, per_call):
    config = tiny_config(tmp_path, "optim.lr=1e30", "train.steps=30", "train.log_every=10", "train.checkpoint_every=10",
                         "eval.every=10", f"train.steps_per_call={per_call}")
    with pytest.raises(TrainingDiverged, match=r"at step (\d+)") as caught:
        train(config, progress=False)
    err = caught.value
    assert err.step > 1 and not np.isfinite(err.loss)
    params, step = restore_params(tmp_path / "run", Experiment(config))
    assert step == err.checkpoint_step == err.step - 1  # the state just before the bad step is kept
    assert f"checkpoint (step {step}) is kept" in str(err)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
    assert (tmp_path / "run" / "curves.png").is_file()  # the curves up to the divergence


def test_parameters_that_an_update_breaks_are_never_checkpointed(tmp_path, monkeypatch):
    """A step whose loss is finite but whose update makes the parameters NaN (here: every update
    at step 3) is not saved as step 3, and the run stops naming the checkpoint it kept."""
    import optax

    import fsl_jax.train as train_module

    def poisoned(optim, steps):
        def update(grads, state, params=None):
            count = state + 1
            return jax.tree.map(lambda g: jnp.where(count == 3, jnp.nan, 0.0) * g, grads), count
        return optax.GradientTransformation(lambda params: jnp.zeros([], jnp.int32), update)

    jnp = jax.numpy
    monkeypatch.setattr(train_module, "make_optimiser", poisoned)
    with pytest.raises(TrainingDiverged, match=r"parameters are not finite after step 3: .*checkpoint \(step 2\)"):
        train(tiny_config(tmp_path, "train.checkpoint_every=1", "eval.every=6"), progress=False)
    assert restore_params(tmp_path / "run", Experiment(tiny_config(tmp_path)))[1] == 2


def test_a_different_config_cannot_reuse_a_run_directory(tmp_path):
    """... once the run holds a checkpoint or a record. One killed before either holds nothing to
    keep: a corrected config starts afresh there."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(tiny_config(tmp_path, "optim.lr=0.5")))
    (run / "metrics.jsonl").touch()
    train(tiny_config(tmp_path), progress=False, stop_after=1)  # a record of step 1, no checkpoint
    assert load_config(run / "config.yaml")["optim"]["lr"] == 0.001
    with pytest.raises(ConfigError, match=r"different config \(optim.lr: 0.001 in the run, 0.01 now\)"):
        train(tiny_config(tmp_path, "optim.lr=0.01"), progress=False)


def test_one_process_at_a_time_trains_into_a_run_directory(tmp_path):
    """A run directory whose ``.lock`` another process holds is refused before anything in it is
    written (two trainings would mix their records and checkpoints); eval reads it meanwhile."""
    import fcntl

    config = tiny_config(tmp_path)
    run = train(config, progress=False, stop_after=3)
    contents = lambda: {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    with open(run / ".lock", "r+") as held:  # as the other process holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("4242\n")
        held.flush()
        before = contents()
        with pytest.raises(DataError, match=rf"another process \(pid 4242\) is training into {re.escape(str(run))}"):
            train(config, progress=False)
        assert contents() == before
        assert main(["eval", "--run", str(run), "--episodes", "2", "--no-progress"]) == 0


def test_run_files_are_replaced_whole(tmp_path, monkeypatch):
    """config.yaml, metrics.jsonl and curves.png are written beside and moved over the old file,
    never truncated and rewritten: a kill at any moment leaves the old file or the new one."""
    from fsl_jax.outputs import write_replacing

    config = tiny_config(tmp_path)
    run = train(config, progress=False, stop_after=3)
    names = ("config.yaml", "metrics.jsonl", "curves.png")
    old = {name: open(run / name, "rb") for name in names}
    try:
        train(config, progress=False, stop_after=0)  # resumes, rewrites all three, trains nothing
        for name, file in old.items():
            assert not os.path.samestat(os.fstat(file.fileno()), (run / name).stat()), f"{name} rewritten in place"
    finally:
        for file in old.values():
            file.close()
    assert not [p for p in run.iterdir() if p.name.startswith(".partial-")]

    def interrupted(*args):
        raise OSError("interrupted")

    target = tmp_path / "kept.txt"
    target.write_text("old")
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OSError, match="interrupted"):  # the old file is not removed before the move
        write_replacing(target, lambda partial: partial.write_text("new"))
    assert target.read_text() == "old"


def test_a_torn_last_metrics_line_is_dropped_and_others_are_named(tmp_path):
    """An append cut short (a kill, the last line) is dropped on resume; a bad line elsewhere (NUL
    bytes a power loss left, say) is a DataError naming its file and line."""
    config = tiny_config(tmp_path)
    run = train(config, progress=False, stop_after=4)  # checkpoint 3; records up to 4
    metrics = run / "metrics.jsonl"
    with metrics.open("ab") as f:
        f.write(b'{"step": 5, "split": "tr')
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(b"".join([lines[0], b"\x00\x00\x00\n", *lines[2:]]))
    with pytest.raises(DataError, match=rf"line 2 of {re.escape(str(metrics))} is not a metrics record"):
        train(config, progress=False)
    metrics.write_bytes(b"".join(lines))
    assert read_metrics(run)[-1]["step"] == 4
    train(config, progress=False)
    assert [(r["step"], r["split"]) for r in read_metrics(run)] == [
        (1, "train"), (2, "train"), (3, "train"), (3, "test"), (4, "train"), (5, "train"), (6, "train"), (6, "test")]
    assert metrics.read_text().endswith("}\n")


def test_a_failed_checkpoint_write_is_named_and_the_run_resumes(tmp_path):
    """A checkpoint that cannot be written (here: files over RLIMIT_FSIZE, as a full disk) fails in
    orbax's background thread; it is a DataError naming its step, and once the cause is gone the
    same config resumes."""
    import resource
    import signal

    config = tiny_config(tmp_path)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), not the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (8000, limits[1]))  # a checkpoint's data file is larger
    try:
        with pytest.raises(DataError, match=r"could not write the checkpoint of step 3 to .*checkpoints \(.*too large"):
            train(config, progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert restore_params(train(config, progress=False), Experiment(config))[1] == 6


def test_a_moved_run_resumes(tmp_path):
    """Where a run and its data lie (out, data.dir) is not what the run is: moved, it resumes, its
    checkpoint's record of the config that trained it still agreeing."""
    from fsl_jax.data.omniglot import data_root

    import orbax.checkpoint as ocp

    train(tiny_config(tmp_path, name="before"), progress=False, stop_after=3)
    shutil.move(tmp_path / "before", tmp_path / "after")
    with ocp.CheckpointManager((tmp_path / "after" / "checkpoints").resolve()) as manager:
        assert {"state_sha256", "trained_by"} <= manager.metadata(3).custom_metadata.keys()  # checked on resume
    run = train(tiny_config(tmp_path, f"data.dir={data_root(None)}", name="after"), progress=False)
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_a_config_that_fails_leaves_no_run_directory_behind(tmp_path):
    """A bad data directory or setting is reported before the run directory is written, so the
    corrected config can use the same `out`."""
    with pytest.raises(DataError, match=r"data directory .*nowhere \(from data.dir, --data-dir\)"):
        train(tiny_config(tmp_path, f"data.dir={tmp_path / 'nowhere'}"), progress=False)
    for bad, message in [("train.steps_per_call=0", "steps_per_call"), ("eval.every=0", "eval.every must be a positive"),
                         ("train.keep_checkpoints=0", "keep_checkpoints"), ("train.steps=0", "train.steps"),
                         ("optim.lr=.nan", "optim.lr must be a positive number, got nan"),
                         ("eval.ways=500", "ways"), ("train.checkpoint_every=2", "multiple of train.log_every"),
                         ("optim.name=lbfgs", "optim.name 'lbfgs' is not an optimiser of gradients alone"),
                         ("method=prototype_segmenter", "method 'prototype_segmenter' is a segmenter; data.name "
                                                        "'omniglot' gives classification tasks")]:
        with pytest.raises((ConfigError, DataError), match=message):
            train(tiny_config(tmp_path, bad, "train.log_every=3" if "checkpoint_every" in bad else "eval.seed=1"),
                  progress=False)
    assert not (tmp_path / "run").exists()
    assert restore_params(train(tiny_config(tmp_path), progress=False), Experiment(tiny_config(tmp_path)))[1] == 6


def test_an_output_holding_the_current_directory_is_refused(tmp_path, monkeypatch):
    from fsl_jax.outputs import write_replacing

    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "keep").write_text("kept")
    monkeypatch.chdir(tmp_path / "inner")
    for out in (".", "..", "../inner"):
        with pytest.raises(ConfigError, match="holds the current directory"):
            write_replacing(Path(out), lambda d: d.mkdir())
    assert (tmp_path / "inner" / "keep").read_text() == "kept"
    write_replacing(Path("../beside"), lambda d: d.mkdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beside", "inner"]
