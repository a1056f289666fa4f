"""metaopt: gradient-based meta-optimization with interchangeable meta-gradient estimators.

The flat public API. Importing metaopt never imports Hydra, wandb or CUDA code.
"""
from metaopt import estimators, losses, optim
from metaopt.batching import TaskShapeMismatch, stack_tasks, unstack_tasks
from metaopt.budget import Budget, BudgetExceeded, TimeBudgetExceeded, parse_bytes, parse_seconds
from metaopt.estimators import (
                                AbstractEstimator,
                                Checkpoint,
                                EstimatorUnsupported,
                                EvolutionStrategies,
                                FirstOrder,
                                ForwardMode,
                                Full,
                                Implicit,
                                MetaGrad,
                                PersistentES,
                                Reptile,
                                Truncated,
                                UnknownEstimator,
                                available_estimators,
                                get_estimator,
)
from metaopt.loop import InnerLoop, detach_state, unroll
from metaopt.metaparams import (
    Init,
    LearnedAffineAugmentation,
    LearnedLoss,
    LearnedOptimizer,
    LearningRates,
    SyntheticData,
    WeightDecay,
    meta_params,
)
from metaopt.models import MLP, Conv4, MatmulConv2d
from metaopt.planning import Auto
from metaopt.prototypes import PrototypeLoop
from metaopt.pretraining import ClassifierLoop
from metaopt.protomaml import ProtoMAMLLoop
from metaopt.tasks import Digits, RandomInit, RandomPatterns, Sinusoid, TaskDistribution
from metaopt.callbacks import Callback, Validation
from metaopt.collapse import CollapseGuard, TrainingCollapsed
from metaopt.planning import plan
from metaopt.runner import run_meta_gradient
from metaopt.train import StepConfig, TrainState, evaluate, meta_step, meta_train
from metaopt.types import Batch, InnerState, Task

__version__ = "0.1.0"

__all__ = [
    "losses", "optim",
    "Batch", "Task", "InnerState",
    "InnerLoop", "PrototypeLoop", "ProtoMAMLLoop", "ClassifierLoop", "unroll", "detach_state",
    "Init", "LearningRates", "WeightDecay", "LearnedLoss", "LearnedOptimizer", "LearnedAffineAugmentation",
    "SyntheticData", "meta_params",
    "estimators", "AbstractEstimator", "MetaGrad", "get_estimator", "available_estimators",
    "Full", "FirstOrder", "Truncated", "Checkpoint", "Implicit", "ForwardMode", "Reptile", "EvolutionStrategies",
    "PersistentES", "Auto",
    "EstimatorUnsupported", "UnknownEstimator",
    "Budget", "BudgetExceeded", "TimeBudgetExceeded", "parse_bytes", "parse_seconds",
    "TaskShapeMismatch", "stack_tasks", "unstack_tasks",
    "MLP", "Conv4", "MatmulConv2d",
    "TaskDistribution", "Sinusoid", "RandomPatterns", "Digits", "RandomInit",
    "meta_train", "meta_step", "TrainState", "StepConfig", "evaluate", "plan", "run_meta_gradient",
    "CollapseGuard", "TrainingCollapsed", "Callback", "Validation",
]
