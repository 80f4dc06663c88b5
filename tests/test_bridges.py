"""The Core ML bridge on classifiers: lowering, SavedModel, ML Program audit, numpy MIL evaluator, CLI, bad input."""
from __future__ import annotations

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")
ct = pytest.importorskip("coremltools")

from bridges.coreml import to_coreml  # noqa: E402
from bridges.export import build_model, export_run, parity  # noqa: E402
from bridges.lower import UnsupportedPrimitive, lower  # noqa: E402
from bridges.mil import Program, audit  # noqa: E402
from bridges.savedmodel import run_savedmodel, to_savedmodel  # noqa: E402
from fsl_jax.cli import main  # noqa: E402
from fsl_jax.config import load_config  # noqa: E402
from fsl_jax.errors import DataError, ExportError  # noqa: E402
from fsl_jax.train import train  # noqa: E402
from tiny import tiny_config  # noqa: E402

FP32, FP16, LOWERED = 1e-4, 1e-2, 1e-5


def graph_ops(concrete) -> set[str]:
    """TensorFlow op types the outputs depend on (what coremltools converts)."""
    outputs = [t.name.split(":")[0] for t in concrete.outputs]
    graph = tf.compat.v1.graph_util.extract_sub_graph(concrete.graph.as_graph_def(), outputs)
    return {node.op for node in graph.node}


def run_lowered(concrete, *inputs):
    return [o.numpy() for o in concrete(*[tf.constant(x) for x in inputs])]


class UNetLike(nn.Module):
    """Every layer kind a U-Net-style segmenter uses, and the elementwise ops around them."""

    @nn.compact
    def __call__(self, x):
        down = nn.Conv(8, (3, 3), strides=2, padding="SAME")(x)
        dilated = nn.Conv(4, (3, 3), kernel_dilation=2)(x)
        grouped = jnp.pad(nn.Conv(4, (3, 3), feature_group_count=2, padding="VALID")(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
        depthwise = nn.Conv(4, (3, 3), feature_group_count=4, padding=1)(x)
        branches = [
            nn.ConvTranspose(3, (3, 3), strides=(2, 2))(down),
            nn.ConvTranspose(3, (2, 2), strides=(2, 2), padding="VALID")(down),
            nn.ConvTranspose(3, (4, 4), strides=(2, 2), padding=1)(down),
            jax.image.resize(down, (x.shape[0], 16, 16, 8), "bilinear"),
            jax.image.resize(down, (x.shape[0], 16, 16, 8), "nearest"),
            nn.avg_pool(x, (2, 2), (2, 2)), nn.max_pool(x, (3, 3), (2, 2), padding="SAME"),
            jnp.concatenate([dilated, grouped, depthwise], -1),
        ]
        flat = jnp.concatenate([b.reshape(b.shape[0], -1) for b in branches], -1)
        h = nn.Dense(5)(flat)
        gated = jnp.where(h > 0, h, 0.1 * h) + nn.sigmoid(h) ** 3 + jnp.sqrt(jnp.abs(h)) + nn.gelu(h)
        return jnp.tanh(flat), jax.nn.softmax(gated) + jnp.argmax(h, -1)[:, None] + jax.lax.rsqrt(1 + h * h)


@pytest.fixture(scope="session")
def unet_like():
    module = UNetLike()
    params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.ones((1, 16, 16, 4)))
    return jax.jit(lambda x: module.apply(params, x))


def test_lowering_matches_jax_on_unet_like_layers(unet_like):
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    concrete, counts = lower(unet_like, [("x", x.shape)], ["features", "scores"])
    for got, want in zip(run_lowered(concrete, x), unet_like(x)):
        np.testing.assert_allclose(got, want, atol=LOWERED, rtol=0)
    ops = graph_ops(concrete)
    assert "XlaCallModule" not in ops
    assert {"Conv2D", "Conv2DBackpropInput", "DepthwiseConv2dNative", "ResizeBilinear", "ResizeNearestNeighbor",
            "AvgPool", "MaxPool", "ConcatV2", "MatMul", "ArgMax"} <= ops
    assert counts["conv_general_dilated"] >= 7 and counts["jit"] >= 2  # the resizes were recognised


def test_unsupported_primitive_names_it_and_where_it_comes_from():
    class Sorter(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.sort(nn.Dense(3, name="head")(x), axis=-1)

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Sorter(name="ranker")(x)

    module = Outer()
    params = module.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
    with pytest.raises(UnsupportedPrimitive, match=r"'sort'.*Outer/ranker.*test_bridges\.py") as caught:
        lower(lambda x: module.apply(params, x), [("x", (1, 4))], ["y"])
    assert isinstance(caught.value, ExportError) and caught.value.primitive == "sort"


def test_backbone_lowers_to_convolutions_and_pooling():
    from fsl_jax.nets import Conv4

    net = Conv4(width=8)
    x = np.random.default_rng(1).random((3, 28, 28, 1)).astype(np.float32)
    variables = jax.jit(net.init)(jax.random.PRNGKey(0), x)
    _, stats = jax.jit(lambda v, images: net.apply(v, images, mutable=["norm_stats"]))(variables, x)
    fn = jax.jit(lambda images: net.apply({**variables, **stats}, images))
    concrete, _ = lower(fn, [("image", (1, 28, 28, 1))], ["features"])
    np.testing.assert_allclose(run_lowered(concrete, x[:1])[0], fn(x[:1]), atol=LOWERED, rtol=0)
    ops = graph_ops(concrete)
    assert {"Conv2D", "MaxPool"} <= ops and not ops & {"MatMul", "ConcatV2", "BatchMatMulV2"}


# --- a trained classifier, exported every way ---

@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("bridges"), "train.steps=3", "eval.curve_episodes=2",
                         name="protonet")
    return train(config, progress=False)


@pytest.fixture(scope="session")
def classifier(run_dir):
    return build_model(run_dir)


@pytest.fixture(scope="session")
def exported(classifier, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    paths = {"savedmodel": to_savedmodel(classifier, root / "savedmodel")}
    for precision in ("fp32", "fp16"):
        paths[precision] = root / f"{precision}.mlpackage"
        to_coreml(classifier, paths[precision], precision, image_input=True)
    return paths


def inputs(classifier):
    """Real held-out Omniglot queries, and random images."""
    real = classifier.examples[0][:6]
    noise = np.random.default_rng(2).random(real.shape).astype(np.float32)
    return {"real": real, "random": noise}


def test_jax_savedmodel_and_lowered_graph_agree(classifier, exported):
    concrete, _ = lower(classifier, [("image", (1, 28, 28, 1))], classifier.outputs)
    assert "XlaCallModule" not in graph_ops(concrete)
    for kind, x in inputs(classifier).items():
        want = np.asarray(classifier(x)[0])
        saved = run_savedmodel(exported["savedmodel"], {"image": x})["class_probabilities"]
        lowered = np.concatenate([run_lowered(concrete, x[i:i + 1])[0] for i in range(len(x))])
        for name, got in (("savedmodel", saved), ("lowered", lowered)):
            assert np.abs(got - want).max() <= LOWERED, (kind, name)
        assert np.abs(saved - lowered).max() <= LOWERED, kind


def test_savedmodel_batch_is_polymorphic(classifier, exported):
    for batch in (1, 4):
        x = classifier.examples[0][:batch]
        out = run_savedmodel(exported["savedmodel"], {"image": x})["class_probabilities"]
        assert out.shape == (batch, len(classifier.class_labels))


def test_ml_program_audit(classifier, exported):
    for precision in ("fp32", "fp16"):
        found = audit(exported[precision])
        assert "XlaCallModule" not in found.ops and found.unknown == []
        assert {"conv", "max_pool"} <= set(found.ops)
        assert found.inputs == {"image": ("image(GRAYSCALE)", (28, 28))}
        assert found.outputs == {"class_probabilities": ("array(FLOAT32)", (1, len(classifier.class_labels)))}
        assert json.loads(found.metadata["class_labels"]) == classifier.class_labels
        assert found.metadata["method"] == "protonet" and found.metadata["precision"] == precision
        assert "method: protonet" in found.metadata["training_config"] and "MIT" in found.metadata["licence"]
    spec = ct.utils.load_spec(str(exported["fp32"]))
    assert "protonet" in spec.description.metadata.shortDescription


def test_numpy_evaluator_matches_jax_from_the_saved_package(classifier, exported):
    for kind, x in inputs(classifier).items():
        pixels = np.round((1 - x) * 255)  # what an app feeds: 8-bit grey levels, strokes dark
        reference = np.asarray(classifier(np.float32(-1 / 255) * pixels.astype(np.float32) + 1)[0])
        for precision, tolerance in (("fp32", FP32), ("fp16", FP16)):
            program = Program(exported[precision])
            got = np.concatenate([program(image=pixels[i:i + 1])["class_probabilities"] for i in range(len(x))])
            assert np.abs(got - reference).max() <= tolerance, (kind, precision)


def test_evaluator_parity_is_not_vacuous(classifier, exported):
    """A wrong weight in the package must show up as a parity failure."""
    x = classifier.examples[0][:2]
    program = Program(exported["fp32"])
    good = program(image=np.round((1 - x[:1]) * 255))["class_probabilities"]
    read = program._value
    program._value = lambda value: read(value) * 1.05 if value.WhichOneof("value") == "blobFileValue" else read(value)
    bad = program(image=np.round((1 - x[:1]) * 255))["class_probabilities"]
    assert np.abs(bad - good).max() > FP32


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML's runtime (MLModel.predict) exists only on macOS; "
                    "elsewhere the saved package is checked by the numpy MIL evaluator")
def test_coreml_predict_matches_jax(classifier, exported):
    model = ct.models.MLModel(str(exported["fp32"]))
    x = classifier.examples[0][:1]
    image = Image.fromarray(np.round((1 - x[0, ..., 0]) * 255).astype(np.uint8), "L")
    got = model.predict({"image": image})["class_probabilities"]
    want = np.asarray(classifier(np.float32(-1 / 255) * np.round((1 - x) * 255).astype(np.float32) + 1)[0])
    assert np.abs(got - want).max() <= FP32


@pytest.mark.slow
def test_embedding_model_exports(run_dir, tmp_path):
    report = export_run(run_dir, "coreml", model="embedding", out=tmp_path / "e.mlpackage")
    assert report["model"] == "embedding" and report["outputs"] == ["embedding"]
    assert report["parity"]["coreml_vs_jax"] <= FP32 and report["parity"]["lowered_tf_vs_jax"] <= LOWERED
    assert audit(tmp_path / "e.mlpackage").inputs == {"image": ("array(FLOAT32)", (1, 28, 28, 1))}
    saved = export_run(run_dir, "savedmodel", model="embedding", out=tmp_path / "e_savedmodel")
    assert saved["parity"]["savedmodel_vs_jax"] <= LOWERED


# --- the CLI and bad input ---

@pytest.mark.slow
def test_cli_export_prints_report_and_refuses_to_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "model.mlpackage"
    args = ["export", "--run", str(run_dir), "--format", "coreml", "--precision", "fp16", "--image-input",
            "--out", str(out)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["output"] == str(out) and out.is_dir() and report["size_mb"] > 0
    assert audit(out).inputs == {"image": ("image(GRAYSCALE)", (28, 28))}
    assert report["mil_ops"] > 5 and report["parity"]["coreml_vs_jax"] <= FP16
    assert report["parity"]["lowered_tf_vs_jax"] <= LOWERED and 0 < report["seconds"] < 60
    assert main(args) == 1
    assert f"output {out} already exists; pass --force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0


@pytest.mark.slow
def test_savedmodel_cli_export(run_dir, tmp_path, capsys):
    out = tmp_path / "sm"
    assert main(["export", "--run", str(run_dir), "--format", "savedmodel", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["parity"]["savedmodel_vs_jax"] <= LOWERED and (out / "saved_model.pb").is_file()


def test_export_never_replaces_the_run_and_a_failed_one_keeps_the_old_output(run_dir, tmp_path, monkeypatch):
    import shutil

    import bridges.export

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for out in (run, run / "checkpoints", run / "checkpoints" / "x", run / "config.yaml", run / "curves.png",
                run / "export", tmp_path):
        with pytest.raises(ExportError, match="would replace the run"):
            export_run(run, "savedmodel", out=out, force=True)
    assert (run / "config.yaml").is_file() and any((run / "checkpoints").iterdir()) and (run / "curves.png").is_file()
    (tmp_path / "a_file").write_text("kept")
    for fmt, out, message in [("coreml", tmp_path / "Classifier", "a Core ML model is a directory named .mlpackage"),
                              ("coreml", tmp_path / "Classifier.v2", r"\(--out Classifier.v2.mlpackage\)"),
                              ("savedmodel", tmp_path / "a_file" / "model", "a_file is a file, not a directory")]:
        with pytest.raises(ExportError, match=message):
            export_run(run, fmt, out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "run"]
    for bad, message in [({"fmt": "coreml", "target": "iOS13"}, "unknown minimum deployment target 'iOS13'"),
                         ({"fmt": "coreml", "target": "real"}, "known: .*'iOS15'"),
                         ({"fmt": "savedmodel", "target": "iOS16"}, "apply to Core ML")]:
        with pytest.raises(ExportError, match=message):
            export_run(run, out=tmp_path / "x", **bad)
    kept = tmp_path / "kept_savedmodel"
    kept.mkdir()
    (kept / "note").write_text("an earlier export")

    def failing_parity(*args, **kwargs):
        raise ExportError("parity failed")

    monkeypatch.setattr(bridges.export, "parity", failing_parity)
    with pytest.raises(ExportError, match="parity failed"):
        export_run(run, "savedmodel", out=kept, force=True)
    assert (kept / "note").read_text() == "an earlier export" and not (tmp_path / ".partial-kept_savedmodel").exists()
    monkeypatch.undo()
    assert export_run(run, "savedmodel", out=kept, force=True)["output"] == str(kept)
    assert (kept / "saved_model.pb").is_file() and not (kept / "note").exists()


def test_run_without_checkpoint_is_refused(run_dir, tmp_path):
    empty = tmp_path / "untrained"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with pytest.raises(DataError, match=rf"run {empty} has no checkpoint"):
        export_run(empty, "coreml", out=tmp_path / "x.mlpackage")
    with pytest.raises(DataError, match="is not a run directory"):
        export_run(tmp_path / "nowhere", "coreml")


def write_support(root, size, classes=("a", "b"), per_class=2):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((size, size), 255, np.uint8)
            pixels[4 + i: 10 + i, 3:20] = 0
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def test_support_directory_is_baked_in(run_dir, tmp_path):
    model = build_model(run_dir, support=write_support(tmp_path / "support", 28))
    assert model.class_labels == ["a", "b"] and model.params["prototypes"].shape[0] == 2
    probabilities = np.asarray(model(model.examples[0])[0])
    assert probabilities.shape == (4, 2) and np.allclose(probabilities.sum(-1), 1, atol=1e-5)


def test_a_transparent_support_image_is_named(run_dir, tmp_path):
    """Its transparent background is black underneath: read as strokes, it would fill the whole image."""
    support = write_support(tmp_path / "support", 28)
    pixels = np.zeros((28, 28, 4), np.uint8)
    pixels[4:10, 3:20, 3] = 255  # black strokes, the rest transparent
    Image.fromarray(pixels, "RGBA").save(support / "a" / "0.png")
    with pytest.raises(DataError, match=r"support image .*a/0\.png has transparent pixels \(mode RGBA\)"):
        build_model(run_dir, support=support)


def test_meta_learners_export_their_embedding_network(tmp_path):
    """The MAML family keeps its backbone under params['model']: the embedding export takes it from there."""
    from bridges.export import load_run

    run = train(load_config(None, ["method=metasgd", "episode.ways=5", "episode.queries=2", "episode.tasks=1",
                                   "backbone_options={width: 8}", "method_options={inner_steps: 1, test_inner_steps: 1}",
                                   "train.steps=1", "eval.every=1", "eval.curve_episodes=1", f"out={tmp_path / 'm'}"]),
                progress=False)
    with pytest.raises(ExportError, match="--model embedding"):
        build_model(run)
    model = build_model(run, model="embedding")
    trained = load_run(run)[2]["model"]["backbone"]
    assert jax.tree.all(jax.tree.map(np.array_equal, model.params["backbone"], trained))
    assert model(model.examples[0])[0].shape == (len(model.examples[0]), 8)


def test_support_with_wrong_image_size_names_the_file(run_dir, tmp_path):
    support = write_support(tmp_path / "support", 32)
    with pytest.raises(DataError, match=r"support image .*a/0\.png is 32x32 but the model takes 28x28"):
        build_model(run_dir, support=support)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has 0 class folder"):
        build_model(run_dir, support=tmp_path / "empty")
    import shutil
    shutil.rmtree(support / "b")  # one class: a classifier that would answer 1.0 whatever it is shown
    with pytest.raises(DataError, match="has 1 class folder.*needs at least two"):
        build_model(run_dir, support=support)


def test_parity_reports_every_format(classifier, exported):
    figures = parity(classifier, exported["fp32"], "coreml", image_input=True)
    assert set(figures) == {"lowered_tf_vs_jax", "coreml_vs_jax"} and all(v <= FP32 for v in figures.values())


@pytest.mark.parametrize("method, options", [("protonet", {}), ("protonet", {"distance": "cosine"}),
                                             ("matching", {"scale": 10.0})])
def test_exported_classifier_is_the_learners_prediction(method, options):
    """With the BatchNorm statistics of support and queries together (what the learner uses), the
    exported classifier's probabilities are the softmax of the learner's own query scores."""
    import dataclasses

    from bridges.models import Support, classifier_model
    from fsl_jax.data import EpisodeSampler
    from fsl_jax.data.omniglot import CharacterSet
    from fsl_jax.learner import first_task
    from fsl_jax.methods import make_learner

    rng = np.random.default_rng(3)
    chars = CharacterSet(rng.random((6, 20, 28, 28)).astype(np.float32), ("x",) * 6, tuple(f"c{i}" for i in range(6)))
    task = first_task(EpisodeSampler(chars, 3, 2, 2, seed=0).sample(0))
    config = load_config(None, [f"method={method}", f"method_options={json.dumps(options)}",
                                "backbone_options={width: 8}"])
    learner = make_learner(config, num_train_classes=6)
    params = jax.jit(learner.init)(jax.random.PRNGKey(0), task)
    support = Support(task.support_x, task.support_y, ["p", "q", "r"], task.query_x, "test",
                      statistics=np.concatenate([task.support_x, task.query_x]))
    model = classifier_model(config, params, support, {})
    scores = jax.jit(learner.task_predict)(params, task, jax.random.PRNGKey(0))
    want = np.exp(scores) if method == "matching" else jax.nn.softmax(scores, -1)  # matching predicts log-probabilities
    np.testing.assert_allclose(model(task.query_x)[0], want, atol=1e-5, rtol=0)
    assert dataclasses.replace(support, statistics=None).norm_images is support.images


@pytest.mark.slow
def test_numpy_evaluator_covers_the_unet_like_layers(tmp_path):
    """Transposed, dilated, grouped and depthwise convolutions, both resizes and both poolings
    through Core ML and back through the numpy evaluator."""
    from bridges.models import Exportable, Input

    module = UNetLike()
    params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.ones((1, 16, 16, 4)))
    model = Exportable("test", lambda p, x: module.apply(p, x), params, [Input("x", (16, 16, 4))],
                       ["features", "scores"], "U-Net-like test model", {}, ())
    x = np.random.default_rng(4).standard_normal((1, 16, 16, 4)).astype(np.float32)
    to_coreml(model, tmp_path / "u.mlpackage")
    found = audit(tmp_path / "u.mlpackage")
    assert {"conv", "conv_transpose", "max_pool", "avg_pool"} <= set(found.ops) and found.unknown == []
    got = Program(tmp_path / "u.mlpackage")(x=x)
    for name, want in zip(model.outputs, model(x)):
        assert np.abs(got[name] - np.asarray(want)).max() <= FP32, name


def test_unexportable_requests_are_refused(run_dir, tmp_path):
    from bridges.models import classifier_model

    config = load_config(None, ["method=relation"])
    with pytest.raises(ExportError, match=r"method is 'relation'.*--model embedding"):
        classifier_model(config, {}, None, {})
    with pytest.raises(ExportError, match="unknown minimum deployment target 'iOS99'"):
        export_run(run_dir, "coreml", target="iOS99", out=tmp_path / "t.mlpackage")
    with pytest.raises(ExportError, match="SavedModel is exported in float32"):
        export_run(run_dir, "savedmodel", precision="fp16", out=tmp_path / "t")


def test_export_drops_the_start_up_noise_of_native_code_only(capfd):
    """TensorFlow's pre-logging start-up lines (and coremltools' on Linux) go to file descriptor 2 directly;
    they are dropped, every other line is passed on, even when the export fails."""
    import os

    from bridges.cli import start_up_noise_dropped

    noise = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
             "I0000 00:00:1 port.cc:153] oneDNN custom operations are on. You may see slightly different results\n"
             "I0000 00:00:1 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.\n"
             "Failed to load _MLModelProxy: No module named 'coremltools.libcoremlpython'\n")
    with pytest.raises(RuntimeError, match="export failed"):
        with start_up_noise_dropped():
            os.write(2, (noise + "E0000 real native error\n").encode())
            print("a Python warning", file=sys.stderr)
            raise RuntimeError("export failed")
    assert sorted(capfd.readouterr().err.splitlines()) == ["E0000 real native error", "a Python warning"]
