"""Fused linear-attention kernels vs the plain-PyTorch reference: outputs, final states and every gradient.

Without CUDA they run under the Triton interpreter (see kernel_testing.py for how it is switched on).
"""

import pytest
import torch
from kernel_testing import DEVICE, IN_PROCESS, TOL, err_ratio, run_module_in_fresh_process, skip_unless_in_process

triton = pytest.importorskip("triton")

from reattend.modeling import attention_backend, linear_attention_ops as ref  # noqa: E402
from reattend.modeling import linear_attention_triton as kernels  # noqa: E402


@pytest.fixture(autouse=True)
def _kernels_runnable(request):
    skip_unless_in_process(request)


def test_kernels_in_fresh_process():
    if IN_PROCESS:
        pytest.skip("the kernels run in this process")
    run_module_in_fresh_process(__file__)


def features(*shape, dtype):
    # Feature maps are positive and normalised-ish (Hedgehog: softmax over the feature axis).
    return torch.randn(*shape, device=DEVICE).softmax(-1).to(dtype)


def leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def run_and_grads(fn, inputs, seed_grads):
    out, final = fn(*inputs)
    loss = (out.float() * seed_grads[0]).sum()
    if final is not None:
        loss = loss + (final * seed_grads[1]).sum()
    loss.backward()
    return out, final, [None if x is None else x.grad for x in inputs]


CASES = [  # (T, F, d, with initial state)
    (1, 16, 16, True),
    (5, 16, 16, False),
    (37, 16, 16, True),
    (64, 16, 64, False),
    (130, 32, 64, True),
    (70, 64, 128, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,F,d,with_h0", CASES)
def test_linear_attention_matches_reference(T, F, d, with_h0, dtype):
    torch.manual_seed(T + F + d)
    B, H = 2, 2
    qf, kf = features(B, H, T, F, dtype=dtype), features(B, H, T, F, dtype=dtype)
    v = torch.randn(B, H, T, d, device=DEVICE, dtype=dtype)
    h0 = torch.rand(B, H, F, d + 1, device=DEVICE) if with_h0 else None
    seed = (torch.randn(B, H, T, d, device=DEVICE), torch.randn(B, H, F, d + 1, device=DEVICE))

    def kernel(*x):
        return attention_backend.linear_attention(*x[:3], initial_state=x[3], output_final_state=True, backend="triton")

    def reference(*x):
        return ref.chunked_linear_attention(*x[:3], initial_state=x[3], output_final_state=True)

    out, final, grads = run_and_grads(kernel, leaves(qf, kf, v, h0), seed)
    ref_out, ref_final, ref_grads = run_and_grads(reference, leaves(qf, kf, v, h0), seed)
    assert out.dtype == dtype and final.dtype == torch.float32
    assert err_ratio(out, ref_out) < TOL[dtype]
    assert err_ratio(final, ref_final) < TOL[torch.float32]
    for name, g, rg in zip(("q_feat", "k_feat", "v", "initial_state"), grads, ref_grads):
        if rg is not None:
            assert g.dtype == rg.dtype, name
            assert err_ratio(g, rg) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_attention_varlen_matches_per_sequence_reference(dtype):
    torch.manual_seed(0)
    H, F, d = 2, 16, 32
    cu = torch.tensor([0, 5, 70, 71, 200], device=DEVICE, dtype=torch.int32)
    T, N = int(cu[-1]), cu.numel() - 1
    qf, kf = features(1, H, T, F, dtype=dtype), features(1, H, T, F, dtype=dtype)
    v = torch.randn(1, H, T, d, device=DEVICE, dtype=dtype)
    h0 = torch.rand(N, H, F, d + 1, device=DEVICE)
    seed = (torch.randn(1, H, T, d, device=DEVICE), torch.randn(N, H, F, d + 1, device=DEVICE))

    def kernel(*x):
        return attention_backend.linear_attention(*x[:3], x[3], True, backend="triton", cu_seqlens=cu)

    def reference(*x):
        return attention_backend.linear_attention(*x[:3], x[3], True, backend="reference", cu_seqlens=cu)

    out, final, grads = run_and_grads(kernel, leaves(qf, kf, v, h0), seed)
    ref_out, ref_final, ref_grads = run_and_grads(reference, leaves(qf, kf, v, h0), seed)
    assert final.shape == (N, H, F, d + 1)
    assert err_ratio(out, ref_out) < TOL[dtype]
    assert err_ratio(final, ref_final) < TOL[torch.float32]
    for g, rg in zip(grads, ref_grads):
        assert err_ratio(g, rg) < TOL[dtype]


def test_varlen_layout_errors_are_clear():
    x = torch.rand(2, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="batch size 1"):
        kernels.triton_linear_attention(x, x, x, cu_seqlens=torch.tensor([0, 8], device=DEVICE))
    with pytest.raises(ValueError, match="packed length"):
        kernels.triton_linear_attention(x[:1], x[:1], x[:1], cu_seqlens=torch.tensor([0, 5], device=DEVICE))


def test_backend_resolution(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("REATTEND_KERNELS", raising=False)
    assert attention_backend.resolve_backend(cpu) == "reference"
    monkeypatch.setenv("REATTEND_KERNELS", "triton")
    assert attention_backend.resolve_backend(cpu) == "triton"
    assert attention_backend.resolve_backend(cpu, "reference") == "reference"
    monkeypatch.setenv("REATTEND_KERNELS", "cuda")
    with pytest.raises(ValueError, match="REATTEND_KERNELS"):
        attention_backend.resolve_backend(cpu)


def test_env_routes_linear_attention_to_the_kernel(monkeypatch):
    calls = []
    real = kernels.triton_linear_attention
    monkeypatch.setattr(kernels, "triton_linear_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("REATTEND_KERNELS", "triton")
    qf = features(1, 1, 10, 16, dtype=torch.float32)
    v = torch.randn(1, 1, 10, 16, device=DEVICE)
    out, _ = attention_backend.linear_attention(qf, qf, v)
    assert calls == [1]
    assert err_ratio(out, ref.chunked_linear_attention(qf, qf, v)[0]) < 1e-5


@pytest.mark.parametrize(
    "B,H,T,d,f,dtype,weight_scale,bias_shape",
    [
        (2, 3, 37, 16, 16, torch.float32, 0.5, "h1f"),
        (1, 2, 130, 64, 64, torch.bfloat16, 0.5, "hf"),
        (2, 2, 70, 64, 48, torch.float32, 0.5, "h1f"),  # f not a power of two
        (1, 2, 20, 16, 16, torch.float32, 30.0, "hf"),  # softmaxes underflow below the 1e-12 clamp
    ],
)
def test_hedgehog_features_match_reference(B, H, T, d, f, dtype, weight_scale, bias_shape):
    torch.manual_seed(T)
    x = torch.randn(B, H, T, d, device=DEVICE).to(dtype)
    weight = torch.randn(H, d, f, device=DEVICE) * weight_scale
    bias = torch.randn(H, 1, f, device=DEVICE) * 0.1
    bias = bias if bias_shape == "h1f" else bias.reshape(H, f)
    seed = torch.randn(B, H, T, 2 * f, device=DEVICE)

    def run(fn, x_dtype):
        leaves_ = [t.detach().clone().requires_grad_() for t in (x.to(x_dtype), weight, bias)]
        out = fn(*leaves_)
        (out.float() * seed).sum().backward()
        return [out] + [t.grad for t in leaves_]

    got = run(lambda *a: attention_backend.hedgehog_features(*a, backend="triton"), dtype)
    # The reference projects in the input dtype; the kernel in float32, so compare with float32 math.
    want = run(ref.hedgehog_features, torch.float32)
    assert got[0].shape == (B, H, T, 2 * f) and got[0].dtype == dtype
    assert got[3].shape == bias.shape
    for name, g, w in zip(("phi", "x", "weight", "bias"), got, want):
        assert err_ratio(g, w) < TOL[dtype], name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_linear_attention_long_sequence_on_gpu():
    torch.manual_seed(0)
    B, H, T, F, d = 2, 4, 4100, 128, 128
    dtype = torch.bfloat16
    qf, kf = features(B, H, T, F, dtype=dtype), features(B, H, T, F, dtype=dtype)
    v = torch.randn(B, H, T, d, device=DEVICE, dtype=dtype)
    seed = (torch.randn(B, H, T, d, device=DEVICE), torch.randn(B, H, F, d + 1, device=DEVICE))
    out, final, grads = run_and_grads(
        lambda *x: kernels.triton_linear_attention(*x, output_final_state=True), leaves(qf, kf, v), seed
    )
    ref_out, ref_final, ref_grads = run_and_grads(
        lambda *x: ref.chunked_linear_attention(*x, output_final_state=True), leaves(qf, kf, v), seed
    )
    assert err_ratio(out, ref_out) < TOL[dtype]
    assert err_ratio(final, ref_final) < 1e-2
    for g, rg in zip(grads, ref_grads):
        assert err_ratio(g, rg) < TOL[dtype]
