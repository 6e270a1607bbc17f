"""Mixture-of-head attention: the sparse path (only selected heads) vs the teacher's dense attention, in one run.

    OMP_NUM_THREADS=1 python bench/bench_moh.py --length 2048 --shared 3 --top-k 2

Takes one attention layer of the real SmolLM2-135M (embedded package) and its real input hidden states on
King James text, converts it to MoH, and times the whole attention layer forward (projections, routing,
attention, output projection) for: the teacher layer (all heads, causal SDPA), the MoH sparse path, and the
MoH masked-dense reference (all heads computed then masked: the released MoH code's cost). FLOPs are counted
for the matmuls (q/k/v/o projections and the causal attention: QK^T and PV over the keys each query sees).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from reattend.convert import convert_model
from reattend.data import kjv_documents, tokenize_stream
from reattend.models.loading import load_teacher
from reattend.modeling.moh_ops import dense_attention, rotate, sparse_moh


def timed_interleaved(fns: dict, reps: int, clock=time.perf_counter) -> dict:
    """Fastest of ``reps`` calls of each function, the functions taking turns so that load from other processes
    on a shared machine hits them alike."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = clock()
            fn()
            best[name] = min(best[name], clock() - start)
    return best


def flops(T: int, D: int, H: int, H_kv: int, d: int, active: float, window: int | None = None) -> dict:
    """Matmul FLOPs of one layer forward; ``active``: mean fraction of query heads a token uses."""
    seen = T * (T + 1) / 2 if window is None else sum(min(t + 1, window) for t in range(T))
    return {
        "projections_qkv": 2 * T * D * (H + 2 * H_kv) * d,
        "attention": 2 * 2 * seen * d * H * active,
        "o_proj": 2 * T * H * d * D * active,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--shared", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this thread's CPU time, which time slices lost to other processes do not inflate "
                             "(meaningful with OMP_NUM_THREADS=1)")
    args = parser.parse_args()

    teacher, tokenizer = load_teacher("embedded:smollm2-135m")
    config = teacher.config
    ids = tokenize_stream(kjv_documents()[:40], tokenizer)[: args.length][None]
    captured = {}
    layer = teacher.model.layers[args.layer].self_attn
    handle = layer.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    with torch.no_grad():
        teacher.model(ids[:, : args.length])
    handle.remove()
    kwargs = {k: captured[k] for k in ("hidden_states", "position_embeddings", "attention_mask")}

    plan = [{"target": "keep"}] * config.num_hidden_layers
    plan[args.layer] = {"target": "moh", "shared_heads": args.shared, "top_k": args.top_k, "router": "qnorm",
                        "gate": "hard", "balance_weight": 0.01}
    student = convert_model(teacher, plan)
    moh = student.model.layers[args.layer].self_attn

    def run_moh(path):
        moh.path = path
        return moh(**kwargs)[0]

    with torch.inference_mode():
        dense_out = run_moh("dense")
        sparse_out = run_moh("sparse")
        max_diff = (dense_out - sparse_out).abs().max().item()
        # The attention core alone (after projections and routing, before o_proj): all heads vs selected rows.
        q_raw, q, k, v = moh._project(kwargs["hidden_states"], kwargs["position_embeddings"])
        cos, sin = kwargs["position_embeddings"]
        q = rotate(q, cos[:, None], sin[:, None])
        _, selected = moh.route(kwargs["hidden_states"], q_raw)
        times = timed_interleaved({
            "teacher": lambda: layer(**kwargs), "sparse": lambda: run_moh("sparse"), "dense": lambda: run_moh("dense"),
            "core_dense": lambda: dense_attention(q, k, v, scale=moh.scaling, window=None),
            "core_sparse": lambda: sparse_moh(q, k, v, selected, shared=moh.shared, scale=moh.scaling, window=None),
        }, args.reps, time.thread_time if args.clock == "cpu" else time.perf_counter)
    H, H_kv, d, D = config.num_attention_heads, config.num_key_value_heads, moh.head_dim, config.hidden_size
    active = (args.shared + args.top_k) / H
    f_dense = flops(args.length, D, H, H_kv, d, 1.0)
    f_sparse = flops(args.length, D, H, H_kv, d, active)
    teacher_time, t_sparse, t_dense = times["teacher"], times["sparse"], times["dense"]
    result = {
        "T": args.length, "layer": args.layer, "heads": H, "shared": args.shared, "top_k": args.top_k,
        "active_fraction": round(active, 4), "threads": torch.get_num_threads(), "clock": args.clock,
        "teacher_s": round(teacher_time, 4), "moh_sparse_s": round(t_sparse, 4), "moh_masked_dense_s": round(t_dense, 4),
        "time_ratio_sparse_vs_teacher": round(t_sparse / teacher_time, 3),
        "time_ratio_sparse_vs_masked_dense": round(t_sparse / t_dense, 3),
        "attention_core_dense_s": round(times["core_dense"], 4), "attention_core_sparse_s": round(times["core_sparse"], 4),
        "attention_core_time_ratio": round(times["core_sparse"] / times["core_dense"], 3),
        "flops_teacher": int(sum(f_dense.values())), "flops_sparse": int(sum(f_sparse.values())),
        "flops_ratio": round(sum(f_sparse.values()) / sum(f_dense.values()), 3),
        "attention_flops_ratio": round(f_sparse["attention"] / f_dense["attention"], 3),
        "head_usage": [round(u, 3) for u in moh.head_usage.tolist()],
        "max_abs_diff_sparse_vs_masked_dense": max_diff,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
