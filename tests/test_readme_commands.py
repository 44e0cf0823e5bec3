"""Every command in README.md and docs/*.md, run as a user runs it.

The commands are read from the documents at collection time: every line of a ```bash block (a
heredoc or a ``\\`` continuation is one command), every ```python block (run as a script), and
every ``$ `` line of a plain block (with the output printed under it). Each document runs its
commands in its own order, in one scratch folder (``METAREC_OUTPUT_DIR`` under it, the real data
in ``METAREC_DATA_DIR`` when present), so ``recommend --run latest`` finds the run trained
before it. Commands are shrunk, never rewritten: tiny overrides are appended (a later Hydra
override of the same key wins, also in a sweep), placeholders (``/path/to/data``,
``<parent run id>``) are filled in, and a shrunk sweep is checked to have run exactly the jobs
its shrinking overrides leave, so an override that stopped applying fails the test.

A command is either run here, or listed in :data:`SKIPPED` with the reason and the test that
covers it instead; a new command that is neither fails :func:`test_every_command_is_classified`
(and its own test) until it is classified. An entry of :data:`SKIPPED` (or :data:`SHRINK`) that
matches no command any more fails too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import metarec_env

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent  # the venv's bin: metarec, mlflow, python
# the toy catalog keeps its 300 items: the README's item ids (50, 172, 181, 127) stay known, and
# `evaluator=sampled` still finds its 100 negatives per user (a user rates up to 60 items)
TOY_TINY = ["dataset.n_users=120", "trainer.max_epochs=1", "trainer.progress=false"]
REAL_TINY = ["trainer.max_epochs=1", "trainer.progress=false"]
KILL_TINY = ["dataset.n_users=120", "trainer.progress=false"]  # keeps max_epochs
TIMEOUT = 600


def _data_dir() -> Path | None:
    for candidate in (os.environ.get("METAREC_DATA_DIR"), "/work/shared/data"):
        if candidate and (Path(candidate) / "ml-100k" / "u.data").is_file():
            return Path(candidate)
    return None


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


DATA = _data_dir()

# Commands that are not run here: (regex searched in the command as written, reason). Each
# must match at least one command (test_no_stale_entries).
SKIPPED: list[tuple[str, str]] = [
    (r"^python3 -m venv \.venv", "the README's setup (ci:setup): .ci/run runs it verbatim on a fresh machine"),
    (r"^\.venv/bin/python -m pytest$", "the README's test command (ci:test): .ci/run runs it; "
                                       "it runs this module, so running it here would recurse"),
    (r"^metarec ui\b", "a long-running server: tests/test_ui.py starts it, waits for the runs-table URL "
                       "and stops it with Ctrl+C"),
    (r"^metarec data download ", "needs the internet (GroupLens): tests/test_download.py downloads from a "
                                 "local server and checks the checksum and the safe extraction"),
    (r"^mlflow models serve ", "a long-running server: tests/test_serve.py::test_rest_server_answers_invocations "
                               "serves a trained run's model/ and posts to /invocations"),
    (r"^curl -X POST 127\.0\.0\.1:5001/invocations", "needs the `mlflow models serve` server above: "
                                                     "tests/test_serve.py::test_rest_server_answers_invocations"),
    (r"hydra/launcher=ray_local", "the Ray sweep: tests/test_distributed.py::test_readme_ray_sweep runs this "
                                  "command on a local Ray (2 jobs; needs the [ray] extra)"),
    (r"hydra/launcher=slurm\b", "needs a SLURM cluster: tests/test_distributed.py::"
                                "test_slurm_preset_through_submitit_local runs the preset's resources through "
                                "submitit's local executor, tests/test_sweeps.py::test_slurm_preset_composes "
                                "composes it"),
]

# Sweeps shrunk by appended overrides: (regex, overrides, the jobs left). Checked after the run:
# the newest sweep parent must have exactly that many FINISHED children.
SHRINK: list[tuple[str, list[str], int]] = [
    (r"-m \+algo=maml,fomaml,reptile,global,finetune$", ["+algo=maml,global"], 2),
    (r"-m \+algo=maml,global seed=0,1,2$", ["seed=0"], 2),  # global: the baseline of the compare after it
    (r"hydra/launcher=joblib hydra\.launcher\.n_jobs=4 \+algo=maml,fomaml,reptile,global seed=0,1$",
     ["hydra.launcher.n_jobs=2", "+algo=maml,global", "seed=0"], 2),
    (r"\+hparams_search=maml_optuna hydra\.sweeper\.n_trials=40$", ["hydra.sweeper.n_trials=2"], 2),
    (r"-m \+algo=maml,global,popularity experiment=ml100k_recbole_metarec$", ["+algo=maml,popularity"], 2),
    # the study's own sweep narrowed as the README says (split_seed=0, +coldstart=...); the two
    # algos are the two baselines the README's `compare` commands pair against
    (r"-m experiment=coldstart_ml100k$", ["split_seed=0", "+coldstart=popularity,ease"], 2),
    (r"-m experiment=coldstart_mlsmall$", ["split_seed=0", "+coldstart=popularity,mlsmall/ease"], 2),
    (r"-m experiment=coldstart_lastfm$", ["split_seed=0", "+coldstart=popularity,lastfm/itemknn"], 2),
    # a per-dataset search, shrunk to 2 trials (its runs share the study's experiment: the compare
    # after it leaves them out, as they scored no test users)
    (r"-m experiment=coldstart_mlsmall \+hparams_search=coldstart_ease threads=1$", ["hydra.sweeper.n_trials=2"], 2),
]

# Commands that need something this machine may lack: (regex, predicate, reason when it is False).
NEEDS: list[tuple[str, object, str]] = [
    (r"device=cuda", _cuda, "needs a CUDA GPU (tests/test_cuda.py runs the GPU checks where there is one)"),
    (r"/path/to/data|dataset=movielens|data info (ml-|movielens)|experiment=(ml100k|coldstart)|"
     r"--experiment coldstart", lambda: DATA is not None,
     "needs the MovieLens-100K files (set METAREC_DATA_DIR to a folder with ml-100k/)"),
    (r"\+hparams_search=", lambda: _has("hydra_plugins.hydra_optuna_sweeper"),
     "needs hydra-optuna-sweeper (pip install 'metarec-runner[optuna]'; the dev extra has it)"),
]

METAREC_SUBCOMMANDS = {"list", "train", "compare", "recommend", "evaluate", "runs", "data"}
RUNNABLE_PROGRAMS = {"metarec", "python", "printf", "mkdir", "cat"}


@dataclass
class Command:
    doc: str
    line: int
    text: str  # as written: continuation lines joined, a heredoc with its body
    kind: str  # "bash" | "python" | "console" ($ line of a plain block)
    expect: list[str] = field(default_factory=list)  # printed lines (`...` matches anything)

    @property
    def id(self) -> str:
        first = self.text.splitlines()[0]
        return f"{self.doc}:{self.line}:{first[:90]}"


# ---------------------------------------------------------------- extraction

FENCE = re.compile(r"^\s*```(\w*)\s*$")
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")


def strip_comment(line: str) -> str:
    """``line`` without a shell comment (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def split_commands(lines: list[str], first_line: int) -> list[tuple[int, str]]:
    """(line number, command) for each command of a bash block."""
    out, i = [], 0
    while i < len(lines):
        start, line = i, lines[i]
        i += 1
        if not strip_comment(line).strip():
            continue  # blank or comment-only
        text = line.rstrip()
        heredoc = HEREDOC.search(strip_comment(line))
        if heredoc:
            while i < len(lines) and lines[i].strip() != heredoc.group(2):
                text += "\n" + lines[i]
                i += 1
            text += "\n" + heredoc.group(2)
            i += 1
        else:
            while text.endswith("\\") and i < len(lines):
                text += "\n" + lines[i].rstrip()
                i += 1
        out.append((first_line + start, text.strip()))
    return out


@dataclass
class Block:
    lang: str
    line: int  # first line inside the fence
    lines: list[str]
    before: str  # the text between the previous block and this one


def _blocks(doc: str) -> list[Block]:
    blocks, lines = [], (ROOT / doc).read_text().splitlines()
    i, text_since = 0, []
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            text_since.append(lines[i])
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not FENCE.match(lines[j]):
            j += 1
        body = lines[i + 1:j]
        indent = min((len(x) - len(x.lstrip()) for x in body if x.strip()), default=0)
        blocks.append(Block(fence.group(1), i + 2, [x[indent:] for x in body], "\n".join(text_since).strip()))
        text_since, i = [], j + 1
    return blocks


def extract(doc: str) -> tuple[list[Command], dict[str, str]]:
    """The commands of ``doc`` in order, and the files it asks you to write (path -> text): a
    ```yaml block whose lead-in names a path that a later command of ``doc`` uses."""
    commands, files = [], {}
    blocks = _blocks(doc)
    for n, block in enumerate(blocks):
        if block.lang in ("bash", "sh", "shell", "console"):
            commands += [Command(doc, line, text, "bash") for line, text in split_commands(block.lines, block.line)]
        elif block.lang == "python":
            commands.append(Command(doc, block.line, "\n".join(block.lines), "python"))
        elif block.lang == "":
            if block.before.rstrip(":").strip().lower() == "prints" and commands and n > 0 \
                    and blocks[n - 1].lang == "bash":
                commands[-1].expect = [x for x in block.lines if x.strip()]  # the output shown for it
                continue
            for k, line in enumerate(block.lines):
                if line.startswith("$ "):
                    expect = []
                    for out in block.lines[k + 1:]:
                        if out.startswith("$ "):
                            break
                        expect.append(out)
                    commands.append(Command(doc, block.line + k, line[2:].strip(), "console", expect))
        elif block.lang == "yaml":  # a file to write when its lead-in (the last paragraph) names it
            named = re.findall(r"`([\w./-]+\.ya?ml)`", block.before.split("\n\n")[-1])
            if named and named[-1] not in files:
                files[named[-1]] = "\n".join(block.lines) + "\n"
    later = "\n".join(c.text for c in commands)
    return commands, {path: text for path, text in files.items() if path in later}


def all_commands() -> list[Command]:
    return [c for doc in DOCUMENTS for c in extract(doc)[0]]


COMMANDS = all_commands()


# ---------------------------------------------------------------- classification

def program(text: str) -> tuple[str, list[str]]:
    """(the program, its words) of a command, past leading VAR=value assignments."""
    words = strip_comment(text.splitlines()[0]).split()
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        words = words[1:]
    if not words:
        return "", []
    return words[0].removeprefix(".venv/bin/"), words[1:]


def classify(cmd: Command) -> tuple[str, str]:
    """("skip", reason) | ("need", reason) when a requirement is missing | ("run", "") |
    ("unclassified", why)."""
    for pattern, reason in SKIPPED:
        if re.search(pattern, cmd.text):
            return "skip", reason
    for pattern, ok, reason in NEEDS:
        if re.search(pattern, cmd.text) and not ok():
            return "need", reason
    if cmd.kind == "python":
        return "run", ""
    prog, args = program(cmd.text)
    if prog not in RUNNABLE_PROGRAMS:
        return "unclassified", f"program {prog!r} is neither run by this module nor listed in SKIPPED"
    if prog == "metarec" and (not args or args[0] not in METAREC_SUBCOMMANDS):
        return "unclassified", f"`metarec {args[:1]}` is not a subcommand this module knows how to run"
    return "run", ""


def test_every_command_is_classified() -> None:
    """A new README/docs command must either run here or be listed in SKIPPED with its reason."""
    assert len(COMMANDS) >= 40, [c.id for c in COMMANDS]  # the extraction still finds the blocks
    unclassified = [f"{c.id}: {why}" for c in COMMANDS for verdict, why in [classify(c)]
                    if verdict == "unclassified"]
    assert not unclassified, "\n".join(unclassified)


def test_no_stale_entries() -> None:
    """Every SKIPPED / SHRINK / NEEDS entry still matches a command of the documents."""
    texts = [c.text for c in COMMANDS]
    texts += [strip_comment(t) for t in texts]  # SHRINK patterns end at the command's last override
    stale = [p for p, *_ in [*SKIPPED, *SHRINK, *NEEDS] if not any(re.search(p, t) for t in texts)]
    assert not stale, stale


def test_extraction_reads_heredocs_continuations_and_console_blocks() -> None:
    lines = ["a 1  # one", "  # only a comment", "cat > f <<'EOF'", "x # y", "EOF", "b \\", "  --c 'd # e'"]
    assert split_commands(lines, 10) == [(10, "a 1  # one"), (12, "cat > f <<'EOF'\nx # y\nEOF"),
                                         (15, "b \\\n  --c 'd # e'")]
    assert strip_comment("metarec train x=1   # note") == "metarec train x=1"
    assert strip_comment("a 'b # c' d") == "a 'b # c' d"
    console = [c for c in COMMANDS if c.kind == "console"]
    assert console and all(c.expect for c in console)  # the Errors section: commands with their output
    assert any(c.kind == "python" for c in COMMANDS)
    # a command nobody classified fails; a new `metarec train ...` line is run with the tiny overrides
    assert classify(Command("README.md", 1, "docker run metarec", "bash"))[0] == "unclassified"
    assert classify(Command("README.md", 1, "metarec serve --run latest", "bash"))[0] == "unclassified"
    assert classify(Command("README.md", 1, "metarec train +algo=ease  # new", "bash")) == ("run", "")
    assert _appended("metarec train +algo=ease  # new") == TOY_TINY


# ---------------------------------------------------------------- running

@dataclass
class Scratch:
    doc: str
    root: Path
    files: dict[str, str]
    plugin: tuple[Path, Path] | None = None
    killed: tuple[str, int] | None = None  # (run id, last.pt epoch) of a killed run waiting for its resume

    @property
    def out(self) -> Path:
        return self.root / "outputs"

    def env(self) -> dict[str, str]:
        extra = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PWD": str(self.root),
                 "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
        if DATA is not None:
            extra["METAREC_DATA_DIR"] = str(DATA)
        return metarec_env(self.out, **extra)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(f"sqlite:///{self.out}/mlflow.db")

    def runs(self):
        from mlflow.entities import ViewType

        client = self.client()
        return client.search_runs([e.experiment_id for e in client.search_experiments()], "", ViewType.ALL,
                                  max_results=5000, order_by=["attributes.start_time DESC"])

    def latest_parent(self):
        parents = [r for r in self.runs() if r.info.run_name.startswith("sweep:")]
        assert parents, "no sweep parent run in the store yet"
        return parents[0]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> dict[str, Scratch]:
    return {doc: Scratch(doc, tmp_path_factory.mktemp(re.sub(r"\W", "_", doc)), extract(doc)[1])
            for doc in DOCUMENTS}


def _sh(script: str, box: Scratch, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=box.root, env=box.env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def _fill(text: str, box: Scratch) -> str:
    """The placeholders of ``text`` filled in for this machine."""
    if DATA is not None:
        text = text.replace("/path/to/data", str(DATA))
    text = re.sub(r"(?<![\w/])\.venv/bin/", f"{BIN}/", text)
    if "<parent run id>" in text:
        text = text.replace("<parent run id>", box.latest_parent().info.run_id)
    if "/path/to/pkg" in text or "/path/to/my_conf" in text:
        if box.plugin is None:  # the plugin the README describes, as tests/test_plugins.py writes it
            from tests.test_plugins import _plugin

            (box.root / "plugin").mkdir(exist_ok=True)
            box.plugin = _plugin(box.root / "plugin")
        pkg, conf = box.plugin
        text = text.replace("/path/to/pkg", str(pkg)).replace("/path/to/my_conf", str(conf))
    return text


def _appended(cmd: str) -> list[str]:
    """The overrides appended to a ``metarec train`` command (nothing for --cfg / --help)."""
    if re.search(r"\s--(cfg|help)\b", cmd):
        return []
    extra = []
    for pattern, overrides, _ in SHRINK:
        if re.search(pattern, strip_comment(cmd)):
            extra += overrides
    toy = not re.search(r"\bdataset=(?!toy\b)|\bexperiment=", cmd)
    return [*(TOY_TINY if toy else REAL_TINY), *extra]


def _fail_message(cmd: str, res: subprocess.CompletedProcess) -> str:
    return f"`{cmd}` exited {res.returncode}\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-5000:]}"


def _matches(expected: list[str], printed: str) -> list[str]:
    """The expected lines (``...`` matches anything) that no printed line matches."""
    lines = [x.strip() for x in printed.splitlines()]
    missing = []
    for want in expected:
        pattern = ".*".join(re.escape(part) for part in want.strip().split("..."))
        if not any(re.fullmatch(pattern, line) for line in lines):
            missing.append(want)
    return missing


def _run_killed(cmd: str, box: Scratch) -> None:
    """A training run that the README says gets killed: start it, SIGTERM it once its first
    last.pt is written, and check that it ended KILLED (the state `trainer.resume` continues)."""
    from metarec_runner.checkpoint import load_checkpoint

    before = set(box.out.glob("runs/*/*/last.pt"))
    proc = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=box.root, env=box.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT  # a guard against a hang, not a timed assertion
    while proc.poll() is None and not (new := set(box.out.glob("runs/*/*/last.pt")) - before):
        assert time.monotonic() < deadline, f"`{cmd}` wrote no last.pt"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0, f"`{cmd}` finished before it could be killed:\n{stdout[-2000:]}"
    newest = box.runs()[0]
    assert newest.info.status == "KILLED", (newest.info.status, stderr[-3000:])
    assert len(new) == 1, new
    box.killed = (newest.info.run_id, load_checkpoint(new.pop()).epoch)


def _run_bash(cmd: Command, box: Scratch) -> None:
    text = _fill(cmd.text, box)
    for path, content in box.files.items():  # files the document asks you to write by hand
        if path in text and not (box.root / path).exists():
            (box.root / path).parent.mkdir(parents=True, exist_ok=True)
            (box.root / path).write_text(content)
    prog, args = program(cmd.text)
    comment = cmd.text.splitlines()[0][len(strip_comment(cmd.text.splitlines()[0])):]
    if cmd.kind == "console" or HEREDOC.search(text.splitlines()[0]) or prog != "metarec" or args[0] != "train":
        script = text  # as written
    else:
        script = f"{strip_comment(text)} {' '.join(_appended(text))}".strip()
        if "trainer.resume=latest" in text:
            if box.killed is None:  # the run it continues: this command, killed after an epoch
                fresh = re.sub(r"\s+trainer\.resume=latest", "", strip_comment(text))
                if "trainer.max_epochs=" not in fresh:
                    fresh += " trainer.max_epochs=40"
                _run_killed(f"{fresh} {' '.join(KILL_TINY)}", box)
            # two epochs past the kill (trainer.max_epochs may differ on resume), not all 40
            script = f"{strip_comment(text)} {' '.join(KILL_TINY)} trainer.max_epochs={box.killed[1] + 2}"
        elif "killed" in comment:  # "killed (Ctrl+C, SIGTERM, kill -9, a lost node)..."
            _run_killed(f"{strip_comment(text)} {' '.join(KILL_TINY)}", box)
            return
    # a file the document writes later (`printf ... > my_ratings.csv`) that this command reads
    for other in COMMANDS:
        if other.doc != cmd.doc or other is cmd:
            continue
        for target in re.findall(r">\s*([\w.-]+)\s*$", strip_comment(other.text.splitlines()[0])):
            if re.search(rf"(?<![\w.]){re.escape(target)}\b", text) and not (box.root / target).exists():
                res = _sh(other.text, box)
                assert res.returncode == 0, _fail_message(other.text, res)
    res = _sh(script, box)
    if cmd.kind == "console":  # the Errors section: a one-line error, as printed in the README
        assert res.returncode != 0, _fail_message(script, res)
    else:
        assert res.returncode == 0, _fail_message(script, res)
    missing = _matches(cmd.expect, res.stdout + res.stderr)
    assert not missing, f"`{script}` did not print {missing}\n--- printed\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
    if "trainer.resume=latest" in text:  # the same MLflow run, continued with no epoch twice
        (run_id, epoch), box.killed = box.killed, None
        run = box.client().get_run(run_id)
        assert run.info.status == "FINISHED"
        steps = [m.step for m in box.client().get_metric_history(run_id, "train/loss")]
        assert sorted(steps) == list(range(1, epoch + 3)), steps
    for pattern, _, jobs in SHRINK:
        if re.search(pattern, strip_comment(text)):
            parent = box.latest_parent()
            children = [r for r in box.runs() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
            assert parent.info.status == "FINISHED"
            assert sorted(c.info.status for c in children) == ["FINISHED"] * jobs, (
                f"the shrunk sweep should run {jobs} jobs", [c.info.run_name for c in children])


def _run_python(cmd: Command, box: Scratch) -> None:
    script = box.root / f"snippet_{cmd.line}.py"
    # a whole run from Python: the tiny overrides appended to its compose(...) call, as on the command line
    tiny = ", ".join(repr(o) for o in TOY_TINY)
    code = re.sub(r"\bcompose\(([^()]*)\)", lambda m: f"compose({m.group(1)}, {tiny})", cmd.text)
    script.write_text(code + "\n")
    res = subprocess.run([sys.executable, str(script)], cwd=box.root, env=box.env(), capture_output=True,
                         text=True, timeout=TIMEOUT, check=False)
    assert res.returncode == 0, _fail_message(f"python {script.name}", res)


@pytest.mark.slow
@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_command(cmd: Command, scratch: dict[str, Scratch]) -> None:
    verdict, why = classify(cmd)
    if verdict in ("skip", "need"):
        pytest.skip(why)
    assert verdict == "run", f"unclassified: {why}"
    box = scratch[cmd.doc]
    if cmd.kind == "python":
        _run_python(cmd, box)
    else:
        _run_bash(cmd, box)
