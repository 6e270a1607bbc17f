"""CLEAR: convert an image-token transformer's self-attention to circular-window attention, in place.

An image query attends to the image keys within ``radius`` cells on the token grid and to every text /
conditioning token (and, with ``pool=d``, to per-head learned d x d averages of the keys and values); text queries
still attend to everything. The converted modules keep the teacher's projections under their original names, so a
teacher state_dict loads into a converted model; pooling weights are the only new parameters.

Families: DiT and PixArt (``attn1`` of each block; ``attn2``, the cross-attention to text, stays as it is), SD3 /
SD3.5 (the joint image+context ``attn`` and the image-only ``attn2`` of dual-attention blocks), FLUX (double-stream
then single-stream blocks, indexed 0..n_double-1, then n_double..), ViT / DeiT (``layers[i].attention``; CLS and
distillation tokens are global like text).

The grid (token rows and columns) is read from each forward call by a pre-hook on the top-level model (ViT: on
its encoder, ``model.base_model``): the latent ``hidden_states`` (B, C, H, W) over the patch size (DiT, PixArt,
SD3), ``img_ids`` (FLUX), ``pixel_values`` over the patch size (ViT, interpolated position encodings included).
Blocks called outside that forward therefore see the grid of the last full call.

``tile``: on CUDA (FlexAttention) the tile must divide both grid sides; on CPU any tile works (the grid is padded).
Dropout on attention probabilities (ViT's ``attention_probs_dropout_prob``) is not applied by converted modules.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..modeling.local_2d import check_options, local_2d_attention

FAMILIES = ("dit", "pixart", "sd3", "flux", "vit")

_DIFFUSERS_CLASSES = {
    "DiTTransformer2DModel": "dit",
    "PixArtTransformer2DModel": "pixart",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}
_VIT_CLASSES = {
    name: "vit"
    for name in ("ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling", "DeiTModel",
                 "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher", "DeiTForMaskedImageModeling")
}
_CLASSES = {**_DIFFUSERS_CLASSES, **_VIT_CLASSES}
_SETTINGS = "_reattend_local_2d"
_MODULES = "_reattend_local_2d_modules"


def detect_family(model) -> str:
    for cls in type(model).__mro__:
        if cls.__name__ in _CLASSES:
            return _CLASSES[cls.__name__]
    raise ValueError(f"model class {type(model).__name__} is not supported by the 2-D local (CLEAR) target; "
                     f"supported: {', '.join(sorted(_CLASSES))}")


class _GridState:
    """The (rows, columns) of the image-token grid of the current forward call, shared by a model's processors."""

    def __init__(self):
        self.grid: tuple[int, int] | None = None


class _GridRecorder:
    """Forward pre-hook (with kwargs) on the top-level model. A callable object rather than a closure, so that
    ``copy.deepcopy`` of a converted model gives the copy's hook the copy's state."""

    def __init__(self, family: str, patch, state: _GridState):
        self.family, self.patch, self.state = family, patch, state

    def __call__(self, module, args, kwargs):
        name = {"flux": "img_ids", "vit": "pixel_values"}.get(self.family, "hidden_states")
        value = kwargs.get(name)
        if value is None:
            try:
                value = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get(name)
            except TypeError:
                value = None
        if value is None:
            raise ValueError(f"2-D local attention: the {type(module).__name__} forward call has no {name!r}; "
                             f"the token grid is read from it")
        self.state.grid = _grid_from_ids(value) if self.family == "flux" else _grid_from_image(value, self.patch)


def _grid_from_image(x: torch.Tensor, patch) -> tuple[int, int]:
    ph, pw = patch if isinstance(patch, (tuple, list)) else (patch, patch)
    return int(x.shape[-2]) // ph, int(x.shape[-1]) // pw


def _grid_from_ids(ids: torch.Tensor) -> tuple[int, int]:
    ids = ids[0] if ids.ndim == 3 else ids
    y, x = ids[:, 1].long(), ids[:, 2].long()
    y, x = y - y.min(), x - x.min()
    h, w = int(y.max()) + 1, int(x.max()) + 1
    n = torch.arange(ids.shape[0], device=ids.device)
    if h * w != ids.shape[0] or not (torch.equal(y, n // w) and torch.equal(x, n % w)):
        raise ValueError("2-D local attention: img_ids do not form one raster-ordered image grid (e.g. FLUX Kontext "
                         "reference images appended); only a single h x w image is supported")
    return h, w


class Local2DAttention(nn.Module):
    """The settings and pooling weights of one converted attention; the processor of diffusers modules."""

    def __init__(self, *, heads: int, radius: float, pool: int | None, tile: int | None, state: _GridState,
                 like: torch.Tensor):
        super().__init__()
        self.radius, self.pool, self.tile = radius, pool, tile
        self._state = state
        if pool:
            init = torch.full((heads, pool, pool), 1.0 / pool ** 2, dtype=like.dtype, device=like.device)
            self.pool_key = nn.Parameter(init.clone())
            self.pool_value = nn.Parameter(init.clone())

    def extra_repr(self) -> str:
        return f"radius={self.radius}, pool={self.pool}, tile={self.tile}"

    def grid(self) -> tuple[int, int]:
        if self._state.grid is None:
            raise RuntimeError("2-D local attention: no token grid recorded; call the converted top-level model "
                               "(its forward pre-hook reads the grid) rather than a block on its own")
        return self._state.grid

    def attend(self, q, k, v, text_tokens: int) -> torch.Tensor:
        """q, k, v: (B, H, text_tokens + h*w, D) with the text tokens first."""
        h, w = self.grid()
        if q.shape[-2] != text_tokens + h * w:
            raise ValueError(f"2-D local attention: {q.shape[-2] - text_tokens} image tokens but the recorded grid "
                             f"is {h}x{w}")
        pool_weights = (self.pool_key, self.pool_value) if self.pool else None
        return local_2d_attention(q, k, v, height=h, width=w, radius=self.radius, text_tokens=text_tokens,
                                  pool_weights=pool_weights, tile=self.tile)


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


class DiffusersLocal2DProcessor(Local2DAttention):
    """For diffusers ``Attention``: PixArt/DiT self-attention (AttnProcessor2_0) and SD3's joint attention
    (JointAttnProcessor2_0: image tokens then context tokens, projected by ``add_*_proj``)."""

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("2-D local attention does not take an attention mask on image self-attention")
        joint = encoder_hidden_states is not None
        if joint and getattr(attn, "add_q_proj", None) is None:
            raise ValueError("2-D local attention converts self-attention; this module got encoder_hidden_states "
                             "without context projections (a cross-attention)")
        residual = hidden_states
        q, k, v = (_heads_first(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        text = 0
        if joint:
            eq, ek, ev = (_heads_first(proj(encoder_hidden_states), attn.heads)
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if getattr(attn, "norm_added_q", None) is not None:
                eq = attn.norm_added_q(eq)
            if getattr(attn, "norm_added_k", None) is not None:
                ek = attn.norm_added_k(ek)
            # SD3 puts the context after the image; the op wants it first. Attention is order-free given the mask.
            q, k, v = torch.cat([eq, q], dim=2), torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2)
            text = encoder_hidden_states.shape[1]
        out = self.attend(q, k, v, text)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        context, out = out[:, :text], out[:, text:]
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        if not joint:
            return out
        if attn.to_add_out is not None:
            context = attn.to_add_out(context)
        return out, context


class FluxLocal2DProcessor(Local2DAttention):
    """For diffusers ``FluxAttention``: double-stream blocks (text projected by ``add_*_proj``) and single-stream
    blocks (one projection over the joint sequence). FLUX's sequence is text first, then the image."""

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                **kwargs):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("2-D local attention does not take an attention mask on FLUX attention")
        if getattr(attn, "fused_projections", False):
            raise ValueError("2-D local attention needs unfused FLUX projections; call unfuse_qkv_projections()")
        q, k, v = (proj(hidden_states).unflatten(-1, (-1, attn.head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            eq, ek, ev = (proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
            text = encoder_hidden_states.shape[1]
        else:
            h, w = self.grid()
            text = hidden_states.shape[1] - h * w
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), text)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        if not joint:
            return out
        context, out = out[:, :text], out[:, text:]
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(context.contiguous())


class ViTLocal2DAttention(nn.Module):
    """Replaces a transformers ViT/DeiT ``attention`` module; keeps its projections under the same names. The
    tokens before the patches (CLS, DeiT's distillation token) are global, like text."""

    def __init__(self, teacher: nn.Module, local: Local2DAttention):
        super().__init__()
        self.config = teacher.config
        self.num_attention_heads, self.head_dim = teacher.num_attention_heads, teacher.head_dim
        self.scaling, self.is_causal = teacher.scaling, teacher.is_causal
        self.q_proj, self.k_proj, self.v_proj = teacher.q_proj, teacher.k_proj, teacher.v_proj
        self.o_proj = teacher.o_proj
        self.local_2d = local

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("2-D local attention does not take an attention mask on ViT self-attention")
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        h, w = self.local_2d.grid()
        out = self.local_2d.attend(q, k, v, hidden_states.shape[1] - h * w)
        out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(out), None


def _blocks(model, family: str) -> list[list[tuple[nn.Module, str, nn.Module]]]:
    """Per transformer block, the (parent, attribute, attention module) to convert."""
    if family in ("dit", "pixart"):
        return [[(b, "attn1", b.attn1)] for b in model.transformer_blocks]
    if family == "sd3":
        return [[(b, name, getattr(b, name)) for name in ("attn", "attn2") if getattr(b, name, None) is not None]
                for b in model.transformer_blocks]
    if family == "flux":
        return [[(b, "attn", b.attn)] for b in (*model.transformer_blocks, *model.single_transformer_blocks)]
    return [[(layer, "attention", layer.attention)] for layer in model.base_model.layers]


def _patch_size(model, family: str):
    return None if family == "flux" else model.config.patch_size


def convert_image_model(model, *, radius: float, pool: int | None = None, tile: int | None = None,
                        layers="all") -> list[str]:
    """Replace the image self-attention of the selected blocks with circular-window attention, in place.

    ``radius`` in grid cells (latent patches / ViT patches); ``pool``: d for d x d pooled global keys (must divide
    the grid, checked per forward call); ``tile``: the t x t tile layout of the block-sparse kernels. ``layers``:
    "all" or a list of block indices (``transformer_blocks`` for DiT/PixArt/SD3; FLUX double-stream blocks first,
    then single-stream; ViT ``layers``). Returns the qualified names of the converted attention modules.
    """
    check_options(radius=radius, tile=tile, pool=pool)
    family = detect_family(model)
    if getattr(model, _SETTINGS, None) is not None:
        raise ValueError(f"model is already converted ({getattr(model, _SETTINGS)}); convert a fresh teacher")
    blocks = _blocks(model, family)
    if layers == "all":
        chosen = list(range(len(blocks)))
    else:
        if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                             for i in layers):
            raise ValueError(f"layers={layers!r}: must be 'all' or a list of block indices; pass e.g. layers=[0, 1]")
        chosen = sorted(set(layers))
        bad = [i for i in chosen if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"layers={layers!r}: block index {bad[0]} out of range for {len(blocks)} blocks; "
                             f"use indices 0..{len(blocks) - 1} or 'all'")
    state = _GridState()
    names_of = {id(module): name for name, module in model.named_modules()}
    converted = []
    for i in chosen:
        for parent, attr, attn in blocks[i]:
            name = names_of[id(attn)]
            if family == "vit":
                like = attn.q_proj.weight
                local = Local2DAttention(heads=attn.num_attention_heads, radius=radius, pool=pool, tile=tile,
                                         state=state, like=like)
                setattr(parent, attr, ViTLocal2DAttention(attn, local))
            else:
                cls = FluxLocal2DProcessor if family == "flux" else DiffusersLocal2DProcessor
                attn.set_processor(cls(heads=attn.heads, radius=radius, pool=pool, tile=tile, state=state,
                                       like=attn.to_q.weight))
            converted.append(name)
    # ViT: on the encoder that takes pixel_values, so that calling it directly (not via the classifier) works too.
    hooked = model.base_model if family == "vit" else model
    hooked.register_forward_pre_hook(_GridRecorder(family, _patch_size(model, family), state), with_kwargs=True)
    setattr(model, _SETTINGS, {"family": family, "radius": radius, "pool": pool, "tile": tile, "layers": chosen})
    setattr(model, _MODULES, converted)
    return list(converted)


def local_2d_settings(model) -> dict | None:
    """The conversion as applied ({"family", "radius", "pool", "tile", "layers"}), or None if not converted."""
    settings = getattr(model, _SETTINGS, None)
    return None if settings is None else {**settings, "layers": list(settings["layers"])}


def trainable_attention_parameters(model) -> dict[str, nn.Parameter]:
    """The parameters CLEAR trains: everything in the converted attention modules (q/k/v/out projections, context
    projections, q/k norms, pooling weights), keyed by their names in ``model.named_parameters()``."""
    names = getattr(model, _MODULES, None) or []
    return {f"{name}.{pname}": p for name in names for pname, p in model.get_submodule(name).named_parameters()}
