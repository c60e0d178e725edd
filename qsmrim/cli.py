"""`qsmrim` command line: thin entry points that parse arguments and call one library function each."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from qsmrim import __version__
from qsmrim.atomic import atomic_path
from qsmrim.console import add_lesion_source_args, lesion_source, run_reporting_errors
from qsmrim.console import print_problems as _print_problems

__all__ = ["build_parser", "main", "run_reporting_errors"]

log = logging.getLogger("qsmrim")


def cmd_synth(args: argparse.Namespace) -> int:
    from qsmrim.data import synthesize_cohort

    out = synthesize_cohort(args.out, args.subjects, args.seed, shape=tuple(args.shape) if args.shape else None,
                            difficulty=args.difficulty, sessions=args.sessions, progress=True)  # fmt: skip
    sessions = f", {args.sessions} session(s) each" if args.sessions else ""
    print(f"wrote {args.subjects} synthetic subject(s){sessions} to {out}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from qsmrim.data import validate_cohort

    report = validate_cohort(args.root, progress=True, lesions=lesion_source(args))
    if not report.ok:
        _print_problems(report.problems)
        return 1
    s = report.summary()
    if args.json:
        print(json.dumps(s, default=list))
        return 0
    print(f"{args.root}: valid")
    print(f"  subjects      {s['subjects']}" + (f" ({s['scans']} scans)" if s["scans"] != s["subjects"] else ""))
    print(f"  lesions       {s['lesions']} ({s['unlabelled']} unlabelled, kept for inference only)")
    print(f"  rim+          {s['rim_pos']} of {s['labelled']} labelled ({100 * s['rim_pos_share']:.2f}%)")
    print(f"  voxel sizes   {', '.join('x'.join(f'{v:g}' for v in vs) + ' mm' for vs in s['voxel_sizes_mm'])}")
    return 0


def _refuse_overwrite(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")


def cmd_lesions(args: argparse.Namespace) -> int:
    from qsmrim.data import validate_cohort

    out = Path(args.out)
    _refuse_overwrite(out, args.force)
    report = validate_cohort(args.root, progress=True, lesions=lesion_source(args))
    if not report.ok:
        _print_problems(report.problems)
        return 1
    with atomic_path(out) as tmp:
        report.table.to_parquet(tmp, index=False)
    print(f"wrote {len(report.table)} lesion(s) of {report.n_subjects} subject(s) to {out}")
    return 0


def cmd_patches(args: argparse.Namespace) -> int:
    import time

    from qsmrim.data import PatchSpec, build_patch_cache, discover_cohort, validate_cohort

    report = validate_cohort(args.root, progress=True, lesions=lesion_source(args))
    if not report.ok:
        _print_problems(report.problems)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.table.to_parquet(out / "lesions.parquet", index=False)
    t = time.perf_counter()
    arr = build_patch_cache(discover_cohort(args.root, lesions=lesion_source(args)), report.table, out, PatchSpec(tuple(args.size)), progress=True)
    print(f"wrote {out / 'patches.npy'} {list(arr.shape)} float32 and {out / 'lesions.parquet'} "
          f"({time.perf_counter() - t:.1f} s)")  # fmt: skip
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qsmrim.demo import run_demo
    from qsmrim.locations import config_from_args

    cfg, where = config_from_args(args, run=args.out)
    res = run_demo(cfg, where.run_dir, keep_serving=args.keep_serving, tracking_uri=where.tracking_uri)
    if res["grid"]["errors"]:
        for err in res["grid"]["errors"]:
            print(f"trial failed: {err}", file=sys.stderr)
        return 1
    run = Path(res["run_dir"])
    ev = res["grid"].get("evaluation") or {}
    print(f"\nqsmrim demo ({cfg.name}) finished in {res['seconds']:.0f} s")
    print(f"  run folder     {run}")
    print(f"  MLflow         {res['grid']['tracking_uri']} (parent run {res['grid']['parent_run_id']}); "
          "open with: mlflow ui --backend-store-uri " + res["grid"]["tracking_uri"])  # fmt: skip
    key = cfg.models[0].replace("-", "_")
    if ev:
        print(f"  CV (paper protocol)  PR AUC {ev.get(f'cv_{key}_pr_auc', float('nan')):.3f}  "
              f"pROC AUC {ev.get(f'cv_{key}_proc_auc', float('nan')):.3f}  F1 {ev.get(f'cv_{key}_f1', float('nan')):.3f}")  # fmt: skip
    print(f"  ONNX ensemble  {res['export']['onnx']}")
    reg = res["export"].get("registry") or {}
    if reg:
        from qsmrim.tracking.registry import describe_promotion

        promo = reg.get("promotion")
        print(f"  registry       {reg['model_uri']}; "
              + (describe_promotion(promo) if promo else "@champion not evaluated"))  # fmt: skip
    _print_served(res["served"])
    from qsmrim.demo import closing_lines

    print("\n".join(closing_lines(res)))
    return 0


def _print_served(s: dict) -> None:
    """The served subject's lesions by probability, the expert label beside each (when the subject has one):
    rim+ calls first, then the next most likely, so a reader sees at once whether the rim+ lesions lead."""
    lesions = sorted(s.get("lesions", []), key=lambda x: -(x.get("prob") or 0))
    expert = {int(k): v for k, v in (s.get("expert") or {}).items()}
    n_true = sum(1 for v in expert.values() if v == 1)
    print(f"  served         POST {s['url']} for held-out sub-{s['subject']}: {len(lesions)} lesions, "
          f"{sum(1 for x in lesions if x.get('rim'))} predicted rim+" + (f", {n_true} rim+ by the expert" if expert else ""))  # fmt: skip
    shown = max(sum(1 for x in lesions if x.get("rim")), n_true) + 3
    print(f"    {'lesion':>6}  {'prob':>5}  {'votes':>5}  {'spread':>6}  {'call':<5}" + ("  expert" if expert else ""))
    names = {1: "rim+", 0: "rim-", None: "n/a"}
    for x in lesions[:shown]:
        truth = f"  {names.get(expert.get(int(x.get('index', -1)), None), 'n/a'):<6}" if expert else ""
        print(f"    {x.get('index'):>6}  {x.get('prob') or 0:>5.3f}  {x.get('votes'):>5}  {x.get('spread') or 0:>6.3f}  "
              f"{'rim+' if x.get('rim') else 'rim-':<5}{truth}")  # fmt: skip
    if len(lesions) > shown:
        rest = [expert.get(int(x.get("index", -1))) for x in lesions[shown:]]
        print(f"    ... {len(lesions) - shown} more below prob {lesions[shown - 1].get('prob') or 0:.3f}"
              + (f" ({sum(1 for v in rest if v == 1)} rim+ by the expert)" if expert else ""))  # fmt: skip


def _load_cfg(args: argparse.Namespace):
    from qsmrim.config import load_config, parse_overrides

    return load_config(args.config, parse_overrides(getattr(args, "set", None)))


def cmd_train(args: argparse.Namespace) -> int:
    import json as _json

    from qsmrim.config import ConfigError
    from qsmrim.experiment import load_run_data, member_config, needs_radiomics, prepare_run, run_dir_of
    from qsmrim.models import is_stackable
    from qsmrim.training import fit_member
    from qsmrim.training.fit_stack import fit_members, stacking_pays
    from qsmrim.training.layout import RunLayout, member_dir, splits_path, stack_dir

    cfg = _load_cfg(args)
    model = args.model or cfg.models[0]
    seeds = list(dict.fromkeys(args.seed))
    if args.out and len(seeds) > 1:
        raise ConfigError("--out names one member folder; give one --seed with it")
    run = run_dir_of(cfg, args.run)
    if not splits_path(run).exists() or not RunLayout(run).patches.exists():
        prepare_run(cfg, run)
    mcfg = member_config(cfg, model)
    data = load_run_data(run, with_features=needs_radiomics([model]))
    splits = _json.loads(splits_path(run).read_text())
    outs = [Path(args.out)] if args.out else [member_dir(run, model, args.fold, s) for s in seeds]

    def _progress(epoch: int, row: dict) -> None:
        print(f"  epoch {epoch:>3}/{row.get('epochs', mcfg.epochs)}  loss {row['train_loss']:.4f}  "
              f"{row['samples_per_s']:.0f} samples/s",
              flush=True)  # fmt: skip

    def _stack_progress(epoch: int, rows: dict) -> None:
        losses = "  ".join(f"seed {s} {r['train_loss']:.4f}" for s, r in rows.items())
        total = next(iter(rows.values())).get("epochs", mcfg.epochs)
        print(f"  epoch {epoch:>3}/{total}  loss {losses}", flush=True)

    if len(seeds) > 1 and is_stackable(model) and not args.no_stack and stacking_pays(mcfg):
        members = fit_members(mcfg, data, splits, args.fold, seeds, out_dirs=outs,
                              checkpoint_dir=stack_dir(run, model, [(args.fold, s) for s in seeds]),
                              on_epoch=_stack_progress)  # fmt: skip
    else:
        members = [fit_member(mcfg, data, splits, args.fold, s, out_dir=o, on_epoch=_progress)
                   for s, o in zip(seeds, outs, strict=True)]  # fmt: skip
    for member, out in zip(members, outs, strict=True):
        print(f"wrote {member.name} ({model}) to {out}")
        for k in ("test_roc_auc", "test_average_precision"):
            if k in member.metrics:
                print(f"  {k} {member.metrics[k]:.3f}")
        print(f"  thresholds {_json.dumps(member.thresholds)}")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from qsmrim.console import print_grid_result
    from qsmrim.grid.ray_grid import run_grid
    from qsmrim.locations import config_from_args

    cfg, where = config_from_args(args, run=args.resume)
    print(f"results: {where.describe()}", flush=True)
    return print_grid_result(run_grid(cfg, where.run_dir, progress=not args.no_progress, tracking_uri=where.tracking_uri))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from qsmrim.training.evaluate_run import OOF_FILE, evaluate_run
    from qsmrim.training.layout import RunLayout

    results = evaluate_run(args.run, args.out, with_figures=not args.no_figures)
    out = Path(args.out) if args.out else RunLayout(Path(args.run)).evaluation
    print(f"{'method':<28} {'pROC AUC':>8} {'PR AUC':>7} {'F1':>6} {'sens':>6} {'PPV':>6} {'r':>6}")
    for label, r in sorted(results.items(), key=lambda kv: -(kv[1]["pr"]["auc"] or 0)):
        f = lambda v: f"{v:.3f}" if isinstance(v, int | float) else "  n/a"  # noqa: E731
        print(f"{label:<28} {f(r['proc']['auc']):>8} {f(r['pr']['auc']):>7} {f(r['lesion']['f1']):>6} "
              f"{f(r['lesion']['sensitivity']):>6} {f(r['lesion']['ppv']):>6} {f(r['subject']['r']):>6}")  # fmt: skip
    if results:
        print(f"report: {out / 'report.html'}")
    if (out / OOF_FILE).exists():
        print(f"per-lesion table: {out / OOF_FILE}")
    if results:
        _log_evaluation(Path(args.run), out, results, args.tracking_uri)
    return 0


def _log_evaluation(run: Path, out: Path, results: dict, tracking_uri: str | None) -> None:
    """Log the cv_* metrics and the report to the run's grid parent run, in the store every command uses."""
    from qsmrim.tracking import mlflow_runs as mr

    uri = mr.resolve_tracking_uri(tracking_uri)
    parent = mr.find_grid_run(uri, run)
    if parent is None:
        print(f"MLflow: no grid run of {run.resolve()} in {uri}; nothing logged (--tracking-uri names another store)")
        return
    mr.log_results(uri, parent, metrics=mr.cv_metrics(results), artifacts_dir=out)
    print(f"MLflow: cv_* metrics and the report logged to grid run {parent} in {uri}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qsmrim", description="Paramagnetic rim lesion detection on QSM (QSMRim-Net).")
    p.add_argument("--version", action="version", version=f"qsmrim {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("synth", help="write a synthetic BIDS cohort")
    s.add_argument("out", help="output BIDS root")
    s.add_argument("--subjects", type=int, default=12)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="volume shape (default 160 160 40)")
    s.add_argument("--difficulty", type=float, help="0 (easy) .. 1 (hard), default 0.5")
    s.add_argument("--sessions", type=int, metavar="N",
                   help="write each subject as N sessions sub-<k>/ses-<j>/anat/ (same lesions, new noise)")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("validate", help="check a BIDS root or CSV manifest; print a summary or every problem")
    s.add_argument("root", help="BIDS root or CSV manifest")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_lesion_source_args(s)
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("lesions", help="write the lesion table (Parquet)")
    s.add_argument("root")
    s.add_argument("--out", required=True, help="output .parquet")
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    add_lesion_source_args(s)
    s.set_defaults(func=cmd_lesions)

    s = sub.add_parser("patches", help="build the lesion table and the cached [N,2,16,32,32] patch array")
    s.add_argument("root")
    s.add_argument("--out", required=True, help="output folder (lesions.parquet, patches.npy)")
    s.add_argument("--size", type=int, nargs=3, default=(16, 32, 32), metavar=("Z", "Y", "X"))
    add_lesion_source_args(s)
    s.set_defaults(func=cmd_patches)

    from qsmrim.export.cli import add_export_parser
    from qsmrim.fanout.cli import add_features_parser
    from qsmrim.locations import add_location_arguments
    from serving.cli import add_predict_parser, add_serve_parser

    add_features_parser(sub)  # each sets its own func
    add_export_parser(sub)
    add_predict_parser(sub)
    add_serve_parser(sub)

    s = sub.add_parser("grid", help="run the fold x seed (x model) grid on Ray with MLflow tracking")
    s.add_argument("--config", required=True, help="experiment YAML (platform/experiments/*.yaml)")
    s.add_argument("--resume", metavar="RUN", help="continue the grid in this run folder (finished members are kept)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    s.add_argument("--no-progress", action="store_true", help="no live trial table")
    add_location_arguments(s)
    s.set_defaults(func=cmd_grid)

    s = sub.add_parser("train", help="fit ensemble members of one fold (model, fold, seeds) without Ray")
    s.add_argument("--config", required=True, help="experiment YAML (platform/experiments/*.yaml)")
    s.add_argument("--fold", type=int, required=True)
    s.add_argument("--seed", type=int, nargs="+", required=True,
                   help="one or more seeds; several train stacked as one network (QSMRim-Net family)")
    s.add_argument("--no-stack", action="store_true", help="train several seeds one after another, not stacked")
    s.add_argument("--model", help="registry name (default: the config's first model)")
    s.add_argument("--run", help="run folder (default <runs_dir>/<name>); prepared data and splits.json live here")
    s.add_argument("--out", help="member folder (default <run>/<model>/fold_<k>/seed_<s>)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="evaluate a run's fold ensembles; write report.md and report.html")
    s.add_argument("run", help="run folder")
    s.add_argument("--out", help="report folder (default <run>/evaluation)")
    s.add_argument("--no-figures", action="store_true", help="skip the PNG plots")
    s.add_argument("--tracking-uri", help="MLflow store holding the run's grid run (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite:///<current folder>/mlruns.db)")  # fmt: skip
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("demo", help="run the main job (data, grid, evaluation, ONNX, registry, one served request) "
                       "on the embedded synthetic cohort or --data ROOT")
    s.add_argument("--config", default="platform/experiments/demo.yaml")
    s.add_argument("--out", help="run folder (default <runs_dir>/<name>)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. data.synth_subjects=8")
    s.add_argument("--keep-serving", action="store_true", help="leave the Serve app up after the demo request (Ctrl-C)")
    add_location_arguments(s, base_dir=False)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qsmrim`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        quiet_libraries()
    return run_reporting_errors(lambda: args.func(args))


#: Environment that keeps the libraries we drive from printing their own INFO walls (each configures its own
#: logging on import, so a level set on our root logger does not reach them); ``-v`` leaves them as they are.
QUIET_LIBRARY_ENV = {
    "DASK_LOGGING__DISTRIBUTED": "warning",  # scheduler/worker start and close lines of every LocalCluster
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables..."
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's configuration box, results path and TensorBoard hint (even at verbose=0)
}


def quiet_libraries() -> None:
    """Apply :data:`QUIET_LIBRARY_ENV` (a value the user set wins); our own progress views stay."""
    import os

    for key, value in QUIET_LIBRARY_ENV.items():
        os.environ.setdefault(key, value)
    # "Token authentication is enabled for this Ray cluster": Ray's default, good news, said at every ray.init.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


if __name__ == "__main__":
    raise SystemExit(main())
