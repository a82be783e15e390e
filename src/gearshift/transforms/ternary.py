"""BitNet b1.58 arithmetic: absmean ternary weights, per-token absmax activations, and a
Linear layer that trains through both with a straight-through estimator.

The format is the one of ``transformers.integrations.bitnet`` (``BitLinear``, the
``bitlinear`` class of ``quantization_config``): a weight ``W`` becomes the ternary tensor
``T = clip(round(W · inv), -1, 1)`` with ``inv = 1 / mean|W|`` (its ``weight_scale``), an input
``x`` becomes the integers ``X = clip(round(x · a), -128, 127)`` with ``a = 127 / max|x|`` per
token, and the output is ``(X Tᵀ) / (a · inv)``. :class:`TernaryLinear` computes exactly those
operations at full strength, so a model exported packed and loaded by plain transformers gives
the logits of the QAT model.

Why not ``AutoBitLinear(online_quant=True)``: its quantizers are ``torch.compile``d (tens of
seconds to compile on CPU, and slower per step for small layers; ``bench/bitlinear.py``
measures both), it has no strength λ for a ramp, and its offline form multiplies the bias by
the scale. This layer needs no compiler and is exact against ``BitLinear``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Ternary values per packed byte (``transformers.integrations.bitnet.VALUES_PER_ITEM``).
VALUES_PER_ITEM = 4


def ternary_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, inv)``: ternary values in {-1, 0, 1} (float32) and ``inv = 1 / mean|W|``.

    The dequantized weight is ``T / inv`` (= ``T · mean|W|``).

    Example:
        >>> t, inv = ternary_weight(torch.tensor([[0.5, -2.0], [0.1, 1.4]]))
        >>> t.tolist(), round(float(1 / inv), 2)
        ([[1.0, -1.0], [0.0, 1.0]], 1.0)
    """
    w = weight.detach().float()
    inv = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * inv).round().clamp(-1, 1), inv.reshape(1)


def quantize_activations(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, a)``: per-token (last dimension) absmax integers and their scale ``a``.

    ``X / a`` is the dequantized input; computed in float32 whatever ``x``'s dtype.
    """
    qp = 2 ** (bits - 1) - 1
    x = x.detach().float()
    scale = qp / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-qp - 1, qp), scale


class _QuantizedLinear(torch.autograd.Function):
    """Full-strength forward in the exported arithmetic; straight-through backward.

    The gradient is that of ``F.linear(x_q, W_q, b)`` with respect to its inputs, handed to
    ``x`` and ``W`` unchanged (the quantizers count as the identity).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                bits: int) -> torch.Tensor:
        t, inv = ternary_weight(weight)
        xi, a = quantize_activations(x, bits)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
            else x.dtype
        y = F.linear(xi.to(dtype), t.to(dtype)) / (inv * a)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(xi / a, t / inv)
        ctx.shapes = (x.dtype, weight.dtype, bias is not None)
        return y.to(dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_q, w_q = ctx.saved_tensors
        x_dtype, w_dtype, has_bias = ctx.shapes
        g = grad.float()
        grad_x = (g @ w_q).to(x_dtype)
        grad_w = (g.reshape(-1, g.shape[-1]).T @ x_q.reshape(-1, x_q.shape[-1])).to(w_dtype)
        grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(w_dtype) if has_bias else None
        return grad_x, grad_w, grad_b, None


class TernaryLinear(nn.Linear):
    """A Linear layer trained with ternary weights and low-bit activations (BitNet b1.58).

    It keeps the latent full-precision ``weight`` (what the optimizer updates and checkpoints
    hold, under the original parameter names) and quantizes in every forward pass with
    strength ``quant_lambda`` λ: the weight used is ``W + λ (W_q − W)`` and the input
    ``x + λ (x_q − x)``. λ = 0 is the plain Linear layer, λ = 1 is exactly the exported
    ``BitLinear``. Gradients pass straight through both quantizers.

    Args:
        in_features: Input width.
        out_features: Output width.
        bias: Whether the layer has a bias.
        activation_bits: Bits of the per-token activation quantization.

    Example:
        >>> layer = TernaryLinear.from_linear(nn.Linear(8, 4))
        >>> layer.quant_lambda = 1.0
        >>> layer(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 activation_bits: int = 8, device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation_bits = activation_bits
        self.quant_lambda = 1.0

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation_bits: int = 8) -> TernaryLinear:
        """A TernaryLinear sharing ``linear``'s parameters (same tensors, same names)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.activation_bits = activation_bits
        layer.quant_lambda = 1.0
        return layer

    def to_linear(self) -> nn.Linear:
        """A plain Linear layer with the latent weights (the layer below this transform)."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.quant_lambda
        if lam <= 0.0:
            return F.linear(x, self.weight, self.bias)
        if lam >= 1.0:
            return _QuantizedLinear.apply(x, self.weight, self.bias, self.activation_bits)
        # Part-way through the ramp: mix with the straight-through (detach) trick.
        t, inv = ternary_weight(self.weight)
        w = self.weight
        w = w + lam * (t / inv).to(w.dtype).sub(w.detach())
        xi, a = quantize_activations(x, self.activation_bits)
        x = x + lam * (xi / a).to(x.dtype).sub(x.detach())
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, activation_bits={self.activation_bits}, "
                f"quant_lambda={self.quant_lambda:g}")
