"""metaopt: gradient-based meta-optimization with interchangeable meta-gradient estimators.

The flat public API. Importing metaopt never imports Hydra, wandb or CUDA code.
"""
from metaopt import losses, optim
from metaopt.batching import TaskShapeMismatch, stack_tasks, unstack_tasks
from metaopt.budget import Budget, BudgetExceeded, parse_bytes, parse_seconds
from metaopt.estimators import (AbstractEstimator, EstimatorUnsupported, FirstOrder, Full, MetaGrad,
                                UnknownEstimator, available_estimators, get_estimator)
from metaopt.loop import InnerLoop, detach_state, unroll
from metaopt.metaparams import Init, LearningRates, meta_params
from metaopt.models import MLP, Conv4
from metaopt.tasks import Sinusoid, TaskDistribution
from metaopt.train import evaluate, meta_train
from metaopt.types import Batch, InnerState, Task

__version__ = "0.1.0"

__all__ = [
    "losses", "optim",
    "Batch", "Task", "InnerState",
    "InnerLoop", "unroll", "detach_state",
    "Init", "LearningRates", "meta_params",
    "AbstractEstimator", "MetaGrad", "Full", "FirstOrder", "get_estimator", "available_estimators",
    "EstimatorUnsupported", "UnknownEstimator",
    "Budget", "BudgetExceeded", "parse_bytes", "parse_seconds",
    "TaskShapeMismatch", "stack_tasks", "unstack_tasks",
    "MLP", "Conv4",
    "TaskDistribution", "Sinusoid",
    "meta_train", "evaluate",
]
