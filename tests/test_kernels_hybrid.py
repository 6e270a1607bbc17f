"""Fused sliding-window + linear hybrid kernels vs the reference: outputs, every gradient, decode steps.

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


NAMES = ("q", "k", "v", "q_feat", "k_feat", "gamma")


def make_inputs(B, H, T, d, F, dtype, seed=0):
    torch.manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, device=DEVICE, dtype=dtype) for _ in range(3))
    q_feat, k_feat = (torch.randn(B, H, T, F, device=DEVICE).softmax(-1).to(dtype) for _ in range(2))
    gamma = torch.rand(H, device=DEVICE).to(dtype)
    return q, k, v, q_feat, k_feat, gamma


def outputs_and_grads(fn, inputs, seed_grad):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    (out.float() * seed_grad).sum().backward()
    return out, [x.grad for x in leaves]


def assert_matches(out, grads, ref_out, ref_grads, dtype):
    assert out.dtype == ref_out.dtype
    assert err_ratio(out, ref_out) < TOL[dtype]
    for name, g, rg in zip(NAMES, grads, ref_grads):
        assert g.dtype == rg.dtype, name
        # Some gradients are exactly zero (gamma's with affine gates and no linear keys, q/k's with a window of
        # one); the floor turns the ratio into an absolute check there.
        floor = 1.0 if name == "gamma" else 1e-2
        assert err_ratio(g, rg, floor) < TOL[dtype], name


CASES = [  # (T, window, sinks, d, F, affine)
    (37, 8, 0, 16, 16, False),  # several window spans per block
    (100, 16, 4, 16, 16, True),
    (150, 48, 3, 16, 32, True),  # window not a multiple of the block
    (130, 64, 2, 64, 32, False),
    (40, 64, 2, 16, 16, True),  # window longer than the sequence: no linear keys
    (70, 1, 0, 16, 16, False),  # window of the query alone
    (90, 24, 2, 128, 64, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,window,sinks,d,F,affine", CASES)
def test_hybrid_attention_matches_reference(T, window, sinks, d, F, affine, dtype):
    inputs = make_inputs(2, 2, T, d, F, dtype, seed=T + window)
    kw = dict(window=window, sinks=sinks, scale=d**-0.5, affine=affine)
    seed_grad = torch.randn(2, 2, T, d, device=DEVICE)
    out, grads = outputs_and_grads(lambda *x: attention_backend.hybrid_attention(*x, backend="triton", **kw), inputs, seed_grad)
    ref_out, ref_grads = outputs_and_grads(lambda *x: ref.quadratic_hybrid_attention(*x, **kw), inputs, seed_grad)
    assert_matches(out, grads, ref_out, ref_grads, dtype)


def test_hybrid_attention_fp16():
    inputs = make_inputs(1, 3, 77, 64, 32, torch.float16)
    kw = dict(window=32, sinks=4, scale=0.125, affine=False)
    seed_grad = torch.randn(1, 3, 77, 64, device=DEVICE)
    out, grads = outputs_and_grads(lambda *x: kernels.triton_hybrid_attention(*x, **kw), inputs, seed_grad)
    ref_out, ref_grads = outputs_and_grads(lambda *x: ref.chunked_hybrid_attention(*x, **kw), inputs, seed_grad)
    assert_matches(out, grads, ref_out, ref_grads, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hybrid_attention_varlen_matches_per_sequence_reference(dtype):
    cu = torch.tensor([0, 1, 9, 80, 150], device=DEVICE)
    inputs = make_inputs(1, 2, 150, 16, 16, dtype)
    kw = dict(window=16, sinks=2, scale=0.25, affine=True)
    seed_grad = torch.randn(1, 2, 150, 16, device=DEVICE)

    def run(backend):
        return lambda *x: attention_backend.hybrid_attention(*x, backend=backend, cu_seqlens=cu, **kw)

    out, grads = outputs_and_grads(run("triton"), inputs, seed_grad)
    ref_out, ref_grads = outputs_and_grads(run("reference"), inputs, seed_grad)
    assert_matches(out, grads, ref_out, ref_grads, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L,leaving,with_state,affine", [(10, 1, True, False), (70, 2, True, True), (5, 0, False, False), (5, 1, False, True)])
def test_decode_step_matches_reference(L, leaving, with_state, affine, dtype):
    B, H, d, F = 2, 3, 64, 32
    _, k, v, _, _, gamma = make_inputs(B, H, L, d, F, dtype, seed=L)
    q, _, _, q_feat, k_feat, _ = make_inputs(B, H, 1, d, F, dtype, seed=L + 1)
    kl, vl = k_feat.expand(B, H, leaving, F), torch.randn(B, H, leaving, d, device=DEVICE, dtype=dtype)
    state = torch.rand(B, H, F, d + 1, device=DEVICE) if with_state else None
    kw = dict(scale=d**-0.5, affine=affine, k_feat_leaving=kl, v_leaving=vl)
    out, new_state = attention_backend.hybrid_decode_step(q, q_feat, k, v, state, gamma, backend="triton", **kw)
    ref_out, ref_state = attention_backend.hybrid_decode_step(q, q_feat, k, v, state, gamma, backend="reference", **kw)
    assert out.dtype == dtype
    assert err_ratio(out, ref_out) < TOL[dtype]
    if ref_state is None:
        assert new_state is None
    else:
        assert err_ratio(new_state, ref_state) < 1e-5


def test_decode_with_gradients_takes_the_reference_path(monkeypatch):
    monkeypatch.setattr(kernels, "triton_hybrid_decode_step", lambda *a, **k: pytest.fail("kernel has no backward"))
    _, k, v, _, _, gamma = make_inputs(1, 2, 6, 16, 16, torch.float32)
    q, _, _, q_feat, _, _ = make_inputs(1, 2, 1, 16, 16, torch.float32)
    out, _ = attention_backend.hybrid_decode_step(q, q_feat, k, v, None, gamma.requires_grad_(), scale=0.25, backend="triton")
    assert out.grad_fn is not None


def test_prefill_then_decode_matches_whole_sequence():
    """Kernel prefill of T0 tokens, then one fused decode step per token, equals the whole-sequence kernel."""
    T, T0, W, sinks, d, F = 60, 20, 8, 3, 16, 16
    q, k, v, q_feat, k_feat, gamma = make_inputs(1, 2, T, d, F, torch.float32)
    kw = dict(scale=0.25, affine=False)
    full = attention_backend.hybrid_attention(q, k, v, q_feat, k_feat, gamma, window=W, sinks=sinks, backend="triton", **kw)
    state = ref.hybrid_prefill_state(k_feat[:, :, :T0], v[:, :, :T0], window=W, sinks=sinks)
    for t in range(T0, T):
        first = max(t - W + 1, 0)  # oldest key of the window
        soft = list(range(min(sinks, first))) + list(range(first, t + 1))
        leaving = slice(first, first + 1) if first >= sinks else slice(0, 0)  # leaves before the next query
        out, state = attention_backend.hybrid_decode_step(
            q[:, :, t : t + 1], q_feat[:, :, t : t + 1], k[:, :, soft], v[:, :, soft], state, gamma, backend="triton",
            k_feat_leaving=k_feat[:, :, leaving], v_leaving=v[:, :, leaving], **kw,
        )
        assert err_ratio(out, full[:, :, t : t + 1]) < 1e-5, t


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("d", [64, 128])
def test_hybrid_attention_long_sequence_on_gpu(d):
    dtype = torch.bfloat16
    inputs = make_inputs(2, 4, 2100, d, 128, dtype)
    kw = dict(window=64, sinks=4, scale=d**-0.5, affine=False)
    seed_grad = torch.randn(2, 4, 2100, d, device=DEVICE)
    out, grads = outputs_and_grads(lambda *x: kernels.triton_hybrid_attention(*x, **kw), inputs, seed_grad)
    ref_out, ref_grads = outputs_and_grads(lambda *x: ref.chunked_hybrid_attention(*x, **kw), inputs, seed_grad)
    assert_matches(out, grads, ref_out, ref_grads, dtype)
