"""The Gram fast path: the (n, n) Gram K_ij = g_i·g_j of the per-sample gradients of a small
GPT-2 on a padded batch, without an n × d matrix; its routes, its spot check against vmap, and
the same K from materialised per-sample gradients (docs/guides/gram-path.md).

    python examples/gram_path.py --out runs/gram-example
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import sgn_lab
from sgn_lab.models import token_cross_entropy


class NextToken(torch.nn.Module):
    """Logits of an HF language model from (ids, attention mask)."""

    def __init__(self) -> None:
        super().__init__()
        config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                            bos_token_id=0, eos_token_id=0,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.gpt2 = GPT2LMHeadModel(config)     # random weights, HF's default sdpa attention

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.gpt2(input_ids=ids, attention_mask=mask).logits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = NextToken()
    n, T = args.samples, 32
    ids = torch.randint(0, 256, (n, T + 1))
    lengths = torch.randint(T // 4, T + 1, (n,))             # a right-padded batch
    mask = (torch.arange(T + 1) < lengths[:, None]).long()
    x, y = (ids[:, :-1], mask[:, :-1]), ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)

    started = time.perf_counter()
    K, mean = sgn_lab.gram_and_mean_gradient(model, token_cross_entropy, x, y, verify=4)
    seconds = time.perf_counter() - started
    print(sgn_lab.per_sample_gram_coverage(model, token_cross_entropy, x, y).summary())
    G = sgn_lab.flatten_grads(sgn_lab.per_sample_grads(model, token_cross_entropy, x, y))
    error = float((K - G.double() @ G.double().T).norm() / K.norm())
    stats = sgn_lab.noise_stats(gram=K, dim=mean.numel(), mean=mean)
    print(f"K: {n} x {n} in {seconds:.2f} s, relative difference to G Gᵀ {error:.1e}; "
          f"tr S = {stats.trace:.4g}, B_simple = {stats.noise_scale:.3g}, "
          f"effective rank {stats.effective_rank:.1f} of {n - 1}")
    torch.save({"gram": K, "mean": mean}, args.out / "gram.pt")
    if error > 1e-4:
        raise SystemExit(f"the Gram path and vmap disagree: {error:.1e}")


if __name__ == "__main__":
    main()
