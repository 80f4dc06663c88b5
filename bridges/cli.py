"""``fsl-jax export``: a trained run to a TensorFlow SavedModel or a Core ML ``.mlpackage``."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

# coremltools logs at import that the pinned TensorFlow and Torch are newer than the versions it was tested
# with; its other messages stay.
logging.getLogger("coremltools").addFilter(lambda record: "has not been tested with coremltools" not in
                                           record.getMessage())

# Lines that TensorFlow's native code writes at start-up, before its logging is set up (so past
# TF_CPP_MIN_LOG_LEVEL), and that coremltools prints where Core ML's runtime does not exist (Linux):
# true of every export, so they say nothing about this one.
START_UP_NOISE = re.compile(r"All log messages before absl::InitializeLog|oneDNN custom operations are on|"
                            r"cudart_stub\.cc.*Could not find cuda drivers|failed call to cuInit|"
                            r"Failed to load _ML\w*Proxy: No module named 'coremltools\.libcoremlpython'")


@contextlib.contextmanager
def start_up_noise_dropped():
    """Hold back what is written to the process's standard error (file descriptor 2, where native code
    writes) during the block, then pass it on without the lines of ``START_UP_NOISE``, whatever happens
    in the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not START_UP_NOISE.search(line)))
            sys.stderr.flush()


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
    with start_up_noise_dropped():
        from bridges.export import export_run

        return export_run(args.run, args.format, args.precision, args.support, args.out, args.force, args.model,
                          args.target, args.image_input, args.data_dir)
