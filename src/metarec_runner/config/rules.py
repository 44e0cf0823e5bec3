"""Reading values from a composed config, the cross-key rules, and :func:`check_config`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from metarec_runner.config.schema import MOVIELENS, RANKING_LOSSES, SCHEMA
from metarec_runner.config.spec import _ABSENT, show
from metarec_runner.errors import ConfigError
from metarec_runner.evaluate.metric_specs import METRIC_SPECS, metric_columns, monitor_mode

# -- reading values ---------------------------------------------------------------------------

def value_of(cfg: DictConfig, key: str) -> object:
    """The resolved value of ``key`` as plain Python (lists, dicts), or ``_ABSENT`` when the
    composed config has no such key. A ``???`` or an interpolation that cannot be resolved is a
    one-line ConfigError naming ``key``."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except MissingMandatoryValue:
        spec = SCHEMA.get(key)
        like = f", e.g. {key}={spec.example}" if spec and spec.example else ""
        raise ConfigError(key, f"has no value (???); set it on the command line{like}") from None
    except OmegaConfBaseException as e:
        raise _unresolved(key, e) from None
    if isinstance(value, DictConfig | ListConfig):
        try:
            return OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as e:
            inner = str(getattr(e, "full_key", "") or key)
            raise ConfigError(inner, f"has no value (???); set it, e.g. {inner}=...") from None
        except OmegaConfBaseException as e:
            raise _unresolved(key, e) from None
    return value


def _unresolved(key: str, e: OmegaConfBaseException) -> ConfigError:
    """``key`` (or the entry under it that failed) has an interpolation that cannot resolve."""
    inner = str(getattr(e, "full_key", "") or key)
    if not inner.startswith(key):
        inner = key
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ConfigError(inner, f"cannot be resolved: {first}; fix the value of {inner}")


def typed_keys(overrides: Iterable[str]) -> list[str]:
    """The keys of command-line overrides, in order: ``+algo.x=1`` -> ``algo.x``."""
    if isinstance(overrides, ListConfig):  # Hydra's overrides.task: never resolve ${...} here
        overrides = OmegaConf.to_container(overrides, resolve=False)
    keys = []
    for o in overrides:
        key = str(o).split("=", 1)[0].lstrip("+~").split("@", 1)[0]
        keys.append(key)
    return keys


def blame(typed: Sequence[str], *keys: str) -> str:
    """Of the ``keys`` a cross-key rule involves, the one the user typed last (the first of
    ``keys`` when none was typed)."""
    for key in reversed(typed):
        if key in keys:
            return key
    return keys[0]


# -- cross-key rules --------------------------------------------------------------------------

Rule = Callable[[Callable[[str], object], Sequence[str]], None]
"""A rule reads values through ``get(key)`` (``_ABSENT`` when absent) and raises ConfigError."""


def _has(*values: object) -> bool:
    return all(v is not _ABSENT for v in values)


def rule_algo_chosen(get, typed) -> None:
    """``+algo=<name>`` is required (the primary config has no default algorithm)."""
    if get("algo") is None:
        from metarec_runner.paths import group_options

        raise ConfigError("algo", "no algorithm chosen; add +algo=<name> with one of: "
                          f"{', '.join(group_options('algo'))}")


def rule_monitor(get, typed) -> None:
    """``trainer.monitor`` is ``val/<column>`` of a metric the evaluator computes, and an
    explicit ``trainer.monitor_mode`` agrees with that metric's declared direction."""
    monitor, mode = get("trainer.monitor"), get("trainer.monitor_mode")
    metrics, ks = get("evaluator.metrics"), get("evaluator.ks")
    if not _has(monitor):
        return
    known = ([f"val/{c}" for c in metric_columns(metrics, ks)] if _has(metrics, ks)
             else [f"val/{m}" for m in METRIC_SPECS])
    if monitor not in known:
        if not monitor.startswith("val/"):
            problem = f"must be a validation metric val/<metric>, got {show(monitor)}"
        else:
            problem = f"{show(monitor)} is not computed by this evaluator"
        raise ConfigError("trainer.monitor", f"{problem}; choose one of {', '.join(known)} "
                          "(or add the metric to evaluator.metrics)")
    if mode not in (_ABSENT, None):
        derived = monitor_mode(monitor)
        if mode != derived:
            better = "higher" if derived == "max" else "lower"
            raise ConfigError("trainer.monitor_mode",
                              f"{mode} contradicts trainer.monitor={monitor} ({better} is "
                              f"better); remove trainer.monitor_mode or set it to {derived}")


def rule_task_sizes(get, typed) -> None:
    """A task needs ``n_query`` query rows and ``n_support`` (or at least one) support rows, so
    ``splitter.min_interactions`` must admit only tasks that large; ``max_interactions`` must
    not be below ``min_interactions``."""
    n_query, n_support = get("splitter.n_query"), get("splitter.n_support")
    low, high = get("splitter.min_interactions"), get("splitter.max_interactions")
    if not _has(n_query, n_support, low):
        return
    need = n_query + (n_support or 1)
    if low < need:
        key = blame(typed, "splitter.n_query", "splitter.n_support", "splitter.min_interactions")
        support = f"splitter.n_support={n_support} support" if n_support else "1 support"
        raise_low = f"raise splitter.min_interactions to {need}"
        fix = {
            "splitter.n_query": (f"lower splitter.n_query to {low - (n_support or 1)} or "
                                 f"{raise_low}" if low - (n_support or 1) >= 1 else raise_low),
            "splitter.n_support": (f"lower splitter.n_support to {low - n_query} or {raise_low}"
                                   if low - n_query >= 1 else
                                   f"set splitter.n_support=null or {raise_low}"),
            "splitter.min_interactions": raise_low,
        }[key]
        raise ConfigError(key, f"splitter.n_query={n_query} query + {support} rows need tasks "
                          f"of >= {need} interactions, but splitter.min_interactions={low} "
                          f"admits smaller ones; {fix}")
    if _has(high) and high is not None and high < low:
        key = blame(typed, "splitter.max_interactions", "splitter.min_interactions")
        raise ConfigError(key, f"splitter.max_interactions={high} is below "
                          f"splitter.min_interactions={low}; raise splitter.max_interactions "
                          "or set it to null")


def rule_quantile_cuts(get, typed) -> None:
    """``splitter.cut=quantile`` takes fractions in (0, 1) for ``user_cut`` and ``item_cut``."""
    if get("splitter.cut") != "quantile":
        return
    for key in ("splitter.user_cut", "splitter.item_cut"):
        value = get(key)
        if _has(value) and value is not None and not 0 < value < 1:
            raise ConfigError(key, f"splitter.cut=quantile needs a fraction in (0, 1), got "
                              f"{show(value)}; e.g. {key}=0.5, or set splitter.cut=time for a "
                              "timestamp")


def rule_anneal_horizon(get, typed) -> None:
    """``algo.anneal=linear`` (Reptile) needs a horizon: ``anneal_epochs`` or ``anneal_steps``."""
    if (get("algo.anneal") == "linear" and get("algo.anneal_epochs") in (None, _ABSENT)
            and get("algo.anneal_steps") in (None, _ABSENT)):
        key = blame(typed, "algo.anneal_epochs", "algo.anneal_steps", "algo.anneal")
        raise ConfigError(key, "algo.anneal=linear needs a horizon; set algo.anneal_epochs (e.g. "
                          "${trainer.max_epochs}) or algo.anneal_steps, or use algo.anneal=none")


def rule_sampled_negatives(get, typed) -> None:
    """``evaluator.protocol=sampled`` draws ``n_negatives >= 1`` items per task."""
    if get("evaluator.protocol") == "sampled" and get("evaluator.n_negatives") == 0:
        raise ConfigError("evaluator.n_negatives", "must be >= 1 for evaluator.protocol=sampled, "
                          "got 0; set evaluator.n_negatives to an integer >= 1 like 100")


_MULTI_USER_TASKS = (".ItemColdStart", ".UserGroups", ".Domains")  # splitters whose tasks mix users


def rule_ranking_loss(get, typed) -> None:
    """``algo.loss=mse`` takes no ``algo.negatives``; a ranking loss (``bpr``, ``softmax``, ``bce``
    with negatives) needs a model that reads ``item_id`` and tasks of one user each."""
    loss, negatives = get("algo.loss"), get("algo.negatives")
    if not _has(loss):
        return
    if loss == "mse" and negatives not in (None, _ABSENT):
        key = blame(typed, "algo.negatives", "algo.loss")
        raise ConfigError(key, f"algo.loss=mse regresses ratings and takes no sampled negatives, got "
                          f"algo.negatives={negatives}; set algo.negatives=null or use algo.loss=bpr, "
                          "softmax or bce")
    ranked = loss in RANKING_LOSSES and (loss != "bce" or negatives not in (None, _ABSENT))
    if not ranked or negatives is _ABSENT:  # an algo without negatives (set_ranker) ranks by itself
        return
    lists = {k: get(k) for k in ("model.fields", "model.item_fields") if get(k) is not _ABSENT}
    if lists and all(isinstance(v, list) and "item_id" not in v for v in lists.values()):
        key = blame(typed, *lists, "algo.loss")
        raise ConfigError(key, f"algo.loss={loss} ranks sampled negatives against the user's items, "
                          f"which needs a model that reads item ids; {key}={show(get(key))} has no "
                          "item_id; add item_id to it (or set it to null), or use algo.loss=mse")
    monitor = get("trainer.monitor")
    if monitor in ("val/rmse", "val/mae"):
        key = blame(typed, "trainer.monitor", "algo.loss")
        raise ConfigError(key, f"algo.loss={loss} trains ranking scores, not ratings, so "
                          f"trainer.monitor={monitor} is not computed; monitor a ranking metric, e.g. "
                          "trainer.monitor=val/ndcg_at_10")
    target = get("splitter._target_")
    if isinstance(target, str) and target.endswith(_MULTI_USER_TASKS):
        raise ConfigError("algo.loss", f"algo.loss={loss} draws negatives per user, but {target} "
                          "tasks hold rows of several users; use a user splitter (user_cold_start, "
                          "temporal, implicit, four_states) or algo.loss=mse")


_TRIVIAL_AT_K = ("recall", "precision", "hit")


def rule_query_only_cutoffs(get, typed) -> None:
    """Under ``evaluator.protocol=query_only`` the candidates are the ``splitter.n_query``
    query items (explicit feedback): recall/precision/hit at a cut-off ``k >= n_query`` and
    ``relevance=top_n`` with ``top_n >= n_query`` would not depend on the ranking."""
    n_query = get("splitter.n_query")
    if get("evaluator.protocol") != "query_only" or not _has(n_query):
        return
    if get("splitter.negatives_per_positive") not in (_ABSENT, 0):
        return  # implicit tasks: the query also holds sampled negatives
    metrics, ks = get("evaluator.metrics"), get("evaluator.ks")
    trivial = [m for m in metrics if m in _TRIVIAL_AT_K] if _has(metrics) else []
    bad = [k for k in ks if k >= n_query] if trivial and _has(ks) else []
    if bad:
        key = blame(typed, "evaluator.ks", "splitter.n_query")
        raise ConfigError(key, f"cut-offs {show(bad)} of evaluator.ks are >= splitter.n_query="
                          f"{n_query}, the query_only candidate set: {', '.join(trivial)}@k would "
                          f"not depend on the ranking; use cut-offs below {n_query} or raise "
                          "splitter.n_query")
    top_n = get("evaluator.top_n")
    if get("evaluator.relevance") == "top_n" and _has(top_n) and top_n >= n_query:
        key = blame(typed, "evaluator.top_n", "splitter.n_query")
        raise ConfigError(key, f"evaluator.top_n={top_n} is >= splitter.n_query={n_query}: every "
                          f"query item would be relevant; use evaluator.top_n below {n_query} or "
                          "raise splitter.n_query")


def rule_toy_interactions(get, typed) -> None:
    """The toy catalog's ``interactions_per_user`` is ``[lo, hi]`` with ``lo <= hi <= n_items``."""
    pair, n_items = get("dataset.interactions_per_user"), get("dataset.n_items")
    if not _has(pair):
        return
    if len(pair) != 2 or pair[0] > pair[1] or (_has(n_items) and pair[1] > n_items):
        limit = f" <= dataset.n_items={n_items}" if _has(n_items) else ""
        raise ConfigError("dataset.interactions_per_user", f"must be a pair [lo, hi] with "
                          f"1 <= lo <= hi{limit}, got {show(pair)}; e.g. "
                          "dataset.interactions_per_user=[20,60]")


def rule_movielens_release(get, typed) -> None:
    """A MovieLens dataset's ``name`` is one of the known releases."""
    target, name = get("dataset._target_"), get("dataset.name")
    if (isinstance(target, str) and target.endswith(".load_movielens") and _has(name)
            and name not in MOVIELENS):
        raise ConfigError("dataset.name", f"unknown MovieLens release {show(name)}; choose one of "
                          f"{', '.join(MOVIELENS)}")


def rule_dataset_filters(get, typed) -> None:
    """``dataset.max_*_interactions`` are not below the matching ``min_*_interactions``."""
    for side in ("user", "item"):
        low, high = get(f"dataset.min_{side}_interactions"), get(f"dataset.max_{side}_interactions")
        if _has(low, high) and high is not None and high < low:
            key = blame(typed, f"dataset.max_{side}_interactions",
                        f"dataset.min_{side}_interactions")
            raise ConfigError(key, f"dataset.max_{side}_interactions={high} is below "
                              f"dataset.min_{side}_interactions={low}; raise the maximum or set "
                              "it to null")


RULES: tuple[Rule, ...] = (
    rule_algo_chosen,
    rule_monitor,
    rule_task_sizes,
    rule_quantile_cuts,
    rule_anneal_horizon,
    rule_sampled_negatives,
    rule_ranking_loss,
    rule_query_only_cutoffs,
    rule_toy_interactions,
    rule_movielens_release,
    rule_dataset_filters,
)
"""Checks that relate several keys, run in this order once every single key has passed."""


def check_config(cfg: DictConfig, overrides: Iterable[str] = ()) -> None:
    """Check every value :data:`SCHEMA` knows, then every rule of :data:`RULES`.

    Args:
        cfg: the composed job config (Hydra's ``cfg``).
        overrides: the job's command-line overrides (``HydraConfig.get().overrides.task``); a
            rule over several keys names the one typed there.

    Raises:
        ConfigError: the first problem, as one line naming the key, the value and the fix.
    """
    typed = typed_keys(overrides)
    rule_algo_chosen(lambda key: cfg.get(key), typed)  # the node only: nothing resolved yet
    cache: dict[str, object] = {}

    def get(key: str) -> object:
        if key not in cache:
            cache[key] = value_of(cfg, key)
        return cache[key]

    # keys the user typed first: their mistake is the one to report
    order = sorted(SCHEMA, key=lambda k: k not in typed)
    for key in order:
        value = get(key)
        if value is not _ABSENT:
            SCHEMA[key].check(key, value)
    for rule in RULES[1:]:
        rule(get, typed)
