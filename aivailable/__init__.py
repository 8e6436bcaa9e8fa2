"""AIvailable: a highly available LLM-as-a-Service for piles of mixed, old GPUs."""

__version__ = "0.1.0"
