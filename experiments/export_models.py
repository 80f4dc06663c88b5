"""Export one run of every exported family to Core ML (fp32, fp16) and SavedModel; write
``experiments/results/export.md`` with sizes, MIL operation counts, parity figures and times.

    .venv/bin/python experiments/export_models.py [--runs-dir runs/export] [--steps 20]

A family's run is ``RUNS_DIR/<family>`` (trained here for ``--steps`` steps, an interrupted one
finished, a complete one reused, one of other steps refused; pass a longer-trained run directory
with ``--run family=DIR``). Exports go
to ``RUNS_DIR/exports/``. Parity is the largest absolute difference from JAX on
held-out inputs (Core ML: the saved package run by the numpy MIL evaluator on 8-bit inputs).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bridges.export import export_run
from common import commit, machine
from fsl_jax.config import load_config
from fsl_jax.train import train

FAMILIES = {  # family -> (model option, config overrides of a short run)
    "classifier": ("auto", ["method=protonet", "episode.ways=20", "episode.queries=5"]),
    "embedding": ("embedding", ["method=protonet", "episode.ways=20", "episode.queries=5"]),
    "prototype_segmenter": ("auto", ["data.name=omniglot_seg", "method=prototype_segmenter",
                                     "backbone_options={pooled_blocks: 2}"]),
    "siamese_unet": ("auto", ["data.name=cluttered_omniglot", "method=siamese_unet"]),
    "maml_segmenter": ("auto", ["data.name=omniglot_seg", "method=maml_segmenter"]),
}
EXPORTS = (("coreml", "fp32"), ("coreml", "fp16"), ("savedmodel", "fp32"))


def ensure_run(directory: Path, overrides: list[str], steps: int) -> Path:
    """Train (or finish, or reuse if complete) the run; one of another config or --steps is refused by train()."""
    every = max(steps // 2, 1)
    config = load_config(None, overrides + [f"train.steps={steps}", f"train.log_every={every}",
                                            f"train.checkpoint_every={every}", f"eval.every={steps}",
                                            "eval.curve_episodes=10", f"out={directory}"])
    return train(config, progress=False)


def table(rows: list[dict]) -> str:
    lines = ["| family | format | precision | inputs | size (MB) | MIL ops | parity (max abs diff from JAX) | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        inputs = ", ".join(f"{k} {'x'.join(map(str, v[1:]))}" for k, v in r["inputs"].items())
        parity = ", ".join(f"{k.replace('_vs_jax', '')} {v:.1e}" for k, v in r["parity"].items())
        lines.append(f"| {r['family']} | {r['format']} | {r['precision']} | {inputs} | {r['size_mb']:.2f} | "
                     f"{r.get('mil_ops', '-')} | {parity} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/export"))
    parser.add_argument("--steps", type=int, default=20, help="training steps of runs made here")
    parser.add_argument("--run", action="append", default=[], metavar="FAMILY=DIR", help="use this run for a family")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--out", type=Path, default=Path("experiments/results/export.md"))
    args = parser.parse_args()
    given = dict(item.split("=", 1) for item in args.run)
    rows = []
    for family in args.families:
        model, overrides = FAMILIES[family]
        run_dir = Path(given[family]) if family in given else ensure_run(
            args.runs_dir / ("classifier" if family == "embedding" else family), overrides, args.steps)
        for fmt, precision in EXPORTS:
            report = export_run(run_dir, fmt, precision, model=model, force=True, image_input=fmt == "coreml",
                                out=args.runs_dir / "exports" / f"{family}_{precision}.{'mlpackage' if fmt == 'coreml' else 'savedmodel'}")
            rows.append({"family": family, "run": str(run_dir), **report})
            print(json.dumps(rows[-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = ", ".join(sorted({f"`{r['run']}`" for r in rows}))
    args.out.write_text(
        "# Export: JAX -> TensorFlow SavedModel and Core ML ML Program\n\n"
        f"Produced by `experiments/export_models.py` on {time.strftime('%Y-%m-%d')} with the code at {commit()}, on "
        f"{machine()}. Runs: {runs}; those made here trained for {args.steps} steps.\n\n"
        "Parity: largest absolute difference from the JAX model on held-out inputs. `lowered_tf`: the "
        "TensorFlow graph of standard ops that Core ML is converted from; `coreml`: the saved `.mlpackage` "
        "itself, run by the numpy MIL evaluator (`bridges/mil.py`) on 8-bit image inputs, since Core ML's "
        "runtime is macOS-only; `savedmodel`: jax2tf's SavedModel. Targets: 1e-5 (lowered graph, SavedModel), "
        "1e-4 (Core ML fp32), 1e-2 (Core ML fp16). Seconds: the whole export (loading the run, converting, "
        "checking), on the machine above.\n\n" + table(rows) + "\n")
    print(json.dumps({"written": str(args.out)}))


if __name__ == "__main__":
    main()
