"""The Core ML bridge on the segmenters: prototype segmenter, Siamese-U-Net, MAML segmenter."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")
pytest.importorskip("coremltools")

from bridges.coreml import to_coreml  # noqa: E402
from bridges.lower import lower  # noqa: E402
from bridges.mil import Program, audit  # noqa: E402
from bridges.savedmodel import run_savedmodel, to_savedmodel  # noqa: E402
from bridges.segmenters import (SegSupport, load_support_folder, maml_segmenter_model,  # noqa: E402
                                prototype_segmenter_model, siamese_unet_model)
from fsl_jax.config import load_config  # noqa: E402
from fsl_jax.data.cluttered import TEST_DRAWERS, ClutteredOmniglot, OmniglotSceneEpisodes  # noqa: E402
from fsl_jax.errors import DataError  # noqa: E402
from fsl_jax.learner import first_task  # noqa: E402
from fsl_jax.methods import make_backbone  # noqa: E402
from fsl_jax.seg import prototype_segmenter, siamese_unet  # noqa: E402

FP32, FP16, LOWERED = 1e-4, 1e-2, 1e-5
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def scenes(omniglot105):
    """Two K-shot tasks of 48x48 Omniglot scenes (2 shots, 2 queries), held-out drawers."""
    return OmniglotSceneEpisodes(omniglot105.select(("Korean",)), shots=2, queries=2, tasks=2, seed=0, drawers=TEST_DRAWERS,
                                 distractors=(4,), scene_size=48, char_size=20).sample(0)


@pytest.fixture(scope="session")
def clutter(omniglot105):
    """Four one-shot clutter tasks: 16x16 exemplars, 48x48 scenes."""
    return ClutteredOmniglot(omniglot105.select(("Korean",)), (4,), tasks=4, seed=0, drawers=TEST_DRAWERS, scene_size=48,
                             exemplar_size=16, char_size=16).sample(0)


def seg_config(method, options, backbone_options=None):
    return load_config(None, ["data.name=omniglot_seg", f"method={method}", f"method_options={options}",
                              f"backbone_options={backbone_options or {}}"])


def support_of(batch, statistics=False) -> SegSupport:
    task = first_task(batch)
    both = np.concatenate([task.support_x, task.query_x]) if statistics else None
    return SegSupport(task.support_x, task.support_mask, batch.query_x.reshape(-1, *batch.query_x.shape[2:]),
                      "test scenes", support_statistics=both, query_statistics=both)


@pytest.fixture(scope="session")
def prototype_model(scenes):
    config = seg_config("prototype_segmenter", {}, {"width": 8, "pooled_blocks": 2})
    learner = prototype_segmenter(make_backbone("conv4", {"width": 8, "pooled_blocks": 2}))
    params = jax.jit(learner.init)(jax.random.PRNGKey(0), first_task(scenes))
    return config, learner, params


@pytest.fixture(scope="session")
def siamese_model(clutter):
    learner = siamese_unet(widths=(4, 8))
    params = jax.jit(learner.init)(jax.random.PRNGKey(0), first_task(clutter))
    config = seg_config("siamese_unet", {"widths": [4, 8]})
    exemplars = clutter.support_x[:, 0] * clutter.support_mask[:, 0, ..., None]
    return learner, params, siamese_unet_model(config, params, (exemplars, clutter.query_x[:, 0]), {"licence": "x"})


@pytest.fixture(scope="session")
def maml_model(scenes):
    from fsl_jax.seg.maml import maml_segmenter

    options = {"widths": [4, 8], "inner_steps": 2, "inner_lr": 0.5}
    learner = maml_segmenter(**options)
    params = jax.jit(learner.init)(jax.random.PRNGKey(0), first_task(scenes))
    return learner, params, maml_segmenter_model(seg_config("maml_segmenter", options), params, support_of(scenes), {})


def check_exports(model, tmp_path, examples: int = 2):
    """JAX vs SavedModel vs lowered graph (1e-5), the ML Program's audit, the numpy evaluator (1e-4 / 1e-2)."""
    rng = np.random.default_rng(0)
    real = [x[:examples] for x in model.examples]
    noise = [rng.random(x.shape).astype(np.float32) for x in real]
    saved = to_savedmodel(model, tmp_path / "savedmodel")
    graph, _ = lower(model.one, [(i.name, (1, *i.shape)) for i in model.inputs], model.outputs)
    for inputs in (real, noise):
        want = np.asarray(model(*inputs)[0])
        got = run_savedmodel(saved, {i.name: x for i, x in zip(model.inputs, inputs)})["mask_probability"]
        lowered = np.concatenate([graph(*[tf.constant(x[j:j + 1]) for x in inputs])[0].numpy() for j in range(examples)])
        assert np.abs(got - want).max() <= LOWERED and np.abs(lowered - want).max() <= LOWERED
    height, width = model.inputs[-1].shape[:2]
    pixels = [np.round(x * 255) for x in real]
    reference = np.asarray(model(*[np.float32(1 / 255) * p.astype(np.float32) for p in pixels])[0])
    for precision, tolerance in (("fp32", FP32), ("fp16", FP16)):
        path = tmp_path / f"{precision}.mlpackage"
        to_coreml(model, path, precision, image_input=True)
        found = audit(path)
        assert found.unknown == [] and "XlaCallModule" not in found.ops and found.ops.get("conv", 0) >= 2
        assert found.inputs == {i.name: ("image(RGB)", i.shape[:2]) for i in model.inputs}
        assert found.outputs == {"mask_probability": ("array(FLOAT32)", (1, height, width))}
        program = Program(path)
        got = np.concatenate([program(**{i.name: p[j:j + 1] for i, p in zip(model.inputs, pixels)})["mask_probability"]
                              for j in range(examples)])
        assert np.abs(got - reference).max() <= tolerance, precision
    return found


def test_prototype_segmenter_exports(prototype_model, scenes, tmp_path):
    config, _, params = prototype_model
    model = prototype_segmenter_model(config, params, support_of(scenes), {})
    found = check_exports(model, tmp_path)
    assert found.ops.get("upsample_bilinear", 0) + found.ops.get("resize_bilinear", 0) == 1


def test_prototype_segmenter_is_the_learners_prediction(prototype_model, scenes):
    config, learner, params = prototype_model
    model = prototype_segmenter_model(config, params, support_of(scenes, statistics=True), {})
    task = first_task(scenes)
    want = jax.nn.sigmoid(jax.jit(learner.task_predict)(params, task, jax.random.PRNGKey(0)))
    np.testing.assert_allclose(model(task.query_x)[0], want, atol=1e-5, rtol=0)


def test_siamese_unet_exports_with_two_inputs(siamese_model, tmp_path):
    _, _, model = siamese_model
    assert [i.name for i in model.inputs] == ["exemplar", "scene"]
    check_exports(model, tmp_path)


def test_siamese_unet_is_the_learners_prediction(siamese_model, clutter):
    learner, params, model = siamese_model
    for t in range(2):
        task = jax.tree.map(lambda x: x[t], clutter)
        want = jax.nn.sigmoid(jax.jit(learner.task_predict)(params, task, jax.random.PRNGKey(0)))
        np.testing.assert_allclose(model(task.support_x, task.query_x)[0], want, atol=1e-5, rtol=0)


def test_maml_segmenter_exports_adapted_parameters(maml_model, scenes, tmp_path):
    learner, params, model = maml_model
    task = first_task(scenes)
    want = jax.nn.sigmoid(jax.jit(learner.task_predict)(params, task, jax.random.PRNGKey(0)))
    np.testing.assert_allclose(model(task.query_x)[0], want, atol=1e-5, rtol=0)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), model.params, params["unet"])
    assert max(jax.tree.leaves(moved)) > 0  # the exported weights are the adapted ones
    check_exports(model, tmp_path)


def write_fss(folder, size, masks=True, width=None):
    folder.mkdir(parents=True)
    for n in (1, 2):
        image = np.zeros((size, width or size, 3), np.uint8)
        image[5:20, 8:30] = (200, 50, 10)
        Image.fromarray(image).save(folder / f"{n}.jpg")
        if masks:
            Image.fromarray(((image[..., 0] > 0) * 255).astype(np.uint8)).save(folder / f"{n}.png")
    return folder


def test_support_folder_is_read_and_checked(prototype_model, scenes, tmp_path):
    config, _, params = prototype_model
    queries = support_of(scenes).queries
    support = load_support_folder(write_fss(tmp_path / "ok", 48), (48, 48), queries)
    assert support.images.shape == (2, 48, 48, 3) and set(np.unique(support.masks)) == {0.0, 1.0}
    model = prototype_segmenter_model(config, params, support, {})
    assert np.asarray(model(queries[:1])[0]).shape == (1, 48, 48)
    with pytest.raises(DataError, match=r"support image .*1\.jpg is 64x64 but the model takes 48x48"):
        load_support_folder(write_fss(tmp_path / "big", 64), (48, 48), queries)
    with pytest.raises(DataError, match=r"support image .*1\.jpg is 64x48 but the model takes 48x48"):
        load_support_folder(write_fss(tmp_path / "wide", 48, width=64), (48, 48), queries)
    with pytest.raises(DataError, match=r"1\.jpg has no mask: .*1\.png is missing"):
        load_support_folder(write_fss(tmp_path / "unmasked", 48, masks=False), (48, 48), queries)
    with pytest.raises(DataError, match="holds a folder, big: a class folder holds <n>.jpg images"):
        load_support_folder(tmp_path / "ok" / "..", (48, 48), queries)


def test_cli_exports_a_segmentation_run_and_checks_its_support(tmp_path, capsys):
    import json

    import orbax.checkpoint as ocp
    import yaml

    from fsl_jax.cli import main
    from fsl_jax.train import Experiment

    # A run directory as `fsl-jax train` writes it (config.yaml, an orbax checkpoint), without the training.
    run = tmp_path / "run"
    config = load_config(None, ["data.name=omniglot_seg", "method=prototype_segmenter", "data.scene_size=32",
                                "data.char_size=16", "backbone_options={width: 8, pooled_blocks: 2}", f"out={run}"])
    experiment = Experiment(config)
    params = jax.jit(experiment.init_params)()
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with ocp.CheckpointManager((run / "checkpoints").resolve()) as manager:
        manager.save(1, args=ocp.args.StandardSave({"params": params, "opt_state": experiment.optimiser.init(params)}))
    out = tmp_path / "seg.mlpackage"
    assert main(["export", "--run", str(run), "--format", "coreml", "--image-input", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model"] == "prototype-segmenter" and report["outputs"] == ["mask_probability"]
    assert report["inputs"] == {"image": [1, 32, 32, 3]} and report["parity"]["coreml_vs_jax"] <= FP32
    assert report["parity"]["lowered_tf_vs_jax"] <= LOWERED and report["mil_ops"] > 5
    for folder, message in ((write_fss(tmp_path / "big", 40), "is 40x40 but the model takes 32x32"),
                            (write_fss(tmp_path / "bare", 32, masks=False), "has no mask")):
        assert main(["export", "--run", str(run), "--format", "coreml", "--support", str(folder),
                     "--out", str(tmp_path / "other.mlpackage")]) == 1
        assert message in capsys.readouterr().err


def test_prototype_segmenter_on_a_backbone_without_batchnorm(scenes):
    """A prototype segmenter on U-Net features, which normalise each image themselves: no
    BatchNorm statistics to fix; the export must still be the learner's prediction."""
    options = {"widths": [4, 8], "outputs": 8}
    config = load_config(None, ["data.name=omniglot_seg", "method=prototype_segmenter", "backbone=unet",
                                f"backbone_options={options}"])
    learner = prototype_segmenter(make_backbone("unet", options))
    task = first_task(scenes)
    params = jax.jit(learner.init)(jax.random.PRNGKey(0), task)
    model = prototype_segmenter_model(config, params, support_of(scenes), {})
    want = jax.nn.sigmoid(jax.jit(learner.task_predict)(params, task, jax.random.PRNGKey(0)))
    np.testing.assert_allclose(model(task.query_x)[0], want, atol=1e-5, rtol=0)
