"""dho: distill vision-language models into small classifiers with Dual-Head Optimization."""

__version__ = "0.1.0"
