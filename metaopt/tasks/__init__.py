"""Task distributions: sinusoid regression, ..."""
from metaopt.tasks.base import TaskDistribution
from metaopt.tasks.omniglot import Omniglot, OmniglotDataError
from metaopt.tasks.patterns import RandomPatterns
from metaopt.tasks.sinusoid import Sinusoid

__all__ = ["TaskDistribution", "Sinusoid", "RandomPatterns", "Omniglot", "OmniglotDataError"]
