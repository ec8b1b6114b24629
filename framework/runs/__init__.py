"""Runs: one function per kind of run, a config in and a result out.

``train_run``, ``evaluate_run``, ``attack_run``, ``transfer_run`` and ``analyze_run`` check
every input before they open an MLflow run (bad input opens none), then log into one run, which
ends FINISHED,
FAILED or KILLED. The CLI, the bench scripts and the tests call these; a sweep calls them with
``Tracking(parent=...)`` to make its trials child runs. The tags every run carries come from
:func:`run_tags`, and only from there.
"""

from .common import (Tracking, linked, load_test_data, log_test_set, model_classes, model_dataset,
                     model_run, run_tags, third_party)
from .train import (CHECKPOINT, FINAL_ARTIFACT, PRUNED_TAG, TrainJob, TrainRun, best_metrics,
                    describe, finish, log_figures, model_note, model_recipe, prepare_resume,
                    prepare_training, resume_run, save_checkpoint, train_run)
from .evaluate import EvaluateConfig, EvaluateRun, evaluate_run
from .analyze import AnalyzeConfig, AnalyzeRun, analyze_run
from .attack import AttackConfig, AttackRun, attack_run
from .transfer import TransferConfig, TransferRun, transfer_run
from .robustness import RobustnessConfig, RobustnessRun, robustness_run

__all__ = ["PRUNED_TAG", "TrainJob", "TrainRun", "prepare_training", "train_run", "CHECKPOINT",
           "save_checkpoint", "resume_run", "prepare_resume", "best_metrics", "log_figures",
           "describe", "model_recipe", "FINAL_ARTIFACT", "model_note", "finish", "Tracking",
           "run_tags", "third_party", "load_test_data", "model_classes", "model_run",
           "model_dataset", "linked", "log_test_set", "EvaluateConfig", "EvaluateRun",
           "evaluate_run", "AnalyzeConfig", "AnalyzeRun", "analyze_run", "AttackConfig",
           "AttackRun", "attack_run", "TransferConfig", "TransferRun", "transfer_run",
           "RobustnessConfig", "RobustnessRun", "robustness_run"]
