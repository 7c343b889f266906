"""Wall time of training K compartments with the ``ray`` executor vs ``local``, and GPU vs CPU training throughput.

Figures: BENCHMARKS.md, section "Scale-out".

    python benchmarks/train_executors.py [--k 4] [--steps 60] [--data digits:subset=600] [--cpus-per-job 1]
                                         [--ray-address ADDR] [--throughput-steps 3] [--device cuda]

Part 1 trains two identical wards (K compartments, no router, ``--steps`` optimizer steps each), one with each executor,
in this run, and prints both wall times, Ray's start-up time (paid once per driver) and whether the weights are bitwise
equal. On one machine Ray can only win when cores are idle: jobs are CPU-bound and each already uses ``threads`` (2) torch
threads, so on a 2-core machine expect ~1x at best, less with worker start-up (each worker imports torch and diffusers).

Part 2 times training steps of the ``small`` UNet preset at 32x32 (batch 64, class-conditional) on the CPU and, when
CUDA is available, on the GPU, and prints samples/s and the GPU/CPU ratio. Without CUDA it says so and prints the CPU
figure only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def train_ward(path: Path, args, executor: str) -> tuple[float, dict]:
    from dataward.config import TrainConfig
    from dataward.store.checkpoints import WEIGHTS_FILE, weights_hash
    from dataward.ward import Ward

    ward = Ward.create(path, args.data, compartments=args.k, slices=1, router=False, train=TrainConfig(steps=args.steps, batch_size=64))
    options = {} if executor == "local" else dict(ray_address=args.ray_address, cpus_per_job=args.cpus_per_job)
    t0 = time.perf_counter()
    ward.train(executor=executor, **options)
    seconds = time.perf_counter() - t0
    hashes = {r.compartment: weights_hash(ward.path / r.path / WEIGHTS_FILE) for r in ward.ledger.models("denoiser", any_compartment=True)}
    ward.close()
    return seconds, hashes


def executors(args) -> None:
    import ray

    scratch = tempfile.mkdtemp(prefix="dwbench-", dir="/tmp")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.perf_counter()
    if args.ray_address:
        ray.init(address=args.ray_address)
    else:
        ray.init(include_dashboard=False, _temp_dir=os.path.join(scratch, "ray"), log_to_driver=False)
    ray_start = time.perf_counter() - t0
    # warm the workers (import torch, diffusers, dataward) so part 1 separates start-up from training
    t0 = time.perf_counter()
    ray.get([ray.remote(lambda: __import__("dataward.ward") and None).options(num_cpus=args.cpus_per_job).remote() for _ in range(args.k)])
    warm = time.perf_counter() - t0
    local_s, local_h = train_ward(Path(scratch) / "ward-local", args, "local")
    ray_s, ray_h = train_ward(Path(scratch) / "ward-ray", args, "ray")
    resources = ray.cluster_resources()
    ray.shutdown()
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"machine: {os.cpu_count()} cores; Ray cluster CPUs {resources.get('CPU', 0):g}, GPUs {resources.get('GPU', 0):g}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"K={args.k} compartments x {args.steps} steps (batch 64, {args.data}), cpus-per-job {args.cpus_per_job}")
    print(f"  local: {local_s:7.1f} s")
    print(f"  ray:   {ray_s:7.1f} s  (speed-up {local_s / ray_s:.2f}x; plus Ray start {ray_start:.1f} s and worker warm-up {warm:.1f} s, once per driver)")
    print(f"  weights bitwise equal: {local_h == ray_h} ({len(local_h)} denoisers)")
    print(f"\n| K={args.k} compartments x {args.steps} steps, batch 64, `{args.data}`, tiny UNet | wall time |\n|---|---|")
    print(f"| `--executor local` | {local_s:.1f} s |\n| `--executor ray --cpus-per-job {args.cpus_per_job:g}` | {ray_s:.1f} s "
          f"({local_s / ray_s:.2f}x) + Ray start {ray_start:.1f} s + worker warm-up {warm:.1f} s |")
    print(f"| weights bitwise equal (local vs ray) | {'yes' if local_h == ray_h else 'NO'}, all {len(local_h)} denoisers |")


def samples_per_second(device: str, steps: int, batch: int = 64) -> float:
    from dataward.config import TrainConfig
    from dataward.models.nets import build_unet
    from dataward.diffusion.sampling import make_training_scheduler
    from dataward.training.loop import TrainState, denoiser_loss

    torch.set_num_threads(2)
    model = build_unet("small", 32, 1, 10, seed=0).to(device)
    state = TrainState.fresh(model, TrainConfig(batch_size=batch))
    loss_fn = denoiser_loss(make_training_scheduler(1000, "squaredcos_cap_v2"))
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 1, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)

    def step():
        loss = loss_fn(state.model, x0, y, None, generator).mean()
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.ema.step(state.model.parameters())
        loss.item()  # synchronises, as training does every step

    step()  # warm-up (cuDNN/cuBLAS handles, allocator)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def throughput(args) -> None:
    cpu = samples_per_second("cpu", args.throughput_steps)
    print(f"small preset 32x32, batch 64, training: CPU (2 threads) {cpu:.1f} samples/s")
    if args.device == "cuda" or torch.cuda.is_available():
        if not torch.cuda.is_available():
            print("  --device cuda asked but CUDA is not available: GPU figure not measured")
            return
        gpu = samples_per_second("cuda", max(20, args.throughput_steps))
        print(f"  GPU ({torch.cuda.get_device_name()}): {gpu:.1f} samples/s, {gpu / cpu:.1f}x the CPU")
    else:
        print("  no CUDA device here: GPU figure not measured (run with --device cuda on a GPU machine)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4, help="compartments")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per compartment")
    parser.add_argument("--data", default="digits:subset=600")
    parser.add_argument("--cpus-per-job", type=float, default=1)
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--throughput-steps", type=int, default=3, help="timed CPU steps of the small preset (0: skip part 2)")
    parser.add_argument("--device", default="cpu", help="cuda: also measure the GPU (part 2)")
    parser.add_argument("--skip-executors", action="store_true")
    args = parser.parse_args()
    if not args.skip_executors:
        executors(args)
    if args.throughput_steps > 0:
        throughput(args)


if __name__ == "__main__":
    main()
