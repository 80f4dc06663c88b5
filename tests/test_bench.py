"""``fsl-jax bench maml``: the JSON line's figures agree with each other, and bad input is refused."""
import json

import pytest

from fsl_jax.bench import cpu_name
from fsl_jax.cli import main


def test_bench_maml_json_is_consistent(capsys):
    args = ["bench", "maml", "--method", "reptile", "--tasks", "1", "--inner-steps", "1",
            "--steps", "5", "--steps-per-call", "2", "--no-progress"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = result["config"]
    assert (config["order"], config["tasks"], config["inner_steps"], config["steps_per_call"]) == ("reptile", 1, 1, 2)
    assert len(result["step_times_s"]) == 5 and min(result["step_times_s"]) <= result["step_s"] <= max(result["step_times_s"])
    assert result["tasks_per_s"] == pytest.approx(1 / result["step_s"], rel=1e-2)
    assert result["gflops_per_s"] == pytest.approx(result["flops_per_step"] / result["step_s"] / 1e9, rel=1e-2)
    assert result["gemm_fraction"] == pytest.approx(result["gflops_per_s"] / result["gemm_gflops_per_s"], rel=1e-2)
    assert 0 < result["gemm_fraction"] < 1 and result["page_faults_per_step"] >= 0
    assert "peer" not in result and result["cpu"]


def test_cpu_name_says_which_generation(tmp_path):
    """A brand alone ('AMD EPYC') spans CPUs of very different speed: family, model and vector width come with it."""
    processor = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\nflags\t\t: {}\n"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("\n".join(processor.format(i, "fpu avx2 avx512f") for i in range(2)))
    assert cpu_name(cpuinfo) == "AMD EPYC (family 26, model 2; AVX-512)"
    cpuinfo.write_text(processor.format(0, "fpu avx2"))
    assert cpu_name(cpuinfo) == "AMD EPYC (family 26, model 2; AVX2)"


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "4", "--steps must be at least 5, got 4"),
    ("--steps-per-call", "0", "--steps-per-call must be at least 1, got 0"),
    ("--tasks", "0", "--tasks must be at least 1, got 0"),
    ("--inner-steps", "-1", "inner_steps must be a non-negative integer, got -1"),
])
def test_bench_maml_refuses_bad_counts(flag, value, message, capsys):
    assert main(["bench", "maml", flag, value, "--no-progress"]) == 1
    assert message in capsys.readouterr().err


def test_peer_is_timed_over_as_many_meta_steps(monkeypatch):
    """Both sides report the median over --steps samples of --steps-per-call meta-steps each."""
    import subprocess
    from argparse import Namespace

    from fsl_jax import bench

    commands = []

    def run(command, **_):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, stdout='{"step_s": 1.0}\n', stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    args = Namespace(method="maml", tasks=4, inner_steps=5, steps=7, steps_per_call=10, first_order=False)
    assert bench.run_peer(args, 0.4) == {"step_s": 1.0}
    command = commands[0]
    assert command[command.index("--steps") + 1] == "7"
    assert command[command.index("--steps-per-sample") + 1] == "10"


def test_peer_divides_each_sample_by_its_meta_steps():
    """The peer runs in its own process, as `fsl-jax bench` runs it: torch imported into a process
    that already holds TensorFlow (the bridges' tests load it at collection) crashes it."""
    pytest.importorskip("torch")
    import subprocess
    import sys

    from fsl_jax.bench import PEER

    def peer(*flags):
        small = ["--method", "reptile", "--tasks", "1", "--inner-steps", "1", "--warmup", "0"]
        return subprocess.run([sys.executable, str(PEER), *small, *flags], capture_output=True, text=True)

    done = peer("--steps", "2", "--steps-per-sample", "3")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps_per_sample"] == 3 and len(result["step_times_s"]) == 2
    assert min(result["step_times_s"]) <= result["step_s"] <= max(result["step_times_s"])
    refused = peer("--steps-per-sample", "0")
    assert refused.returncode == 2 and "--steps-per-sample must be at least 1, got 0" in refused.stderr
