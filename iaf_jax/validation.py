"""What the training loop does with a validation -ELBO: keep the best checkpoint, anneal the learning rate on a
plateau, stop early. Plain Python (no JAX), so the rules are tested on their own (tests/test_validation.py).

Its state is three keys of the `meta` dict saved with every checkpoint: best_valid (the lowest validation
-ELBO so far, None before the first), bad_evals (evaluations since it last improved) and lr_base (the rate that
plateau annealing scales and the learning-rate schedule starts from). A resumed run carries on from them."""
from __future__ import annotations

import dataclasses
from typing import Optional

META_KEYS = ("best_valid", "bad_evals", "lr_base")


@dataclasses.dataclass(frozen=True)
class Decision:
  """What one validation evaluation asks of the loop."""
  improved: bool   # a new best: save it as the best checkpoint
  annealed: bool   # lr_base was lowered: the optimizer's rate must follow
  stop: bool       # early-stopping patience spent


@dataclasses.dataclass
class ValidationPolicy:
  """Best checkpoint, plateau annealing and early stopping (a patience of 0 turns either rule off).

  Annealing: every `lr_plateau_patience`-th evaluation in a row without improvement multiplies lr_base by
  `lr_plateau_factor`, never below `min_learning_rate`. Early stopping: `early_stopping_patience` evaluations
  in a row without improvement."""
  early_stopping_patience: int
  lr_plateau_patience: int
  lr_plateau_factor: float
  min_learning_rate: float
  lr_base: float
  best_valid: Optional[float] = None
  bad_evals: int = 0

  @classmethod
  def from_config(cls, train_cfg, meta: dict) -> "ValidationPolicy":
    """The rules of config.train, the state of a checkpoint's (or a new run's) meta."""
    return cls(early_stopping_patience=train_cfg.early_stopping_patience,
               lr_plateau_patience=train_cfg.lr_plateau_patience, lr_plateau_factor=train_cfg.lr_plateau_factor,
               min_learning_rate=train_cfg.min_learning_rate, lr_base=float(meta["lr_base"]),
               best_valid=meta["best_valid"], bad_evals=int(meta["bad_evals"]))

  def meta(self) -> dict:
    """The state, as the checkpoint's meta keys."""
    return {k: getattr(self, k) for k in META_KEYS}

  @property
  def patience_spent(self) -> bool:
    """Early stopping's rule; also true of a resumed run that stopped early (so a rerun stays stopped)."""
    return bool(self.early_stopping_patience and self.bad_evals >= self.early_stopping_patience)

  def update(self, valid_value: float) -> Decision:
    """Takes one validation -ELBO (lower is better) and says what the loop must do."""
    improved = self._keep_if_best(valid_value)
    if not improved:
      self.bad_evals += 1
    annealed = bool(not improved and self.lr_plateau_patience and self.bad_evals % self.lr_plateau_patience == 0
                    and self.lr_base > self.min_learning_rate)
    if annealed:
      self.lr_base = max(self.lr_base * self.lr_plateau_factor, self.min_learning_rate)
    return Decision(improved=improved, annealed=annealed, stop=self.patience_spent)

  def update_at_end(self, valid_value: float) -> bool:
    """The closing evaluation of a run that ends (num_steps or time budget) between two regular ones; True when
    it is a new best, which the loop saves. A worse value neither counts toward early stopping nor anneals: no
    training follows it in this run."""
    return self._keep_if_best(valid_value)

  def _keep_if_best(self, valid_value: float) -> bool:
    improved = self.best_valid is None or valid_value < self.best_valid
    if improved:
      self.best_valid, self.bad_evals = valid_value, 0
    return improved
