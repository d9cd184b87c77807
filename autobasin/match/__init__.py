"""Matchers: find the permutations that align model B to model A."""
from .lap import solve_lap
from .weight import weight_matching

__all__ = ["solve_lap", "weight_matching"]
