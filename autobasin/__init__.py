"""autobasin: align and merge neural networks modulo permutation symmetries."""
from .spec import Group, Member, PermutationSpec, SpecError
from .permute import (EquivalenceError, apply_permutation, check_equivalence, compose,
                      identity_permutation, invert, permute_model, random_permutation)

__all__ = ["Group", "Member", "PermutationSpec", "SpecError", "EquivalenceError",
           "apply_permutation", "check_equivalence", "compose", "identity_permutation",
           "invert", "permute_model", "random_permutation"]
