"""
The command line of run.py: every Config field as a flag, checked before any work, and the
entry point.

    python run.py --scenario A                               # one run (run.run)
    python run.py --scenario A --methods local,centralized   # a comparison over seeds (compare.run_comparison)

Defaults live in run.py (Config, PRESETS), not here: a flag without a value keeps Config's.
"""
import argparse
import json
import sys
from pathlib import Path

import checkpoint
import compare
import data
import faults
import run
from run import DTYPES, METHODS, Config


def parse_args(argv=None):
    """(cfg, methods, seeds): methods and seeds None unless a comparison is asked for."""
    return parse_command(argv)[:3]


def parse_command(argv=None):
    """(cfg, methods, seeds, jobs): parse_args's and the comparison's number of runs at once."""
    d = Config()
    ap = OneLineErrors(description="Pilot federated multimodal instruction tuning (simulated clients).")
    ap.add_argument("--scenario", default=d.scenario, choices=sorted(data.SCENARIOS),
                    help="A: caption/VQA/grounding, 6 clients; B: adds text reading, 8 unbalanced clients")
    ap.add_argument("--method", default=d.method, choices=list(METHODS), help="federated method or ablation")
    ap.add_argument("--methods", default=None, help="comparison: comma-separated methods, or 'all'")
    ap.add_argument("--seed", type=int, default=d.seed, help="seeds the training: the adapters' init and the batch order")
    ap.add_argument("--data-seed", type=lambda v: None if v == "seed" else int(v), default=argparse.SUPPRESS,
                    help=f"synthetic data: the seed that draws every client's domain and samples (default "
                         f"{d.data_seed}, the benchmark's world); 'seed': each --seed draws its own data")
    ap.add_argument("--seeds", default=None, help="comparison: comma-separated seeds (default 0,1,2,3,4)")
    ap.add_argument("--jobs", type=int, default=1, help="comparison: runs at once, each in its own process with "
                    "its share of the threads (a CPU finishes sooner with 2 one-thread runs than 1 two-thread run)")
    ap.add_argument("--mu", type=float, default=d.mu, help="FedProx's proximal weight μ")
    ap.add_argument("--eval-every-round", action="store_true", help="evaluate every client after every round")
    ap.add_argument("--test-loss-every-round", action="store_true",
                    help="every client's test loss (teacher-forced) after every round; a comparison always records it")
    ap.add_argument("--rounds-stage1", type=int, default=None,
                    help="rounds of stage 1, R1 (default: 4 for the tiny backbone, 1 for a checkpoint)")
    ap.add_argument("--rounds-stage2", type=int, default=None,
                    help="rounds of stage 2, CT-MoA, R2 (default: 16 for the tiny backbone, 3 for a checkpoint)")
    ap.add_argument("--local-steps", type=int, default=None,
                    help="optimiser steps per client per round (default: 10 for the tiny backbone, 0 for a checkpoint); "
                         "0: --local-epochs whole epochs")
    ap.add_argument("--local-epochs", type=int, default=d.local_epochs, help="local epochs per round (E), when --local-steps is 0")
    ap.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip each step's gradient norm (0: off)")
    ap.add_argument("--loss-mean", default=d.loss_mean, choices=["tokens", "samples"],
                    help="training loss: mean over the batch's answer tokens, or over samples of each one's token mean")
    ap.add_argument("--top-m", type=int, default=d.top_m, help="ATA's number of nearest neighbours M (default min(3, K - 1))")
    ap.add_argument("--backbone", default=d.backbone, help="'tiny' (embedded, cached) or a LLaVA checkpoint dir / HF id")
    ap.add_argument("--out", default=d.out, help="output dir (default runs/scenario-<S>-<method>-seed<seed>)")
    ap.add_argument("--device", default=d.device, choices=["cpu", "cuda"], help="where to train")
    ap.add_argument("--lr-stage1", type=float, default=d.lr_stage1, help="learning rate, stage 1")
    ap.add_argument("--lr-stage2", type=float, default=None,
                    help="learning rate, stage 2 (default 3e-3 tiny, 6e-3 real checkpoints)")
    ap.add_argument("--lambda-d", type=float, default=d.lambda_d, help="λ0, weight of the difference loss L_d (stage 1)")
    ap.add_argument("--lambda-b", type=float, default=d.lambda_b, help="λ1, weight of the load-balance loss L_b (stage 2)")
    ap.add_argument("--lambda-z", type=float, default=d.lambda_z, help="λ2, weight of the router z-loss L_z (stage 2)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="local batch size")
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 8 tiny, 64 real checkpoints)")
    ap.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 16 tiny, 128 real)")
    ap.add_argument("--lora-targets", default=d.lora_targets, help="comma-separated names of the LLM's linear layers to adapt")
    ap.add_argument("--data", default=d.data, help="scenario manifest of LLaVA-format data (default: the synthetic scenario)")
    ap.add_argument("--formats", default=d.formats, help="synthetic data: changes to the benchmark's formats of "
                    "grounding and text reading and to its training data's skew, e.g. box_objects=3,box_large=0,"
                    "ocr_digits=1-2,ocr_dot_px=2,train_omit= (data.FORMATS)")
    ap.add_argument("--dtype", default=d.dtype, choices=list(DTYPES), help="dtype of the frozen weights")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the LLM")
    ap.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimiser step")
    ap.add_argument("--features", default=d.features, choices=["auto", "memory", "disk"],
                    help="where each client's image features live: memory, a memory-mapped disk cache under "
                         "$PILOT_CACHE/features, or auto (disk when above --features-max-mb)")
    ap.add_argument("--features-max-mb", type=float, default=d.features_max_mb,
                    help="--features auto: a client's features above this many MB go to the disk cache")
    ap.add_argument("--max-length", type=int, default=d.max_length, help="maximum tokens per sample")
    ap.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    ap.add_argument("--checkpoint", default=None, choices=["client", "round"],
                    help="write the federation state after every client, or after every round only "
                         "(default: round for the tiny backbone, client for a checkpoint)")
    ap.add_argument("--faults", default=d.faults, help='fault injection: "client=3:nan", "client=3:scale=100", "client=3:drop" '
                    '(comma-separated; "@2" after one: in round 2 only)')
    ap.add_argument("--norm-screen", type=float, default=d.norm_screen,
                    help="reject updates whose norm exceeds this multiple of the round's median (our addition; 0 = off)")
    ap.add_argument("--clients", default=None, help="comma-separated client indices to keep (quick runs)")
    ap.add_argument("--n-train", type=int, default=None, help="train samples per client (default: scenario's; "
                    "the test samples, drawn after them, change with it)")
    ap.add_argument("--n-test", type=int, default=None, help="test samples per client (default: scenario's)")
    a = ap.parse_args(argv)
    kw = {k: v for k, v in vars(a).items() if k not in ("methods", "seeds", "jobs")}
    kw["clients"] = [int(x) for x in a.clients.split(",")] if a.clients else None
    methods = None if a.methods is None else list(METHODS) if a.methods == "all" else a.methods.split(",")
    for m in methods or []:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} in --methods; choose from {', '.join(METHODS)}")
    seeds = None if a.seeds is None else [int(x) for x in a.seeds.split(",")]
    if a.jobs < 1 or (a.jobs > 1 and methods is None and seeds is None):
        ap.error(f"--jobs {a.jobs}: runs of a comparison at once, at least 1 (give --methods or --seeds for more)")
    if "data_seed" in kw and a.data:
        ap.error("--data-seed: draws the synthetic scenarios only, not --data")
    cfg = Config(**kw)
    try:
        check_config(cfg)
    except ValueError as e:
        ap.error(str(e))
    return cfg, methods, seeds, a.jobs


class OneLineErrors(argparse.ArgumentParser):
    """Bad command lines end in one line on stderr and exit code 2, before anything is written."""

    def error(self, message):
        self.exit(2, f"run.py: error: {message}\n")


def check_config(cfg: Config):
    """What can be checked before any work: raises ValueError with a one-line reason."""
    if cfg.data and not Path(cfg.data).is_file():
        raise ValueError(f"--data {cfg.data}: no such file")
    n_clients = run.federation_size(cfg)
    if cfg.top_m is not None and not 1 <= cfg.top_m < max(2, n_clients):
        raise ValueError(f"--top-m {cfg.top_m}: must be at least 1 and below the number of clients ({n_clients})")
    if cfg.out and not Path(cfg.out).resolve().parent.is_dir():
        raise ValueError(f"--out {cfg.out}: the parent directory {Path(cfg.out).resolve().parent} does not exist")
    if cfg.backbone != "tiny" and Path(cfg.backbone).exists():
        conf = Path(cfg.backbone) / "config.json"
        if not conf.is_file() or json.loads(conf.read_text()).get("model_type") != "llava":
            raise ValueError(f"--backbone {cfg.backbone}: not a LLaVA checkpoint (no config.json with model_type 'llava')")
    try:
        faults.parse_faults(cfg.faults)
        data.parse_formats(cfg.formats)
    except ValueError as e:
        raise ValueError(str(e)) from None
    if cfg.formats and cfg.data:
        raise ValueError("--formats: shapes the synthetic scenarios only, not --data")


def main(argv=None):
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # weight-loading bars say nothing a researcher needs here
    cfg, methods, seeds, jobs = parse_command(argv)
    try:
        if methods or seeds:
            compare.run_comparison(cfg, methods or [cfg.method], seeds or run.COMPARISON_SEEDS, jobs)
        else:
            run.run(cfg)
    except (checkpoint.CheckpointError, data.DataError) as e:
        print(f"run.py: error: {e}", file=sys.stderr)   # one line, exit 2, as for a bad command line
        raise SystemExit(2)
