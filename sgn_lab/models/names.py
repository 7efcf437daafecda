"""The names of the models a run can build, defined once and light (no torch), so that the
config's schema and ``sgn-lab --help`` list them without importing the models."""

from __future__ import annotations

MODELS = ("linear", "mlp", "cnn", "resnet")
"""Names of the built-in models (:func:`sgn_lab.models.builtin.build_model`)."""

ACTIVATIONS = ("relu", "tanh")
"""Hidden-layer activations of the built-in models."""

TRANSFORMERS = ("gpt2", "bert", "vit")
"""Names of the transformers built from Hugging Face configs
(:func:`sgn_lab.models.hf.build_transformer`)."""
