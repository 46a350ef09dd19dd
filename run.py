"""
Pilot federated multimodal instruction tuning, simulated: clients are trained one after another in
a plain Python loop on one machine, and the server aggregates their uploads between rounds.

    python run.py --scenario A                    # the embedded tiny backbone and synthetic data, CPU
    python run.py --scenario B --seed 1 --out runs/b1
    python run.py --help                          # every setting (config.Config) as a flag

This file is the command line and the fleet of clients in this process (Simulation, which trains
each with client.py's client_step); the loop itself, with the server's step, checkpoints, resume
and results, is federation.federate, which flower_app.py drives with a fleet of Flower SuperNodes.
Writes OUT/results.json, OUT/results.md, OUT/predictions_client_<id>.jsonl and
OUT/client_<id>.safetensors (each client's final state: what it downloaded last plus its private
tensors); OUT/state.json and the files it names are the checkpoint --resume continues from.
"""
import argparse
import sys
import time
from dataclasses import fields, replace

import torch

import checkpoint
import data
import evaluate
import features
import llava
import report
from backbone import BackboneError, check_checkpoint, checkpoint_dir
from client import client_step, settle_private
from config import METHODS, Config, check_config, fault_for, is_tiny, parse_faults, recipe_line, with_defaults
from federation import federate, load_clients, load_model, open_out


# ----------------------------------------------------------------------------- the clients, in this process
class Simulation:
    """The fleet of run.py (a federation.Fleet): every client's encoded data and private state in
    this process, trained one after another. The pooled bounds train instead one model on the union
    of several clients' training data, with those clients' total number of steps, and evaluate it on
    each of those clients' own test sets: Centralized one model for every client, centralized-task
    one per task."""
    engine = "run.py"

    def __init__(self, bb, cts, cfg: Config, log=print):
        self.bb, self.cts, self.cfg, self.log = bb, cts, cfg, log
        self.tasks = sorted({ct.task for ct in cts}, key=data.TASKS.index)
        self.faults = parse_faults(cfg.faults)
        pooled = METHODS[cfg.method].pooled
        if pooled:
            # "all": one trainer of task "all", id -1; "task": one per task, id -2 - its index in data.TASKS
            groups = {"all": cts} if pooled == "all" else {t: [ct for ct in cts if ct.task == t] for t in self.tasks}
            self.trainers = [features.pool(group, task, -1 if task == "all" else -2 - data.TASKS.index(task))
                             for task, group in groups.items()]
            # the pooled clients' steps together: K x --local-steps a round (whole epochs: an epoch of the union)
            self.train_cfgs = [replace(cfg, local_steps=cfg.local_steps * len(group)) for group in groups.values()]
            self.train_tasks = ["all"] if pooled == "all" else self.tasks
        else:
            self.trainers, self.train_cfgs, self.train_tasks = cts, [cfg] * len(cts), self.tasks
        self.trainer_of = [next(i for i, t in enumerate(self.trainers) if t.task in ("all", ct.task)) if pooled else k
                           for k, ct in enumerate(cts)]     # which trainer's model each client is evaluated with
        self.ids = [ct.id for ct in self.trainers]
        self.tasks_of = [ct.task for ct in self.trainers]
        self.n = [len(ct.items_train) for ct in self.trainers]
        self.private = [{} for _ in self.trainers]
        self.pending = [{} for _ in self.trainers]   # this round's private states, kept only if the upload is accepted

    def state(self):
        return {"private": self.private}

    def turn_state(self, k):
        return {"pending": self.pending[k]}

    def progress(self):
        return {}

    def restore(self, groups, progress):
        self.private = [p or {} for p in groups["private"]]
        self.pending = [p or {} for p in groups.get("pending") or [{}] * len(self.trainers)]

    def train(self, r, stage, downloads, uploads, done, turn):
        """Every client not yet done in round r, one after another; each upload lands in uploads[k],
        the client in done, and turn(k) checkpoints it (with --checkpoint client)."""
        stats = []
        for k, ct in enumerate(self.trainers):
            if k in done:
                continue
            report.reset_peak_memory(self.cfg.device)
            uploads[k], self.pending[k], st = client_step(self.bb, ct, downloads[k], self.private[k], stage,
                                                          self.train_tasks, self.train_cfgs[k], r,
                                                          fault_for(self.faults, ct.id, r))
            stats += [st] if st else []
            rss, cuda = report.peak_memory(self.cfg.device)
            trained = (f"{st['steps']} steps, loss {st['loss_first']:.3f} -> {st['loss_last']:.3f}, "
                       f"{st['seconds']:.1f} s" if st else "failed, no upload")
            who = "the pooled client" if isinstance(ct.id, int) and ct.id < 0 else f"client {ct.id}"
            self.log(f"  {who} ({ct.task}) round {r + 1}: {trained}; peak memory {rss or 0:.0f} MB resident"
                     + (f", {cuda:.0f} MB CUDA" if cuda else ""))
            done.append(k)
            turn(k)
        return stats, ""

    def settle(self, accepted):
        self.private = settle_private(self.private, self.pending, accepted)
        self.pending = [{} for _ in self.trainers]

    def _as_evaluated(self, downloads):
        """Each client's download and private state as it is evaluated: its own, or its pooled
        trainer's (Centralized's one adapter read as each client's task adapter)."""
        def of(ct, d):
            if not d or self.tasks_of[0] != "all":
                return d
            return {(f"global_task_adapter.{ct.task}." + k.split(".", 2)[2] if k.startswith("global_task_adapter.")
                     else k): v for k, v in d.items()}
        return ([of(ct, downloads[t]) for ct, t in zip(self.cts, self.trainer_of)],
                [self.private[t] for t in self.trainer_of])

    def evaluate(self, downloads, stage, scores=True):
        downloads, private = self._as_evaluated(downloads)
        return [evaluate.evaluate_client(self.bb, ct, d, p, stage, self.tasks, self.cfg, scores)
                for ct, d, p in zip(self.cts, downloads, private)]

    def save(self, out, downloads):
        for ct, d, p in zip(self.cts, *self._as_evaluated(downloads)):
            report.save_client_state(out, ct.id, d, p)


def run(cfg: Config, log=print):
    """One federated run of cfg.method, simulated in this process; writes and returns results.json's
    content. The federation state is checkpointed after every aggregation, and after every client
    with cfg.checkpoint "client"; with cfg.resume the run continues from OUT's checkpoint."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    cfg = with_defaults(cfg, log)
    if not is_tiny(cfg.backbone) and not cfg.allow_download:   # a broken checkpoint fails here, before OUT is made
        check_checkpoint(checkpoint_dir(cfg.backbone), cfg.backbone)
    out, lock, saved = open_out(cfg, f"runs/scenario-{cfg.scenario}-{cfg.method}-seed{cfg.seed}")
    try:
        log(recipe_line(cfg))
        bb, theta0, expected = load_model(cfg, log)
        cfg, clients = load_clients(cfg)
        cts = [features.prepare_client(bb, c, cfg.device, cfg.max_length, log, cfg.features, cfg.features_max_mb)
               for c in clients]
        del clients     # the training samples are encoded in cts: their text and images need no memory now
        fleet = Simulation(bb, cts, cfg, log)
        log(f"scenario {cfg.scenario}, method {cfg.method}, seed {cfg.seed}: clients {[ct.id for ct in cts]}, "
            f"tasks {fleet.tasks}, train sizes {[len(ct.items_train) for ct in cts]}")
        return federate(cfg, fleet, theta0, expected, out, saved, log, t0)
    finally:
        lock.close()


# ----------------------------------------------------------------------------- the command line
FLAGS = {   # the flags a user needs most, with their help; every other Config field is a flag too
    "scenario": "A: caption/VQA/grounding, 6 clients; B: adds text reading, 8 unbalanced clients",
    "method": f"federated method or ablation: {', '.join(METHODS)}",
    "seed": "seeds the training: the adapters' initial values and the batch order",
    "data_seed": "draws the synthetic world (default 0, the benchmark's, whatever --seed)",
    "backbone": "'tiny' (shipped) or a LLaVA checkpoint directory / hub id in the local cache",
    "data": "a scenario manifest of LLaVA-format data (default: the synthetic scenario)",
    "out": "output directory (default runs/scenario-<S>-<method>-seed<seed>)",
    "device": "cpu or cuda",
    "top_m": "ATA's number of nearest neighbours M (default min(3, K - 1))",
    "rounds_stage1": "rounds of stage 1, R1 (preset: 4 tiny, 1 checkpoint)",
    "rounds_stage2": "rounds of stage 2 (CT-MoA), R2 (preset: 16 tiny, 3 checkpoint)",
    "local_steps": "optimiser steps per client per round (preset: 10 tiny; 0, whole epochs, checkpoint)",
    "resume": "continue the run checkpointed in --out",
    "clients": "comma-separated client ids to keep (a quick look)",
}


def arg_parser(description="Pilot federated multimodal instruction tuning (simulated clients)."):
    """The command line: every Config field as a flag (--top-m for top_m), its default Config's
    (None: the backbone's preset). Bad command lines end in one line on stderr, exit 2."""
    ap = OneLineErrors(description=description)
    d = Config()
    for f in fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), getattr(d, f.name)
        help_ = FLAGS.get(f.name, "see config.py") + ("" if default in (None, False) else f" (default {default})")
        if f.type is bool:
            ap.add_argument(flag, action="store_true", default=None, help=help_)
        elif f.type is list:    # --clients 0,2
            ap.add_argument(flag, type=lambda v: [int(x) for x in v.split(",")], help=help_)
        else:
            ap.add_argument(flag, type=f.type, help=help_)
    return ap


def config_from(args) -> Config:
    """Config from parsed flags: a flag not given keeps Config's default."""
    return Config(**{f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None})


class OneLineErrors(argparse.ArgumentParser):
    """Bad command lines end in one line on stderr and exit code 2, before anything is written."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_config(argv=None, ap=None):
    """(cfg, parsed args) of a command line, checked before any work (config.check_config)."""
    ap = ap or arg_parser()
    a = ap.parse_args(argv)
    if a.data_seed is not None and a.data:
        ap.error("--data-seed: draws the synthetic scenarios only, not --data")
    try:
        cfg = config_from(a)
        check_config(cfg)
    except (ValueError, llava.DataError) as e:
        ap.error(str(e))
    return cfg, a


def main(argv=None, prog="run.py"):
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # weight-loading bars say nothing a researcher needs here
    cfg, _ = parse_config(argv)
    try:
        run(cfg)
    except (checkpoint.CheckpointError, llava.DataError, BackboneError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)   # one line, exit 2, as for a bad command line
        raise SystemExit(2)


if __name__ == "__main__":
    main()
