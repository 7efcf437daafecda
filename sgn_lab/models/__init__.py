"""Models and the losses of tasks.

``builtin``  linear, MLP, CNN, ResNet (:func:`build_model`)
``hf``       GPT-2, BERT, ViT from Hugging Face configs (:func:`build_transformer`), or a
             model saved in a local folder (:func:`load_pretrained`); transformers is imported
             only when one is built or loaded
``losses``   the mean-reduced losses: cross entropy, ½ MSE, next-token cross entropy
"""

from sgn_lab.models.builtin import ACTIVATIONS, MODELS, build_model
from sgn_lab.models.hf import TRANSFORMERS, Logits, build_transformer, load_pretrained
from sgn_lab.models.losses import LossFn, half_mse, loss_for, token_cross_entropy

__all__ = [
    "ACTIVATIONS",
    "MODELS",
    "TRANSFORMERS",
    "LossFn",
    "Logits",
    "build_model",
    "build_transformer",
    "half_mse",
    "load_pretrained",
    "loss_for",
    "token_cross_entropy",
]
