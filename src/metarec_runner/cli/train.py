"""The Hydra entry point of ``metarec train``, light to import.

Importing this module loads Hydra and OmegaConf only. Every job first checks its whole config
(:func:`metarec_runner.config.rules.check_config`: types, ranges, cross-key rules) and only
then imports the job itself (:func:`metarec_runner.run.train_task`: torch, MLflow, the data and
model code), in the process that runs it. So a bad value is reported in a fraction of a second,
and a sweep process whose launcher runs the jobs elsewhere (joblib workers, Ray, SLURM) composes
configs and opens the MLflow parent run without spending seconds on imports it never uses.

Hydra's own composition errors (an unknown key, an unknown option of a group, an override it
cannot parse) are reported the same way: one ``metarec: error: <key>: ...`` line, exit code 2
(``HYDRA_FULL_ERROR=1`` still shows Hydra's full report).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from metarec_runner.config.rules import check_config
from metarec_runner.errors import MetarecError, fail
from metarec_runner.paths import conf_dir, discard_run_folder, frozen_conf_dir, register_resolvers

register_resolvers()  # also in launcher workers (joblib, Ray), which import this module to run a job


def train_job(cfg: DictConfig) -> float:
    """One ``metarec train`` job: the config check, then :func:`metarec_runner.run.train_task`
    (returns the best value of ``trainer.monitor``, for sweepers)."""
    hc = HydraConfig.get()
    try:
        check_config(cfg, hc.overrides.task)
    except MetarecError as err:
        # nothing was built or tracked: remove the run folder Hydra created (no half-written run)
        discard_run_folder(hc.runtime.output_dir)
        fail(err, 2)
    from metarec_runner.run import train_task

    return train_task(cfg)


# -- Hydra's composition errors as one line --------------------------------------------------

def _lines(text: str) -> list[str]:
    return [line.strip() for line in str(text).splitlines() if line.strip()]


# The Hydra plugins behind metarec's optional extras: the config a plugin registers (a prefix of
# the group path Hydra could not load) and the distribution that registers it. Which extra of
# metarec-runner installs that distribution is read from the installed package's metadata.
PLUGIN_CONFIGS: dict[str, tuple[str, str]] = {
    "hydra/launcher/ray": ("hydra-ray-launcher", "the Ray launcher"),
    "hydra/launcher/submitit": ("hydra-submitit-launcher", "the submitit (SLURM) launcher"),
    "hydra/sweeper/optuna": ("hydra-optuna-sweeper", "the Optuna sweeper"),
    "hydra/sweeper/sampler": ("hydra-optuna-sweeper", "the Optuna sweeper"),
}


def extra_providing(distribution: str, package: str = "metarec-runner") -> str | None:
    """The smallest optional extra of ``package`` that requires ``distribution`` (``"ray"``
    for ``hydra-ray-launcher``), from the installed metadata; None when no extra names it."""
    from importlib.metadata import PackageNotFoundError, metadata, requires

    from packaging.requirements import Requirement  # hydra-core's own dependency
    from packaging.utils import canonicalize_name

    try:
        extras = metadata(package).get_all("Provides-Extra") or []
        requirements = [Requirement(line) for line in requires(package) or []]
    except PackageNotFoundError:
        return None
    members = {extra: {canonicalize_name(r.name) for r in requirements
                       if r.marker is not None and r.marker.evaluate({"extra": extra})}
               for extra in extras}
    having = [extra for extra, names in members.items() if canonicalize_name(distribution) in names]
    return min(having, key=lambda extra: (len(members[extra]), extra)) if having else None


def missing_plugin_line(missing_config: str) -> str | None:
    """One line for a config that only an uninstalled Hydra plugin provides, naming the plugin
    and the pip command that installs it; None when ``missing_config`` is no plugin's."""
    from importlib.metadata import PackageNotFoundError, version

    for prefix, (distribution, title) in PLUGIN_CONFIGS.items():
        if not missing_config.startswith(prefix):
            continue
        try:
            installed = version(distribution)
        except PackageNotFoundError:
            installed = None
        chosen = [arg for arg in sys.argv[1:]
                  if arg.lstrip("+~").split("=", 1)[0] in ("hydra/launcher", "hydra/sweeper",
                                                           "hparams_search")]
        what = f"{' '.join(chosen)} needs" if chosen else f"{missing_config!r} comes from"
        if installed:
            module = "hydra_plugins." + distribution.replace("-", "_")
            return (f"{what} {title} ({distribution} {installed} is installed, but Hydra did not "
                    f"register its configs); run python -c 'import {module}' to see why")
        extra = extra_providing(distribution)
        install = (f'pip install "metarec-runner[{extra}]"' if extra
                   else f"pip install {distribution}")
        return (f"{what} {title} ({distribution}), which is not installed; install it with "
                f"{install}")
    return None


def hydra_error_line(ex: BaseException) -> str:
    """One line naming the key for one of Hydra's composition errors."""
    cause = ex.__cause__
    if isinstance(ex, MissingConfigException) and ex.missing_cfg_file:
        plugin_line = missing_plugin_line(str(ex.missing_cfg_file))
        if plugin_line:
            return plugin_line
        group, _, option = str(ex.missing_cfg_file).rpartition("/")
        key = group.replace("/", ".") if group else option
        options = list(ex.options or [])
        if options:
            return (f"{key}: no option {option!r}; Available options in {group!r}: "
                    f"{', '.join(options)}")
        return f"{key}: " + " ".join(_lines(str(ex)))
    if isinstance(ex, OverrideParseException):
        key = str(ex.override).split("=", 1)[0].lstrip("+~") or "override"
        detail = " ".join(_lines(ex.message))
        return (f"{key}: cannot parse the override {ex.override!r} ({detail}); quote values with "
                "brackets or special characters, e.g. 'evaluator.ks=[5,10]'")
    full_key = getattr(cause, "full_key", None)
    text = _lines(str(ex))
    if full_key and "not in struct" in str(cause):
        return _unknown_key_line(str(full_key), getattr(cause, "parent_node", None))
    appended = re.search(r"An item is already at '([^']+)'", str(ex))
    if appended:
        key = appended[1]
        return (f"{key}: already in the config, so it cannot be added with +; set it with "
                f"{key}=... (or ++{key}=... to add or set)")
    if full_key:
        return f"{full_key}: " + " ".join(text + _lines(str(cause)))
    return " ".join(text + (_lines(str(cause)) if cause is not None else []))


def _unknown_key_line(full_key: str, parent: object) -> str:
    """``algo.inner_lrr: no such key ... (did you mean algo.inner_lr?); keys of algo: ...``."""
    group, _, name = full_key.rpartition(".")
    known = [str(k) for k in parent if not str(k).startswith("_")] if parent else []
    line = f"{full_key}: no such key in this config"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        line += f" (did you mean {group + '.' if group else ''}{close[0]}?)"
    if known:
        line += f"; keys of {group or 'the top level'}: {', '.join(known)}"
    return line + f"; add a new key with +{full_key}=..."


def hydra_setting_line(ex: BaseException, key: str) -> str:
    """One line for a Hydra setting that cannot be resolved, blaming the override whose value
    holds an interpolation when there is one (``seed=${nope}`` breaks ``hydra.run.dir``)."""
    detail = (_lines(str(ex)) or [type(ex).__name__])[0]
    for override in reversed(sys.argv[1:]):
        name, eq, value = override.partition("=")
        if eq and "${" in value:
            name = name.lstrip("+~")
            return (f"{name}: cannot be resolved: {detail} (while computing {key}); fix the "
                    f"value of {name}")
    return f"{key}: cannot be resolved: {detail}"


_COMPOSITION_ERRORS = (ConfigCompositionException, OverrideParseException)


def _one_line_composition_errors(report: Callable[[Callable[[], Any]], Any]):
    """Wrap Hydra's ``run_and_report`` so its composition errors become one line (exit 2), and
    a sweep whose jobs failed on a MetarecError (each already printed its line) exits 1 without
    a traceback; everything else (a bug in a job) is reported by Hydra as before."""

    def run_and_report(func: Callable[[], Any]) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except _COMPOSITION_ERRORS as ex:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"metarec: error: {hydra_error_line(ex)}", file=sys.stderr)
                sys.exit(2)
            except OmegaConfBaseException as ex:
                # Hydra resolving its own settings (hydra.run.dir...) before any job runs
                key = str(getattr(ex, "full_key", "") or "")
                if not key.startswith("hydra.") or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"metarec: error: {hydra_setting_line(ex, key)}", file=sys.stderr)
                sys.exit(2)
            except RuntimeError as ex:
                # JobFailed: the job's one line is already on stderr
                if type(ex).__name__ != "JobFailed" or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                sys.exit(1)

        return report(guarded)

    return run_and_report


def main() -> None:
    """Entry point for ``metarec train`` (reads overrides from ``sys.argv``)."""
    from hydra._internal import utils as hydra_utils  # _run_hydra looks run_and_report up here

    original = hydra_utils.run_and_report
    hydra_utils.run_and_report = _one_line_composition_errors(original)
    # a sweep composes its jobs one by one as it goes: from a copy of conf/ taken now, so an edit
    # made meanwhile cannot change or break the jobs still to come
    configs = frozen_conf_dir(conf_dir()) if is_multirun(sys.argv[1:]) else nullcontext(conf_dir())
    try:
        with configs as config_path:
            app = hydra.main(version_base="1.3", config_path=str(config_path), config_name="config")
            app(train_job)()
    finally:
        hydra_utils.run_and_report = original


def is_multirun(args: list[str]) -> bool:
    """Whether these ``metarec train`` arguments start a sweep (``-m``, ``--multirun``)."""
    return any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in args)
