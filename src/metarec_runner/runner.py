"""Runner: meta-train epochs over task batches, validation, early stopping, the test pass.

The runner owns the loop, the device, the task-sampling RNG and the tracker calls; algorithms
own only their update rules (``meta_step``, ``adapt``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from metarec_runner.algos.base import MetaAlgorithm
from metarec_runner.checkpoint import Checkpoint, CheckpointSink, capture_rng, restore_rng
from metarec_runner.errors import ConfigError, TrainingError, require_choice, require_positive
from metarec_runner.evaluate.evaluator import EvalResult, QueryEvaluator
from metarec_runner.evaluate.metric_specs import UnknownMetric, monitor_mode
from metarec_runner.tasks.taskset import TaskSet
from metarec_runner.tracking.layout import epoch_metrics
from metarec_runner.tracking.lifecycle import raise_if_terminated

DIVERGENCE_FACTOR = 30.0  # a loss this many times its value at the start of training: warn once
_KNOBS = {"train/loss": "algo.meta_optimizer.lr", "train/inner_loss": "algo.inner_lr"}


@dataclass
class TrainerConfig:
    """``conf/trainer/*.yaml``; see the comments there.

    ``val_support_size``: validate (select the epoch, and report to a sweeper tuning the
    algorithm) on every validation user's support cut to its first k items, e.g. 10 to tune
    for k = 10 ratings; users with fewer are left out of validation. ``None`` = the whole support.
    """

    max_epochs: int = 20
    meta_batch_size: int = 32
    monitor: str = "val/rmse"
    monitor_mode: str | None = None
    patience: int = 5
    progress: bool = True
    val_support_size: int | None = None
    checkpoint: bool = True
    resume: str | None = None
    resume_force: bool = False

    def __post_init__(self) -> None:
        require_positive("trainer.max_epochs", self.max_epochs)
        require_positive("trainer.meta_batch_size", self.meta_batch_size)
        if self.patience < 0:
            raise ConfigError("trainer.patience", f"must be >= 0, got {self.patience}")
        if self.val_support_size is not None and self.val_support_size < 0:
            raise ConfigError("trainer.val_support_size", f"must be >= 0 or null, got {self.val_support_size}")
        if not self.monitor.startswith("val/"):
            raise ConfigError("trainer.monitor", f"must be a validation metric like val/rmse, got {self.monitor!r}")
        try:
            derived = monitor_mode(self.monitor)
        except UnknownMetric as e:
            raise ConfigError("trainer.monitor", str(e)) from None
        if self.monitor_mode is not None:
            require_choice("trainer.monitor_mode", self.monitor_mode, ("min", "max"))
            if self.monitor_mode != derived:
                better = "higher" if derived == "max" else "lower"
                raise ConfigError(
                    "trainer.monitor_mode",
                    f"{self.monitor_mode} contradicts trainer.monitor={self.monitor} ({better} is better); "
                    f"remove trainer.monitor_mode or set it to {derived}",
                )
        self.mode = derived  # "max" | "min": the monitored metric's declared direction


@dataclass
class FitResult:
    """What ``fit`` found: the best epoch and its monitored value, and the per-epoch history."""

    best_epoch: int = 0
    best_value: float = math.nan
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


class Runner:
    """Meta-trains ``algo`` and evaluates it with ``evaluator``.

    Args:
        algo: the algorithm (owns the model and the outer optimizer).
        evaluator: scores adapted models on query items.
        tracker: MLflow or null tracker (``log_metrics`` buffers; flushed once per epoch).
        config: trainer settings.
        device: where tensors live.
        seed: seeds the task-sampling generator (meta-batch order).
        dtype: floating dtype of ratings (the model's dtype).
        console: where progress and summaries are printed.
    """

    def __init__(self, algo: MetaAlgorithm, evaluator: QueryEvaluator, tracker, config: TrainerConfig,
                 device: torch.device, seed: int, console: Console | None = None) -> None:
        self.algo = algo
        self.evaluator = evaluator
        self.tracker = tracker
        self.config = config
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = next(algo.model.parameters()).dtype
        self.console = console or Console(stderr=True)
        self._first_step: dict[str, float] | None = None  # the losses of the run's first meta-batch

    def _improved(self, value: float, best: float) -> bool:
        if math.isnan(best):
            return not math.isnan(value)
        return value < best if self.config.mode == "min" else value > best

    def _train_epoch(self, train: TaskSet, epoch: int, progress: Progress, bar) -> dict[str, float]:
        """One pass over the meta-train tasks in a seeded random order."""
        self.algo.model.train()
        order = torch.randperm(len(train), generator=self.generator)
        sums: dict[str, float] = {}
        steps = 0
        start = time.perf_counter()
        for chunk in order.split(self.config.meta_batch_size):
            batch = train.batch(chunk).to(self.device, self.dtype)
            stats = self.algo.meta_step(batch)
            if not all(math.isfinite(v) for v in stats.values()):
                raise TrainingError(
                    f"train/loss became {stats.get('loss')} at epoch {epoch} step {steps + 1}; "
                    "lower algo.meta_optimizer.lr (or algo.inner_lr) and run again"
                )
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            if self._first_step is None:  # the divergence warning's reference
                self._first_step = {f"train/{k}": v for k, v in stats.items()}
            steps += 1
            progress.update(bar, advance=len(chunk))
            raise_if_terminated()  # a SIGTERM whose own raise was swallowed (lifecycle.py)
        seconds = time.perf_counter() - start
        out = {f"train/{k}": v / steps for k, v in sums.items()}
        out["sys/sec_per_outer_step"] = seconds / steps
        out["sys/train_tasks_per_sec"] = len(train) / seconds
        return out

    def fit(self, train: TaskSet, val: TaskSet, checkpoints: CheckpointSink | None = None,
            resume: Checkpoint | None = None) -> FitResult:
        """Meta-train with validation every epoch and early stopping on ``config.monitor``.

        The model ends in its best validation state. An algorithm that ``fits_once`` (the
        closed-form and counting scorers) is fitted by one call instead: :meth:`fit_once`.

        Args:
            checkpoints: where ``last.pt`` (every epoch) and ``best.pt`` (every improvement) go.
            resume: a ``last.pt`` to continue from: the algorithm, the best state, the history,
                the early-stopping counter and every RNG state are put back, so the run ends
                exactly where an uninterrupted one does. Its epochs are not trained again.
        """
        if self.algo.fits_once:
            return self.fit_once(train, val, checkpoints)
        result = FitResult()
        best_state = None
        stale = 0
        first_epoch = 1
        if resume is not None:
            best_state, stale, first_epoch = self._resume(resume, result)
            if first_epoch > self.config.max_epochs or (stale and stale >= max(self.config.patience, 1)):
                self.console.print(f"resumed after epoch {resume.epoch}: nothing left to train "
                                   f"(trainer.max_epochs={self.config.max_epochs})", highlight=False)
                if best_state is not None:
                    self.algo.load_state_dict(best_state)
                return result
            self.console.print(f"resuming after epoch {resume.epoch} (best epoch {result.best_epoch}: "
                               f"{self.config.monitor}={result.best_value:.4f})", highlight=False)
        self._print_header(train)
        watch = _DivergenceWatch(result.history)
        epoch_seconds: list[float] = []
        with Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
            console=self.console, disable=not self.config.progress, transient=True,
        ) as progress:
            bar = progress.add_task("train", total=len(train), epoch=first_epoch,
                                    epochs=self.config.max_epochs, info="")
            for epoch in range(first_epoch, self.config.max_epochs + 1):
                progress.reset(bar, total=len(train), epoch=epoch, epochs=self.config.max_epochs,
                               info=progress.tasks[0].fields.get("info", ""))
                epoch_start = time.perf_counter()
                metrics = self._train_epoch(train, epoch, progress, bar)
                val_result = self.evaluator.evaluate(self.algo, val, "val", self.device)
                metrics.update(val_result.summary)
                if self.device.type == "cuda":
                    metrics["sys/peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
                value = metrics.get(self.config.monitor, math.nan)
                if self.config.monitor not in metrics:
                    raise ConfigError("trainer.monitor", f"{self.config.monitor!r} is not computed; "
                                      f"choose one of {', '.join(k for k in metrics if k.startswith('val/'))}")
                if not math.isfinite(value):
                    raise TrainingError(f"{self.config.monitor} became {value} at epoch {epoch}; lower "
                                        "algo.meta_optimizer.lr (or algo.inner_lr) and run again")
                improved = self._improved(value, result.best_value)
                state = self.algo.state_dict()
                if improved:
                    result.best_epoch, result.best_value, stale = epoch, value, 0
                    best_state = copy.deepcopy(state)
                else:
                    stale += 1
                metrics["val/best_" + self.config.monitor[4:]] = result.best_value
                result.history.append({"epoch": epoch, **metrics})
                if checkpoints is not None:  # before the metrics are logged: resume re-logs what is missing
                    checkpoints.write(state, best_state, {
                        "epoch": epoch, "best_epoch": result.best_epoch, "best_value": result.best_value,
                        "stale": stale, "history": result.history},
                        capture_rng({"runner": self, "algo": self.algo}), improved)
                self.tracker.log_metrics(epoch_metrics(metrics), step=epoch)
                self.tracker.flush()
                epoch_seconds.append(time.perf_counter() - epoch_start)
                left = self.config.max_epochs - epoch
                eta = f"  ETA {_duration(left * sum(epoch_seconds) / len(epoch_seconds))}" if left else ""
                self.console.print(
                    f"epoch {epoch:>3}/{self.config.max_epochs}  train/loss={metrics['train/loss']:.4f}  "
                    f"{self.config.monitor}={value:.4f}{' *' if improved else '  '}  "
                    f"{metrics['sys/train_tasks_per_sec']:.0f} tasks/s  {epoch_seconds[-1]:.1f} s/epoch{eta}",
                    highlight=False, soft_wrap=True,
                )
                warning = watch.check(epoch, metrics, self._first_step)
                if warning:
                    self.console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
                progress.update(bar, info=f"{self.config.monitor}={value:.4f}")
                if stale and stale >= max(self.config.patience, 1):
                    result.stopped_early = True
                    self.console.print(
                        f"early stop at epoch {epoch}: no {self.config.monitor} improvement for {stale} "
                        f"epochs (trainer.patience={self.config.patience}); best epoch {result.best_epoch}",
                        highlight=False, soft_wrap=True)
                    break
        if best_state is not None:
            self.algo.load_state_dict(best_state)
        return result

    def _resume(self, ckpt: Checkpoint, result: FitResult) -> tuple[dict | None, int, int]:
        """Put a ``last.pt`` back: ``(best state, stale epochs, first epoch to train)``."""
        meta = ckpt.meta
        self.algo.load_state_dict(ckpt.algo)
        best = meta.get("best_value")
        result.best_epoch = int(meta.get("best_epoch", 0))
        result.best_value = math.nan if best is None else float(best)
        result.history = list(meta.get("history", []))
        restore_rng(ckpt.rng, meta.get("rng", {}), {"runner": self, "algo": self.algo})
        return ckpt.best_algo, int(meta.get("stale", 0)), ckpt.epoch + 1

    def fit_once(self, train: TaskSet, val: TaskSet, checkpoints: CheckpointSink | None = None) -> FitResult:
        """Fit a closed-form or counting algorithm on the meta-train tasks in one call, then
        validate it once: no epochs, no early stopping, nothing to select (``best_epoch`` 0).

        The monitored value is reported when the algorithm computes it (a ranking-only scorer
        has no ``val/rmse``); it is what a sweeper tuning the algorithm's knobs receives.
        """
        start = time.perf_counter()
        self.algo.fit(train)
        seconds = time.perf_counter() - start
        metrics = {"sys/fit_seconds": seconds}
        metrics.update(self.evaluator.evaluate(self.algo, val, "val", self.device).summary)
        value = metrics.get(self.config.monitor, math.nan)
        self.tracker.log_metrics(epoch_metrics(metrics), step=0)
        self.tracker.flush()
        shown = f"{self.config.monitor}={value:.4f}" if self.config.monitor in metrics else (
            f"{self.config.monitor} not defined for {type(self.algo).__name__}")
        self.console.print(f"fitted once in {seconds:.2f} s (no epochs)  {shown}", highlight=False)
        result = FitResult(best_epoch=0, best_value=value, history=[{"epoch": 0, **metrics}])
        if checkpoints is not None:
            checkpoints.write(self.algo.state_dict(), None, {
                "epoch": 0, "best_epoch": 0, "best_value": value, "stale": 0, "history": result.history},
                capture_rng({"runner": self, "algo": self.algo}), improved=True, last=False)
        return result

    def _print_header(self, train: TaskSet) -> None:
        """One line before the first epoch: the model's size and the shape of an epoch."""
        params = list(self.algo.model.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        extra = sum(p.numel() for v in vars(self.algo).values()  # learned step sizes (Meta-SGD)...
                    if isinstance(v, torch.nn.Module) and v is not self.algo.model for p in v.parameters())
        steps = math.ceil(len(train) / self.config.meta_batch_size)
        self.console.print(
            f"{type(self.algo).__name__} on {type(self.algo.model).__name__}: {total:,} parameters "
            f"({trainable:,} trainable{f', +{extra:,} of the algorithm' if extra > 0 else ''}); "
            f"up to {self.config.max_epochs} epochs of {steps} meta-batches ({len(train)} tasks, "
            f"{self.config.meta_batch_size} a batch)", highlight=False, soft_wrap=True)

    def test(self, test: TaskSet) -> EvalResult:
        """Adapt on every test task's support set and score its query items."""
        return self.evaluator.evaluate(self.algo, test, "test", self.device)


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _DivergenceWatch:
    """Warns once when a training loss (an epoch's mean) grows past :data:`DIVERGENCE_FACTOR`
    times its value at the start of training: the run's first meta-batch (the first epoch's
    mean when resuming), naming the step size to lower."""

    def __init__(self, history: list[dict[str, float]]) -> None:
        self.first: dict[str, float] = {}
        self.warned = False
        for row in history[:1]:
            self.first = {k: abs(float(row[k])) for k in _KNOBS if k in row}
        self.what = "its first epoch's"

    def check(self, epoch: int, metrics: dict[str, float], first_step: dict[str, float] | None = None) -> str | None:
        """The warning to print after ``epoch`` (once per run), or None."""
        if not self.first and first_step:
            self.first = {k: abs(float(first_step[k])) for k in _KNOBS if k in first_step}
            self.what = "its first step's"
        if self.warned or not self.first:
            return None
        for key, knob in _KNOBS.items():
            first, now = self.first.get(key), metrics.get(key)
            if first is None or now is None or not first > 0 or abs(now) <= DIVERGENCE_FACTOR * first:
                continue
            self.warned = True
            return (f"{key} is {abs(now) / first:.0f}x {self.what} ({first:.4g} -> {abs(now):.4g} at epoch "
                    f"{epoch}): training is diverging; lower {knob} and run again")
        return None
