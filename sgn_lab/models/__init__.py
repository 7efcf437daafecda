"""Models and the losses of tasks.

``builtin``  linear, MLP, CNN, ResNet (:func:`build_model`)
``hf``       GPT-2, BERT, ViT from Hugging Face configs (:func:`build_transformer`), or a
             model saved in a local folder (:func:`load_pretrained`); transformers is imported
             only when one is built or loaded
``losses``   the mean-reduced losses: cross entropy, ½ MSE, next-token cross entropy
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sgn_lab.lazy import homes, lazy_exports

# Each public name -> the module that defines it, imported on first use (sgn_lab.lazy).
_HOME = {
    **homes("sgn_lab.models.names", ("ACTIVATIONS", "MODELS", "TRANSFORMERS")),
    **homes("sgn_lab.models.builtin", ("build_model",)),
    **homes("sgn_lab.models.hf", ("Logits", "build_transformer", "load_pretrained")),
    **homes("sgn_lab.models.losses", ("LossFn", "half_mse", "loss_for", "token_cross_entropy")),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _HOME)

if TYPE_CHECKING:  # the same names, for type checkers and editors
    from sgn_lab.models.builtin import build_model
    from sgn_lab.models.hf import Logits, build_transformer, load_pretrained
    from sgn_lab.models.losses import LossFn, half_mse, loss_for, token_cross_entropy
    from sgn_lab.models.names import ACTIVATIONS, MODELS, TRANSFORMERS
