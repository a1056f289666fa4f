"""Meta-parameter kinds, one per file, each filling one slot of the inner loop."""
from metaopt.metaparams.augmentation import LearnedAffineAugmentation
from metaopt.metaparams.base import (
                                     AbstractDataMetaParam,
                                     AbstractInitMetaParam,
                                     AbstractLossMetaParam,
                                     AbstractMetaParam,
                                     AbstractOptimizerMetaParam,
                                     meta_params,
)
from metaopt.metaparams.init import Init
from metaopt.metaparams.learned_loss import LearnedLoss
from metaopt.metaparams.learned_optimizer import LearnedOptimizer
from metaopt.metaparams.lrs import LearningRates
from metaopt.metaparams.regularizer import WeightDecay
from metaopt.metaparams.synthetic import SyntheticData

__all__ = [
    "AbstractMetaParam",
    "AbstractInitMetaParam",
    "AbstractOptimizerMetaParam",
    "AbstractLossMetaParam",
    "AbstractDataMetaParam",
    "meta_params",
    "Init",
    "LearningRates",
    "WeightDecay",
    "LearnedLoss",
    "LearnedOptimizer",
    "LearnedAffineAugmentation",
    "SyntheticData",
]
