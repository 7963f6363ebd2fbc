"""The validation policy alone (iaf_jax/validation.py): best checkpoint, plateau annealing, early stopping, and
its state as the checkpoint's meta keys."""
import ml_collections
import pytest

from iaf_jax.validation import Decision, ValidationPolicy


def _policy(early=0, plateau=0, factor=0.5, min_lr=1e-4, lr=1e-3, **state):
  return ValidationPolicy(early_stopping_patience=early, lr_plateau_patience=plateau, lr_plateau_factor=factor,
                          min_learning_rate=min_lr, lr_base=lr, **state)


def test_first_evaluation_is_a_new_best():
  p = _policy()
  assert p.update(90.0) == Decision(improved=True, annealed=False, stop=False)
  assert (p.best_valid, p.bad_evals) == (90.0, 0)


def test_worse_or_equal_counts_as_a_bad_evaluation_and_a_new_best_resets_the_count():
  p = _policy()
  p.update(90.0)
  assert not p.update(90.0).improved and not p.update(95.0).improved
  assert (p.best_valid, p.bad_evals) == (90.0, 2)
  assert p.update(89.0).improved
  assert (p.best_valid, p.bad_evals) == (89.0, 0)


def test_plateau_annealing_every_patience_bad_evaluations_down_to_the_floor():
  p = _policy(plateau=2, factor=0.1, min_lr=5e-5, lr=1e-3)
  p.update(90.0)
  annealed = [p.update(91.0).annealed for _ in range(6)]
  assert annealed == [False, True, False, True, False, False]   # the third would go below the floor: none
  assert p.lr_base == pytest.approx(5e-5)


def test_no_annealing_or_stopping_with_patience_zero():
  p = _policy(early=0, plateau=0)
  p.update(1.0)
  decisions = [p.update(2.0) for _ in range(20)]
  assert not any(d.annealed or d.stop for d in decisions) and p.lr_base == 1e-3 and not p.patience_spent


def test_early_stopping_after_patience_bad_evaluations():
  p = _policy(early=3)
  p.update(1.0)
  assert [p.update(2.0).stop for _ in range(3)] == [False, False, True]
  assert p.patience_spent


def test_state_round_trips_through_the_checkpoint_meta():
  train = ml_collections.ConfigDict({"early_stopping_patience": 2, "lr_plateau_patience": 1,
                                     "lr_plateau_factor": 0.5, "min_learning_rate": 1e-6})
  meta = {"best_valid": None, "bad_evals": 0, "wall_time": 0.0, "lr_base": 1e-3}
  p = ValidationPolicy.from_config(train, meta)
  p.update(10.0)
  p.update(11.0)
  saved = dict(meta, **p.meta())
  assert saved == {"best_valid": 10.0, "bad_evals": 1, "wall_time": 0.0, "lr_base": 5e-4}
  resumed = ValidationPolicy.from_config(train, saved)
  assert resumed == p
  assert resumed.update(12.0).stop and resumed.patience_spent
  # A run stopped early stays stopped when resumed: the check needs no new evaluation.
  assert ValidationPolicy.from_config(train, dict(saved, bad_evals=2)).patience_spent


def test_the_closing_evaluation_keeps_a_new_best_and_otherwise_changes_nothing():
  p = _policy(early=2, plateau=1, lr=1e-3)
  p.update(90.0)
  p.update(91.0)   # one bad evaluation: annealed once
  state = p.meta()
  assert not p.update_at_end(95.0)
  assert p.meta() == state and not p.patience_spent   # neither annealed nor a step toward stopping
  assert p.update_at_end(80.0)
  assert (p.best_valid, p.bad_evals) == (80.0, 0)
