"""Checkpoints: atomic writes, weights_only reads, exact resume, refusals of the wrong file."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from metarec_runner.checkpoint import (
    BEST,
    FORMAT,
    LAST,
    Checkpoint,
    CheckpointError,
    atomic_save,
    load_checkpoint,
    save_checkpoint,
)
from metarec_runner.errors import TrainingError
from metarec_runner.run import compose, train

TINY = ("dataset.n_users=120", "dataset.n_items=80", "trainer.progress=false", "logger=none")


def _train(*overrides: str):
    return train(compose("+algo=maml", *TINY, *overrides))


def _numbers(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.startswith("sys/")}


class Payload:
    """A custom class: torch.load(weights_only=True) must refuse to unpickle it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_roundtrip_keeps_tensors_and_meta(tmp_path):
    ckpt = Checkpoint(algo={"model": {"w": torch.arange(6.0).reshape(2, 3)}}, meta={"epoch": 3, "best_value": math.nan},
                      rng={"torch": torch.get_rng_state()}, item_rows=torch.arange(8).reshape(4, 2))
    path = save_checkpoint(ckpt, tmp_path / LAST)
    back = load_checkpoint(path)
    assert torch.equal(back.algo["model"]["w"], ckpt.algo["model"]["w"])
    assert back.epoch == 3 and math.isnan(back.meta["best_value"])
    assert torch.equal(back.item_rows, ckpt.item_rows)


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path):
    path = save_checkpoint(Checkpoint(algo={"w": torch.ones(2)}, meta={"epoch": 1}), tmp_path / LAST)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        atomic_save({"format": FORMAT, "x": Boom()}, path)
    assert load_checkpoint(path).epoch == 1
    assert [p.name for p in tmp_path.iterdir()] == [LAST]


def test_truncated_corrupt_foreign_and_pickled_files_are_refused_in_one_line(tmp_path):
    good = save_checkpoint(Checkpoint(algo={"w": torch.ones(1000)}, meta={"epoch": 2}), tmp_path / BEST)
    data = good.read_bytes()
    truncated = tmp_path / LAST
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last\.pt: truncated or corrupt checkpoint") as err:
        load_checkpoint(truncated)
    assert "\n" not in str(err.value)
    assert load_checkpoint(good).epoch == 2  # the other one still loads
    foreign = tmp_path / "foreign.pt"
    torch.save({"state": torch.ones(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a metarec checkpoint"):
        load_checkpoint(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": FORMAT, "meta": "{}", "algo": Payload()}, pickled)
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        load_checkpoint(pickled)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"format": FORMAT}))
    with pytest.raises(CheckpointError):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def test_every_run_writes_last_and_best_with_what_a_reload_needs():
    result = _train("trainer.max_epochs=3")
    last, best = load_checkpoint(result.output_dir / LAST), load_checkpoint(result.checkpoint)
    assert result.checkpoint == result.output_dir / BEST
    assert last.epoch == 3 and len(last.meta["history"]) == 3 and last.best_algo is not None
    assert best.meta["best_epoch"] == result.best_epoch and best.best_algo is None
    vocab = best.meta["vocabulary"]
    assert len(vocab["raw_item_ids"]) == best.item_rows.shape[0] == 80
    assert best.meta["config"]["algo"]["_target_"].endswith("MAML")
    assert best.meta["data_checksum"] and best.meta["split_hash"]
    for key in ("gen.runner.generator", "torch"):
        assert key in last.rng


def test_resumed_run_ends_exactly_where_an_uninterrupted_one_does():
    whole = _train("trainer.max_epochs=4", "seed=3")
    half = _train("trainer.max_epochs=2", "seed=3")
    resumed = _train("trainer.max_epochs=4", "seed=3", f"trainer.resume={half.output_dir}")
    assert _numbers(resumed.test) == _numbers(whole.test)
    assert (resumed.best_epoch, resumed.best_value) == (whole.best_epoch, whole.best_value)
    a, b = load_checkpoint(whole.output_dir / LAST), load_checkpoint(resumed.output_dir / LAST)
    assert [h["epoch"] for h in b.meta["history"]] == [1, 2, 3, 4]
    assert [_numbers(h) for h in a.meta["history"]] == [_numbers(h) for h in b.meta["history"]]
    for name, tensor in a.algo["model"].items():
        assert torch.equal(tensor, b.algo["model"][name]), name


def test_resume_refuses_another_config_unless_forced():
    half = _train("trainer.max_epochs=2")
    with pytest.raises(CheckpointError, match=r"another config: algo\.inner_lr.*trainer\.resume_force=true"):
        _train("trainer.max_epochs=3", "algo.inner_lr=0.9", f"trainer.resume={half.output_dir}")
    with pytest.raises(CheckpointError, match="trained on (dataset checksum|split)"):  # toy data follow split_seed
        _train("trainer.max_epochs=3", "split_seed=7", f"trainer.resume={half.output_dir}")
    forced = _train("trainer.max_epochs=3", "algo.inner_lr=0.9", "trainer.resume_force=true",
                    f"trainer.resume={half.output_dir}")
    assert forced.best_epoch >= 1


def test_resume_of_a_missing_or_truncated_file_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        _train(f"trainer.resume={tmp_path / 'absent.pt'}")
    bad = tmp_path / LAST
    bad.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _train(f"trainer.resume={bad}")


def test_nan_loss_fails_and_keeps_the_last_good_checkpoint(monkeypatch, tmp_path):
    from metarec_runner.algos.maml import MAML

    real = MAML.meta_step
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        stats = real(self, batch)
        return {**stats, "loss": math.nan} if calls["n"] > 4 else stats  # 84 tasks: 3 outer steps an epoch

    monkeypatch.setattr(MAML, "meta_step", poisoned)
    folder = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"at epoch 2 step 2; lower algo\.meta_optimizer\.lr") as err:
        train(compose("+algo=maml", *TINY, "trainer.max_epochs=4", output_dir=folder))
    assert "\n" not in str(err.value)
    kept = load_checkpoint(folder / LAST)
    assert kept.epoch == 1 and all(math.isfinite(h["train/loss"]) for h in kept.meta["history"])
