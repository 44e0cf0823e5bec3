"""Build a run from its config: data, splits, trainer, evaluator, model, algorithm, tracker.

:class:`Prepared` builds and checks everything before anything is written to the tracker, so a bad
value stops the run with one line and leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from metarec_runner.config.rules import check_config
from metarec_runner.errors import ConfigError, MetarecError
from metarec_runner.evaluate.candidates import Catalog
from metarec_runner.evaluate.metric_specs import needs_ratings
from metarec_runner.utils import resolve_device, resolve_dtype, seed_everything


def build(group: str, node: DictConfig, **kwargs):
    """Instantiate a config group's object; failures become one-line ConfigErrors naming ``group``.

    Runtime objects (``schema``, ``model``) are passed to the partially instantiated target, so
    Hydra never tries to turn them into config nodes.
    """
    target = node.get("_target_", "?")
    try:
        if kwargs:
            return instantiate(node, _partial_=True)(**kwargs)
        return instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise cause.under(group) from None
        if isinstance(cause, MetarecError):
            raise cause from None
        raise ConfigError(group, f"cannot build {target}: {cause or e}") from None
    except ConfigError as e:
        raise e.under(group) from None
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise ConfigError(group, f"cannot build {target}: {e}") from None


def validate(cfg: DictConfig, overrides: Sequence[str] | None = None) -> None:
    """Every config value and cross-key rule (:func:`metarec_runner.config.rules.check_config`,
    which ``metarec train`` already ran before importing this module); raises ConfigError.
    ``overrides``: the command line's (default: Hydra's, when a Hydra app runs)."""
    if overrides is None:
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else ()
    check_config(cfg, overrides)


class Prepared:
    """Everything a run needs, built and checked before anything is written to the tracker."""

    def __init__(self, cfg: DictConfig, overrides: Sequence[str] | None = None) -> None:
        validate(cfg, overrides)
        if cfg.threads is not None:
            torch.set_num_threads(int(cfg.threads))
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype)
        seed_everything(cfg.split_seed)
        self.data = build("dataset", cfg.dataset)
        self.splits = build("splitter", cfg.splitter)(self.data)
        seed_everything(cfg.seed)
        self.trainer = build("trainer", cfg.trainer)
        self.val_tasks = self.splits.val  # what model selection sees (the split keeps its hash)
        k = self.trainer.val_support_size
        if k is not None:  # validate (select, tune) at k support items
            val = self.splits.val
            self.val_tasks = val.subset(val.support_sizes >= k).with_support_size(k)
            if len(self.val_tasks) == 0:
                raise ConfigError("trainer.val_support_size", f"no validation user has {k} support "
                                  "items; lower trainer.val_support_size")
        self.evaluator = build("evaluator", cfg.evaluator)
        known = [f"val/{m}" for m in self.evaluator.metric_names]
        if self.trainer.monitor not in known:
            raise ConfigError("trainer.monitor", f"{self.trainer.monitor!r} is not computed; choose one "
                              f"of {', '.join(known)}")
        train = self.splits.train
        train_mean = float((train.support_y.sum() + train.query_y.sum())
                           / max(train.support_y.numel() + train.query_y.numel(), 1))
        catalog = Catalog.from_interactions(self.data)
        self.evaluator.bind(catalog, rating_mean=train_mean, item_counts=train.item_counts(self.data.n_items))
        self.evaluator.check_tasks(self.val_tasks, "val")
        self.evaluator.check_tasks(self.splits.test, "test")
        mean = float(self.splits.train.support_y.mean())
        model = build("model", cfg.model, schema=self.data.schema, rating_mean=mean)
        self.model = model.to(device=self.device, dtype=self.dtype)
        # the feature-row layout, for algorithms that read raw fields (group_popularity)
        self.model.schema = self.data.schema
        self.algo = build("algo", cfg.algo, model=self.model)
        # ranking losses draw negatives from the evaluator's catalog (popularity: meta-train counts)
        bind = getattr(self.algo, "bind_catalog", None)
        if bind is not None:
            bind(catalog, self.splits.train)
        fits_once = self.algo.fits_once
        if (not fits_once and not getattr(self.algo, "predicts_ratings", True)
                and needs_ratings(self.trainer.monitor)):
            ranking = [m for m in known if not needs_ratings(m)]
            raise ConfigError(
                "trainer.monitor", f"{self.trainer.monitor} needs rating predictions and algo "
                f"{type(self.algo).__name__} does not predict ratings; choose one of {', '.join(ranking)}")
        if self.evaluator.adaptation_steps and not hasattr(self.algo, "eval_inner_steps"):
            raise ConfigError("evaluator.adaptation_steps", f"algo {type(self.algo).__name__} takes no inner "
                              "steps; set evaluator.adaptation_steps=[]")
        self.tracker = build("logger", cfg.logger)
