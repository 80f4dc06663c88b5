"""Reproduce the README's Omniglot table: train each config, evaluate it on held-out alphabets.

    python experiments/omniglot_table.py                      # every experiments/omniglot/*.yaml
    python experiments/omniglot_table.py protonet_20way_1shot  # some of them

For each config: train it (resuming a finished or interrupted run in runs/table/), then
1000 episodes per ``eval.settings`` entry ([ways, shots]) on the held-out alphabets (mean and
95% CI), and Lake-style 20-way within-alphabet one-shot runs built from the held-out alphabets.
Writes experiments/results/omniglot.json (one record per config, merged with earlier ones) and
experiments/results/omniglot.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import chosen_configs, device, train_run
from fsl_jax.config import load_config
from fsl_jax.data.lake_runs import read_runs, write_runs
from fsl_jax.data.omniglot import load_omniglot, split
from fsl_jax.tasks import lake_run_accuracies

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "omniglot.json"


def run_config(path: Path, episodes: int, lake_runs) -> dict:
    experiment, params, result = train_run(path, f"runs/table/{path.stem}", RESULTS)
    config = experiment.config
    settings = config["eval"]["settings"] or [[config["episode"]["ways"], config["episode"]["shots"]]]
    result["eval"] = {}
    for ways, shots in settings:
        sampler = experiment.eval_sampler(ways=ways, shots=shots)
        result["eval"][f"{ways}way_{shots}shot"] = experiment.evaluate(params, sampler, episodes, progress=False)
        print(path.stem, ways, shots, result["eval"][f"{ways}way_{shots}shot"], flush=True)
    if lake_runs and any(w == 20 and s == 1 for w, s in settings):
        result["lake_20way_within_alphabet"] = {"runs": len(lake_runs), "accuracy": float(np.mean(lake_run_accuracies(experiment.learner, params, lake_runs)))}
    return result


def markdown(results: dict) -> str:
    """The table of ``results``, each row with the machine and code that trained it: rows of earlier
    runs are kept, so they need not share one."""
    cell = lambda e: f"{100 * e['accuracy']:.1f} ± {100 * e['ci95']:.1f}" if e else "–"
    episodes = sorted({e["episodes"] for r in results.values() for e in r["eval"].values()})
    lines = [f"Omniglot, held-out alphabets {', '.join(load_config(None)['data']['test_alphabets'])}; accuracy % "
             f"± 95% CI over {' or '.join(map(str, episodes))} episodes (5 queries per class).", "",
             "| config | trained on | steps | minutes | device, code | train episodes/s | sampler episodes/s | 5-way 1-shot | 5-way 5-shot | 20-way 1-shot | Lake-style 20-way runs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(results.items()):
        ep = r["train_episode"]
        lake = r.get("lake_20way_within_alphabet")
        lines.append(
            f"| `{r['config']}` | {ep['ways']}-way {ep['shots']}-shot, {ep['queries']} queries/class | {r['steps']} | {r['train_minutes']} | "
            f"{device(r)} | {r['train_episodes_per_s']} | {r['sampler_episodes_per_s']:.0f} | "
            + " | ".join(cell(r["eval"].get(k)) for k in ("5way_1shot", "5way_5shot", "20way_1shot"))
            + (f" | {100 * lake['accuracy']:.1f} ({lake['runs']} runs) |" if lake else " | – |"))
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help="config stems (default: all in experiments/omniglot)")
    parser.add_argument("--episodes", type=int, default=1000)
    args = parser.parse_args()
    paths = chosen_configs(parser, sorted((HERE / "omniglot").glob("*.yaml")), args.configs)
    _, held_out = split(load_omniglot(image_size=105))
    with tempfile.TemporaryDirectory() as tmp:
        lake_runs = read_runs(write_runs(held_out, tmp, runs=20, seed=0), image_size=28)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for path in paths:
        results[path.stem] = run_config(path, args.episodes, lake_runs)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    (HERE / "results" / "omniglot.md").write_text(markdown(results))
    print((HERE / "results" / "omniglot.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
