"""Distillation inputs: the keyword arguments of the teacher transformer's forward, one batch element each.

A sample is a flat dict of tensors named like the forward's arguments (nested dicts dotted, e.g.
``added_cond_kwargs.resolution``), without the batch dimension, except the few inputs that never had one (FLUX's
``img_ids``/``txt_ids``). Non-tensor arguments (``None`` entries of ``added_cond_kwargs``) travel as JSON. Two
optional extras, never passed to the model, give the task loss its target: ``reattend.x0`` (the clean latent the
input was noised from) and ``reattend.alpha_bar`` (its noise level, for epsilon-prediction models).

Sources: ``pipeline`` records what the teacher is called with while it generates images itself (CLEAR trains on
self-generated samples), ``latents`` reads a user's safetensors file, ``synthetic`` draws gaussians shaped from the
model config (tests, smoke runs). All are stored as safetensors shards in the samples stage folder.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

EXTRAS = ("reattend.x0", "reattend.alpha_bar")
ALWAYS_UNBATCHED = {"img_ids", "txt_ids"}  # FLUX passes these without a batch dimension
REQUIRED = {
    "dit": ("hidden_states", "timestep", "class_labels"),
    "pixart": ("hidden_states", "encoder_hidden_states", "timestep"),
    "sd3": ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
    "flux": ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids"),
    "vit": ("pixel_values",),
}
FLOW_FAMILIES = ("sd3", "flux")  # rectified flow: predict noise - x0; the others predict the noise
SHARD_FORMAT = "reattend-image-samples/1"


class SampleError(ValueError):
    """Distillation inputs that do not fit the model: names the input, its shape and the fix."""


# Storage
def write_shard(path: Path, samples: list[dict], statics: list[dict]) -> None:
    # clone: batch elements of one call are views of one tensor, and safetensors refuses shared storage
    tensors = {f"{i:06d}/{name}": value.detach().cpu().clone()
               for i, sample in enumerate(samples) for name, value in sample.items()}
    metadata = {"format": SHARD_FORMAT, "count": str(len(samples)), "static": json.dumps(statics)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def shard_count(path: Path) -> int:
    with safe_open(path, "pt") as f:
        return int((f.metadata() or {}).get("count", 0))


class SampleStore:
    """Random access to the samples of a folder of shards (``shard-*.safetensors``), read lazily."""

    def __init__(self, folder: str | Path):
        self.shards = sorted(Path(folder).glob("shard-*.safetensors"))
        self.index: list[tuple[int, int]] = []
        self.statics: list[list[dict]] = []
        for s, shard in enumerate(self.shards):
            with safe_open(shard, "pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != SHARD_FORMAT:
                raise SampleError(f"{shard} is not a reattend sample shard; delete the samples stage folder and re-run")
            self.statics.append(json.loads(meta["static"]))
            self.index += [(s, i) for i in range(int(meta["count"]))]
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.index)

    def get(self, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        s, j = self.index[i]
        handle = self._open.get(s) or self._open.setdefault(s, safe_open(self.shards[s], "pt"))
        prefix = f"{j:06d}/"
        tensors = {k[len(prefix):]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}
        return tensors, self.statics[s][j]

    def batch(self, indices, device=None, dtype=None) -> tuple[dict, dict[str, torch.Tensor]]:
        """(forward kwargs, extras) for the samples at ``indices``, stacked along a new batch dimension."""
        return collate([self.get(i) for i in indices], device=device, dtype=dtype)


def collate(items: list[tuple[dict, dict]], device=None, dtype=None) -> tuple[dict, dict[str, torch.Tensor]]:
    first, static = items[0]
    flat = {}
    for name, value in first.items():
        if name in ALWAYS_UNBATCHED:
            flat[name] = value
        else:
            flat[name] = torch.stack([tensors[name] for tensors, _ in items])
    moved = {}
    for name, value in flat.items():
        if dtype is not None and value.is_floating_point() and name not in ("timestep", "reattend.alpha_bar"):
            value = value.to(dtype)
        moved[name] = value.to(device) if device is not None else value
    extras = {name: moved.pop(name) for name in EXTRAS if name in moved}
    return _unflatten(moved, static), extras


def _flatten(arguments: dict, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    tensors, static = {}, {}
    for name, value in arguments.items():
        key = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach()
        elif isinstance(value, dict):
            sub_tensors, sub_static = _flatten(value, f"{key}.")
            tensors.update(sub_tensors)
            if sub_static or not sub_tensors:
                static[name] = sub_static
        elif value is None or isinstance(value, (bool, int, float, str)):
            static[name] = value
    return tensors, static


def _unflatten(tensors: dict[str, torch.Tensor], static: dict) -> dict:
    out = json.loads(json.dumps(static))
    for key, value in tensors.items():
        node, parts = out, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    out.pop("return_dict", None)
    return out


def split_call(arguments: dict) -> list[tuple[dict, dict]]:
    """One forward call's bound arguments -> one (tensors, static) per batch element."""
    tensors, static = _flatten(arguments)
    batch = tensors["hidden_states"].shape[0]
    samples = []
    for b in range(batch):
        sample = {}
        for name, value in tensors.items():
            if name in ALWAYS_UNBATCHED or value.dim() == 0 or value.shape[0] != batch:
                sample[name] = value
            else:
                sample[name] = value[b]
        samples.append((sample, static))
    return samples


# Validation at the boundary
def check_inputs(model, family: str, kwargs: dict, where: str) -> None:
    """Refuse inputs the model cannot take, before any training step: missing or unknown arguments, wrong shapes."""
    accepted = set(inspect.signature(model.forward).parameters)
    missing = [name for name in REQUIRED[family] if name not in kwargs]
    if missing:
        raise SampleError(f"{where}: missing input(s) {', '.join(missing)} for a {family} model; "
                          f"a {family} sample needs {', '.join(REQUIRED[family])}")
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise SampleError(f"{where}: {type(model).__name__}.forward takes no argument(s) {', '.join(unknown)}; "
                          f"accepted: {', '.join(sorted(accepted - {'return_dict'}))}")
    cfg = model.config

    def want(name, ok, expected):
        if not ok:
            raise SampleError(f"{where}: input {name} has shape {tuple(kwargs[name].shape)}, expected {expected} for "
                              f"this {type(model).__name__}; regenerate the samples for this model")

    if family == "vit":
        x = kwargs["pixel_values"]
        want("pixel_values", x.dim() == 4 and x.shape[1] == cfg.num_channels,
             f"(batch, {cfg.num_channels}, height, width)")
        return
    x = kwargs["hidden_states"]
    if family == "flux":
        want("hidden_states", x.dim() == 3 and x.shape[2] == cfg.in_channels, f"(batch, tokens, {cfg.in_channels})")
        want("img_ids", kwargs["img_ids"].shape == (x.shape[1], 3), f"({x.shape[1]}, 3)")
        text = kwargs["encoder_hidden_states"]
        want("txt_ids", kwargs["txt_ids"].shape == (text.shape[1], 3), f"({text.shape[1]}, 3)")
    else:
        p = cfg.patch_size
        want("hidden_states", x.dim() == 4 and x.shape[1] == cfg.in_channels and x.shape[2] % p == 0
             and x.shape[3] % p == 0, f"(batch, {cfg.in_channels}, height, width), height and width multiples of {p}")
    text_dim = {"pixart": "caption_channels", "sd3": "joint_attention_dim", "flux": "joint_attention_dim"}.get(family)
    if text_dim:
        dim = getattr(cfg, text_dim) or cfg.cross_attention_dim
        t = kwargs["encoder_hidden_states"]
        want("encoder_hidden_states", t.dim() == 3 and t.shape[2] == dim, f"(batch, text tokens, {dim})")
    if family in ("sd3", "flux"):
        t = kwargs["pooled_projections"]
        want("pooled_projections", t.dim() == 2 and t.shape[1] == cfg.pooled_projection_dim,
             f"(batch, {cfg.pooled_projection_dim})")


def token_grid(model, family: str, kwargs: dict) -> tuple[int, int, int]:
    """(grid height, grid width, global tokens) of the image self-attention these inputs give."""
    cfg = model.config
    if family == "vit":
        x = kwargs["pixel_values"]
        return x.shape[2] // cfg.patch_size, x.shape[3] // cfg.patch_size, 1
    if family == "flux":
        ids = kwargs["img_ids"]
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1, kwargs["encoder_hidden_states"].shape[1]
    x = kwargs["hidden_states"]
    text = kwargs["encoder_hidden_states"].shape[1] if family == "sd3" else 0
    return x.shape[2] // cfg.patch_size, x.shape[3] // cfg.patch_size, text


# Sources
def _latent_size(model, family: str, height: int | None, width: int | None) -> tuple[int, int]:
    """Latent height and width: pixels / 8 (the VAEs of all these families), or the model's native size."""
    if height is not None or width is not None:
        return (height or width) // 8, (width or height) // 8
    size = getattr(model.config, "sample_size", None) or 128
    return size, size


def _linear_alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """DDPM's linear beta schedule (what DiT and PixArt were trained with)."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)[t].float()


def synthetic_sample(model, family: str, cfg, gen: torch.Generator) -> tuple[dict, dict]:
    """Gaussian inputs of the right shapes, noised from a gaussian 'clean latent' so the task loss has a target."""
    mc = model.config

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    if family == "vit":
        size = (cfg.height or mc.image_size, cfg.width or mc.image_size)
        # the position embeddings were learned for image_size; other sizes need them interpolated
        static = {} if size == (mc.image_size, mc.image_size) else {"interpolate_pos_encoding": True}
        return {"pixel_values": randn(mc.num_channels, *size)}, static
    h, w = _latent_size(model, family, cfg.height, cfg.width)
    sample, static = {}, {}
    if family == "flux":
        gh, gw = h // 2, w // 2
        x0, noise = randn(gh * gw, mc.in_channels), randn(gh * gw, mc.in_channels)
        ids = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1).reshape(-1, 2)
        sample["img_ids"] = torch.cat([torch.zeros(gh * gw, 1), ids.float()], dim=1)
        sample["txt_ids"] = torch.zeros(cfg.text_tokens, 3)
        if mc.guidance_embeds:
            sample["guidance"] = torch.tensor(3.5)
    else:
        x0, noise = randn(mc.in_channels, h, w), randn(mc.in_channels, h, w)
    if family in FLOW_FAMILIES:
        sigma = torch.rand((), generator=gen).clamp(0.02, 0.98)
        sample["hidden_states"] = (1 - sigma) * x0 + sigma * noise
        sample["timestep"] = sigma * 1000 if family == "sd3" else sigma
    else:
        t = torch.randint(0, 1000, (), generator=gen)
        alpha_bar = _linear_alpha_bar(t)
        sample["hidden_states"] = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        sample["timestep"] = t
        sample["reattend.alpha_bar"] = alpha_bar
    sample["reattend.x0"] = x0
    if family == "dit":
        sample["class_labels"] = torch.randint(0, mc.num_embeds_ada_norm or 1000, (), generator=gen)
    else:
        dim = (mc.caption_channels or mc.cross_attention_dim) if family == "pixart" else mc.joint_attention_dim
        sample["encoder_hidden_states"] = randn(cfg.text_tokens, dim)
    if family in ("sd3", "flux"):
        sample["pooled_projections"] = randn(mc.pooled_projection_dim)
    if family == "pixart":
        if getattr(model, "use_additional_conditions", False):
            sample["added_cond_kwargs.resolution"] = torch.tensor([h * 8.0, w * 8.0])
            sample["added_cond_kwargs.aspect_ratio"] = torch.tensor([h / w])
        else:
            static["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return sample, static


def latents_file_samples(path: str | Path) -> list[tuple[dict, dict]]:
    """A user's safetensors file: each tensor named like a forward argument, with a leading batch dimension N
    shared by all (except img_ids/txt_ids); non-tensor arguments as JSON under the metadata key ``static``."""
    path = Path(path)
    if not path.exists():
        raise SampleError(f"samples.path {str(path)!r} does not exist; give a safetensors file of transformer inputs")
    with safe_open(path, "pt") as f:
        static = json.loads((f.metadata() or {}).get("static", "{}"))
    tensors = load_file(path)
    if "hidden_states" not in tensors and "pixel_values" not in tensors:
        raise SampleError(f"{path} holds {', '.join(sorted(tensors)) or 'no tensors'}; it needs hidden_states "
                          "(diffusion) or pixel_values (vit), named like the model's forward arguments")
    main = "hidden_states" if "hidden_states" in tensors else "pixel_values"
    n = tensors[main].shape[0]
    for name, value in tensors.items():
        if name not in ALWAYS_UNBATCHED and (value.dim() == 0 or value.shape[0] != n):
            raise SampleError(f"{path}: tensor {name} has shape {tuple(value.shape)} but {main} has {n} samples; "
                              f"every tensor except {', '.join(sorted(ALWAYS_UNBATCHED))} needs a leading dimension {n}")
    return [({k: v if k in ALWAYS_UNBATCHED else v[i] for k, v in tensors.items()}, static) for i in range(n)]


def read_prompts(prompts: list[str] | str) -> list[str]:
    if isinstance(prompts, list):
        return prompts
    path = Path(prompts)
    if not path.exists():
        raise SampleError(f"samples.prompts {prompts!r} is neither a list nor an existing text file (one prompt a line)")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise SampleError(f"samples.prompts file {prompts!r} has no prompts")
    return lines


def pipeline_samples(pipe, family: str, cfg, *, needed: int, seed: int):
    """Yield samples the teacher generates itself: at each denoising call, each batch element is kept with a
    probability that gives ``cfg.per_image`` inputs per image on average. The clean latent each trajectory ends
    at is attached as ``reattend.x0`` (and the scheduler's alpha_bar for epsilon models)."""
    transformer = pipe.transformer
    signature = inspect.signature(transformer.forward)
    prompts = read_prompts(cfg.prompts)
    gen = torch.Generator().manual_seed(seed)
    pending: list[tuple[int, dict, dict]] = []

    def record(module, args, kwargs):
        arguments = signature.bind_partial(*args, **kwargs).arguments
        arguments.update(arguments.pop("kwargs", {}) or {})
        elements = split_call(arguments)
        keep_p = cfg.per_image / (cfg.steps * max(1, len(elements) // images))
        for b, (sample, static) in enumerate(elements):
            if torch.rand((), generator=gen).item() < keep_p:
                pending.append((b, {k: v.cpu() for k, v in sample.items()}, static))

    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
    produced, call = 0, 0
    try:
        while produced < needed:
            batch = [prompts[(call * cfg.batch_size + i) % len(prompts)] for i in range(cfg.batch_size)]
            images = len(batch)
            options = {"num_inference_steps": cfg.steps, "generator": torch.Generator(pipe.device).manual_seed(seed + call)}
            if family == "dit":
                options["class_labels"] = [int(p) for p in batch]
            else:
                options.update(prompt=batch, output_type="latent", height=cfg.height, width=cfg.width)
            if cfg.guidance_scale is not None:
                options["guidance_scale"] = cfg.guidance_scale
            pending.clear()
            final = pipe(**options).images
            call += 1
            for b, sample, static in pending:
                if isinstance(final, torch.Tensor) and final.shape[1:] == sample["hidden_states"].shape:
                    sample["reattend.x0"] = final[b % images].detach().cpu()
                    alphas = getattr(pipe.scheduler, "alphas_cumprod", None)
                    if family not in FLOW_FAMILIES and alphas is not None:
                        sample["reattend.alpha_bar"] = alphas[int(sample["timestep"])].float()
                yield sample, static
                produced += 1
                if produced >= needed:
                    break
    finally:
        handle.remove()


def build_samples(folder: Path, source_iter, *, total: int, shard_size: int, progress: bool = True) -> int:
    """Write ``total`` samples from ``source_iter(start)`` into shards; shards already on disk are kept, so a killed
    run resumes after its last complete shard."""
    shards = sorted(folder.glob("shard-*.safetensors"))
    done, shard = sum(shard_count(p) for p in shards), len(shards)
    buffer, statics = [], []
    bar = tqdm(total=total, initial=done, desc="samples", disable=not progress)
    if done < total:
        for sample, static in source_iter(done):
            buffer.append(sample)
            statics.append(static)
            if len(buffer) == shard_size or done + len(buffer) == total:
                write_shard(folder / f"shard-{shard:05d}.safetensors", buffer, statics)
                bar.update(len(buffer))
                done, shard, buffer, statics = done + len(buffer), shard + 1, [], []
            if done >= total:
                break
    bar.close()
    if done < total:
        raise SampleError(f"the sample source ran out after {done} of {total} samples; lower samples.count or "
                          "samples.heldout, or supply more")
    return done
