"""The schema: every dotted config key metarec checks, and the choices it restates."""

from __future__ import annotations

from metarec_runner.config.spec import Bool, Choice, Int, Ints, Names, Number, Spec, Text
from metarec_runner.evaluate.metric_specs import METRIC_SPECS

PROTOCOLS = ("all_unseen", "sampled", "query_only")  # evaluate.candidates.PROTOCOLS
RELEVANCE_RULES = ("threshold", "top_n")  # evaluate.metrics.RELEVANCE_RULES
TIE_BREAKS = ("position", "random", "topk")  # evaluate.metrics.TIE_BREAKS
GAINS = ("exp", "linear")  # evaluate.metrics.GAINS
CI_METHODS = ("normal", "bootstrap")  # evaluate.stats.CI_METHODS
SCOPES = ("head", "all")  # algos.base.SCOPES
LOSSES = ("mse", "bce", "bpr", "softmax")  # algos.functional.LOSSES
RANKING_LOSSES = ("bce", "bpr", "softmax")  # algos.ranking_loss.RANKING_LOSSES
NEGATIVES = ("uniform", "popularity")  # algos.negatives.NEGATIVES
AUX_LOSSES = ("none", "support")  # algos.base.AUX_LOSSES
ANNEALS = ("linear", "none")  # algos.reptile.ANNEALS
STATES = ("warm", "user_cold", "item_cold", "user_item_cold")  # tasks.four_states.STATES
CUTS = ("time", "quantile")  # tasks.four_states.CUTS
OTHERS = ("drop", "zero")  # tasks.implicit.OTHERS
FILTERED_USERS = ("train", "drop")  # tasks.splitters.FILTERED_USERS
KMEANS_INPUTS = ("features", "ratings")  # tasks.user_groups.KMEANS_INPUTS
DUPLICATE_POLICIES = ("keep_last", "mean", "error")  # data.encode.DUPLICATE_POLICIES
RATING_SCALES = ("raw", "unit")  # data.encode.RATING_SCALES
FEEDBACK = ("explicit", "binary", "log")  # data.tabular.FEEDBACK
MOVIELENS = ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m", "ml-latest-small",
             "ml-latest")  # data.movielens.FORMATS
DTYPES = ("float32", "float64")  # utils.resolve_dtype

_LR = "a zero learning rate trains nothing"

SCHEMA: dict[str, Spec] = {
    # top level (conf/config.yaml)
    "task_name": Text(example="train"),
    "seed": Int(0, example=0),
    "split_seed": Int(0, example=0),
    "device": Spec("device", example="cpu"),
    "dtype": Choice(*DTYPES),
    "save_split": Bool(),
    "evaluate_test": Bool(),
    "threads": Int(1, nullable=True, example=4),
    # trainer (conf/trainer/default.yaml; trainer.monitor is checked by a rule)
    "trainer.max_epochs": Int(1, example=30),
    "trainer.val_support_size": Int(0, nullable=True, example=10),
    "trainer.meta_batch_size": Int(1, example=32),
    "trainer.monitor": Text(example="val/rmse"),
    "trainer.monitor_mode": Choice("min", "max", nullable=True),
    "trainer.patience": Int(0, example=5),
    "trainer.progress": Bool(),
    "trainer.checkpoint": Bool(),
    "trainer.resume": Text(nullable=True, example="latest"),
    "trainer.resume_force": Bool(),
    # evaluator (conf/evaluator/*.yaml)
    "evaluator.protocol": Choice(*PROTOCOLS),
    "evaluator.n_negatives": Int(0, example=100),
    "evaluator.ks": Ints(1, empty=False, example="[5,10,20]"),
    "evaluator.relevance_threshold": Number(example=4.0),
    "evaluator.batch_size": Int(1, example=64),
    "evaluator.metrics": Names(*METRIC_SPECS, empty=False, example="[rmse,ndcg,recall]"),
    "evaluator.relevance": Choice(*RELEVANCE_RULES),
    "evaluator.top_n": Int(1, example=5),
    "evaluator.tie_break": Choice(*TIE_BREAKS),
    "evaluator.graded_gain": Choice(*GAINS),
    "evaluator.ci": Choice(*CI_METHODS),
    "evaluator.references": Bool(),
    "evaluator.n_boot": Int(1, example=1000),
    "evaluator.seed": Int(0, example=0),
    "evaluator.shots": Ints(0, example="[0,1,3,5]"),
    "evaluator.adaptation_steps": Ints(0, example="[0,1,5]"),
    # splitter (conf/splitter/*.yaml)
    "splitter.ratios": Spec("ratios", example="[0.7,0.1,0.2]"),
    "splitter.n_query": Int(1, example=10),
    "splitter.n_support": Int(1, nullable=True, example=5),
    "splitter.min_interactions": Int(1, example=13),
    "splitter.max_interactions": Int(1, nullable=True, example=100),
    "splitter.seed": Int(0, example=0),
    "splitter.filtered_users": Choice(*FILTERED_USERS),
    "splitter.state": Choice(*STATES),
    "splitter.cut": Choice(*CUTS),
    "splitter.user_cut": Number(example=0.5),
    "splitter.item_cut": Number(nullable=True, example=0.5),
    "splitter.positive_threshold": Number(example=4.0),
    "splitter.others": Choice(*OTHERS),
    "splitter.negatives_per_positive": Int(0, example=1),
    "splitter.group_by": Text(example="kmeans"),
    "splitter.kmeans_on": Choice(*KMEANS_INPUTS),
    "splitter.n_groups": Int(1, example=40),
    "splitter.kmeans_iters": Int(1, example=50),
    "splitter.field": Text(nullable=True, example="genres"),
    "splitter.exclusive_items": Bool(),
    "splitter.path": Text(example="outputs/runs/.../split.parquet"),
    # algo (conf/algo/*.yaml)
    "algo.adapt": Choice(*SCOPES),
    "algo.inner_lr": Number(gt=0, example=0.01, why="a zero step size adapts nothing"),
    "algo.inner_steps": Int(1, example=3),
    "algo.eval_inner_steps": Int(1, nullable=True, example=10),
    "algo.chunks": Int(1, example=2),
    "algo.first_order": Bool(),
    "algo.touched_rows": Bool(),
    "algo.check_fast_path": Bool(),
    "algo.loss": Choice(*LOSSES),
    "algo.negatives": Choice(*NEGATIVES, nullable=True),
    "algo.n_negatives": Int(1, nullable=True, example=20),
    "algo.positive_threshold": Number(nullable=True, example=4.0),
    "algo.aux_loss": Choice(*AUX_LOSSES),
    "algo.aux_weight": Number(ge=0, example=0.1),
    "algo.finetune_lr": Number(gt=0, example=0.05, why="a zero step size adapts nothing"),
    "algo.finetune_steps": Int(1, example=10),
    "algo.support_weight": Number(ge=0, example=1.0),
    "algo.value": Number(nullable=True, example=3.5),
    "algo.shrinkage": Number(ge=0, example=5.0),
    "algo.seed": Int(0, example=0),
    "algo.anneal": Choice(*ANNEALS),
    "algo.anneal_epochs": Int(1, nullable=True, example=30),
    "algo.anneal_steps": Int(1, nullable=True, example=1000),
    **{f"algo.{name}{key}": spec
       for name, nullable in (("meta_optimizer", False), ("body_optimizer", True))
       for key, spec in (
           ("", Spec("mapping", nullable=nullable,
                     example="{_target_: torch.optim.Adam, _partial_: true, lr: 0.002}")),
           ("._target_", Text(example="torch.optim.Adam")),
           (".lr", Number(gt=0, example=0.002, why=_LR)),
           (".weight_decay", Number(ge=0, example=0.0001)),
           (".momentum", Number(ge=0, example=0.9)),
       )},
    # model (conf/model/*.yaml)
    "model.embedding_dim": Int(1, example=32),
    "model.hidden": Ints(1, distinct=False, example="[64,64]"),
    "model.hidden_dim": Int(1, example=32),
    "model.fields": Names(empty=False, nullable=True, example="[item_id,category]"),
    "model.item_fields": Names(empty=False, nullable=True, example="[item_id]"),
    "model.init_std": Number(gt=0, example=0.05,
                             why="all-zero factors get zero gradients and never learn"),
    # dataset (conf/dataset/*.yaml; dataset.name of MovieLens is checked by a rule)
    "dataset.name": Text(example="toy"),
    "dataset.n_users": Int(1, example=400),
    "dataset.n_items": Int(2, example=300),
    "dataset.n_brands": Int(1, example=24),
    "dataset.interactions_per_user": Ints(1, empty=False, distinct=False, example="[20,60]"),
    "dataset.noise_std": Number(ge=0, example=0.4),
    "dataset.taste_std": Number(ge=0, example=0.9),
    "dataset.quality_std": Number(ge=0, example=0.4),
    "dataset.popularity_exponent": Number(ge=0, example=1.0),
    "dataset.integer_ratings": Bool(),
    "dataset.seed": Int(0, example=0),
    "dataset.rating_scale": Choice(*RATING_SCALES),
    "dataset.duplicates": Choice(*DUPLICATE_POLICIES),
    "dataset.title_tokens": Bool(),
    "dataset.max_title_tokens": Int(1, example=16),
    "dataset.cache": Bool(),
    "dataset.feedback": Choice(*FEEDBACK),
    "dataset.min_user_interactions": Int(0, example=0),
    "dataset.max_user_interactions": Int(1, nullable=True, example=100),
    "dataset.min_item_interactions": Int(0, example=0),
    "dataset.max_item_interactions": Int(1, nullable=True, example=100),
    "dataset.max_bag_size": Int(1, nullable=True, example=16),
    "dataset.header": Bool(),
    "dataset.data_dir": Text(nullable=True, example="/data"),
}
"""Dotted key -> what it accepts. Only keys present in the composed config are checked."""


