"""Task distributions: sinusoid regression, ..."""
from metaopt.tasks.base import TaskDistribution
from metaopt.tasks.sinusoid import Sinusoid

__all__ = ["TaskDistribution", "Sinusoid"]
