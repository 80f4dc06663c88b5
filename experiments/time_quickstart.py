"""Reproduce the README's quick-start figures: the README's commands timed in a fresh clone.

    python experiments/time_quickstart.py   # about 15 minutes on a 2-core CPU

Clones the committed HEAD (uncommitted changes are not in it) into an empty folder and runs
``make install``, ``make demo`` and ``make test`` there one after the other, as a new user would,
timing each and keeping what they print. The data is the data this checkout finds (``--data-dir``,
``$FSL_JAX_DATA``, ``../shared/data``), passed on as ``FSL_JAX_DATA``. ``make install`` downloads
from PyPI unless pip's cache holds the wheels already, so its time says more about the network
than about the project. A command that fails stops the script with its output's tail, and no
table is written. Writes experiments/results/quickstart.json (times, test counts, the demo's
JSON lines) and experiments/results/quickstart.md (the README's table).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine

from fsl_jax.data.omniglot import data_root

COMMANDS = ("install", "demo", "test")
PYTEST_SUMMARY = re.compile(r"^=*\s*(?P<counts>\d+ passed.*?) in [\d.]+s", re.M)


def run(target: str, checkout: Path, env: dict) -> tuple[float, str]:
    """``make target`` in ``checkout``: (minutes, stdout and stderr); exits on failure."""
    start = time.perf_counter()
    done = subprocess.run(["make", target], cwd=checkout, env=env, capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    output = done.stdout + done.stderr
    (checkout / f"make_{target}.log").write_text(output)
    if done.returncode:
        sys.exit(f"make {target} failed (exit {done.returncode}) after {minutes:.1f} minutes; "
                 f"its output ends:\n{output[-3000:]}")
    return minutes, output


def json_lines(output: str) -> list[dict]:
    """The JSON objects ``fsl-jax`` printed, one per line."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{") and line.endswith("}")]


def demo_results(lines: list[dict]) -> str:
    """What the demo's JSON lines report, in words: training times, scores, the export's parity."""
    said = []
    for line in lines:
        if "checkpoints" in line:
            said.append(f"`{line['run']}` trained in {line['seconds'] / 60:.1f} min")
        elif "accuracy" in line:
            said.append(f"{line['ways']}-way {line['shots']}-shot accuracy {line['accuracy']:.1%} "
                        f"± {line['ci95']:.1%} ({line['episodes']} episodes)")
        elif "iou_by_distractors" in line:
            said.append("IoU " + ", ".join(f"{iou:.3f} with {level}" for level, iou in line["iou_by_distractors"].items())
                        + f" distractors ({line['episodes']} episodes)")
        elif "parity" in line:
            said.append(f"`{line['output']}` ({line['size_mb']:.1f} MB), largest difference from JAX "
                        f"{max(line['parity'].values()):.1e}")
    return "; ".join(said)


def table(record: dict) -> str:
    rows = [f"| `make {name}` | {record[name]['minutes']:.1f} | {record[name]['result'] or '-'} |" for name in COMMANDS]
    return (f"Fresh clone of {record['commit'][:7]} on {record['machine']}, Python {record['python']}, "
            f"{record['date']}; made by `python experiments/time_quickstart.py`. `make install` is mostly "
            "fetching and unpacking wheels (from PyPI, or pip's cache where it holds them), so its "
            "time depends on the network; `make demo` and `make test` reuse the `.venv` it made.\n\n"
            "| command | minutes | result |\n|---|---|---|\n" + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="data root (else $FSL_JAX_DATA, else ../shared/data)")
    parser.add_argument("--keep", type=Path, help="clone into this new folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    env = {**os.environ, "FSL_JAX_DATA": str(data_root(args.data_dir).resolve())}
    for variable in ("VIRTUAL_ENV", "PYTHONPATH"):  # the clone installs and runs in its own .venv
        env.pop(variable, None)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout:
        print(f"note: uncommitted changes are not timed; the clone is of {commit[:7]}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        checkout = args.keep or Path(scratch) / "fsl_jax"
        if checkout.exists():
            sys.exit(f"--keep {checkout} exists; give a new folder")
        subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(checkout)], check=True)
        record = {"commit": commit, "machine": machine(), "python": sys.version.split()[0],
                  "date": time.strftime("%Y-%m-%d")}
        for name in COMMANDS:
            minutes, output = run(name, checkout, env)
            record[name] = {"minutes": round(minutes, 1), "result": ""}
            print(f"make {name}: {record[name]['minutes']} minutes", file=sys.stderr)
            if name == "demo":
                record[name]["json_lines"] = json_lines(output)
                record[name]["result"] = demo_results(record[name]["json_lines"])
            elif name == "test":
                summary = PYTEST_SUMMARY.search(output)
                if summary is None:
                    sys.exit(f"make test passed but printed no pytest summary; its output ends:\n{output[-3000:]}")
                record[name]["result"] = summary["counts"]
    results = ROOT / "experiments" / "results"
    (results / "quickstart.json").write_text(json.dumps(record, indent=1) + "\n")
    (results / "quickstart.md").write_text(table(record))
    print(table(record))


if __name__ == "__main__":
    main()
