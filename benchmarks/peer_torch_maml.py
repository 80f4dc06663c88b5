"""The peer for `fsl-jax bench maml --peer torch`: the same MAML meta-step in plain PyTorch.

Straightforward ``torch.func`` code, the way the library's docs suggest writing it:
``functional_call``-style pure functions of a parameter dict, ``torch.func.grad`` for the
inner SGD steps (differentiated again for the second-order meta-gradient) and
``torch.func.vmap`` over the tasks of the meta-batch, then Adam. Same model (Conv4:
conv3x3 64 -> BatchNorm with batch statistics -> ReLU -> maxpool2, four times; a linear
head), same episode shapes, same inner loop. Prints one JSON line.

    pip install "fsl_jax[bench]"   # torch
    python benchmarks/peer_torch_maml.py --tasks 4 --inner-steps 5
    python benchmarks/peer_torch_maml.py --device cuda   # on a GPU (fsl-jax bench passes it there)

Each timed sample runs ``--steps-per-sample`` meta-steps and its time is divided by them, as
``fsl-jax bench maml`` times each call of ``--steps-per-call`` meta-steps (it passes that
number here), so both sides report the same statistic over the same number of meta-steps.
On CUDA each sample is timed to ``torch.cuda.synchronize()``; torch's defaults are kept (cuDNN
convolutions in TF32 on Ampere and later, as XLA's default precision for float32 on GPUs).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import grad, vmap


def init_params(ways: int, width: int = 64, blocks: int = 4, channels: int = 1, image: int = 28) -> dict:
    params, size = {}, image
    for i in range(blocks):
        conv = torch.nn.Conv2d(channels if i == 0 else width, width, 3, padding=1)
        params[f"conv{i}.weight"], params[f"conv{i}.bias"] = conv.weight.detach(), conv.bias.detach()
        params[f"norm{i}.weight"], params[f"norm{i}.bias"] = torch.ones(width), torch.zeros(width)
        size //= 2
    head = torch.nn.Linear(width * size * size, ways)
    params["head.weight"], params["head.bias"] = head.weight.detach(), head.bias.detach()
    return {k: v.clone().requires_grad_(True) for k, v in params.items()}


def forward(params: dict, x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    for i in range(blocks):
        x = F.conv2d(x, params[f"conv{i}.weight"], params[f"conv{i}.bias"], padding=1)
        x = F.batch_norm(x, None, None, params[f"norm{i}.weight"], params[f"norm{i}.bias"], training=True)
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), params["head.weight"], params["head.bias"])


def support_loss(params, x, y):
    return F.cross_entropy(forward(params, x), y)


def adapt(params, x, y, steps: int, lr: float, first_order: bool):
    for _ in range(steps):
        grads = grad(support_loss)(params, x, y)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        params = {k: p - lr * grads[k] for k, p in params.items()}
    return params


def make_step(method: str, steps: int, lr: float, first_order: bool, params: dict):
    optimiser = torch.optim.Adam(list(params.values()), lr=1e-3)

    def maml_loss(params, sx, sy, qx, qy):
        return F.cross_entropy(forward(adapt(params, sx, sy, steps, lr, first_order), qx), qy)

    def reptile_direction(params, sx, sy, qx, qy):
        adapted = adapt(params, sx, sy, steps, lr, True)
        # the query loss after adaptation is reported, as fsl_jax's Reptile does
        return {k: params[k] - adapted[k] for k in params}, F.cross_entropy(forward(adapted, qx), qy)

    def step(sx, sy, qx, qy):
        if method == "reptile":
            directions, _ = vmap(reptile_direction, in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy)
            grads = {k: d.mean(0).detach() for k, d in directions.items()}
        else:
            meta_loss = lambda p: vmap(maml_loss, in_dims=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy).mean()
            grads = grad(meta_loss)(params)
        for k, p in params.items():
            p.grad = grads[k]
        optimiser.step()

    return step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["maml", "reptile"], default="maml")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.4)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed samples after the warm-up")
    parser.add_argument("--steps-per-sample", type=int, default=1,
                        help="meta-steps timed together per sample, each sample's time divided by them "
                             "(fsl-jax bench passes its meta-steps per call: both sides time as many meta-steps)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed meta-steps first: torch's first steps are up to 2x slower than its steady state")
    args = parser.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--steps-per-sample", args.steps_per_sample)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    t, n, size = args.tasks, args.ways, args.image_size
    sx = torch.rand(t, n * args.shots, 1, size, size, device=device)
    qx = torch.rand(t, n * args.queries, 1, size, size, device=device)
    sy = torch.arange(n, device=device).repeat_interleave(args.shots).repeat(t, 1)
    qy = torch.arange(n, device=device).repeat_interleave(args.queries).repeat(t, 1)
    with torch.device(device):
        params = init_params(n, image=size)
    step = make_step(args.method, args.inner_steps, args.inner_lr, args.first_order, params)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step(sx, sy, qx, qy)
    sync()
    warmup_s = time.perf_counter() - start
    times, faults, per_sample = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt, args.steps_per_sample
    for _ in range(args.steps):
        start = time.perf_counter()
        for _ in range(per_sample):
            step(sx, sy, qx, qy)
        sync()
        times.append((time.perf_counter() - start) / per_sample)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (args.steps * per_sample)
    step_s = statistics.median(times)
    result = {"peer": "torch.func", "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
              "method": args.method, "first_order": args.first_order or args.method == "reptile",
              "warmup_steps": args.warmup, "warmup_s": round(warmup_s, 3), "steps_per_sample": per_sample, "step_s": round(step_s, 6), "step_times_s": [round(x, 6) for x in times],
              "tasks_per_s": round(t / step_s, 3), "page_faults_per_step": round(faults)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
