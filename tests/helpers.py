"""Tiny checkpoints built in tmp dirs (no downloads); see evomerge.zoo."""

from evomerge.zoo import make_random_family as make_pool
from evomerge.zoo import make_random_llama as make_llama

__all__ = ["make_llama", "make_pool"]
