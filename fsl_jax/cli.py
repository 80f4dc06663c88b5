"""``fsl-jax``: train, eval, bench, data and export commands. Results are printed as one JSON line."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from fsl_jax.errors import FslJaxError, Preempted


def cmd_train(args) -> dict:
    from fsl_jax.config import load_config
    from fsl_jax.train import train

    if args.distributed or args.coordinator or args.hosts is not None or args.host is not None:
        _join_hosts(args.coordinator, args.hosts, args.host)
    overrides = list(args.set) + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
    config = load_config(args.config, overrides)
    run_dir = train(config, progress=not args.no_progress)
    return {"run": str(run_dir), "checkpoints": str(run_dir / "checkpoints"),
            "metrics": str(run_dir / "metrics.jsonl"), "curves": str(run_dir / "curves.png")}


def _join_hosts(coordinator: str | None, hosts: int | None, host: int | None) -> None:
    """Join the other hosts of a run (``jax.distributed.initialize``): what is not given is found in
    the cluster's environment (SLURM, Open MPI, Kubernetes, Cloud TPU)."""
    import jax

    from fsl_jax.errors import ConfigError

    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=hosts, process_id=host)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"cannot join the other hosts ({err}); outside SLURM, Open MPI, Kubernetes and Cloud TPU "
                          "give --coordinator HOST:PORT, --hosts and --host") from err


def cmd_eval(args) -> dict:
    from fsl_jax.config import run_config
    from fsl_jax.errors import ConfigError, DataError
    from fsl_jax.train import Experiment, restore_params

    if args.episodes is not None and args.episodes < 1:
        raise ConfigError(f"--episodes must be at least 1, got {args.episodes}")
    fixed_set = "--lake-runs" if args.lake_runs else "--episodes-dir" if args.episodes_dir else None
    sampled = {"--ways": args.ways, "--shots": args.shots, "--queries": args.queries, "--distractors": args.distractors,
               **({"--episodes": args.episodes} if args.lake_runs else {})}
    unused = [flag for flag, value in sampled.items() if value is not None]
    if fixed_set and unused:
        raise ConfigError(f"{', '.join(unused)} shape sampled episodes; {fixed_set} evaluates a fixed set")
    config = run_config(args.run, args.data_dir)
    experiment = Experiment(config)
    if args.picture and experiment.task.picture is None:
        raise ConfigError(f"--picture draws segmentations; {args.run} is a {config['data']['name']} run")
    if args.picture and args.picture.suffix.lower() != ".png":
        raise ConfigError(f"--picture {args.picture}: the picture is a PNG, name it .png")
    if args.episodes_dir and experiment.task.score == "accuracy":
        raise ConfigError(f"--episodes-dir evaluates segmenters; {args.run} is a {config['data']['name']} run")
    params, step = restore_params(Path(args.run), experiment)
    if args.lake_runs:
        from fsl_jax.data.lake_runs import read_runs
        from fsl_jax.tasks import accuracy_ci95, lake_run_accuracies

        if experiment.task.score != "accuracy":
            raise ConfigError(f"--lake-runs scores classifiers; {args.run} is a {config['data']['name']} run")

        runs = read_runs(args.lake_runs, config["data"]["image_size"])
        score = accuracy_ci95(lake_run_accuracies(experiment.learner, params, runs))
        return {"run": str(args.run), "step": step, "protocol": "lake-one-shot", "runs": len(runs),
                **score, "error": 1 - score["accuracy"]}
    if args.episodes_dir:
        from fsl_jax.data.segmentation import FixedEpisodes, load_episodes

        fixed = load_episodes(args.episodes_dir)
        channels = experiment.train_sampler.sample(0).query_x.shape[-1]
        if fixed.query_x.shape[-1] != channels:
            raise DataError(f"{args.episodes_dir} holds {fixed.query_x.shape[-1]}-channel images; {args.run} was "
                            f"trained on {channels}-channel images")
        if args.episodes is not None and args.episodes > fixed.tasks:
            raise ConfigError(f"--episodes {args.episodes} is more than the {fixed.tasks} episodes in {args.episodes_dir}")
        sampler, described, episodes = FixedEpisodes(fixed, 10), {"episodes_dir": str(args.episodes_dir)}, fixed.tasks
    else:
        sampler = experiment.eval_sampler(ways=args.ways, shots=args.shots, queries=args.queries,
                                          distractors=args.distractors)
        described, episodes = experiment.task.describe(sampler), config["eval"]["episodes"]
        levels = described.get("distractors", [])  # they take turns: the last ones would get no episode
        if args.episodes is not None and args.episodes < len(levels):
            raise ConfigError(f"--episodes {args.episodes} is fewer than the {len(levels)} distractor levels {levels}: "
                              "every level needs at least one episode")
    result = {"run": str(args.run), "step": step, **described,
              **experiment.evaluate(params, sampler, episodes if args.episodes is None else args.episodes,
                                   progress=not args.no_progress)}
    if experiment.task.picture is not None:
        picture = experiment.task.picture(experiment.learner, params, sampler, args.picture or Path(args.run) / "eval.png")
        result["picture"] = str(picture)
    return result


def cmd_bench(args) -> dict:
    from fsl_jax.bench import BENCHMARKS

    return BENCHMARKS[args.what](args)


def cmd_data(args) -> dict:
    from fsl_jax.errors import ConfigError

    if args.action == "download":
        from fsl_jax.data.download import download_omniglot

        paths = download_omniglot(args.data_dir)
        return {"downloaded": [str(p) for p in paths]}
    from fsl_jax.data.lake_runs import write_runs
    from fsl_jax.data.omniglot import DEFAULT_TEST_ALPHABETS, load_omniglot, split
    from fsl_jax.outputs import write_replacing

    for name, least in (("runs", 1), ("episodes", 1), ("seed", 0)):  # each where the command has it
        if getattr(args, name, least) < least:
            raise ConfigError(f"--{name} must be at least {least}, got {getattr(args, name)}")
    _, held_out = split(load_omniglot(args.data_dir, 105), args.alphabets or DEFAULT_TEST_ALPHABETS)
    if args.action == "cluttered-sets":
        from fsl_jax.data.cluttered import TEST_DRAWERS, ClutteredOmniglot
        from fsl_jax.data.segmentation import collect, save_episodes

        targets = {level: args.out / f"distractors_{level}" for level in args.distractors}
        for target in targets.values():
            _check_target(target, args.force)
        samplers = {level: ClutteredOmniglot(held_out, (level,), 50, args.seed, TEST_DRAWERS) for level in targets}
        for level, sampler in samplers.items():
            write_replacing(targets[level], lambda d: save_episodes(collect(sampler, args.episodes), d))
        return {"cluttered_sets": {str(k): str(v) for k, v in targets.items()}, "episodes": args.episodes,
                "alphabets": list(args.alphabets or DEFAULT_TEST_ALPHABETS)}
    _check_target(args.out, args.force)
    write_replacing(args.out, lambda d: write_runs(held_out, d, runs=args.runs, seed=args.seed))
    return {"lake_runs": str(args.out)}


def _check_target(path: Path, force: bool) -> None:
    from fsl_jax.errors import DataError

    if path.exists() and not path.is_dir():
        raise DataError(f"{path} is a file, not a directory")
    if path.exists() and not force:
        raise DataError(f"{path} already exists; pass --force to replace it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsl-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a config; writes a run directory")
    train.add_argument("--config", required=True)
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument("--distributed", action="store_true",
                       help="train as one of several hosts (run the same command on each): the coordinator, the "
                            "number of hosts and this host's index come from SLURM, Open MPI, Kubernetes or Cloud "
                            "TPU, or from the three options below (any of which implies --distributed)")
    train.add_argument("--coordinator", metavar="HOST:PORT", help="several hosts: the address host 0 serves on")
    train.add_argument("--hosts", type=int, help="several hosts: how many")
    train.add_argument("--host", type=int, help="several hosts: this one's index, 0 to hosts-1")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a run on held-out classes, Lake's one-shot runs or a fixed set")
    ev.add_argument("--run", required=True, type=Path)
    ev.add_argument("--ways", type=int, help="classes per episode (default: the run's eval.ways, else its training ways)")
    ev.add_argument("--shots", type=int,
                    help="support examples per class (default: the run's eval.shots, else its training shots)")
    ev.add_argument("--queries", type=int, help="query examples per class (default: the run's eval.queries)")
    ev.add_argument("--episodes", type=int,
                    help="episodes to score, at least one per distractor level (default: the run's eval.episodes; "
                         "with --episodes-dir, the whole set)")
    ev.add_argument("--distractors", type=int, nargs="+", help="cluttered scenes: the distractor levels")
    ev.add_argument("--lake-runs", type=Path, help="a directory of runNN folders in Lake's layout")
    ev.add_argument("--episodes-dir", type=Path, help="segmentation: a fixed set of episodes (.npy per field)")
    ev.add_argument("--picture", type=Path, help="segmentation: where to write the PNG (default RUN/eval.png)")
    ev.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="measure speed; prints one JSON line")
    from fsl_jax.bench import add_arguments
    benches = add_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    from fsl_jax.config import TASK_DEFAULTS
    data = sub.add_parser("data", help="get Omniglot, write Lake-style one-shot runs or fixed cluttered test sets")
    action = data.add_subparsers(dest="action", required=True)
    download = action.add_parser("download", help="Lake's Omniglot zips into --data-dir (sha256 checked)")
    download.add_argument("dataset", nargs="?", default="omniglot", choices=["omniglot"])
    lake = action.add_parser("lake-runs", help="20-way within-alphabet one-shot runs in Lake's layout")
    lake.add_argument("--runs", type=int, default=20)
    cluttered = action.add_parser("cluttered-sets", help="fixed cluttered-Omniglot test sets, one per distractor level")
    cluttered.add_argument("--episodes", type=int, default=1000, help="scenes per distractor level")
    levels = TASK_DEFAULTS["cluttered_omniglot"]["eval"]["distractors"]
    cluttered.add_argument("--distractors", type=int, nargs="+", default=levels,
                           help=f"distractor levels, one set each (default {' '.join(map(str, levels))}: "
                                "the published 4, 32 and 256 characters per scene)")
    for command, default in ((lake, "runs/lake_runs"), (cluttered, "runs/cluttered_omniglot")):
        command.add_argument("--out", type=Path, default=Path(default), help=f"where to write (default {default})")
        command.add_argument("--alphabets", nargs="*", help="alphabets to draw from (default: held-out ones)")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--force", action="store_true", help="replace what --out holds")
    data.set_defaults(func=cmd_data)

    export = sub.add_parser("export", help="export a run to a TensorFlow SavedModel or a Core ML .mlpackage")
    from bridges.cli import add_arguments as add_export_arguments, cmd_export
    add_export_arguments(export)
    export.set_defaults(func=cmd_export)

    root = "data root (else $FSL_JAX_DATA, else ../shared/data)"
    run_root = (f"{root}; for data.name fss, the folder of class folders itself (a root holds it as fss1000/); "
                "for data.source tfds, tensorflow-datasets' data folder (else tfds's default)")
    data_dir = {train: run_root, ev: run_root, benches[0]: run_root, export: run_root,  # benches[0]: bench train
                download: "required: the zips go to DATA_DIR/omniglot"}
    for command in (train, ev, *benches, download, lake, cluttered, export):
        command.add_argument("--data-dir", help=data_dir.get(command, root))
        command.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "data" and args.action == "download" and not args.data_dir:
        print("fsl-jax: error: data download needs --data-dir", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        result = args.func(args)
    except Preempted as preempted:  # SIGTERM: the run's checkpoint is written; 128 + SIGTERM, as if killed by it
        print(f"fsl-jax: {preempted}", file=sys.stderr)
        return _failed(143)
    except (FslJaxError, OSError) as err:  # OSError: a path that cannot be read or written, named by it
        print(f"fsl-jax: error: {err}", file=sys.stderr)
        return _failed(1)
    except KeyboardInterrupt as interrupt:  # Ctrl-C: one line (train's says how its run resumes), not a traceback
        print(f"fsl-jax: interrupted{f'; {interrupt}' if str(interrupt) else ''}", file=sys.stderr)
        return _failed(130)
    result.setdefault("seconds", round(time.perf_counter() - start, 2))
    print(json.dumps(_strict(result)))
    return 0


def _failed(code: int) -> int:
    """The exit status of a failed command. A host of a several-host run leaves at once: jax's exit
    would wait minutes at a shutdown barrier for the hosts that stopped with it, then abort."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _strict(value):
    """``value`` with NaN and infinities as None, so the line is strict JSON (a CI over one episode is NaN)."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


if __name__ == "__main__":
    sys.exit(main())
