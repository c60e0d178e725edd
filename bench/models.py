"""Training throughput of every torch model: forward + backward samples/s at batch 64.

Each step is what the trainer does per minibatch minus the optimiser update:
``model.forward_train(patch, radiomics, labels)`` (DeepSMOTE appends its synthetic rim+ rows), a
binary cross-entropy on the returned logits and ``loss.backward()``. Inputs are random, with
``--rim-positives`` rim+ labels per batch so that DeepSMOTE actually synthesises.

Imports only torch and ``qsmrim.models`` so it runs on a bare GPU machine with ``PYTHONPATH=.``.

Examples
--------
python bench/models.py --device cpu --steps 3 --warmup 1 --json bench/models_cpu.json
PYTHONPATH=. python bench/models.py --device cuda --sweep --steps 30 --json $OUT/models_gpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qsmrim.models import TORCH_MODEL_NAMES, build_model, example_inputs


def bench_one(
    name: str,
    *,
    device: torch.device,
    batch_size: int,
    steps: int,
    warmup: int,
    bf16: bool,
    channels_last: bool,
    rim_positives: int,
) -> dict:
    """Time ``steps`` forward+backward passes of model ``name``; returns one result row."""
    torch.manual_seed(0)
    model = build_model(name).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    patch, radiomics = example_inputs(batch_size, device=device)
    labels = torch.zeros(batch_size)
    labels[torch.linspace(0, batch_size - 1, rim_positives).long()] = 1.0
    labels = labels.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        patch = patch.contiguous(memory_format=torch.channels_last_3d)

    def step() -> int:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, out_labels = model.forward_train(patch, radiomics, labels)
        loss = F.binary_cross_entropy_with_logits(logits.float(), out_labels.float())
        loss.backward()
        return logits.shape[0]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = 0
    step_s = []
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        rows = step()
        if device.type == "cpu":  # on CUDA the launch is asynchronous: only the total is meaningful
            step_s.append(time.perf_counter() - t0)
    sync()
    elapsed = time.perf_counter() - start
    result = {
        "model": name,
        "params": n_params,
        "precision": "bf16-autocast" if bf16 else "fp32",
        "memory_format": "channels_last_3d" if channels_last else "contiguous",
        "batch_size": batch_size,
        "rows_after_deepsmote": rows,
        "steps": steps,
        "seconds": elapsed,
        "ms_per_step": 1000 * elapsed / steps,
        "samples_per_s": batch_size * steps / elapsed,
    }
    if step_s:
        # Robust to other processes stealing a core for part of a step (shared CPU machines).
        result["median_ms_per_step"] = 1000 * statistics.median(step_s)
        result["samples_per_s_median"] = batch_size / statistics.median(step_s)
    if device.type == "cuda":
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def machine_info(device: torch.device) -> dict:
    """Describe where the numbers come from."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def markdown_table(results: list[dict]) -> str:
    """Render result rows as a markdown table."""
    lines = [
        "| model | params (M) | precision | memory format | rows/step | ms/step | samples/s | median samples/s |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        median = f"{r['samples_per_s_median']:.1f}" if "samples_per_s_median" in r else "n/a"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['precision']} | {r['memory_format']} | "
            f"{r['rows_after_deepsmote']} | {r['ms_per_step']:.1f} | {r['samples_per_s']:.1f} | {median} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", nargs="+", choices=TORCH_MODEL_NAMES, default=list(TORCH_MODEL_NAMES))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model and setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotune, allocator)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels_last_3d model and input")
    p.add_argument(
        "--sweep", action="store_true", help="every combination of fp32/bf16 x contiguous/channels-last"
    )
    p.add_argument("--rim-positives", type=int, default=4, help="rim+ labels per batch (>= 3 for DeepSMOTE)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="write results and machine info here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print a markdown table, optionally write JSON."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch.cuda.is_available() is False")
        torch.backends.cudnn.benchmark = True
    settings = (
        [(b, c) for b in (False, True) for c in (False, True)]
        if args.sweep
        else [(args.bf16, args.channels_last)]
    )
    results = []
    for name in args.models:
        for bf16, cl in settings:
            r = bench_one(
                name,
                device=device,
                batch_size=args.batch_size,
                steps=args.steps,
                warmup=args.warmup,
                bf16=bf16,
                channels_last=cl,
                rim_positives=args.rim_positives,
            )
            progress = f"{name} {r['precision']} {r['memory_format']}: {r['samples_per_s']:.1f} samples/s"
            print(progress, file=sys.stderr, flush=True)
            results.append(r)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the model of the finished run is unreferenced now
    print(markdown_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python", "bench/models.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine_info(device),
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return results


if __name__ == "__main__":
    main()
