"""Meta-gradient estimators, one per file, registered by name (`get_estimator`)."""
from metaopt.estimators.base import (AbstractEstimator, EstimatorUnsupported, MetaGrad, TaskObjective,
                                     UnknownEstimator, available_estimators, get_estimator, grads_of,
                                     register)
from metaopt.estimators.first_order import FirstOrder
from metaopt.estimators.full import Full

__all__ = [
    "AbstractEstimator",
    "EstimatorUnsupported",
    "MetaGrad",
    "TaskObjective",
    "UnknownEstimator",
    "available_estimators",
    "get_estimator",
    "grads_of",
    "register",
    "Full",
    "FirstOrder",
]
