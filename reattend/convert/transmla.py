"""TransMLA conversion math: GQA/MHA attention -> MLA weights, from second moments of calibration activations.

Everything is phrased on kv = [k; v] (2L values per token, L = H_kv * head_dim): the teacher's keys before RoPE
(after its k_norm, bias included) and values. One streaming pass over the calibration blocks accumulates
E[kv kv^T] per converted layer (a 2L x 2L float64 matrix; no activations are kept), and the three steps of
METHODS.md section 2 are linear algebra on those moments:

1. GQA as MLA: every query head sees the whole L-wide key through a block-identity up-projection.
2. RoRoPE: per group of ``freqfold`` adjacent frequencies, PCA over the (head, frequency) channels of the keys
   (x and y of each rotary pair as samples); a real mixing of same-frequency channels commutes with RoPE, so the
   rotation is exact, and only the top channels keep RoPE (``qk_rope_head_dim`` values in all).
3. BKV-PCA: joint PCA of [K_nope / rho; V], keeping ``kv_lora_rank`` components as the cached latent.

Key layout: the teacher's head h stores the rotary pair of frequency i at (h*d + i, h*d + i + d/2) (rotate_half).
Channel c = h * d/2 + i names that pair. Output layout of the rope key: x parts of the kept pairs, then y parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Identity-mode latent norms: the calibration mean square of the scaled latent is this fraction of the norm's
# epsilon, so a token with k times the mean latent energy is shrunk by about k * 5e-7 (under 1e-3 up to k = 2000).
IDENTITY_NORM_HEADROOM = 1e-6


@dataclass
class LayerGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:  # L
        return self.num_kv_heads * self.head_dim

    def x_index(self, channel: int) -> int:
        half = self.head_dim // 2
        return (channel // half) * self.head_dim + channel % half

    def y_index(self, channel: int) -> int:
        return self.x_index(channel) + self.head_dim // 2


def _eigenvectors(m: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric PSD matrix as columns, by decreasing eigenvalue. Many zero eigenvalues can stop
    LAPACK from converging; a multiple of the identity leaves the eigenvectors unchanged, so retry shifted."""
    try:
        values, vectors = torch.linalg.eigh(m)
    except torch.linalg.LinAlgError:
        shift = 1e-6 * max(m.diagonal().abs().max().item(), 1e-30)
        values, vectors = torch.linalg.eigh(m + shift * torch.eye(len(m), dtype=m.dtype))
    return vectors[:, values.argsort(descending=True)]


def rotation_groups(c_kk: torch.Tensor, geo: LayerGeometry, freqfold: int, *, pca: bool = True):
    """Per frequency group: (channels, eigenvectors as columns sorted by decreasing energy, first frequency).

    ``pca=False`` keeps the identity basis (step 1 alone)."""
    half = geo.head_dim // 2
    groups = []
    for first in range(0, half, freqfold):
        channels = [h * half + i for h in range(geo.num_kv_heads) for i in range(first, first + freqfold)]
        if pca:
            xs = torch.tensor([geo.x_index(c) for c in channels])
            ys = torch.tensor([geo.y_index(c) for c in channels])
            # x and y of a pair are two samples of the same channel vector; their sum is rotation-invariant.
            energy = c_kk[xs][:, xs] + c_kk[ys][:, ys]
            vectors = _eigenvectors(energy)
        else:
            vectors = torch.eye(len(channels), dtype=c_kk.dtype)
        groups.append((channels, vectors, first))
    return groups


def key_transform(groups, geo: LayerGeometry, kept_per_group: int, freqfold: int):
    """G (L x L, orthogonal): rows [rope x; rope y; nope], and the teacher frequency index of each rope pair."""
    L = geo.width
    rope_x, rope_y, nope, freqs = [], [], [], []
    for channels, vectors, first in groups:
        xs = torch.tensor([geo.x_index(c) for c in channels])
        ys = torch.tensor([geo.y_index(c) for c in channels])
        for k in range(vectors.shape[1]):
            row_x = torch.zeros(L, dtype=vectors.dtype)
            row_y = torch.zeros(L, dtype=vectors.dtype)
            row_x[xs] = vectors[:, k]
            row_y[ys] = vectors[:, k]
            if k < kept_per_group:
                rope_x.append(row_x)
                rope_y.append(row_y)
                # Kept channels of a group share its frequencies evenly; with one pair per group this is the
                # group's first frequency, which is also what deepseek_v3's own RoPE uses for that pair.
                freqs.append(first + (k * freqfold) // kept_per_group)
            else:
                nope += [row_x, row_y]
    G = torch.stack(rope_x + rope_y + nope)
    return G, torch.tensor(freqs, dtype=torch.long)


def mla_from_moments(c_kv: torch.Tensor, geo: LayerGeometry, G: torch.Tensor, rope_dim: int, rank: int | None,
                     balance: bool) -> dict[str, torch.Tensor]:
    """The MLA factors for one layer from E[kv kv^T] (float64) and the key transform G.

    Returns ``down`` ((r + d_rope) x 2L: latent rows then rope-key rows, applied to kv), ``kv_b`` (H*2d x r: per
    head its no-RoPE key rows then value rows), ``q_rope_map`` (H x d_rope x d: a head's query -> its rope query)
    and ``latent_rms`` (root-mean-square latent value on the calibration set)."""
    L, d = geo.width, geo.head_dim
    groups = geo.num_heads // geo.num_kv_heads
    G_rope, G_nope = G[:rope_dim], G[rope_dim:]
    n_nope = L - rope_dim
    M = torch.block_diag(G_nope, torch.eye(L, dtype=G.dtype))  # kv -> [K_nope; V]
    c_z = M @ c_kv @ M.T
    rho = 1.0
    if balance and n_nope > 0:
        # Ratio of root-mean-square norms, from the same moments (mean norms would need a second pass).
        k_energy, v_energy = c_z[:n_nope, :n_nope].trace().item(), c_z[n_nope:, n_nope:].trace().item()
        # No-RoPE keys with no energy (all of it went to the RoPE part) leave nothing to balance.
        if k_energy > 1e-12 * v_energy:
            rho = math.sqrt(k_energy / v_energy)
    scale = torch.cat([torch.full((n_nope,), 1.0 / rho, dtype=G.dtype), torch.ones(L, dtype=G.dtype)])
    c_b = scale[:, None] * c_z * scale[None, :]
    rank = n_nope + L if rank is None else rank
    R = _eigenvectors(c_b)[:, :rank]
    A = R.T @ (scale[:, None] * M)  # latent = A kv
    rope_rows = torch.cat([G_rope, torch.zeros(rope_dim, L, dtype=G.dtype)], dim=1)
    R_k, R_v = rho * R[:n_nope], R[n_nope:]
    kv_b, q_rope_map = [], []
    for h in range(geo.num_heads):
        g = slice((h // groups) * d, (h // groups + 1) * d)
        kv_b += [G_nope[:, g].T @ R_k, R_v[g]]
        q_rope_map.append(G_rope[:, g])
    latent_rms = math.sqrt(max((A @ c_kv @ A.T).trace().item() / rank, 1e-30))
    return {"down": torch.cat([A, rope_rows]), "kv_b": torch.cat(kv_b), "q_rope_map": torch.stack(q_rope_map),
            "latent_rms": torch.tensor(latent_rms, dtype=torch.float64)}


def transmla(c_kv: torch.Tensor, geo: LayerGeometry, *, rope_dim: int, rank: int | None, freqfold: int,
             balance: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Steps 1-3: RoRoPE with ``freqfold`` keeping ``rope_dim`` values, then BKV-PCA at ``rank``.
    Returns (factors as in ``mla_from_moments``, rope frequency index per kept pair)."""
    c_kv = c_kv.double()
    L = geo.width
    groups = rotation_groups(c_kv[:L, :L], geo, freqfold)
    kept = (rope_dim // 2) // len(groups)
    G, freqs = key_transform(groups, geo, kept, freqfold)
    return mla_from_moments(c_kv, geo, G, rope_dim, rank, balance), freqs


def untruncated(c_kv: torch.Tensor, geo: LayerGeometry, *, pca: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every key channel keeps RoPE and V keeps full rank: ``pca=False`` is step 1 alone (GQA written as MLA),
    ``pca=True`` adds the RoRoPE rotation (one frequency per group). Both reproduce the teacher exactly."""
    c_kv = c_kv.double()
    groups = rotation_groups(c_kv[: geo.width, : geo.width], geo, 1, pca=pca)
    G, freqs = key_transform(groups, geo, geo.num_kv_heads, 1)
    return mla_from_moments(c_kv, geo, G, geo.width, geo.width, balance=False), freqs


# Applying the math to a model


def collect_moments(teacher, layer_indices: list[int], blocks: torch.Tensor, *, queries: bool = False,
                    batch_size: int = 8, progress: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """Per listed teacher layer: ``kv``, E[kv kv^T] (float64, 2L x 2L), over ``blocks`` (LongTensor[N, T]); with
    ``queries``, also ``q``, E[q q^T] of q_proj's output (for low-rank queries).

    One teacher forward per batch; a pre-hook on each listed attention module turns its input into kv and adds to
    that layer's sum at once, so no layer's activations outlive its own forward."""
    from tqdm.auto import tqdm

    sums = {i: {} for i in layer_indices}
    count = 0

    def hook_for(layer_idx):
        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            k = module.k_proj(x)
            if getattr(module, "k_norm", None) is not None:
                k = module.k_norm(k.view(*x.shape[:-1], -1, module.head_dim)).flatten(-2)
            found = {"kv": torch.cat([k, module.v_proj(x)], dim=-1)} | ({"q": module.q_proj(x)} if queries else {})
            for name, value in found.items():
                value = value.flatten(0, -2).double()
                total = sums[layer_idx].get(name)
                sums[layer_idx][name] = value.T @ value if total is None else total + value.T @ value
        return hook

    handles = [teacher.model.layers[i].self_attn.register_forward_pre_hook(hook_for(i), with_kwargs=True)
               for i in layer_indices]
    device = next(teacher.parameters()).device
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(blocks), batch_size), desc="mla calibration", disable=not progress,
                              leave=False):
                batch = blocks[start:start + batch_size].to(device)
                teacher(input_ids=batch, use_cache=False, logits_to_keep=1)
                count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return {i: {name: total.cpu() / count for name, total in s.items()} for i, s in sums.items()}


@torch.no_grad()
def load_factors(module, teacher_attn, factors: dict[str, torch.Tensor], freqs: torch.Tensor, *,
                 identity_norm: bool) -> None:
    """Write MLA factors into a student ``MlaAttention``; without a k_norm the down-projection absorbs k/v_proj."""
    down = factors["down"]
    proj = module.kv_a_proj_with_mqa
    if module.k_norm is None:
        k_proj, v_proj = teacher_attn.k_proj, teacher_attn.v_proj
        w_kv = torch.cat([k_proj.weight, v_proj.weight]).double().cpu()
        proj.weight.copy_(down @ w_kv)
        if proj.bias is not None:
            b_k, b_v = (torch.zeros(m.out_features, dtype=torch.float64) if m.bias is None else m.bias.double().cpu()
                        for m in (k_proj, v_proj))
            proj.bias.copy_(down @ torch.cat([b_k, b_v]))
    else:
        proj.weight.copy_(down)
    module.kv_b_proj.weight.copy_(factors["kv_b"])
    module.q_rope_map.copy_(factors["q_rope_map"])
    module.rope_freq_index.copy_(freqs)
    if module.kv_a_layernorm is not None:
        module.kv_a_layernorm.initialise(factors["latent_rms"].item(), identity=identity_norm,
                                         headroom=IDENTITY_NORM_HEADROOM)


@torch.no_grad()
def load_query_factors(module, teacher_attn, c_q: torch.Tensor, *, identity_norm: bool) -> None:
    """Low-rank queries by PCA of q_proj's outputs: q_a = P^T W_q, q_b = P (top ``q_lora_rank`` directions)."""
    P = _eigenvectors(c_q.double())[:, : module.q_lora_rank]
    module.q_a_proj.weight.copy_(P.T @ teacher_attn.q_proj.weight.double().cpu())
    if module.q_a_proj.bias is not None:
        module.q_a_proj.bias.copy_(P.T @ teacher_attn.q_proj.bias.double().cpu())
    module.q_b_proj.weight.copy_(P)
    rms = math.sqrt(max((P.T @ c_q.double() @ P).trace().item() / P.shape[1], 1e-30))
    module.q_a_layernorm.initialise(rms, identity=identity_norm, headroom=IDENTITY_NORM_HEADROOM)


def initialise_layers(student, teacher, layer_indices: list[int], plan: list[dict], calibration: torch.Tensor | None,
                      *, progress: bool = True) -> None:
    """Convert the listed teacher layers into the student's MLA layers from calibration moments.

    Layers whose ``freqfold`` is ``search`` try every fitting fold size together and keep the one with the lowest
    perplexity on (up to 16 of) the calibration blocks, scored as recovery will start: latent norms that recovery
    phases in (``latent_norm_warmup``) are left out."""
    from ..data import pack_blocks
    from ..evaluate.perplexity import perplexity
    from ..models.adapters import layer_shapes
    from .mla import MlaOptions, freqfold_candidates

    options = {i: MlaOptions(**{k: v for k, v in plan[i].items() if k != "target"}) for i in layer_indices}
    shapes = layer_shapes(teacher.config)
    for i in layer_indices:
        options[i].check_layer(shapes[i], i)
    if calibration is None:
        raise ValueError("the mla target needs calibration text: pass convert_model(..., calibration=LongTensor[N, T]) "
                         "(the runner passes the training blocks of the recipe's data section)")
    moments: dict[int, torch.Tensor] = {}
    settings = {(o.calibration_sequences, o.calibration_length) for o in options.values()}
    blocks = None
    for sequences, length in sorted(settings):
        blocks = pack_blocks(calibration.flatten(), length)[:sequences]
        if len(blocks) == 0:
            raise ValueError(f"calibration_length={length}: the calibration text has only {calibration.numel()} "
                             "tokens; lower calibration_length or give more training text")
        chosen = [i for i in layer_indices if (options[i].calibration_sequences, options[i].calibration_length)
                  == (sequences, length)]
        queries = any(options[i].q_lora_rank for i in chosen)
        moments.update(collect_moments(teacher, chosen, blocks, queries=queries, progress=progress))
    modules = {i: student.model.layers[i].self_attn for i in layer_indices}
    teachers = {i: teacher.model.layers[i].self_attn for i in layer_indices}

    def convert(i, fold):
        geo = LayerGeometry(shapes[i].num_heads, shapes[i].num_kv_heads, shapes[i].head_dim)
        o = options[i]
        factors, freqs = transmla(moments[i]["kv"], geo, rope_dim=o.qk_rope_head_dim, rank=o.kv_lora_rank, freqfold=fold,
                                  balance=o.balance_kv)
        load_factors(modules[i], teachers[i], factors, freqs, identity_norm=o.latent_norm_mode == "identity")

    for i in layer_indices:
        if options[i].q_lora_rank:
            load_query_factors(modules[i], teachers[i], moments[i]["q"],
                               identity_norm=options[i].latent_norm_mode == "identity")
    for i in layer_indices:
        if options[i].freqfold != "search":
            convert(i, options[i].freqfold)
    searched = [i for i in layer_indices if options[i].freqfold == "search"]
    if searched:
        candidates = sorted(set.intersection(*(set(freqfold_candidates(shapes[i].head_dim, options[i].qk_rope_head_dim))
                                                for i in searched)))
        scored = []
        for i in searched:
            modules[i].set_training_progress(0.0)
        for fold in candidates:
            for i in searched:
                convert(i, fold)
            scored.append((perplexity(student, blocks[:16], progress=False), fold))
            if progress:
                print(f"mla freqfold search: freqfold={fold} calibration perplexity {scored[-1][0]:.3f}")
        for i in searched:
            modules[i].set_training_progress(1.0)
        best = min(scored)[1]
        if progress:
            print(f"mla freqfold search: using freqfold={best}")
        for i in searched:
            convert(i, best)
