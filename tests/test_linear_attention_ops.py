"""The plain-PyTorch linear/hybrid attention: chunked forms equal their quadratic definitions."""

import pytest
import torch
import torch.nn.functional as F

from reattend.modeling import linear_attention_ops as ops


def _inputs(T, B=2, H=3, d=8, Fdim=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=dtype) for _ in range(3))
    qf, kf = (torch.rand(B, H, T, Fdim, generator=g, dtype=dtype) + 0.05 for _ in range(2))
    gamma = torch.rand(H, generator=g, dtype=dtype)
    return q, k, v, qf, kf, gamma


def _grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    out.backward(torch.ones_like(out) + torch.linspace(0, 1, out.numel(), dtype=out.dtype).view_as(out))
    return out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("T", [1, 7, 33, 64])
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_chunked_linear_equals_quadratic_outputs_and_gradients(T, chunk):
    q, k, v, qf, kf, _ = _inputs(T)
    ref_out, ref_grads = _grads(lambda a, b, c: ops.quadratic_linear_attention(a, b, c), [qf, kf, v])
    out, grads = _grads(lambda a, b, c: ops.chunked_linear_attention(a, b, c, chunk_size=chunk)[0], [qf, kf, v])
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9)


def test_chunked_linear_state_carries_across_calls():
    q, k, v, qf, kf, _ = _inputs(29)
    whole, final = ops.chunked_linear_attention(qf, kf, v, chunk_size=8, output_final_state=True)
    first, state = ops.chunked_linear_attention(qf[:, :, :13], kf[:, :, :13], v[:, :, :13], chunk_size=8, output_final_state=True)
    second, final2 = ops.chunked_linear_attention(qf[:, :, 13:], kf[:, :, 13:], v[:, :, 13:], initial_state=state,
                                                  chunk_size=8, output_final_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=2), whole)
    torch.testing.assert_close(final2, final)
    steps, st = [], None
    for t in range(29):
        o, st = ops.linear_attention_step(qf[:, :, t:t + 1], kf[:, :, t:t + 1], v[:, :, t:t + 1], st)
        steps.append(o)
    torch.testing.assert_close(torch.cat(steps, dim=2), whole)


@pytest.mark.parametrize("T", [1, 5, 23, 40])
@pytest.mark.parametrize("window,sinks", [(2, 0), (4, 0), (5, 2), (8, 3), (64, 0)])
@pytest.mark.parametrize("affine", [False, True])
def test_chunked_hybrid_equals_quadratic(T, window, sinks, affine):
    q, k, v, qf, kf, gamma = _inputs(T)
    kw = dict(window=window, sinks=sinks, scale=0.3, affine=affine)
    ref_out, ref_grads = _grads(lambda *t: ops.quadratic_hybrid_attention(*t, **kw), [q, k, v, qf, kf, gamma])
    out, grads = _grads(lambda *t: ops.chunked_hybrid_attention(*t, **kw), [q, k, v, qf, kf, gamma])
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("T", [20, 61, 96])
def test_linear_in_segments_equals_one_pass(T):
    """Long inputs run in segments carrying the state; outputs, final state and gradients are unchanged."""
    q, k, v, qf, kf, _ = _inputs(T)
    state = torch.rand(2, 3, 6, 9, dtype=torch.float64)
    one_pass = lambda a, b, c, s: torch.cat([x.flatten() for x in ops.chunked_linear_attention(  # noqa: E731
        a, b, c, initial_state=s, chunk_size=8, output_final_state=True, segment_tokens=T)])
    segmented = lambda a, b, c, s: torch.cat([x.flatten() for x in ops.chunked_linear_attention(  # noqa: E731
        a, b, c, initial_state=s, chunk_size=8, output_final_state=True, segment_tokens=20)])
    ref_out, ref_grads = _grads(one_pass, [qf, kf, v, state])
    out, grads = _grads(segmented, [qf, kf, v, state])
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("T", [33, 70, 101])
@pytest.mark.parametrize("window,sinks,segment", [(4, 0, 8), (5, 2, 12), (8, 3, 16), (6, 1, 6)])
def test_hybrid_in_segments_equals_quadratic(T, window, sinks, segment):
    q, k, v, qf, kf, gamma = _inputs(T)
    kw = dict(window=window, sinks=sinks, scale=0.3, affine=True)
    ref_out, ref_grads = _grads(lambda *t: ops.quadratic_hybrid_attention(*t, **kw), [q, k, v, qf, kf, gamma])
    out, grads = _grads(lambda *t: ops.chunked_hybrid_attention(*t, **kw, segment_tokens=segment), [q, k, v, qf, kf, gamma])
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("T", [3, 17, 40])
def test_hybrid_is_exact_softmax_when_window_covers_sequence(T):
    q, k, v, qf, kf, gamma = _inputs(T)
    out = ops.chunked_hybrid_attention(q, k, v, qf, kf, gamma, window=T, scale=0.25)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_hybrid_weights_rows_sum_to_one_and_split_as_defined():
    q, k, v, qf, kf, gamma = _inputs(12)
    w = ops.hybrid_attention_weights(q, k, qf, kf, gamma, window=3, sinks=2, scale=0.5)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert torch.all(w.triu(1) == 0)


@pytest.mark.parametrize("window,sinks", [(3, 0), (4, 2), (6, 1)])
def test_decode_steps_reproduce_the_whole_sequence(window, sinks):
    """Prefill state + one query at a time over (sinks + last window keys) equals the chunked forward."""
    T, P = 21, 9
    q, k, v, qf, kf, gamma = _inputs(T)
    whole = ops.chunked_hybrid_attention(q, k, v, qf, kf, gamma, window=window, sinks=sinks, scale=0.4)
    state = ops.hybrid_prefill_state(kf[:, :, :P], v[:, :, :P], window=window, sinks=sinks)
    outs = []
    for t in range(P, T):
        lo = max(0, t - window + 1)
        idx = list(range(min(sinks, lo))) + list(range(lo, t + 1))
        outs.append(ops.hybrid_attention_step(q[:, :, t:t + 1], qf[:, :, t:t + 1], k[:, :, idx], v[:, :, idx], state,
                                              gamma, scale=0.4))
        leaving = t - window + 1
        if leaving >= sinks and leaving >= 0:
            state = ops.fold_into_state(state, kf[:, :, leaving:leaving + 1], v[:, :, leaving:leaving + 1])
    torch.testing.assert_close(torch.cat(outs, dim=2), whole[:, :, P:])
