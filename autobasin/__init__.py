"""autobasin: align and merge neural networks modulo permutation symmetries.

The pipeline: ``trace_model`` (capture + infer; a ``TracedModel`` whose ``spec``
is what ``infer_spec`` returns) -> ``PermutationSpec`` (plain data) -> a matcher
(``weight_matching``, ``activation_matching``, ``ste_matching``) -> a ``Matching``
(the permutations and how they were found)
-> ``apply_permutation`` -> ``interpolate`` / ``loss_barrier`` / ``merge_many``.
``auto_rebasin`` runs it in one call; ``align_files`` / ``merge_files`` do it on
checkpoint files that need not fit in memory together.
"""
from .api import ArchitectureMismatchError, RebasinResult, auto_rebasin
from .barrier import BarrierResult, loss_barrier, plot_barrier
from .calibration import (CalibrationResult, expected_calibration_error, reliability,
                          reliability_plot)
from .files import AlignedFiles, MergedFiles, align_files, merge_files
from .guard import MetaTensorError, NonFiniteWeightError
from .infer import ExampleInputError, TracedModel, infer_spec, rule, trace_model
from .inputs import ModelInputs
from .io import CheckpointError, load_into, load_perms, load_state_dict, save_perms, save_state_dict
from .fold import FoldError, GainlessRMSNorm, fold_norms
from .match import (GeneralMatching, Matching, activation_matching, general_weight_matching,
                    ste_matching, weight_matching)
from .merge import interpolate, merge_many
from .models import ModelSpecError, build_model
from .permute import (EquivalenceError, NondeterministicModelError, TieBreakError, apply_permutation,
                      check_equivalence, compose, identity_permutation, invert, permute_model,
                      random_permutation, random_transforms)
from .repair import ChannelStats, channel_stats, repair, reset_bn_stats
from .spec import KINDS, Group, Member, PermutationSpec, SpecError
from .study import StudyRow, StudyTable, barrier_study
from .trace import TraceError

__all__ = [
    "infer_spec", "trace_model", "TracedModel", "rule", "PermutationSpec", "Group", "Member", "ModelInputs",
    "SpecError", "TraceError", "ExampleInputError", "NonFiniteWeightError", "MetaTensorError",
    "random_permutation", "identity_permutation", "apply_permutation", "invert", "compose",
    "permute_model", "check_equivalence", "EquivalenceError", "NondeterministicModelError", "TieBreakError",
    "weight_matching", "activation_matching", "ste_matching", "Matching",
    "auto_rebasin", "RebasinResult", "ArchitectureMismatchError",
    "interpolate", "merge_many", "reset_bn_stats", "loss_barrier", "plot_barrier", "BarrierResult",
    "load_state_dict", "save_state_dict", "load_into", "save_perms", "load_perms", "CheckpointError",
    "build_model", "ModelSpecError",
    "repair", "channel_stats", "ChannelStats",
    "expected_calibration_error", "reliability", "CalibrationResult", "reliability_plot",
    "barrier_study", "StudyTable", "StudyRow",
    "align_files", "merge_files", "AlignedFiles", "MergedFiles",
    "KINDS", "random_transforms", "general_weight_matching", "GeneralMatching",
    "fold_norms", "GainlessRMSNorm", "FoldError",
]
