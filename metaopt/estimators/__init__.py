"""Meta-gradient estimators, one per file, registered by name (`get_estimator`)."""
from metaopt.estimators.base import (
                                     AbstractEstimator,
                                     EstimatorUnsupported,
                                     MetaGrad,
                                     MetaGradientMethod,
                                     TaskObjective,
                                     UnknownEstimator,
                                     available_estimators,
                                     get_estimator,
                                     grads_of,
                                     register,
                                     registered_estimators,
)
from metaopt.estimators.checkpoint import Checkpoint
from metaopt.estimators.es import EvolutionStrategies
from metaopt.estimators.first_order import FirstOrder
from metaopt.estimators.forward import ForwardMode
from metaopt.estimators.full import Full
from metaopt.estimators.implicit import Implicit
from metaopt.estimators.online_pes import OnlinePES
from metaopt.estimators.pes import PersistentES
from metaopt.estimators.reptile import Reptile
from metaopt.estimators.truncated import Truncated

__all__ = [
    "AbstractEstimator",
    "EstimatorUnsupported",
    "MetaGrad",
    "MetaGradientMethod",
    "TaskObjective",
    "UnknownEstimator",
    "available_estimators",
    "get_estimator",
    "grads_of",
    "registered_estimators",
    "register",
    "Full",
    "FirstOrder",
    "Truncated",
    "Checkpoint",
    "Implicit",
    "ForwardMode",
    "Reptile",
    "EvolutionStrategies",
    "PersistentES",
    "OnlinePES",
]
