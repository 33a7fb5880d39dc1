"""Teachers: models that set a student's loss, trained by meta-gradients."""

from l2t_jax.teachers.dlf import TEACHER_FORMS, DLFTeacher
from l2t_jax.teachers.features import (
    FEATURE_NAMES,
    NUM_FEATURES,
    FeaturesFn,
    feature_indices,
    initial_stats,
    make_stats_fn,
    student_features,
)
from l2t_jax.teachers.weights import WeightTeacher

__all__ = [
    "DLFTeacher", "FEATURE_NAMES", "FeaturesFn", "NUM_FEATURES", "TEACHER_FORMS",
    "feature_indices", "initial_stats", "make_stats_fn", "student_features", "WeightTeacher",
]
