"""A live terminal table of the grid's trials (fold, seeds, epoch, loss, state), as a Ray Tune callback.

Trial errors are printed with their model/fold/seeds and the end of the error file, so they are not
buried in Ray's logs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.tune import Callback

from qsmrim.grid.specs import GridTrial

__all__ = ["TrialTable"]

log = logging.getLogger(__name__)


class TrialTable(Callback):
    """Rich live table; a no-op (logging only) when ``enabled`` is False or stdout is not a terminal."""

    def __init__(self, epochs: int, *, enabled: bool = True):
        self.epochs = epochs
        self.enabled = enabled
        self.rows: dict[str, dict[str, Any]] = {}
        self._live = None

    def __enter__(self) -> TrialTable:
        if self.enabled:
            from rich.console import Console
            from rich.live import Live

            console = Console()
            if console.is_terminal:
                self._live = Live(self._render(), console=console, refresh_per_second=2, transient=False)
                self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None

    @staticmethod
    def _spec(trial) -> tuple[str, str, str]:
        c: GridTrial = trial.config["trial"]
        folds = sorted({str(f) for f, _ in c.members})
        seeds = sorted({str(s) for _, s in c.members})
        return c.model, ",".join(folds), ",".join(seeds)

    def _key(self, trial) -> str:
        return "|".join(self._spec(trial))

    def _update(self, trial, **kw) -> None:
        row = self.rows.setdefault(self._key(trial), {"state": "PENDING", "epoch": 0, "loss": None})
        row.update(kw)
        if self._live is not None:
            self._live.update(self._render())

    def _render(self):
        from rich.table import Table

        t = Table(title="qsmrim grid", expand=False)
        for col in ("model", "folds", "seeds", "epoch", "loss", "state"):
            t.add_column(col, justify="right" if col in ("folds", "seeds", "epoch", "loss") else "left")
        for key in sorted(self.rows):
            model, fold, seed = key.split("|")
            r = self.rows[key]
            loss = f"{r['loss']:.4f}" if isinstance(r.get("loss"), float) else "-"
            t.add_row(model, fold, seed, f"{r['epoch']}/{r.get('epochs') or self.epochs}", loss, r["state"])
        return t

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trial, state="RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        kw: dict[str, Any] = {"epoch": int(result.get("epoch", 0) or 0)}
        if result.get("epochs"):  # the fit's own count: min_steps raises it on small cohorts
            kw["epochs"] = int(result["epochs"])
        if "train_loss" in result:
            kw["loss"] = float(result["train_loss"])
        if result.get("skipped"):
            kw.update(state="DONE (resumed)", epoch=self.epochs)
        self._update(trial, **kw)

    def on_trial_complete(self, iteration, trials, trial, **info):
        state = self.rows.get(self._key(trial), {}).get("state", "")
        self._update(trial, state=state if state.startswith("DONE") else "DONE")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trial, state="ERROR")
        model, fold, seeds = self._spec(trial)
        tail = ""
        err = Path(trial.local_path or "", "error.txt") if getattr(trial, "local_path", None) else None
        if err is not None and err.exists():
            tail = "\n".join(err.read_text().strip().splitlines()[-5:])
        log.error("trial %s folds=%s seeds=%s failed:\n%s", model, fold, seeds, tail)
