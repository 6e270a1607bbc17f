"""Feature maps phi for linear attention, applied per query head to post-RoPE queries and keys.

Input ``(B, H, T, d)``; output ``(B, H, T, F)`` with non-negative features. Bundled into exported
checkpoints, so only torch is imported.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_backend import hedgehog_features


def _rectangular_identity(num_heads: int, head_dim: int, feature_dim: int) -> torch.Tensor:
    eye = torch.zeros(head_dim, feature_dim)
    n = min(head_dim, feature_dim)
    eye[torch.arange(n), torch.arange(n)] = 1.0
    return eye.expand(num_heads, head_dim, feature_dim).clone()


class _PerHeadLinear(nn.Module):
    """z = x W_h + b_h with one (d x f) matrix per head, identity-initialised so training starts near phi(x) ~ x."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(_rectangular_identity(num_heads, head_dim, feature_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, feature_dim))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhtd,hdf->bhtf", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)


class HedgehogFeatureMap(_PerHeadLinear):
    """LoLCATs form: [softmax(z) || softmax(-z)] over the feature axis, two separate softmaxes (2f features)."""

    @staticmethod
    def output_dim(head_dim: int, feature_dim: int) -> int:
        return 2 * feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hedgehog_features(x, self.weight, self.bias)


class HedgehogFLAFeatureMap(_PerHeadLinear):
    """flash-linear-attention's variant: one softmax over [2z || -2z] (2f features)."""

    @staticmethod
    def output_dim(head_dim: int, feature_dim: int) -> int:
        return 2 * feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.project(x).float()
        return torch.softmax(torch.cat([2 * z, -2 * z], dim=-1), dim=-1).clamp_min(1e-12).to(x.dtype)


class T2RFeatureMap(_PerHeadLinear):
    """ReLU(x W + b) (T2R); f features."""

    @staticmethod
    def output_dim(head_dim: int, feature_dim: int) -> int:
        return feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.project(x))


class ExpFeatureMap(_PerHeadLinear):
    """[exp(z - max z) || exp(-z + min z)], max/min over the feature axis; 2f features."""

    @staticmethod
    def output_dim(head_dim: int, feature_dim: int) -> int:
        return 2 * feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.project(x).float()
        pos = torch.exp(z - z.amax(dim=-1, keepdim=True))
        neg = torch.exp(-z + z.amin(dim=-1, keepdim=True))
        return torch.cat([pos, neg], dim=-1).to(x.dtype)


class _ParameterFree(nn.Module):
    """A map with no weights: same constructor as the learned maps, d output features."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()

    @staticmethod
    def output_dim(head_dim: int, feature_dim: int) -> int:
        return head_dim


class EluFeatureMap(_ParameterFree):
    """1 + ELU(x); no parameters, d features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 + torch.nn.functional.elu(x)


class IdentityFeatureMap(_ParameterFree):
    """phi(x) = x: not positive, so only meaningful inside the hybrid or for tests."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


FEATURE_MAPS = {
    "hedgehog": HedgehogFeatureMap,
    "hedgehog_fla": HedgehogFLAFeatureMap,
    "t2r": T2RFeatureMap,
    "exp": ExpFeatureMap,
    "elu": EluFeatureMap,
    "identity": IdentityFeatureMap,
}
