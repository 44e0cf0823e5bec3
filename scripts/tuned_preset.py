"""Write the cold-start preset a finished Optuna search found, for one dataset's study.

The study's presets (``conf/coldstart/<algo>.yaml``) were tuned on ML-100K. Another dataset's
study re-tunes the same knobs on its own validation users, with the same budget, by running the
algo's search preset on that dataset's experiment, e.g.

    METAREC_DATA_DIR=... metarec train -m experiment=coldstart_lastfm +hparams_search=coldstart_ease threads=1

This script reads that search's sweep folder (``optimization_results.yaml``, and every trial's
``metrics.json`` and ``.hydra/overrides.yaml``) and writes ``conf/coldstart/<dataset>/<algo>.yaml``:
the ML-100K preset as its default (its structure and every knob not searched), the best trial's
values of the searched knobs, each commented as the search preset comments it, and a header with
the command, the budget and the trials' range of the monitored validation metric:

    python scripts/tuned_preset.py outputs/multiruns/2026-12-01/17-19-40_378774
    python scripts/tuned_preset.py latest --print   # the newest finished search under outputs/

It refuses a folder that is not a finished search of a coldstart_<algo> preset.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SECTION_COMMENTS = {"algo": "the re-tuned knobs of the algorithm", "model": "the re-tuned knobs of the model",
                    "meta_optimizer": "the outer optimizer (Adam)", "trainer": "the re-tuned knobs of training"}
COMMENT_COLUMN = 33  # where the key comments start, as in the hand-written presets


def fail(message: str) -> None:
    print(f"tuned_preset: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def latest_search() -> Path:
    """The newest sweep folder holding ``optimization_results.yaml`` under the output root."""
    from metarec_runner.paths import output_root

    found = sorted((output_root() / "multiruns").glob("*/*/optimization_results.yaml"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        fail(f"no finished Optuna search under {output_root() / 'multiruns'} (set METAREC_OUTPUT_DIR, "
             "or pass the sweep folder)")
    return found[-1].parent


def read_search(sweep: Path) -> tuple[dict[str, str], dict, list[float], str | None]:
    """``(overrides of the first trial, optimization results, every trial's monitored value, the
    dataset's name)``."""
    results_file = sweep / "optimization_results.yaml"
    if not results_file.is_file():
        fail(f"{results_file} not found: pass the folder of a finished Optuna search (hydra.sweep.dir)")
    results = yaml.safe_load(results_file.read_text())
    trials = sorted(p for p in sweep.iterdir() if (p / ".hydra" / "overrides.yaml").is_file())
    if not trials:
        fail(f"{sweep} holds no trial folders (<n>_<run name>/.hydra/overrides.yaml)")
    values = []
    for trial in trials:
        metrics = json.loads((trial / "metrics.json").read_text()) if (trial / "metrics.json").is_file() else {}
        values += [float(v) for k, v in metrics.items() if k.startswith("best_val/")]
    pairs = (line.removeprefix("- ").split("=", 1) for line in
             (trials[0] / ".hydra" / "overrides.yaml").read_text().splitlines() if "=" in line)
    resolved = trials[0] / "config_resolved.yaml"
    config = (yaml.safe_load(resolved.read_text()) or {}) if resolved.is_file() else {}
    dataset = config.get("dataset", {}).get("name")
    return {k: v for k, v in pairs}, results, values, dataset


def key_comments(search_preset: Path) -> dict[str, str]:
    """The comment on each searched key of ``conf/hparams_search/<name>.yaml``."""
    found = {}
    for line in search_preset.read_text().splitlines():
        match = re.match(r"\s+([\w.]+):\s.*?#\s*(.+)$", line)
        if match and "." in match.group(1):
            found[match.group(1)] = match.group(2).strip()
    return found


def nest(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def render(tree: dict, comments: dict[str, str], prefix: str = "", indent: int = 0) -> list[str]:
    lines = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            head, note = f"{' ' * indent}{key}:", SECTION_COMMENTS.get(key, f"{key} settings")
            lines.append(f"{head.ljust(COMMENT_COLUMN - 1)} # {note}")
            lines += render(value, comments, f"{path}.", indent + 2)
        else:
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            head = f"{' ' * indent}{key}: {text}"
            lines.append(f"{head.ljust(COMMENT_COLUMN - 1)} # {comments.get(path, 'searched')} (Optuna)")
    return lines


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="the Optuna search's sweep folder, or latest")
    parser.add_argument("--conf", type=Path, default=ROOT / "conf", help="the config tree to write into")
    parser.add_argument("--print", action="store_true", help="print the preset instead of writing it")
    args = parser.parse_args(argv)
    args.sweep = latest_search() if args.sweep == "latest" else Path(args.sweep)
    overrides, results, values, dataset_name = read_search(args.sweep)
    search, experiment = overrides.get("+hparams_search", ""), overrides.get("experiment", "")
    if not search.startswith("coldstart_") or not experiment.startswith("coldstart_"):
        fail(f"{args.sweep} is not a cold-start search (+hparams_search={search or '?'}, "
             f"experiment={experiment or '?'}); run +hparams_search=coldstart_<algo> experiment=coldstart_<dataset>")
    algo, dataset = search.removeprefix("coldstart_"), experiment.removeprefix("coldstart_")
    base = args.conf / "coldstart" / f"{algo}.yaml"
    if not base.is_file():
        fail(f"{base} not found: the search's preset must exist")
    best = dict(results.get("best_params") or {})
    if not best:
        fail(f"{args.sweep}/optimization_results.yaml has no best_params")
    monitor = "validation NDCG@10 at k = 10"
    shown = dataset_name or dataset
    header = [
        "# @package _global_",
        f"# Cold-start study preset on {shown}: the ML-100K preset (conf/coldstart/{algo}.yaml) with its searched",
        f"# knobs re-tuned on {shown}'s validation users of split 0 (the test users never scored): the equal-budget",
        f"# Optuna search ({len(values)} trials, {monitor}; best trial {float(results['best_value']):.4f}, "
        f"the {len(values)} trials {min(values):.3f}-{max(values):.3f}):",
        f"#   METAREC_DATA_DIR=... metarec train -m experiment={experiment} +hparams_search={search} threads=1",
        "# written by scripts/tuned_preset.py from that search's sweep folder",
        f"{'defaults:'.ljust(COMMENT_COLUMN - 1)} # what this preset picks",
        f"{f'  - /coldstart/{algo}'.ljust(COMMENT_COLUMN - 1)} # the ML-100K preset (structure, unsearched knobs)",
        f"{'  - _self_'.ljust(COMMENT_COLUMN - 1)} # then the re-tuned values",
    ]
    comments = key_comments(args.conf / "hparams_search" / f"{search}.yaml")
    text = "\n".join([*header, *render(nest(best), comments)]) + "\n"
    if args.print:
        print(text, end="")
        return
    out = args.conf / "coldstart" / dataset / f"{algo}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out.relative_to(args.conf.parent) if out.is_relative_to(args.conf.parent) else out}")


if __name__ == "__main__":
    main(sys.argv[1:])
