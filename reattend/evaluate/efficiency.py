"""Speed and memory over context length, measured through ``generate()`` as a user would run the model.

- prefill: wall time from calling ``generate()`` on a prompt of the given length to its first token;
- decode tokens/s: the next ``n`` tokens of the same call, timed step by step, so prefill does not count;
- peak memory: CUDA peak allocation above the resident weights, or on CPU the peak process RSS (sampled)
  above its level before the call;
- cache bytes: every tensor reachable from the cache object ``generate()`` returns (KV tensors, window
  buffers, recurrent states, latents), so each attention type is counted by what it really stores.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

import psutil
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from .config import EfficiencyConfig
from .generations import greedy_generate, pad_id_of
from .quality import model_device


def tensor_bytes(obj) -> int:
    """Bytes of the distinct tensors reachable from ``obj`` through attributes, lists, tuples and dicts."""
    seen_tensors: set[int] = set()
    seen_objects: set[int] = set()
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if torch.is_tensor(item):
            if id(item) not in seen_tensors:
                seen_tensors.add(id(item))
                total += item.numel() * item.element_size()
            continue
        if id(item) in seen_objects or isinstance(item, (str, bytes, int, float, bool, type(None), torch.dtype, torch.device)):
            continue
        seen_objects.add(id(item))
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            stack.extend(vars(item).values())
    return total


def _release_freed_memory() -> None:
    """Hand memory glibc keeps after frees back to the OS, so the next RSS baseline is not inflated by the
    previous measurement (no-op where there is no glibc)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class _PeakMemory:
    """Peak memory above the level at entry: CUDA allocator statistics, or sampled RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def _rss(self) -> int:
        return psutil.Process(os.getpid()).memory_info().rss

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            self._stop.wait(0.002)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _release_freed_memory()
            self.base = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self.base)
        return False


class _StepClock(LogitsProcessor):
    """Timestamps each generation step: generate() calls its logits processors once per new token, right
    after that token's forward pass, so the first stamp ends the prefill and the gaps between the later
    stamps are single decode steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def _timed_generate(model, ids: torch.Tensor, new_tokens: int, pad_token_id: int):
    """(prefill seconds, decode tokens/s, generate output)."""
    device = model_device(model)
    clock = _StepClock(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = greedy_generate(model, ids, new_tokens, pad_token_id, min_new_tokens=new_tokens,
                          logits_processor=LogitsProcessorList([clock]), return_dict_in_generate=True)
    decode_s = clock.stamps[-1] - clock.stamps[0]
    return clock.stamps[0] - start, (len(clock.stamps) - 1) / decode_s, out


def measure(model, length: int, cfg: EfficiencyConfig, *, vocab_size: int, pad_token_id: int, seed: int) -> dict:
    device = model_device(model)
    # Content does not change the cost of attention, so random tokens stand in for text of any length.
    ids = torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed)).to(device)
    prefill, decode_tps, peak = float("inf"), 0.0, None
    for _ in range(cfg.repeats):
        with _PeakMemory(device) as mem:
            seconds, tokens_per_s, out = _timed_generate(model, ids, 1 + cfg.decode_tokens, pad_token_id)
        prefill, decode_tps = min(prefill, seconds), max(decode_tps, tokens_per_s)
        peak = mem.peak if peak is None else min(peak, mem.peak)
    cache_tokens = out.sequences.shape[1] - 1
    cache_bytes = tensor_bytes(out.past_key_values)
    return {
        "prefill_s": prefill,
        "decode_tokens_per_s": decode_tps,
        "peak_memory_bytes": peak,
        "cache_bytes": cache_bytes,
        "cache_tokens": cache_tokens,
        "cache_bytes_per_token": cache_bytes / cache_tokens,
    }


def crossover(lengths: list[int], student: list[float], teacher: list[float]) -> float | None:
    """Context length from which the student's value stays below the teacher's up to the longest measured
    length, interpolated linearly between the two measured lengths around the crossing. None when the
    student is not below at the longest length, or is below at every length (nothing crosses)."""
    diffs = [s - t for s, t in zip(student, teacher)]
    last_not_below = max((i for i, d in enumerate(diffs) if d >= 0), default=None)
    if last_not_below is None or last_not_below == len(diffs) - 1:
        return None
    i = last_not_below + 1
    frac = diffs[i - 1] / (diffs[i - 1] - diffs[i])
    return lengths[i - 1] + frac * (lengths[i] - lengths[i - 1])


def evaluate_efficiency(student, teacher, tokenizer, cfg: EfficiencyConfig, *, seed: int, progress: bool) -> dict:
    vocab_size = min(len(tokenizer), teacher.config.vocab_size)
    pad = pad_id_of(tokenizer)
    # One short run each first, so lazy initialisation and allocator growth are not timed at the first length.
    for model in (teacher, student):
        measure(model, min(cfg.context_lengths), cfg.model_copy(update={"repeats": 1}), vocab_size=vocab_size, pad_token_id=pad, seed=seed)
    device = model_device(teacher)
    results = {
        "device": str(device),
        "memory_note": "CUDA peak allocation above the level before the call." if device.type == "cuda"
        else "peak process RSS above its level before the call, sampled every 2 ms.",
        "teacher": {},
        "student": {},
    }
    jobs = [(length, who) for length in cfg.context_lengths for who in ("teacher", "student")]
    for length, who in tqdm(jobs, desc="efficiency", disable=not progress):
        model = teacher if who == "teacher" else student
        results[who][length] = measure(model, length, cfg, vocab_size=vocab_size, pad_token_id=pad, seed=seed)
    # Where the student starts to win: lower is better for costs, higher for decode speed (hence negated).
    signs = {"prefill_s": 1, "decode_tokens_per_s": -1, "peak_memory_bytes": 1, "cache_bytes": 1}
    lengths = cfg.context_lengths
    results["crossover"] = {
        key: crossover(lengths, *([sign * results[who][n][key] for n in lengths] for who in ("student", "teacher")))
        for key, sign in signs.items()
    }
    return results
