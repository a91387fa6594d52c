"""Low-resolution image conditioning for super-resolution denoisers (Imagen / SD-upscaler style).

A cascade's upsampler sees the noisy high-resolution image with the low-resolution image
(upsampled to the output size) concatenated on channels, and the level of the noise
augmentation applied to that low-resolution image, embedded like the time and added to the time
embedding (Ho et al. 2021, "Cascaded Diffusion Models"; Saharia et al. 2022, Imagen).

- :func:`upsample`: ``[B, h, w, C] -> [B, H, W, C]`` by ``bilinear`` or ``nearest``;
- :class:`LowResInput`: the layer a denoiser owns: it concatenates and embeds;
- :func:`check_fields`: the config checks shared by the denoisers that take these fields
  (``low_res_channels``, ``low_res_size``, ``low_res_upsample``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.config import check
from mlgen.nn.conv import TimeEmbedding
from mlgen.typing import Array, Float

__all__ = ["UPSAMPLE", "LowResInput", "check_fields", "upsample"]

UPSAMPLE = ("bilinear", "nearest")


def upsample(
    x: Float[Array, "B h w C"], size: int, method: str = "bilinear"
) -> Float[Array, "B H W C"]:
    """``x`` resized to ``size x size`` (``bilinear`` with half-pixel centres, or ``nearest``)."""
    if method not in UPSAMPLE:
        raise ValueError(f"upsample: method must be one of {UPSAMPLE}, got {method!r}")
    b, h, w, c = x.shape
    if (h, w) == (size, size):
        return x
    if method == "nearest" and size % h == 0 and size % w == 0:
        return jnp.repeat(jnp.repeat(x, size // h, axis=1), size // w, axis=2)
    return jax.image.resize(x, (b, size, size, c), method=method)


def check_fields(cfg) -> None:
    """Checks a denoiser config's ``low_res_*`` fields (ConfigError naming the field)."""
    check(
        cfg.low_res_channels >= 0,
        "low_res_channels",
        f"must be >= 0 (0 = no low-res input), got {cfg.low_res_channels}",
    )
    if not cfg.low_res_channels:
        check(
            cfg.low_res_size == 0,
            "low_res_size",
            f"{cfg.low_res_size} but low_res_channels=0 (no low-res input); set both or neither",
        )
        return
    check(
        0 < cfg.low_res_size <= cfg.image_size and cfg.image_size % cfg.low_res_size == 0,
        "low_res_size",
        f"{cfg.low_res_size} must divide image_size={cfg.image_size} (and be > 0)",
    )
    check(
        cfg.low_res_upsample in UPSAMPLE,
        "low_res_upsample",
        f"must be one of {list(UPSAMPLE)}, got {cfg.low_res_upsample!r}",
    )


class LowResInput(nnx.Module):
    """The low-res image upsampled and concatenated to the denoiser's input, and the embedding of
    its noise-augmentation level (added to the time embedding)."""

    def __init__(
        self,
        channels: int,
        low_res_size: int,
        image_size: int,
        embed_dim: int,
        *,
        freq_dim: int,
        method: str = "bilinear",
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.channels, self.low_res_size, self.image_size = channels, low_res_size, image_size
        self.method = method
        self.aug = TimeEmbedding(freq_dim, embed_dim, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        x: Float[Array, "B H W C"],
        low_res: Float[Array, "B h w L"] | None,
        aug: Float[Array, " B"] | None,
    ) -> tuple[Float[Array, "B H W CL"], Float[Array, "B D"]]:
        """Returns ``(x ++ upsample(low_res), embedding of aug)``; ``aug`` is the augmentation
        level in the schedule's time units ([0, 1]; None = 0)."""
        if low_res is None:
            raise ValueError(
                "LowResInput: this model is conditioned on a low-res image "
                "(model.low_res_channels > 0); pass low_res=[B, h, w, C]"
            )
        want = (x.shape[0], self.low_res_size, self.low_res_size, self.channels)
        if tuple(low_res.shape) != want:
            raise ValueError(
                f"model.low_res_size / low_res_channels: the model takes low-res images of shape "
                f"{want[1:]}, got {tuple(low_res.shape[1:])}"
            )
        up = upsample(low_res.astype(x.dtype), self.image_size, self.method)
        if aug is None:
            aug = jnp.zeros((x.shape[0],), jnp.float32)
        # The level is in [0, 1]; embedded on the model-time scale (x1000) like the time.
        emb = self.aug(jnp.asarray(aug, jnp.float32) * 1000.0)
        return jnp.concatenate([x, up], axis=-1), emb
