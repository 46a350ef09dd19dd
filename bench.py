"""
Benchmarks: what Pilot costs beside plain federated LoRA. Prints a table, writes bench.json.

    python bench.py                      # the CPU part
    python bench.py --device cuda        # adds the GPU part: a LLaVA-1.5-7B-shaped client step
    python bench.py --features 1000,10000,50000   # only the feature cache: one client round's peak
                                         # memory and loading time, H_v in memory or on disk
    python bench.py --rehearse --out DIR  # the whole loop at LLaVA-1.5-7B's widths on the CPU, and what a
                                         # real run costs (rehearsal.py): DIR/rehearsal.json

Ratios are measured side by side in one process, after warm-up, as the median of several repeats;
absolute times are printed too. Peak memory of an aggregation is measured in a fresh process each
(memory a process has freed stays counted in its resident set). Nothing here asserts a time.
"""
import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import aggregate
import pilot
import rehearsal


H100_BF16_PEAK = 989e12   # dense bf16 FLOP/s of an H100 SXM, the MFU denominator


def peak_rss_mb(fn):
    """Peak resident memory while fn runs, above the resident memory before it."""
    import report
    report.reset_peak_memory("cpu")
    before = report.resident_mb()
    fn()
    return report.resident_mb("VmHWM:") - before


def timeit(fn, repeats=5, warmup=1, sync=lambda: None):
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


# ----------------------------------------------------------------------------- 1. CT-MoA
def loop_reference(conn, h_v):
    """CT-MoA the straightforward way: a Python loop over samples and over experts."""
    p_all = conn.router(h_v).softmax(-1)
    ca, out = conn.cross_adapter, []
    for b in range(h_v.shape[0]):
        x, p = h_v[b], p_all[b]
        y = p[:, :1] * conn.task_adapter(x)
        for i in range(conn.n_tasks - 1):
            foreign = F.gelu(F.linear(x, conn.foreign_w1[i], conn.foreign_b1[i])) @ conn.foreign_w2[i] + conn.foreign_b2[i]
            cross = F.gelu(F.linear(x, ca["w1"][i], ca["b1"][i])) @ ca["w2"][i] + ca["b2"][i]
            y = y + p[:, i + 1:i + 2] * (foreign + cross)
        if conn.client_adapter is not None:
            y = y + conn.client_adapter(x)
        out.append(y)
    return torch.stack(out)


def bench_ctmoa(b, n, c_v, c, t, device, repeats):
    g = torch.Generator().manual_seed(0)
    tasks = [f"t{i}" for i in range(t)]
    sd = lambda: {"linear_1.weight": torch.randn(c, c_v, generator=g) * 0.02, "linear_1.bias": torch.zeros(c),
                  "linear_2.weight": torch.randn(c, c, generator=g) * 0.02, "linear_2.bias": torch.zeros(c)}
    conn = pilot.build_ctmoa(c_v, c, sd(), tasks, "t0", {k: sd() for k in tasks}, {}, seed=0).to(device)
    with torch.no_grad():
        for v in conn.cross_adapter.values():
            v.normal_(0, 0.02)
    h = torch.randn(b, n, c_v, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(fn):
        def run():
            conn.zero_grad(set_to_none=True)
            out = fn(h)
            (out[0] if isinstance(out, tuple) else out).float().pow(2).mean().backward()
        return run
    with torch.no_grad():
        diff = (conn(h)[0] - loop_reference(conn, h)).abs().max().item()
    tb = timeit(step(conn), repeats, sync=sync)
    tl = timeit(step(lambda x: loop_reference(conn, x)), repeats, sync=sync)
    return {"batched_s": tb, "loop_s": tl, "speedup": tl / tb, "max_abs_diff": diff}


# ----------------------------------------------------------------------------- 2. one client step
def bench_step(repeats, steps=8):
    """Pilot stage 1 / stage 2 versus FedAvg's plain MLP connector: one client's local round of
    `steps` steps of the whole model (tiny backbone, batch 8, same samples), per step, connector
    set-up and optimiser included."""
    import backbone
    import data
    import features
    import server
    from client import client_round
    from config import Config
    bb = backbone.load_backbone("tiny", log=lambda *a: None)
    pilot.install_lora(bb.model.model.language_model, 8, 16, seed=0)
    c = data.make_scenario("A", 0, [2], n_train=8 * steps, n_test=1)[0]
    ct = features.prepare_client(bb, c, "cpu")
    tasks = ["caption", "vqa", "grounding"]
    start = {k: v.detach().clone() for k, v in pilot.lora_state(bb.model).items()}
    down = server.server_round([{**start, **{f"task_adapter.{k}": v for k, v in pilot.projector_state(bb.model).items()}}] * 3,
                            tasks, [1, 1, 1], 2)[0]
    out = {}
    for name, method, stage in (("fedavg", "fedavg", 1), ("stage1", "pilot", 1), ("stage2", "pilot", 2)):
        cfg = Config(method=method, batch_size=8, local_steps=steps)
        fn = lambda: client_round(bb, ct, down, {}, stage, tasks, cfg, 0, log_bar=False)
        out[name + "_rss_mb"] = peak_rss_mb(fn)
        out[name] = timeit(fn, repeats) / steps
    return {"fedavg_s": out["fedavg"], "stage1_s": out["stage1"], "stage2_s": out["stage2"],
            "overhead_stage1": out["stage1"] / out["fedavg"], "overhead_stage2": out["stage2"] / out["fedavg"],
            "peak_rss_mb": {k: out[k + "_rss_mb"] for k in ("fedavg", "stage1", "stage2")}}


# ----------------------------------------------------------------------------- 3. server aggregation
def synthetic_uploads(k, params, seed=0):
    """k clients' text adapters of `params` parameters in 64 tensors, all moved a little from one
    shared start (as Pilot's clients are: one Θ^l_0 for everyone)."""
    g = torch.Generator().manual_seed(seed)
    start = [torch.randn(params // 64, generator=g) for _ in range(64)]
    return [{f"lora.{i}": x + 0.01 * torch.randn(x.shape, generator=g) for i, x in enumerate(start)} for _ in range(k)]


def aggregation_peak_mb(k, params):
    """Peak resident memory of one server aggregation above the uploads, each measured in a fresh
    process: memory that one measurement freed stays with its process and would hide the next
    peak. ATA as run.py calls it (in place), ATA returning new tensors, and FedAvg."""
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return {name: pool.apply(_peak_in_child, (k, params, name)) for name in ("ata_inplace", "ata", "fedavg")}


def _peak_in_child(k, params, name):
    states, n = synthetic_uploads(k, params), list(range(1, k + 1))
    return peak_rss_mb({"ata_inplace": lambda: aggregate.adaptive_text(states, n, 3, inplace=True),
                        "ata": lambda: aggregate.adaptive_text(states, n, 3),
                        "fedavg": lambda: aggregate.fedavg(states, n)}[name])


def bench_aggregation(k, params, repeats):
    """ATA versus FedAvg for k clients whose text adapter has `params` parameters. ATA is timed in
    place, as the server runs it (the uploads become the downloads); repeating it on its own
    output is the same work."""
    def times(states, n):   # the uploads live only here, so the peak measured below starts clean
        return (timeit(lambda: aggregate.fedavg(states, n), repeats),
                timeit(lambda: aggregate.adaptive_text(states, n, 3, inplace=True), repeats),
                timeit(lambda: aggregate.pairwise_distances(states), repeats))
    t_avg, t_ata, t_dist = times(synthetic_uploads(k, params), list(range(1, k + 1)))
    mb = lambda x: x * 4 / 2**20
    return {"fedavg_s": t_avg, "ata_s": t_ata, "ata_distances_s": t_dist, "ratio": t_ata / t_avg,
            "uploads_mb": mb(k * params), "one_tensor_per_client_mb": mb(k * (params // 64)),
            "peak_above_uploads_mb": aggregation_peak_mb(k, params)}


# ----------------------------------------------------------------------------- 4. communication
def llava7b_config():
    """LLaVA-1.5-7B's architecture written out (CLIP ViT-L/14-336 + Vicuna-7B), no download."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def comm_7b(r=64, tasks=3):
    """Per client per round, from the config: Pilot uploads expert 1 + Θ^l and downloads T task
    adapters + Θ̄^l; FedAvg uploads and downloads one connector + Θ^l (fp32 tensors)."""
    cfg = llava7b_config()
    c_v, c, L, inter = 1024, cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers, cfg.text_config.intermediate_size
    lora = rehearsal.lora_params(L, r, c, inter)         # q,k,v,o; gate,up; down
    adapter = rehearsal.adapter_params(c_v, c)
    return {"lora_params": lora, "adapter_params": adapter,
            "pilot_up_params": lora + adapter, "pilot_down_params": lora + tasks * adapter,
            "fedavg_up_params": lora + adapter, "bytes_up_per_round_pilot_7b": 4 * (lora + adapter)}


# ----------------------------------------------------------------------------- 5. GPU: a 7B-shaped client step
def gpu_step_7b(stage, batch=16, text_tokens=64, steps=3, method="pilot"):
    """One client's local step on a randomly initialised LLaVA-1.5-7B-shaped model, bf16 frozen
    weights, fp32 LoRA r 64 and connector, gradient checkpointing."""
    from transformers import LlavaForConditionalGeneration
    import features
    from client import client_round
    from config import Config
    torch.cuda.reset_peak_memory_stats()
    cfg = llava7b_config()
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16).eval().requires_grad_(False)
    pilot.install_lora(model.model.language_model, 64, 128, seed=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_tok = 576 + text_tokens
    ids = torch.randint(0, 32000, (batch * steps, n_tok))
    ids[:, 1:577] = 32000
    items = [(row[:n_tok - 16].tolist(), row[n_tok - 16:].tolist()) for row in ids]
    ct = features.ClientTensors(0, "vqa", torch.randn(batch * steps, 576, 1024, device="cuda", dtype=torch.bfloat16), items,
                           None, [], [])
    bb = SimpleNamespace(model=model, tokenizer=SimpleNamespace(pad_token_id=0), pad_id=0, dims=(1024, 4096))
    tasks = ["caption", "vqa", "grounding"]
    proj = pilot.projector_state(model)
    base = {f"global_task_adapter.{t}.{k}": v for t in tasks for k, v in proj.items()}
    down = {**base, **{k: v.detach().clone() for k, v in pilot.lora_state(model).items()}}
    rcfg = Config(method=method, batch_size=batch, lora_r=64, lora_alpha=128, local_steps=0)  # an epoch
    client_round(bb, SimpleNamespace(**{**ct.__dict__, "items_train": items[:batch], "h_train": ct.h_train[:batch]}),
                     down, {}, stage, tasks, rcfg, 0, log_bar=False)      # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    client_round(bb, ct, down, {}, stage, tasks, rcfg, 0, log_bar=False)
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t) / steps
    tokens = batch * n_tok
    n_llm = sum(p.numel() for p in model.model.language_model.parameters())
    flops = 4 * n_llm * tokens     # forward 2N + backward to activations 2N per token (frozen weights), recompute not counted
    peak = torch.cuda.get_device_properties(0)
    del model
    torch.cuda.empty_cache()
    return {"stage": stage, "method": method, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "tflops": flops / step_s / 1e12, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "gpu": peak.name}


# ----------------------------------------------------------------------------- 6. the feature cache
def write_client(root: Path, n_train, n_test=50, seed=0):
    """One VQA client of n_train + n_test synthetic images in the LLaVA format, written image by
    image (nothing holds them all); returns its manifest."""
    import data
    import llava
    g = torch.Generator().manual_seed(seed)
    domain = data.client_domain(g)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        records = []
        for i in range(n):
            s = data.make_sample(g, "vqa", domain)
            s.id = f"{split}{i}"
            records.append(llava.llava_record(s, root / "images", f"{s.id}.png"))
        (root / f"{split}.json").write_text(json.dumps(records))
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"name": f"bench-{n_train}", "clients": [
        {"id": "c0", "task": "vqa", "train": "train.json", "test": "test.json", "image_folder": "images",
         "n_train": n_train}]}))
    return manifest


def _client_round_in_child(manifest, mode):
    """What a Flower ClientApp does for one TRAIN message, in this fresh process: load the backbone,
    load and encode (or read back) the client's data, one round of 10 local steps. Returns
    (loading s, round s, peak resident MB of the process)."""
    import features
    import report
    from client import client_round
    from config import Config
    from federation import load_clients, load_model
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)     # the same work whatever the machine's core count
    cfg = Config(data=str(manifest), features=mode, rounds_stage1=1, rounds_stage2=0)
    t0 = time.perf_counter()
    bb, theta0, _ = load_model(cfg, log=lambda *a: None)
    ct = features.prepare_client(bb, load_clients(cfg)[1][0], "cpu", mode=mode, log=lambda *a: None)
    t1 = time.perf_counter()
    client_round(bb, ct, dict(theta0), {}, 1, ["vqa"], cfg, 0)
    return t1 - t0, time.perf_counter() - t1, report.resident_mb("VmHWM:")


def bench_features(counts, root: Path):
    """Per client size: peak resident memory of one client round and its loading time, with H_v in
    memory (encoded in the process, as every Flower message did before the cache), on disk cold
    (encoded into the cache) and on disk warm (read back, memory-mapped). Each in a fresh process."""
    import multiprocessing
    out = {}
    for n in counts:
        manifest = write_client(root / f"client-{n}", n)
        r = {}
        for name, mode in (("memory", "memory"), ("disk_cold", "disk"), ("disk_warm", "disk")):
            with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
                load_s, round_s, peak = pool.apply(_client_round_in_child, (manifest, mode))
            r[name] = {"load_s": load_s, "round_s": round_s, "peak_rss_mb": peak}
        out[n] = r
    return out


def main_features(counts):
    import os
    import tempfile
    with tempfile.TemporaryDirectory(prefix="pilot-bench-features-") as tmp:
        os.environ["PILOT_CACHE"] = str(Path(tmp) / "cache")   # the feature cache, gone afterwards
        res = bench_features(counts, Path(tmp))
    print(f"{'images':>8}  {'H_v':>7}  " + "  ".join(f"{m:>28}" for m in ("in memory", "disk, first time", "disk, warm")))
    print(f"{'':>8}  {'MB':>7}  " + "  ".join(f"{'peak RSS / load / round':>28}" for _ in range(3)))
    for n, r in res.items():
        hv = n * 16 * 64 * 4 / 2**20
        print(f"{n:>8}  {hv:>7.0f}  " + "  ".join(
            f"{r[m]['peak_rss_mb']:>9.0f} MB {r[m]['load_s']:>7.1f} s {r[m]['round_s']:>5.1f} s"
            for m in ("memory", "disk_cold", "disk_warm")))
    return res


def main():
    ap = argparse.ArgumentParser(description="Pilot benchmarks")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default="runs/bench.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="paper-shape batch 2 on a GPU too")
    ap.add_argument("--features", metavar="N,N,...", help="only the feature-cache benchmark, for clients of N images")
    ap.add_argument("--rehearse", action="store_true", help="only the whole loop at LLaVA-1.5-7B's widths (rehearsal.py), "
                    "into the directory --out")
    a = ap.parse_args()
    if a.rehearse:
        rehearsal.main(a.out)
        return
    if a.features:
        res = main_features([int(x) for x in a.features.split(",")])
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).with_name("bench-features.json").write_text(json.dumps(res, indent=1))
        print(f"wrote {Path(a.out).with_name('bench-features.json')}")
        return
    res, rows = {}, []
    # paper shape per sample (576 tokens, 1024 -> 4096); batch 16 on a GPU, 2 on a CPU, where one
    # batch-16 forward + backward alone is several TFLOP (a minute on 2 cores)
    b = 2 if a.quick or a.device == "cpu" else 16
    for t in (3, 6):
        r = bench_ctmoa(b, 576, 1024, 4096, t, a.device, a.repeats)
        res[f"ctmoa_paper_T{t}"] = r
        rows.append((f"CT-MoA fwd+bwd, batch {b} x 576 x 1024 -> 4096, T={t}",
                     f"batched {r['batched_s']:.2f} s, loop {r['loop_s']:.2f} s, speed-up {r['speedup']:.2f}x, max|diff| {r['max_abs_diff']:.1e}"))
    r = bench_ctmoa(8, 16, 64, 128, 3, "cpu", 20)
    res["ctmoa_tiny"] = r
    rows.append(("CT-MoA fwd+bwd, tiny shape 8 x 16 x 64 -> 128, T=3",
                 f"batched {r['batched_s'] * 1e3:.2f} ms, loop {r['loop_s'] * 1e3:.2f} ms, speed-up {r['speedup']:.2f}x"))
    res["ctmoa_speedup_paper_shape"] = res["ctmoa_paper_T3"]["speedup"]
    res["ctmoa_max_abs_diff"] = max(res[k]["max_abs_diff"] for k in ("ctmoa_paper_T3", "ctmoa_paper_T6", "ctmoa_tiny"))
    r = bench_step(a.repeats)
    res["step_tiny"] = r
    res["step_overhead_stage1_tiny"], res["step_overhead_stage2_tiny"] = r["overhead_stage1"], r["overhead_stage2"]
    rows.append(("one local step, tiny backbone, batch 8: FedAvg / Pilot stage 1 / stage 2",
                 f"{1e3 * r['fedavg_s']:.1f} / {1e3 * r['stage1_s']:.1f} / {1e3 * r['stage2_s']:.1f} ms: overhead "
                 f"{r['overhead_stage1']:.2f}x, {r['overhead_stage2']:.2f}x; peak RSS of a round "
                 + " / ".join(f"{v:.0f}" for v in r["peak_rss_mb"].values()) + " MB above the process"))
    for k in (8, 32, 128):
        for p in (1_000_000, 40_000_000):
            if k * p * 4 > 8 * 2**30:
                continue   # more than 8 GiB of uploads: beyond this machine's comfort
            r = bench_aggregation(k, p, a.repeats)
            res[f"agg_k{k}_p{p}"] = r
            pk = r["peak_above_uploads_mb"]
            rows.append((f"aggregation K={k}, {p / 1e6:.0f}M params", f"FedAvg {r['fedavg_s']:.3f} s, ATA {r['ata_s']:.3f} s "
                         f"(distances {r['ata_distances_s']:.3f} s), {r['ratio']:.2f}x; peak above the uploads "
                         f"({r['uploads_mb']:,.0f} MB): ATA in place {pk['ata_inplace']:,.0f} MB, ATA to new tensors "
                         f"{pk['ata']:,.0f} MB, FedAvg {pk['fedavg']:,.0f} MB; one tensor per client {r['one_tensor_per_client_mb']:,.1f} MB"))
    res["ata_over_fedavg_time_k32"] = res["agg_k32_p40000000"]["ratio"]
    r = comm_7b()
    res["comm_7b"] = r
    res["bytes_up_per_round_pilot_7b"] = r["bytes_up_per_round_pilot_7b"]
    rows.append(("LLaVA-1.5-7B, LoRA r 64: communicated params per client per round",
                 f"up {r['pilot_up_params'] / 1e6:.0f}M (Θ^l {r['lora_params'] / 1e6:.0f}M + expert 1 {r['adapter_params'] / 1e6:.0f}M), "
                 f"down {r['pilot_down_params'] / 1e6:.0f}M"))
    if a.device == "cuda":
        for name, stage, method in (("fedavg", 1, "fedavg"), ("stage1", 1, "pilot"), ("stage2", 2, "pilot")):
            r = gpu_step_7b(stage, method=method)
            res[f"gpu_7b_{name}"] = r
            mfu = r["tflops"] * 1e12 / H100_BF16_PEAK if "H100" in r["gpu"] else float("nan")
            r["mfu_h100"] = mfu
            rows.append((f"7B-shaped step, {name}, batch 16 x 640 tokens, bf16 + grad ckpt ({r['gpu']})",
                         f"{r['step_s']:.2f} s, {r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.0f} TFLOP/s "
                         f"(MFU {100 * mfu:.0f}%), peak {r['peak_mem_gib']:.1f} GiB"))
        for name in ("stage1", "stage2"):
            res[f"step_overhead_{name}_7b"] = res[f"gpu_7b_{name}"]["step_s"] / res["gpu_7b_fedavg"]["step_s"]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # weight-loading bars: noise in a log file, and nothing a figure needs
    main()
