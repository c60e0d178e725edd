"""ORT CUDA latency of the paper-size ensemble, fp32 and fp16, and CUDA-vs-CPU parity (issue 18, item 4).

Prepared for a machine with a GPU (bench/device_precision.sh runs it); not run on the 2-core CPU machine.
What it measures, in this order, printing each figure as soon as it has it:

1. the paper-size ensemble (``--members`` QSMRim-Net members at ``base_channels=64``, random weights with
   drawn batch-norm statistics, as bench/quant.py) exported fp32 and converted to fp16
   (:func:`qsmrim.export.precision.convert_graph`);
2. onnxruntime's CUDA provider: p50/p99 latency per lesion at batch 1 and batch 25 for fp32 and fp16
   (``--reps`` timed runs after warm-up), against the issue's 20 ms p99 per lesion;
3. parity on the same ``--parity-lesions`` seeded lesions: fp32 CUDA vs fp32 CPU and fp16 CUDA vs fp32 CPU
   (max |prob diff|, vote flips, rim-call flips).

If this onnxruntime has no CUDA provider (the device image's ``onnxruntime`` is the CPU build; the
``onnxruntime-gpu`` wheel is larger than what a device call can carry), the script says so and times the
same members in PyTorch on CUDA instead (eager, fp32 and fp16 autocast), clearly labelled, so the figure is
not mistaken for ORT's.

    python3 bench/quant_cuda.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent
]

import numpy as np  # noqa: E402

TARGET_P99_MS = 20.0


def _percentiles(times: list[float], batch: int) -> dict[str, float]:
    per = np.asarray(times) / batch * 1e3
    return {"p50_ms_per_lesion": float(np.percentile(per, 50)), "p99_ms_per_lesion": float(np.percentile(per, 99)),
            "n": len(times)}  # fmt: skip


def _time(fn, reps: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=15)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--reps", type=int, default=200, help="timed runs per (precision, batch)")
    p.add_argument("--parity-lesions", type=int, default=200)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import onnxruntime as ort

    from bench.quant import paper_members
    from qsmrim.export import export_ensemble
    from qsmrim.export.precision import convert_graph
    from qsmrim.onnx_runtime import CPU, CUDA, gpu_device_present, open_session
    from qsmrim.radiomics import FEATURE_NAMES

    report: dict[str, object] = {"machine": platform.node(), "onnxruntime": ort.__version__,
                                 "providers": ort.get_available_providers(), "members": args.members}  # fmt: skip
    try:
        import torch

        report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        torch = None
    print(json.dumps(report), flush=True)
    rng = np.random.default_rng(0)
    f = len(FEATURE_NAMES)
    patch = rng.normal(size=(args.parity_lesions, 2, 16, 32, 32)).astype(np.float32)
    radiomics = rng.normal(size=(args.parity_lesions, f)).astype(np.float32)
    members = paper_members(args.members, args.width, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="qsmrim-cuda-"))
    t = time.perf_counter()
    fp32 = export_ensemble(members, tmp / "model.onnx", verify=False, sidecar=False)
    fp16 = tmp / "model.fp16.onnx"
    convert_graph(fp32, fp16, "fp16")
    report["export_and_convert_s"] = time.perf_counter() - t
    print(f"exported fp32 and fp16 in {report['export_and_convert_s']:.0f} s", flush=True)

    results: dict[str, object] = {}
    if CUDA in ort.get_available_providers() and gpu_device_present():
        sessions = {"fp32": open_session(fp32, [CUDA, CPU]), "fp16": open_session(fp16, [CUDA, CPU])}
        report["provider"] = {k: s.get_providers()[0] for k, s in sessions.items()}
        for name, s in sessions.items():
            for batch in (1, 25):
                feeds = {"patch": patch[:batch], "radiomics": radiomics[:batch]}
                results[f"ort_cuda_{name}_batch{batch}"] = r = _percentiles(
                    _time(lambda s=s, feeds=feeds: s.run(None, feeds), args.reps), batch
                )
                print(f"ORT CUDA {name} batch {batch}: p50 {r['p50_ms_per_lesion']:.2f} ms, p99 "
                      f"{r['p99_ms_per_lesion']:.2f} ms per lesion (target p99 <= {TARGET_P99_MS} ms)", flush=True)  # fmt: skip
        cpu = open_session(fp32, [CPU])
        ref = cpu.run(None, {"patch": patch, "radiomics": radiomics})
        for name, s in sessions.items():
            got = s.run(None, {"patch": patch, "radiomics": radiomics})
            results[f"parity_cuda_{name}_vs_cpu_fp32"] = q = {
                "lesions": len(patch), "max_prob_diff": float(np.abs(got[0] - ref[0]).max()),
                "vote_flips": int((got[1] != ref[1]).sum()), "rim_flips": int((got[2] != ref[2]).sum()),
            }  # fmt: skip
            print(f"parity CUDA {name} vs CPU fp32: {json.dumps(q)}", flush=True)
    else:
        report["ort_cuda"] = "unavailable: no CUDAExecutionProvider or no GPU"
        print(
            "onnxruntime has no usable CUDA provider here (CPU build or no GPU); timing the same members in PyTorch on CUDA instead",
            flush=True,
        )
        if torch is not None and torch.cuda.is_available():
            from qsmrim.export.ensemble import EnsembleModule

            module = EnsembleModule(members).eval().cuda()
            for name, dtype in (("fp32", None), ("fp16-autocast", torch.float16)):
                for batch in (1, 25):
                    x = torch.from_numpy(patch[:batch]).cuda()
                    r_ = torch.from_numpy(radiomics[:batch]).cuda()

                    def step(x=x, r_=r_, dtype=dtype) -> None:
                        half = dtype is not None
                        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=half):
                            module(x, r_)
                        torch.cuda.synchronize()

                    results[f"torch_cuda_{name}_batch{batch}"] = r = _percentiles(
                        _time(step, args.reps), batch
                    )
                    print(f"torch CUDA (not ORT) {name} batch {batch}: p50 {r['p50_ms_per_lesion']:.2f} ms, p99 "
                          f"{r['p99_ms_per_lesion']:.2f} ms per lesion", flush=True)  # fmt: skip
    report["results"] = results
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
