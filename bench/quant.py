"""fp32 vs int8 inference of the paper-size ensemble on CPU, side by side in one process (issue 18).

What is timed, one run, onnxruntime CPU provider, ``intra_op_num_threads`` = ``--threads``:

* the paper-size ensemble (``--members`` QSMRim-Net members at ``base_channels=64``: 34.8M parameters each,
  plus the radiomics branch) exported by :func:`qsmrim.export.export_ensemble` (fp32, external weights) and
  converted by :func:`qsmrim.export.precision.convert_graph` (int8: static, QOperator, stem conv float);
  fp32 and int8 alternate on the same batch (``--batch`` lesions), so load from other jobs hits both alike and
  the per-repeat ratio int8/fp32 is the figure to trust;
* one member in every int8 variant (static QOperator, static QDQ, dynamic, and static with the stem conv
  quantised too), to show why the shipped variant is the one it is.

Weights are random (timing does not depend on them) with batch-norm statistics drawn per channel, so the
folded conv biases differ as trained ones do (with default statistics every bias is zero and the exporter
shares one tensor between convs, which changes what the quantiser can fuse). Calibration uses seeded
random patches. Parity and PR AUC on a *trained* model are ``qsmrim export --precision int8`` 's job (the
sidecar records them); see bench/RESULTS.md.

Example::

    .venv/bin/python bench/quant.py --members 15 --reps 5 --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Running as a script puts bench/ first on sys.path, where bench/radiomics.py would shadow pyradiomics.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

PAPER_WIDTH = 64


def paper_members(n: int, width: int, seed: int):
    """``n`` untrained QSMRim-Net members with drawn batch-norm statistics and identity standardisation."""
    import torch

    from qsmrim.models import build_model
    from qsmrim.radiomics import FEATURE_NAMES
    from qsmrim.training.member import Member, Standardisation

    f = len(FEATURE_NAMES)
    gen = torch.Generator().manual_seed(seed)
    members = []
    for k in range(n):
        torch.manual_seed(seed + k)
        model = build_model("qsmrimnet", base_channels=width).eval()
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    c = mod.num_features
                    mod.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                    mod.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                    if mod.affine:
                        mod.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                        mod.bias.copy_(torch.randn(c, generator=gen) * 0.1)
        std = Standardisation(np.zeros(f), np.ones(f), np.zeros(f))
        members.append(Member("qsmrimnet", {"base_channels": width}, k // 3, k % 3, {"paper": 0.5}, std,
                              tuple(FEATURE_NAMES), model=model))  # fmt: skip
    return members


def _session(path: Path, threads: int):
    from qsmrim.onnx_runtime import CPU, open_session

    return open_session(path, [CPU], threads)


def _interleaved(sessions: dict[str, object], feeds: dict[str, np.ndarray], reps: int,
                 cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:  # fmt: skip
    """Wall seconds per run, sessions alternating; ``cpu`` collects this process's CPU seconds per run.

    On a shared machine wall time includes waiting for cores other jobs hold; CPU time (all threads, spin
    included) divided by the thread count estimates the wall time the same run takes on dedicated cores.
    """
    for s in sessions.values():
        s.run(None, feeds)  # warm-up: first run allocates
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():
            c, t = time.process_time(), time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t)
            if cpu is not None:
                cpu.setdefault(k, []).append(time.process_time() - c)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=15)
    p.add_argument("--width", type=int, default=PAPER_WIDTH, help="base_channels (64 = paper size)")
    p.add_argument("--batch", type=int, default=25, help="lesions per run (a subject)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calibration-rows", type=int, default=32)
    p.add_argument(
        "--skip-variants", action="store_true", help="only the ensemble, not the one-member variants"
    )
    p.add_argument("--json", type=Path)
    p.add_argument("--results", type=Path, help="append a Markdown section to this file")
    args = p.parse_args()

    from qsmrim.export import export_ensemble
    from qsmrim.export.precision import PrecisionConfig, convert_graph
    from qsmrim.radiomics import FEATURE_NAMES

    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    f = len(FEATURE_NAMES)
    patch = rng.normal(size=(args.batch, 2, 16, 32, 32)).astype(np.float32)
    radiomics = rng.normal(size=(args.batch, f)).astype(np.float32)
    calib = (rng.normal(size=(args.calibration_rows, 2, 16, 32, 32)).astype(np.float32),
             rng.normal(size=(args.calibration_rows, f)).astype(np.float32))  # fmt: skip
    feeds = {"patch": patch, "radiomics": radiomics}
    tmp = Path(tempfile.mkdtemp(prefix="qsmrim-quant-"))
    report: dict[str, object] = {"members": args.members, "width": args.width, "batch": args.batch,
                                 "threads": args.threads, "reps": args.reps}  # fmt: skip
    try:
        variants: dict[str, dict[str, object]] = {}
        if not args.skip_variants:
            one = paper_members(1, args.width, seed=100)
            fp32_1 = export_ensemble(one, tmp / "one" / "model.onnx", verify=False, sidecar=False)
            configs = {
                "int8 static QOperator, stem float (shipped)": PrecisionConfig(
                    calibration_rows=args.calibration_rows
                ),
                "int8 static QOperator, stem int8 too": PrecisionConfig(float_conv_max_in_channels=0),
                "int8 static QDQ, stem float": PrecisionConfig(int8_format="qdq"),
                "int8 dynamic, stem float": PrecisionConfig(int8_method="dynamic"),
            }
            paths = {"fp32": fp32_1}
            for k, (name, cfg) in enumerate(configs.items()):
                out = tmp / "one" / f"v{k}.onnx"
                convert_graph(fp32_1, out, "int8", config=cfg, calibration=calib)
                paths[name] = out
            sessions = {k: _session(v, args.threads) for k, v in paths.items()}
            ref = sessions["fp32"].run(["prob"], feeds)[0]
            times = _interleaved(sessions, feeds, args.reps)
            for k, ts in times.items():
                diff = float(np.abs(sessions[k].run(["prob"], feeds)[0] - ref).max())
                variants[k] = {"median_s": float(np.median(ts)), "times_s": ts, "max_prob_diff_vs_fp32": diff,
                               "ratio_vs_fp32": float(np.median(np.asarray(ts) / np.asarray(times["fp32"])))}  # fmt: skip
            del sessions
            report["one_member"] = variants

        members = paper_members(args.members, args.width, seed=0)
        t = time.perf_counter()
        fp32 = export_ensemble(members, tmp / "ens" / "model.onnx", verify=False, sidecar=False)
        export_s = time.perf_counter() - t
        del members
        t = time.perf_counter()
        int8 = tmp / "ens" / "model.int8.onnx"
        details = convert_graph(fp32, int8, "int8", config=PrecisionConfig(calibration_rows=args.calibration_rows),
                                calibration=calib)  # fmt: skip
        convert_s = time.perf_counter() - t
        sizes = {
            "fp32": sum(x.stat().st_size for x in fp32.parent.glob("model.onnx*")),
            "int8": int8.stat().st_size,
        }
        sessions = {"fp32": _session(fp32, args.threads), "int8": _session(int8, args.threads)}
        ref = sessions["fp32"].run(["prob"], feeds)[0]
        diff = float(np.abs(sessions["int8"].run(["prob"], feeds)[0] - ref).max())
        cpu: dict[str, list[float]] = {}
        times = _interleaved(sessions, feeds, args.reps, cpu)
        ratio = np.asarray(times["int8"]) / np.asarray(times["fp32"])
        cpu_ratio = np.asarray(cpu["int8"]) / np.asarray(cpu["fp32"])
        report["ensemble"] = {
            "export_s": export_s, "convert_s": convert_s, "bytes": sizes, "details": details,
            "times_s": times, "cpu_s": cpu, "ratio_int8_over_fp32": ratio.tolist(),
            "cpu_ratio_int8_over_fp32": cpu_ratio.tolist(), "max_prob_diff": diff,
        }  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    report["load"] = [load_before[0], load_after[0]]

    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    ens = report["ensemble"]
    per = {k: np.median(v) / args.batch * 1e3 for k, v in ens["times_s"].items()}
    cmd = (f".venv/bin/python bench/quant.py --members {args.members} --width {args.width} --batch {args.batch} "
           f"--reps {args.reps} --threads {args.threads} --calibration-rows {args.calibration_rows}")  # fmt: skip
    lines = [
        f"\n## Precision: fp32 vs int8 on CPU, paper-size ensemble (issue 18), {date}\n",
        f"Machine: {platform.node()}, 2-core CPU shared with other jobs ({os.cpu_count()} cores visible, load "
        f"average {load_before[0]:.1f} before / {load_after[0]:.1f} after), onnxruntime CPU provider, "
        f"{args.threads} intra-op threads. Random weights (timing only), drawn batch-norm statistics.\n",
        f"Command: `{cmd}`\n",
        f"{args.members} members x QSMRim-Net base_channels={args.width}, batch {args.batch} lesions, "
        f"{args.reps} repeats, fp32 and int8 alternating in one process:\n",
        "| graph | size | wall s per batch (median) | wall ms per lesion | CPU s per batch (median) | "
        f"CPU s / {args.threads} threads: ms per lesion | per-repeat wall s |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for k in ("fp32", "int8"):
        c = float(np.median(ens["cpu_s"][k]))
        lines.append(f"| {k} | {sizes[k] / 1e6:.0f} MB | {np.median(ens['times_s'][k]):.2f} | {per[k]:.0f} | {c:.2f} | "
                     f"**{c / args.threads / args.batch * 1e3:.0f}** | {', '.join(f'{x:.2f}' for x in ens['times_s'][k])} |")  # fmt: skip
    lines += [
        "",
        f"int8 / fp32 per repeat: {', '.join(f'{x:.3f}' for x in ratio)} (median **{np.median(ratio):.3f}**, "
        f"{1 / np.median(ratio):.1f}x faster); in CPU time {', '.join(f'{x:.3f}' for x in cpu_ratio)} (median "
        f"**{np.median(cpu_ratio):.3f}**); max |prob diff| int8 vs fp32 on these random inputs {diff:.2g}. "
        f"Export {export_s:.0f} s, int8 conversion (calibration on {args.calibration_rows} rows) {convert_s:.0f} s.",
        "",
    ]
    if variants:
        lines += [
            "One member, every int8 variant, alternating in the same run:\n",
            "| graph | median s per batch | ratio to fp32 (per-repeat median) | max prob diff vs fp32 |",
            "|---|---:|---:|---:|",
        ]
        for k, v in variants.items():
            lines.append(
                f"| {k} | {v['median_s']:.3f} | {v['ratio_vs_fp32']:.2f} | {v['max_prob_diff_vs_fp32']:.1e} |"
            )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
    if args.results:
        with open(args.results, "a") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
