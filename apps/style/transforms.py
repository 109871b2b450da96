"""Feature-space style transforms: AdaIN and WCT, with a content-style blend ``alpha``.

Both act on encoder feature maps (B, C, H, W); style transfer decodes the result, and
``StyleAugment`` uses the same functions with a random ``alpha`` per image. No
maintained library exposes these as plain tensor functions (kornia has none; the
reference implementations are research scripts), so they are written here.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

Method = Literal["wct", "adain"]
"""A feature transform: ``wct`` (mean and full channel covariance) or ``adain`` (channel mean and std)."""
METHODS: tuple[str, ...] = get_args(Method)


def _alpha(alpha: float | Tensor, like: Tensor) -> Tensor | float:
    if isinstance(alpha, Tensor):
        return alpha.to(like).view(-1, *([1] * (like.dim() - 1)))
    return alpha


def adain(
    content: Tensor, style: Tensor, alpha: float | Tensor = 1.0, eps: float = 1e-5, stats_from: Tensor | None = None
) -> Tensor:
    """Adaptive instance normalisation: give ``content`` the channel means and stds of ``style``.

    Args:
        content: (B, C, H, W) features.
        style: (B, C, H', W') features (any spatial size).
        alpha: blend in [0, 1], a float or a (B,) tensor: 0 = content, 1 = fully restyled.
        eps: added to the content's standard deviation.
        stats_from: the features the content's statistics are measured on (B, C, h, w), e.g. the
            part of a padded map that lies inside the image (default: ``content``); the same
            affine map is applied to all of ``content``.

    Returns:
        (B, C, H, W) features ``alpha * adain + (1 - alpha) * content``.

    Example:
        >>> c, s = torch.rand(2, 8, 5, 5), torch.rand(2, 8, 3, 3) * 4
        >>> torch.allclose(adain(c, s).std(dim=(2, 3)), s.std(dim=(2, 3)), atol=1e-3)
        True
    """
    measured = content if stats_from is None else stats_from
    c_mean, c_std = measured.mean(dim=(2, 3), keepdim=True), measured.std(dim=(2, 3), keepdim=True)
    s_mean, s_std = style.mean(dim=(2, 3), keepdim=True), style.std(dim=(2, 3), keepdim=True)
    out = (content - c_mean) / (c_std + eps) * s_std + s_mean
    a = _alpha(alpha, content)
    return a * out + (1 - a) * content


def _sqrtm(cov: Tensor, eps: float, inverse: bool) -> Tensor:
    vals, vecs = torch.linalg.eigh(cov)
    vals = vals.clamp_min(eps)
    power = vals.rsqrt() if inverse else vals.sqrt()
    return vecs @ torch.diag_embed(power) @ vecs.transpose(-1, -2)


def wct(
    content: Tensor, style: Tensor, alpha: float | Tensor = 1.0, eps: float = 1e-5, stats_from: Tensor | None = None
) -> Tensor:
    """Whitening and colouring transform: match the full channel covariance of ``style``.

    Args:
        content: (B, C, H, W) features.
        style: (B, C, H', W') features.
        alpha: blend in [0, 1] (float or (B,) tensor).
        eps: added to the eigenvalues of both covariances.
        stats_from: the features the content's mean and covariance are measured on (B, C, h, w)
            (default: ``content``); the same affine map is applied to all of ``content``.

    Returns:
        (B, C, H, W) features whose channel mean and covariance are the style's (at alpha=1).

    Example:
        >>> c, s = torch.rand(1, 4, 8, 8), torch.randn(1, 4, 6, 6)
        >>> out = wct(c, s).flatten(2)
        >>> torch.allclose(torch.cov(out[0]), torch.cov(s.flatten(2)[0]), atol=1e-3)
        True
    """
    b, c, h, w = content.shape
    dtype = content.dtype
    fm = (content if stats_from is None else stats_from).flatten(2).double()
    fs = style.flatten(2).double()
    mc, ms = fm.mean(-1, keepdim=True), fs.mean(-1, keepdim=True)
    fm, fs = fm - mc, fs - ms
    eye = torch.eye(c, dtype=fm.dtype, device=fm.device)
    cov_c = fm @ fm.transpose(1, 2) / max(1, fm.shape[-1] - 1) + eps * eye
    cov_s = fs @ fs.transpose(1, 2) / max(1, fs.shape[-1] - 1) + eps * eye
    fc = content.flatten(2).double() - mc
    out = _sqrtm(cov_s, eps, inverse=False) @ _sqrtm(cov_c, eps, inverse=True) @ fc + ms
    out = out.view(b, c, h, w).to(dtype)
    a = _alpha(alpha, content)
    return a * out + (1 - a) * content


def blend_styles(
    content: Tensor,
    styles: list[Tensor],
    weights: list[float],
    method: Method = "adain",
    alpha: float | Tensor = 1.0,
    stats_from: Tensor | None = None,
) -> Tensor:
    """Restyle ``content`` towards several styles: the weighted mix of each single-style result.

    Args:
        content: (B, C, H, W) features.
        styles: feature maps of each style (B or 1, C, H', W').
        weights: non-negative, one per style, not all zero (normalised to sum 1).
        method: ``adain`` or ``wct``.
        alpha: content-style blend in [0, 1] (float or (B,) tensor).
        stats_from: the features the content's statistics are measured on (default: ``content``;
            see :func:`adain`).

    Returns:
        (B, C, H, W) features ``alpha * sum_i w_i * transform(content, style_i) + (1 - alpha) * content``.

    Raises:
        ValueError: unknown method, or weights that do not match the styles.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if len(weights) != len(styles) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"need one non-negative weight per style, not all zero: {len(styles)} styles, weights {list(weights)}"
        )
    fn = adain if method == "adain" else wct
    total = float(sum(weights))
    out = torch.zeros_like(content)
    for feat, weight in zip(styles, weights):
        out = out + (weight / total) * fn(
            content, feat.expand(content.shape[0], -1, -1, -1), 1.0, stats_from=stats_from
        )
    a = _alpha(alpha, content)
    return a * out + (1 - a) * content
