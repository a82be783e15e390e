"""Which ternary layer trains faster on CPU: transformers' ``AutoBitLinear(online_quant=True)``
or gearshift's ``TernaryLinear``? Same model, same weights, same batches, side by side.

Both quantize the same way (absmean ternary weights per tensor, per-token absmax 8-bit
activations, straight-through gradients). ``AutoBitLinear``'s quantizers are
``torch.compile``d; ``TernaryLinear`` runs eagerly and computes the full-strength forward in
the exact arithmetic of the exported ``BitLinear``. For each arm it prints the time of the
first training step (compilation included), the median of the next ``--steps`` steps, and
how far the two arms' logits are apart on the same input at the start.

Usage::

    .venv/bin/python bench/bitlinear.py                 # the embedded default model's sizes
    .venv/bin/python bench/bitlinear.py --steps 30 --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

# A fresh compile cache: the first step shows what a user's first run pays for compilation.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.bitnet import AutoBitLinear  # noqa: E402

from gearshift.config.schema import QuantizationConfig  # noqa: E402
from gearshift.transforms import BitNetTransform  # noqa: E402


def build(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=259, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=512))


def with_autobitlinear(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and not name.endswith("lm_head"):
            layer = AutoBitLinear(module.in_features, module.out_features,
                                  bias=module.bias is not None, online_quant=True)
            layer.weight = module.weight
            model.set_submodule(name, layer)
    return model


def with_ternary(model: nn.Module) -> nn.Module:
    return BitNetTransform(QuantizationConfig(method="bitnet_b158"), say=lambda _: None
                           ).apply(model)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    logits = model(input_ids=ids).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=352)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 259, (args.batch, args.seq_len), generator=g)
               for _ in range(args.steps + 1)]
    arms = {"AutoBitLinear(online_quant)": with_autobitlinear(build(args)),
            "TernaryLinear": with_ternary(build(args))}
    with torch.no_grad():
        a, b = (m(input_ids=batches[0]).logits for m in arms.values())
    print(f"max |logit difference| between the arms at the start: {(a - b).abs().max():.2e}")
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in arms.items()}
    results: dict[str, list[float]] = {name: [] for name in arms}
    for ids in batches:  # interleaved, so that load from elsewhere hits both arms alike
        for name, model in arms.items():
            results[name].append(train_step(model, optimizers[name], ids))
    base = statistics.median(results["TernaryLinear"][1:])
    print(f"{'arm':<30} {'first step (s)':>15} {'median step (s)':>16} {'vs TernaryLinear':>17}")
    for name, times in results.items():
        median = statistics.median(times[1:])
        print(f"{name:<30} {times[0]:>15.2f} {median:>16.4f} {median / base:>16.2f}x")


if __name__ == "__main__":
    main()
