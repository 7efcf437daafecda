"""The probe inside trainers researchers already use: PyTorch Lightning and Hugging Face.

``lightning``  SGNCallback for ``lightning.Trainer`` (extra ``lightning``)
``hf``         SGNTrainerCallback for ``transformers.Trainer`` (extra ``hf``)

Both measure the SGN of a fixed probe set (``probe_x``, ``probe_y``) at step 0, every ``every``
optimizer steps (not micro-batches: gradient accumulation counts once per step) and at the
end of training, and write the same run directory as ``sgn-lab measure``
(:func:`sgn_lab.load_run` reads it; ``log=("tensorboard",)`` adds event files). Training is
bit-identical with or without them: random state, ``.grad``, train/eval flags and weights are
left as they were. Under mixed precision the probe measures float32 gradients of its own loss
with autocast off, so a GradScaler's scale never enters (details in ``session``).
Import the submodule you need; this package imports neither trainer.
"""
