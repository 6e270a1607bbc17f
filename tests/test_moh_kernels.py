"""The Triton MoH kernel vs the PyTorch sparse path and the masked dense reference: outputs and q/k/v gradients.

Without CUDA it runs under the Triton interpreter (see kernel_testing.py for how it is switched on).
"""

import pytest
import torch
from kernel_testing import DEVICE, IN_PROCESS, TOL, err_ratio, run_module_in_fresh_process, skip_unless_in_process
from torch import nn

triton = pytest.importorskip("triton")

from reattend.modeling import moh_triton  # noqa: E402
from reattend.modeling.moh_attention import MohAttention  # noqa: E402
from reattend.modeling.moh_ops import masked_dense_moh, sparse_moh  # noqa: E402


@pytest.fixture(autouse=True)
def _kernels_runnable(request):
    skip_unless_in_process(request)


def test_kernels_in_fresh_process():
    if IN_PROCESS:
        pytest.skip("the kernels run in this process")
    run_module_in_fresh_process(__file__)


def ragged_selection(B, T, routed, groups_routed, seed):
    """Random selections with holes: in the last batch the first routed head picks no token and, when
    ``groups_routed`` (the query heads of the last KV head, all routed), the last KV head gets no row at all."""
    g = torch.Generator().manual_seed(seed)
    selected = torch.rand(B, T, routed, generator=g) < 0.45
    selected[-1, :, 0] = False
    if groups_routed:
        selected[-1, :, -groups_routed:] = False
    return selected.to(DEVICE)


def assembled(shared_out, routed, B, T, H, d, dtype):
    """The (B, T, H, d) head outputs: shared heads, routed heads on their rows, zeros elsewhere."""
    out = torch.zeros(B, T, H, d, dtype=dtype, device=DEVICE)
    if shared_out is not None:
        out[:, :, : shared_out.shape[2]] = shared_out
    for head, b, tokens, rows in routed:
        out[b, tokens, head] = rows
    return out


def spy_on_kernel(monkeypatch) -> list:
    """A list that gets one entry per call of the kernel's entry point."""
    calls = []
    real = moh_triton.triton_selected_rows_attention
    monkeypatch.setattr(moh_triton, "triton_selected_rows_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def output_and_grads(fn, inputs, seed):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    (out.float() * seed).sum().backward()
    return [out] + [x.grad for x in leaves]


CASES = [  # (B, H, H_kv, T, S, d, shared, window)
    (2, 6, 2, 150, 150, 32, 2, None),  # GQA, several row blocks per KV head
    (2, 6, 2, 150, 190, 32, 2, 37),  # cached prefix (S > T); a window spanning key blocks
    (1, 4, 4, 130, 130, 24, 0, 5),  # MHA, no shared head, head_dim not a power of two, tiny window
    (2, 8, 2, 90, 160, 16, 1, None),  # 4 query heads per KV head, prefix
    (1, 3, 1, 70, 70, 128, 1, None),  # the launch configurations of wider heads (next case too)
    (2, 2, 1, 40, 45, 256, 0, 20),  # batch 1 selects nothing at all
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,H,H_kv,T,S,d,shared,window", CASES)
def test_kernel_matches_the_pytorch_sparse_path_and_masked_dense(B, H, H_kv, T, S, d, shared, window, dtype):
    torch.manual_seed(T + S + d)
    q = torch.randn(B, H, T, d, device=DEVICE).to(dtype)
    k = torch.randn(B, H_kv, S, d, device=DEVICE).to(dtype)
    v = torch.randn(B, H_kv, S, d, device=DEVICE).to(dtype)
    groups = H // H_kv
    selected = ragged_selection(B, T, H - shared, groups if groups <= H - shared else 0, seed=T)
    gates = torch.cat([torch.ones(B, T, shared, dtype=torch.bool, device=DEVICE), selected], -1).to(dtype)
    seed = torch.randn(B, T, H, d, device=DEVICE)
    scale = d**-0.5

    def sparse(backend):
        def fn(q, k, v):
            shared_out, routed = sparse_moh(q, k, v, selected, shared=shared, scale=scale, window=window,
                                            backend=backend)
            return assembled(shared_out, routed, B, T, H, d, dtype)
        return fn

    got = output_and_grads(sparse("triton"), (q, k, v), seed)
    want = output_and_grads(sparse("reference"), (q, k, v), seed)
    dense = output_and_grads(lambda *x: masked_dense_moh(*x, gates, scale=scale, window=window), (q, k, v), seed)
    assert got[0].dtype == dtype and [g.dtype for g in got[1:]] == [dtype] * 3
    for name, g, w, m in zip(("out", "dq", "dk", "dv"), got, want, dense):
        assert err_ratio(g, w) < TOL[dtype], name
        assert err_ratio(g, m) < TOL[dtype], name
    if shared <= H - groups and not selected[-1, :, H - groups - shared:].any():
        assert got[2][-1, -1].abs().sum() == 0 and got[3][-1, -1].abs().sum() == 0, \
            "a KV head that no row uses gets no key/value gradient"


def test_kernel_on_raw_rows_with_empty_and_single_row_segments():
    # Segments 0 and 2 of 4 are empty; segment 3 holds one row that sees only the first key (a long prefix).
    torch.manual_seed(0)
    B, H_kv, S, d = 2, 2, 70, 16
    k, v = torch.randn(B, H_kv, S, d, device=DEVICE), torch.randn(B, H_kv, S, d, device=DEVICE)
    positions = torch.tensor(list(range(0, 70, 2)) + [0], device=DEVICE)
    segments = torch.tensor([1] * 35 + [3], device=DEVICE)
    q_rows = torch.randn(36, d, device=DEVICE)
    seed = torch.randn(36, d, device=DEVICE)

    def reference(q_rows, k, v):
        kk, vv = k.reshape(B * H_kv, S, d)[segments], v.reshape(B * H_kv, S, d)[segments]
        scores = torch.einsum("nd,nsd->ns", q_rows, kk) * 0.25
        scores = scores.masked_fill(torch.arange(S, device=DEVICE)[None] > positions[:, None], float("-inf"))
        return torch.einsum("ns,nsd->nd", scores.softmax(-1), vv)

    got = output_and_grads(lambda *x: moh_triton.triton_selected_rows_attention(
        x[0], positions, segments, x[1], x[2], scale=0.25), (q_rows, k, v), seed)
    want = output_and_grads(reference, (q_rows, k, v), seed)
    torch.testing.assert_close(got[0][-1], v[1, 1, 0])
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert err_ratio(g, w) < 1e-5, name


def test_kernel_input_errors_are_clear():
    k = torch.zeros(1, 1, 8, 16, device=DEVICE)
    rows = torch.zeros(3, 16, device=DEVICE)
    index = torch.zeros(3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"q_rows must be \(N, 16\)"):
        moh_triton.triton_selected_rows_attention(rows[:, :8], index, index, k, k, scale=1.0)
    with pytest.raises(ValueError, match="positions and segments"):
        moh_triton.triton_selected_rows_attention(rows, index[:2], index, k, k, scale=1.0)
    with pytest.raises(ValueError, match="window must be >= 1"):
        moh_triton.triton_selected_rows_attention(rows, index, index, k, k, scale=1.0, window=0)


def test_a_mask_that_only_restates_the_window_keeps_the_kernel_and_padding_falls_back(monkeypatch):
    torch.manual_seed(0)
    B, H, H_kv, T, S, d, window = 2, 4, 2, 40, 50, 16, 9
    q, k, v = torch.randn(B, H, T, d, device=DEVICE), *torch.randn(2, B, H_kv, S, d, device=DEVICE)
    selected = ragged_selection(B, T, H - 1, 0, seed=1)
    gates = torch.cat([torch.ones(B, T, 1, dtype=torch.bool, device=DEVICE), selected], -1).float()
    i, j = torch.arange(S - T, S, device=DEVICE)[:, None], torch.arange(S, device=DEVICE)[None]
    window_mask = ((j <= i) & (i - j < window))[None, None].expand(B, 1, T, S)
    padded = window_mask.clone()
    padded[0, :, :, :3] = False
    calls = spy_on_kernel(monkeypatch)
    for mask in (window_mask, padded):
        shared_out, routed = sparse_moh(q, k, v, selected, shared=1, scale=0.25, window=window, attention_mask=mask,
                                        backend="triton")
        want = masked_dense_moh(q, k, v, gates, scale=0.25, window=window, attention_mask=mask)
        assert err_ratio(assembled(shared_out, routed, B, T, H, d, torch.float32), want) < 1e-5
    assert len(calls) == 1, "the window-only mask runs the kernel, the padded one the PyTorch path"


class _Teacher(nn.Module):
    def __init__(self, hidden, heads, kv_heads, head_dim):
        super().__init__()
        self.scaling = head_dim**-0.5
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)


def test_layer_sparse_path_runs_the_kernel_when_asked_and_matches_masked_dense(monkeypatch):
    torch.manual_seed(0)
    B, T, D, H, H_kv, d = 2, 70, 32, 6, 2, 16
    layer = MohAttention(_Teacher(D, H, H_kv, d), layer_idx=0, num_heads=H, num_kv_heads=H_kv, head_dim=d,
                         hidden_size=D, shared_heads=2, top_k=2, router="learned").to(DEVICE)
    with torch.no_grad():
        for p in layer.feature_parameters():
            p.normal_(std=0.5)
    hidden = torch.randn(B, T, D, device=DEVICE)
    angles = torch.arange(T, device=DEVICE)[:, None] * torch.linspace(0.01, 1, d // 2, device=DEVICE)
    rope = tuple(torch.cat([f(angles)] * 2, -1)[None].expand(B, -1, -1) for f in (torch.cos, torch.sin))
    calls = spy_on_kernel(monkeypatch)
    monkeypatch.setenv("REATTEND_KERNELS", "triton")

    def run(path):
        layer.zero_grad(set_to_none=True)
        layer.path = path
        x = hidden.clone().requires_grad_()
        out, _ = layer(x, position_embeddings=rope)
        (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
        return [out, x.grad] + [p.grad for p in layer.parameters()]

    sparse = run("sparse")
    assert calls == [1]
    dense = run("dense")
    for g, w in zip(sparse, dense):
        assert err_ratio(g, w) < 1e-5
