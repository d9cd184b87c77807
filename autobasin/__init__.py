"""autobasin: align and merge neural networks modulo permutation symmetries."""
from .spec import Group, Member, PermutationSpec, SpecError
from .permute import (EquivalenceError, apply_permutation, check_equivalence, compose,
                      identity_permutation, invert, permute_model, random_permutation)
from .match import weight_matching
from .merge import interpolate
from .repair import reset_bn_stats
from .barrier import BarrierResult, loss_barrier, plot_barrier
from .api import RebasinResult, auto_rebasin

__all__ = ["Group", "Member", "PermutationSpec", "SpecError", "EquivalenceError",
           "apply_permutation", "check_equivalence", "compose", "identity_permutation",
           "invert", "permute_model", "random_permutation",
           "weight_matching", "auto_rebasin", "RebasinResult", "interpolate", "reset_bn_stats",
           "loss_barrier", "plot_barrier", "BarrierResult"]
