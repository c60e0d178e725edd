"""Benchmark `fit_member` / `fit_members`: epoch time and samples/s on a paper-size cohort, one process and several.

The cohort is random (paper size: 172 subjects, 4,163 lesions, 4.25% rim+), so the script needs only torch,
numpy, pandas and scikit-learn and runs on the GPU machine (no Ray, MLflow or nibabel there). Several
processes at once on one device are what Ray's fractional GPUs give the grid. ``--mode member``: each process
fits one member (``fit_member``); ``--mode stack``: each process fits the seeds of one fold stacked
(``fit_members``, fold = process index), i.e. one grid trial; ``--mode model``: one process stacks every fold
and seed (``fit_stack``, ``grid.stack_folds``). Throughput counts member samples.

    python bench/train.py --device cuda --epochs 2 --concurrent 1 5 --json out.json
    python bench/train.py --device cuda --mode stack --seeds 0 1 2 --epochs 40 --concurrent 5   # the paper grid
    python bench/train.py --device cpu --base-channels 4 --lesions 400 --epochs 1 --concurrent 1 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path

import numpy as np

# bench/radiomics.py would shadow pyradiomics (`radiomics`) for scripts run from bench/: put the repo first.
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _dataset(n_lesions: int, n_subjects: int, seed: int = 0):
    from qsmrim.training import LesionDataset

    rng = np.random.default_rng(seed)
    subjects = np.array([f"{i:03d}" for i in rng.integers(0, n_subjects, n_lesions)])
    labels = (rng.random(n_lesions) < 0.0425).astype(np.int8)
    patches = rng.standard_normal((n_lesions, 2, 16, 32, 32), dtype=np.float32) * 0.05
    radiomics = rng.standard_normal((n_lesions, 527))
    return LesionDataset(subjects, np.arange(n_lesions), labels, patches, radiomics, tuple(f"f{i}" for i in range(527)))


def _fit(args_tuple):
    (model, base, epochs, device, bf16, n_lesions, n_subjects, index, start_evt, mode, seeds, channels_last, inner_val, graphs,
     checkpoint_every) = args_tuple
    import tempfile

    import torch

    from qsmrim.training import TrainConfig, fit_member, make_splits
    from qsmrim.training.fit_stack import fit_members, fit_stack

    torch.set_num_threads(2)  # several processes share the CPUs; the GPU step needs one thread to launch
    data = _dataset(n_lesions, n_subjects)
    splits = make_splits(data.rim_counts(), 5, 0)
    cfg = TrainConfig(model=model, model_kwargs={"base_channels": base}, epochs=epochs, device=device, bf16=bf16,
                      inner_val_fraction=inner_val, eval_batch_size=512, channels_last=channels_last,
                      cuda_graphs=graphs, checkpoint_every=max(checkpoint_every, 1))  # fmt: skip
    # Stacked modes write their resume checkpoints as the grid does (every --checkpoint-every epochs), here.
    ckpt_dir = tempfile.mkdtemp(prefix="bench-ckpt-") if checkpoint_every and mode != "member" else None
    if start_evt is not None:
        start_evt.wait()
    t = time.perf_counter()
    def progress(epoch, rows):
        if epoch % 10 == 0:
            print(f"process {index}: epoch {epoch} at {time.perf_counter() - t:.1f} s", flush=True)

    if mode == "stack":
        members = fit_members(cfg, data, splits, fold=index % 5, seeds=seeds, on_epoch=progress, checkpoint_dir=ckpt_dir)
    elif mode == "model":  # the whole 5-fold grid of the seeds in one stacked process
        members = fit_stack(cfg, data, splits, [(f, s) for f in range(5) for s in seeds], on_epoch=progress,
                            checkpoint_dir=ckpt_dir)  # fmt: skip
    else:
        members = [fit_member(cfg, data, splits, fold=0, seed=index)]
    wall = time.perf_counter() - t
    if ckpt_dir is not None:
        import shutil

        shutil.rmtree(ckpt_dir, ignore_errors=True)
    hist = members[0].history
    k = len(members)  # member samples: a stack of k trains k members per row
    return {"wall_s": wall, "epoch_s": [h["epoch_seconds"] for h in hist], "samples_per_s": [k * h["samples_per_s"] for h in hist],
            "n_fit": members[0].metrics["n_fit"], "members": k}  # fmt: skip


def run(args) -> dict:
    import torch

    out = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor(),
           "torch": torch.__version__, "model": args.model, "base_channels": args.base_channels, "epochs": args.epochs,
           "lesions": args.lesions, "bf16": args.bf16, "mode": args.mode, "seeds": args.seeds,
           "channels_last": args.channels_last, "inner_val_fraction": args.inner_val, "cuda_graphs": args.graphs,
           "checkpoint_every": args.checkpoint_every,
           "results": []}  # fmt: skip
    for k in args.concurrent:
        ctx = mp.get_context("spawn")
        evt = ctx.Manager().Event()
        t = time.perf_counter()
        with ctx.Pool(k) as pool:
            jobs = [pool.apply_async(_fit, ((args.model, args.base_channels, args.epochs, args.device, args.bf16,
                                             args.lesions, 172, s, evt, args.mode, args.seeds, args.channels_last,
                                             args.inner_val, args.graphs, args.checkpoint_every),)) for s in range(k)]  # fmt: skip
            time.sleep(2.0)
            evt.set()
            res = [j.get() for j in jobs]
        wall = time.perf_counter() - t
        # steady state: the last epoch of each member (the first carries cuDNN autotuning and allocation)
        last = [r["samples_per_s"][-1] for r in res]
        row = {"concurrent": k, "members": sum(r["members"] for r in res), "wall_s": wall,
               "fit_wall_s": [r["wall_s"] for r in res], "per_member_samples_per_s": last, "aggregate_samples_per_s": float(sum(last)),
               "epoch_s": [r["epoch_s"] for r in res], "n_fit": res[0]["n_fit"]}  # fmt: skip
        grid_samples = 15 * 40 * res[0]["n_fit"]
        row["projected_paper_grid_s"] = grid_samples / row["aggregate_samples_per_s"]
        out["results"].append(row)
        print(f"{k} concurrent: {row['aggregate_samples_per_s']:.0f} samples/s together "
              f"({np.mean(last):.0f} each); paper grid (15 x 40 epochs x {res[0]['n_fit']}) ~ {row['projected_paper_grid_s']:.0f} s",
              flush=True)  # fmt: skip
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="qsmrimnet")
    p.add_argument("--base-channels", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lesions", type=int, default=4163)
    # fp32 by default, like training.bf16 (until 2026-11-27 07:00 UTC this script defaulted to bf16 autocast)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (training.bf16); default fp32")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--concurrent", type=int, nargs="+", default=[1, 5])
    p.add_argument("--mode", choices=["member", "stack", "model"], default="member",
                   help="per process: one member, one fold's seeds stacked, or every fold x seed stacked")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds stacked per process (--mode stack)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="training.cuda_graphs off (stacked fits)")
    p.add_argument("--inner-val", type=float, default=0.0, help="training.inner_val_fraction (paper.yaml: 0.2)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="stack/model modes: write resume checkpoints every N epochs, as the grid does (paper.yaml: 10); 0: none")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    out = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
