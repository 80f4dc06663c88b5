"""Export a trained run: build the model, write it, check it against JAX, report.

:func:`export_run` is what ``fsl-jax export`` runs. The report gives the output's path and
size, the number of MIL operations (Core ML), and the parity figures: the largest absolute
difference from JAX of the lowered TensorFlow graph, of the SavedModel, and of the saved
``.mlpackage`` run by the numpy MIL evaluator (on 8-bit-quantised inputs when the model
takes images, since that is what Core ML feeds it).
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np

from bridges.models import Exportable, Support, embedding_model, classifier_model, held_out_support, \
    load_class_folders, run_metadata
from fsl_jax.errors import ExportError
from fsl_jax.outputs import write_replacing

FORMATS = ("savedmodel", "coreml")
MODELS = ("auto", "embedding")
PARITY_EXAMPLES = 4  # Core ML inputs are single images: how many the parity checks run


def load_run(run: str | Path, data_dir: str | None = None):
    """(config, experiment, params, step) of a trained run; clear errors for a missing run or checkpoint."""
    from fsl_jax.config import run_config
    from fsl_jax.train import Experiment, restore_params

    run = Path(run)
    config = run_config(run, data_dir)
    experiment = Experiment(config)
    return config, experiment, *restore_params(run, experiment)


def build_model(run: str | Path, support: str | Path | None = None, model: str = "auto",
                data_dir: str | None = None) -> Exportable:
    """The exportable a run gives: for classification, a classifier with the support set baked in
    (``model="auto"``) or its embedding network; for segmentation, the method's segmenter. The
    support set is ``support`` (a directory) or the run's first held-out episode."""
    if model not in MODELS:
        raise ExportError(f"model must be one of {MODELS}, got {model!r}")
    config, experiment, params, step = load_run(run, data_dir)
    metadata = run_metadata(config, Path(run), step)
    if config["data"]["name"] != "omniglot":
        from bridges.segmenters import segmenter_model

        if model != "auto":
            raise ExportError(f"--model {model} applies to classifiers; {run} is a segmentation run")
        return segmenter_model(config, experiment, params, metadata, support)
    image_size = config["data"]["image_size"]
    chosen: Support = load_class_folders(Path(support), image_size) if support else held_out_support(experiment)
    if model == "embedding":
        return embedding_model(config, params, chosen, metadata)
    return classifier_model(config, params, chosen, metadata)


def _quantise(model: Exportable, examples: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(8-bit pixels, the model inputs Core ML makes of them: scale * p + bias in float32)."""
    pixels, inputs = [], []
    for spec, x in zip(model.inputs, examples):
        bias = np.asarray(spec.bias, np.float32)
        p = np.clip(np.round((x - bias) / spec.scale), 0, 255).astype(np.float32)
        pixels.append(p)
        inputs.append(np.float32(spec.scale) * p + bias)
    return pixels, inputs


def parity(model: Exportable, path: Path, fmt: str, image_input: bool = False, graph=None) -> dict[str, float]:
    """Largest absolute differences from JAX of what was written at ``path`` (and of the lowered
    graph, ``graph`` if given, else lowered here)."""
    import tensorflow as tf

    from bridges.lower import lower

    examples = [x[:PARITY_EXAMPLES] for x in model.examples]
    expected = [np.asarray(o) for o in model(*examples)]
    diff = lambda got, want: float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    if fmt == "savedmodel":
        from bridges.savedmodel import run_savedmodel

        got = run_savedmodel(path, {i.name: x for i, x in zip(model.inputs, examples)})
        return {"savedmodel_vs_jax": max(diff(got[n], e) for n, e in zip(model.outputs, expected))}
    from bridges.mil import Program

    if graph is None:
        graph, _ = lower(model.one, [(i.name, (1, *i.shape)) for i in model.inputs], model.outputs)
    lowered = [np.concatenate(o) for o in zip(*[graph(*[tf.constant(x[j:j + 1]) for x in examples])
                                               for j in range(len(examples[0]))])]
    pixels, quantised = _quantise(model, examples) if image_input else (examples, examples)
    reference = [np.asarray(o) for o in model(*quantised)]
    program = Program(path)
    runs = [program(**{i.name: x[j:j + 1] for i, x in zip(model.inputs, pixels)}) for j in range(len(pixels[0]))]
    return {"lowered_tf_vs_jax": max(diff(g, e) for g, e in zip(lowered, expected)),
            "coreml_vs_jax": max(diff(np.concatenate([r[n] for r in runs]), e) for n, e in zip(model.outputs, reference))}


def default_out(run: Path, model: Exportable, fmt: str, precision: str) -> Path:
    suffix = ".mlpackage" if fmt == "coreml" else "_savedmodel"
    return Path(run) / "export" / f"{model.kind}{'_fp16' if precision == 'fp16' else ''}{suffix}"


def directory_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 3)


def export_run(run: str | Path, fmt: str, precision: str = "fp32", support: str | Path | None = None,
               out: str | Path | None = None, force: bool = False, model: str = "auto",
               target: str | None = None, image_input: bool = False, data_dir: str | None = None) -> dict:
    """Export a run as a SavedModel or a Core ML ``.mlpackage``; returns the report (see module doc)."""
    start = time.perf_counter()
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    needed = ("tensorflow", "coremltools") if fmt == "coreml" else ("tensorflow",)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"exporting to {fmt} needs {' and '.join(missing)}: pip install 'fsl_jax[export]'")
    if fmt == "savedmodel" and precision != "fp32":
        raise ExportError("a SavedModel is exported in float32; --precision applies to Core ML")
    if fmt == "coreml":
        from bridges.coreml import DEFAULT_TARGET, deployment_target

        target = target or DEFAULT_TARGET
        deployment_target(target)
    elif target is not None or image_input:
        raise ExportError("--target and --image-input apply to Core ML, not to a SavedModel")
    if out is not None:
        _check_out(Path(out), Path(run), force, fmt)
    exportable = build_model(run, support, model, data_dir)
    path = Path(out) if out is not None else default_out(Path(run), exportable, fmt, precision)
    if out is None:
        _check_out(path, Path(run), force, fmt)
    report = {"output": str(path), "format": fmt, "model": exportable.kind, "precision": precision,
              "inputs": {i.name: [1, *i.shape] for i in exportable.inputs}, "outputs": exportable.outputs}

    def write(partial: Path) -> None:
        """Export into ``partial`` and check it: only then does it replace what ``path`` holds."""
        if fmt == "savedmodel":
            from bridges.savedmodel import to_savedmodel

            to_savedmodel(exportable, partial)
        else:
            from bridges.coreml import to_coreml
            from bridges.mil import audit

            _, graph = to_coreml(exportable, partial, precision, target, image_input)
            found = audit(partial)
            if found.unknown:
                raise ExportError(f"{path} holds operations that are not MIL operations: {found.unknown}")
            report["mil_ops"] = found.op_count
            report["mil_op_types"] = {k: v for k, v in sorted(found.ops.items()) if k != "const"}
        report["size_mb"] = directory_mb(partial)
        report["parity"] = parity(exportable, partial, fmt, image_input, graph if fmt == "coreml" else None)

    write_replacing(path, write)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def _check_out(path: Path, run: Path, force: bool, fmt: str) -> None:
    """Refuse an output that would replace the run or its files (inside a run, exports go under its
    ``export/``), one that cannot be written, a Core ML output not named ``.mlpackage``, or an
    existing one unless ``force``."""
    target, run_dir = path.resolve(), run.resolve()
    exports = run_dir / "export"
    if run_dir.is_relative_to(target) or (target.is_relative_to(run_dir) and not target.is_relative_to(exports)) \
            or target == exports:
        raise ExportError(f"output {path} would replace the run {run} itself or its files; choose another --out "
                          f"(inside the run, exports go under {run / 'export'})")
    if fmt == "coreml" and path.suffix != ".mlpackage":
        raise ExportError(f"output {path}: a Core ML model is a directory named .mlpackage (--out {path.name}.mlpackage)")
    blocking = next(p for p in path.parents if p.exists())
    if not blocking.is_dir():
        raise ExportError(f"output {path} cannot be written: {blocking} is a file, not a directory")
    if path.exists() and not force:
        raise ExportError(f"output {path} already exists; pass --force to replace it")

