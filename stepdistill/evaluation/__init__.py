"""Evaluation of any diffusers pipeline directory (teacher or student): FD / FID / KID, CLIP
score, precision / recall, per-condition diversity, latency; ``metrics.json``, a markdown table,
a sample grid and a plot (``stepdistill eval``), in a named feature space (``feature_spaces.feature_spaces()``).
See docs/evaluation.md."""

from .clip import clip_score, load_local_clip
from .conditions import Conditions, label_conditions, load_prompts, prompt_conditions
from .distribution import fid_from_features, kid_from_features, per_condition_diversity, precision_recall
from .feature_spaces import RandomConvFeatures, get_feature_space, register_feature_space
from .features import IdentityFeatures, InceptionFeatures, extract_features, inception_features
from .generation import EvalPipeline, generate_images, load_eval_pipeline
from .ladder import feature_ladder
from .latency import measure_latency
from .reference import list_images, reference_features
from .runner import EvalOptions, run_evaluation
from .scoring import Reference, make_evaluator, score_images

__all__ = [
    "Conditions",
    "EvalPipeline",
    "IdentityFeatures",
    "InceptionFeatures",
    "RandomConvFeatures",
    "Reference",
    "clip_score",
    "extract_features",
    "feature_ladder",
    "fid_from_features",
    "generate_images",
    "get_feature_space",
    "inception_features",
    "kid_from_features",
    "label_conditions",
    "list_images",
    "load_eval_pipeline",
    "load_local_clip",
    "load_prompts",
    "make_evaluator",
    "measure_latency",
    "per_condition_diversity",
    "precision_recall",
    "prompt_conditions",
    "reference_features",
    "register_feature_space",
    "run_evaluation",
    "EvalOptions",
    "score_images",
]
