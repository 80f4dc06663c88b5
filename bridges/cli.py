"""``fsl-jax export``: a trained run to a TensorFlow SavedModel or a Core ML ``.mlpackage``."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

# coremltools logs at import that the pinned TensorFlow and Torch are newer than the versions it was tested
# with; its other messages stay.
logging.getLogger("coremltools").addFilter(lambda record: "has not been tested with coremltools" not in
                                           record.getMessage())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bridges.export import FORMATS, MODELS

    parser.add_argument("--run", required=True, type=Path, help="a run directory (config.yaml and checkpoints/)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="Core ML compute precision")
    parser.add_argument("--support", type=Path,
                        help="support set to bake in (classifiers: DIR/<class>/*.png; segmenters: DIR/<n>.jpg with "
                             "DIR/<n>.png masks); default: the run's first held-out episode")
    parser.add_argument("--out", type=Path, help="output path (default: RUN/export/<model>.mlpackage or _savedmodel)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--model", choices=MODELS, default="auto",
                        help="auto: the complete model of the run's method; embedding: the embedding network only")
    parser.add_argument("--target", help="Core ML minimum deployment target (default iOS16), e.g. iOS17, macOS13")
    parser.add_argument("--image-input", action="store_true",
                        help="Core ML inputs as images (8-bit pixels; the normalisation becomes Core ML's scale and "
                             "bias) instead of float arrays normalised as in training")


def cmd_export(args) -> dict:
    from bridges.export import export_run

    return export_run(args.run, args.format, args.precision, args.support, args.out, args.force, args.model,
                      args.target, args.image_input, args.data_dir)
