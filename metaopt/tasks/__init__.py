"""Task distributions: sinusoid regression, Omniglot, digits, synthetic patterns; random inits."""
from metaopt.tasks.base import TaskDistribution
from metaopt.tasks.digits import Digits
from metaopt.tasks.omniglot import Omniglot, OmniglotDataError
from metaopt.tasks.patterns import RandomPatterns
from metaopt.tasks.random_init import RandomInit
from metaopt.tasks.sinusoid import Sinusoid

__all__ = ["TaskDistribution", "Sinusoid", "RandomPatterns", "Omniglot", "OmniglotDataError", "Digits", "RandomInit"]
