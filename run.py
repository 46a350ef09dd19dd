"""
Pilot federated multimodal instruction tuning, simulated: clients are trained one after another in
a plain Python loop on one machine, and the server aggregates their uploads between rounds.

    python run.py --scenario A                    # the embedded tiny backbone and synthetic data, CPU
    python run.py --scenario B --seed 1 --out runs/b1
    python run.py --help                          # every setting (config.Config) as a flag

The loop (federate) is written once: it drives the rounds, the server's step, the checkpoint and
resume, the accounting and the results, whoever trains the clients. Here a Simulation trains them
in this process (client.py's client_step); flower_app.py hands the same loop a fleet of Flower
SuperNodes on other machines. Writes OUT/results.json, OUT/results.md,
OUT/predictions_client_<id>.jsonl and OUT/client_<id>.safetensors (each client's final state: what it
downloaded last plus its private tensors); OUT/state.json + OUT/state-<n>.safetensors is the
checkpoint --resume continues from.
"""
import argparse
import fcntl
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

import backbone as bbmod
import checkpoint
import data
import evaluate
import features
import llava
import pilot
import report
import server
from client import client_step, settle_private
from config import METHODS, Config, check_config, fault_for, final_stage, parse_faults, recipe, recipe_line, \
    stage_of, with_defaults

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the settings a --resume must share with the run it continues
RESUME_KEYS = ("scenario", "method", "backbone", "seed", "data_seed", "rounds_stage1", "rounds_stage2", "local_steps",
               "local_epochs", "top_m", "lr_stage1", "lr_stage2", "batch_size", "lora_r", "lora_alpha", "lora_targets",
               "dtype", "grad_accum", "clients", "n_train", "n_test", "data", "mu", "faults", "norm_screen", "max_length",
               "lambda_d", "lambda_b", "lambda_z", "grad_clip", "warmup_ratio")


# ----------------------------------------------------------------------------- set-up
def load_model(cfg: Config, log=print):
    """The frozen backbone with Θ^l installed at its initial value; returns (bb, Θ^l_0, expected),
    expected being what the server accepts from a client: {key: (shape, dtype)}."""
    bb = bbmod.load_backbone(cfg.backbone, device=cfg.device, dtype=DTYPES[cfg.dtype], log=log)
    # Θ^l's initial value is the server's: one seed, the same for every client, so that ATA's
    # distances measure what local training changed, not initialisation noise.
    pilot.install_lora(bb.model.model.language_model, cfg.lora_r, cfg.lora_alpha,
                       targets=tuple(cfg.lora_targets.split(",")), seed=cfg.seed)
    bb.model.to(cfg.device)
    if cfg.grad_ckpt:
        bb.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    theta0 = {k: v.detach().clone().cpu() for k, v in pilot.lora_state(bb.model).items()}
    # exactly Θ^l's tensors and one projector-shaped task adapter, fp32
    expected = {**{k: (tuple(v.shape), torch.float32) for k, v in theta0.items()},
                **{f"task_adapter.{k}": (tuple(v.shape), torch.float32) for k, v in pilot.projector_state(bb.model).items()}}
    return bb, theta0, expected


def load_clients(cfg: Config):
    """(cfg, the clients cfg keeps, in scenario order): a manifest's, else the synthetic scenario's.
    A manifest names its scenario, which replaces cfg.scenario."""
    if cfg.data:
        name, clients = llava.load_manifest(cfg.data, keep=cfg.clients)
        return replace(cfg, scenario=name), clients
    return cfg, data.make_scenario(cfg.scenario, cfg.data_seed, cfg.clients, cfg.n_train, cfg.n_test)


def backbone_recipe(cfg: Config):
    """The tiny backbone's recipe key; None for a checkpoint directory or hub id, which --backbone names itself."""
    return bbmod.tiny_backbone_key() if cfg.backbone == "tiny" else None


def open_out(cfg: Config, default: str):
    """(OUT, its lock, the checkpoint to resume from or None). One writer per OUT: the kernel drops
    the lock when the process dies. A --resume first checks that the run in OUT was started with
    cfg's settings (RESUME_KEYS), raising a CheckpointError that names each one that differs."""
    out = Path(cfg.out or default)
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise checkpoint.CheckpointError(f"{out}: another run is writing there") from None
    if not cfg.resume:
        return out, lock, None
    meta = checkpoint.read_meta(out)
    default_cfg, now = asdict(Config(backbone=cfg.backbone)), asdict(cfg)
    saved = {k: meta["config"].get(k, default_cfg.get(k)) for k in RESUME_KEYS}
    differ = [f"{k} (saved {saved[k]!r}, now {now.get(k)!r})" for k in RESUME_KEYS if saved[k] != now.get(k)]
    recipe_key = backbone_recipe(cfg)   # 'tiny' after a change of its recipe is another backbone
    if meta.get("backbone_recipe", recipe_key) != recipe_key:
        differ.append(f"the tiny backbone's recipe (saved {meta['backbone_recipe']!r}, now {recipe_key!r})")
    if differ:
        raise checkpoint.CheckpointError(f"--resume: the run in {out} was started with other settings: " + ", ".join(differ))
    return out, lock, checkpoint.load(out)


# ----------------------------------------------------------------------------- the loop
def federate(cfg: Config, fleet, theta0, expected, out: Path, saved=None, log=print, t0=None):
    """The federated run of cfg.method, round by round, with `fleet` training the clients. Each
    round: every client trains from its download (fleet.train), the server screens and aggregates
    the uploads into the next downloads (server.server_step), each client keeps or rolls back its
    private state by the verdict (fleet.settle), and the federation state is checkpointed. Then
    every client is evaluated with what it downloaded last plus its private tensors. saved: the
    checkpoint to continue from (open_out). Writes and returns results.json's content."""
    t0 = t0 or time.time()
    communicates = METHODS[cfg.method].text_agg != "none"   # Local sends and receives nothing
    rounds = cfg.rounds_stage1 + cfg.rounds_stage2
    K = len(fleet.ids)
    if saved:
        meta, groups = saved
        p = meta["progress"]
        downloads, uploads = groups["downloads"], groups["uploads"]
        fleet.restore(groups, p)
        r0, done, bytes_up, bytes_down = p["round"], p["done"], p["bytes_up"], p["bytes_down"]
        history, trainable, upload_params, losses = p["history"], p["trainable"], p["upload_params"], p["losses"]
        elapsed, ata_log = p["elapsed"], p["ata"]
        log(f"resumed from {out}/state.json: round {r0 + 1}, clients done in it {[fleet.ids[k] for k in done]}")
    else:
        downloads, uploads = [dict(theta0) for _ in range(K)], [None] * K
        r0, done, losses, history, trainable, upload_params, elapsed, ata_log = 0, [], [], [], 0, 0, 0.0, []
        bytes_up, bytes_down = 0, sum(report.nbytes(d) for d in downloads) if communicates else 0

    def commit(r, done):
        progress = {"round": r, "done": list(done), "bytes_up": bytes_up, "bytes_down": bytes_down, "history": history,
                    "trainable": trainable, "upload_params": upload_params, "losses": losses,
                    "elapsed": elapsed + time.time() - t0, "ata": ata_log, **fleet.progress()}
        checkpoint.save(out, {"config": asdict(cfg), "backbone_recipe": backbone_recipe(cfg), "engine": fleet.engine,
                              "progress": progress}, {"downloads": downloads, "uploads": uploads, **fleet.state()})

    if not saved:
        commit(0, [])
    for r in range(r0, rounds):
        stage, tr = stage_of(cfg, r), time.time()
        stats, note = fleet.train(r, stage, downloads, uploads, done, lambda: commit(r, done))
        for st in stats:
            losses.append(st["loss_last"])
            trainable = max(trainable, int(st["trainable_params"]))
            upload_params = max(upload_params, int(st["upload_params"]))
        ata_did = {}
        sent = [u for u in uploads if u is not None]
        ru = sum(report.nbytes(u) for u in sent) if communicates else 0
        downloads, accepted = server.server_step(uploads, downloads, fleet.tasks_of, fleet.n, expected, cfg,
                                                 fleet.ids, log, ata_did)
        fleet.settle(accepted)
        rd = sum(report.nbytes(d) for d in downloads) if communicates else 0
        bytes_up, bytes_down = bytes_up + ru, bytes_down + rd
        line = (f"round {r + 1}/{rounds} (stage {stage}): mean last loss {sum(losses) / max(1, len(losses)):.3f}, "
                f"up {ru / 1e6:.2f} MB, down {rd / 1e6:.2f} MB, {time.time() - tr:.1f} s{note}")
        if "neighbours" in ata_did:
            ata_log.append({"round": r + 1, **server.ata_record(ata_did["neighbours"], fleet.tasks_of,
                                                                ata_did["weights"], fleet.ids)})
            line += f", ATA neighbours of the client's own task {ata_log[-1]['same_task_mean']:.2f}"
        if r < rounds - 1 and (cfg.eval_every_round or cfg.test_loss_every_round):
            rows = fleet.evaluate(downloads, stage, scores=cfg.eval_every_round)
            entry = dict(zip(("per_task", "average"), report.summarise_rows(rows, fleet.tasks))) \
                if cfg.eval_every_round else {}
            per_task_ce, average_ce = report.summarise_rows(rows, fleet.tasks, "test_ce", 4)
            history.append({"round": r + 1, **entry, "per_task_ce": per_task_ce, "average_ce": average_ce})
            line += (f", average score {entry['average']:.1f}" if entry else "") + f", test loss {average_ce:.3f}"
        log(line)
        uploads, done, losses = [None] * K, [], []
        commit(r + 1, [])

    # the connector of the last round trained, also when a resumed run has no round left to train
    rows = fleet.evaluate(downloads, final_stage(cfg), scores=True)
    per_task, average = report.summarise_rows(rows, fleet.tasks)
    per_task_ce, average_ce = report.summarise_rows(rows, fleet.tasks, "test_ce", 4)
    history.append({"round": rounds, "per_task": per_task, "average": average, "per_task_ce": per_task_ce,
                    "average_ce": average_ce})
    res = {"scenario": cfg.scenario, "seed": cfg.seed, "method": cfg.method, "backbone": cfg.backbone,
           "engine": fleet.engine, "clients": rows, "per_task": per_task, "average": average,
           "per_task_ce": per_task_ce, "average_ce": average_ce, "bytes_up": bytes_up, "bytes_down": bytes_down,
           "wall_s": round(elapsed + time.time() - t0, 1),
           "rounds": history if cfg.eval_every_round or cfg.test_loss_every_round else history[-1:],
           "trainable_params": trainable, "communicated_params": upload_params if communicates else 0,
           "ata": ata_log, "recipe": recipe(cfg), "config": asdict(cfg)}
    fleet.save(out, downloads)
    return report.write_results(out, res, log)


# ----------------------------------------------------------------------------- the clients, in this process
class Simulation:
    """The fleet of run.py: every client's encoded data and private state in this process, trained
    one after another. Centralized ("pooled") trains one client holding the union of every client's
    training data, with the federation's total number of steps, and evaluates that one model on
    each client's own test set."""
    engine = "run.py"

    def __init__(self, bb, cts, cfg: Config, log=print):
        self.bb, self.cts, self.cfg, self.log = bb, cts, cfg, log
        self.tasks = sorted({ct.task for ct in cts}, key=data.TASKS.index)
        self.faults = parse_faults(cfg.faults)
        self.pooled = METHODS[cfg.method].pooled
        if self.pooled:   # its task is "all"; K x --local-steps a round (with whole epochs, an epoch of the union)
            self.trainers = [features.ClientTensors(-1, "all", torch.cat([ct.h_train for ct in cts]),
                                                    features.Tokens(i for ct in cts for i in ct.items_train),
                                                    cts[0].h_test[:0], features.Tokens(), [])]
            self.train_cfg, self.train_tasks = replace(cfg, local_steps=cfg.local_steps * len(cts)), ["all"]
        else:
            self.trainers, self.train_cfg, self.train_tasks = cts, cfg, self.tasks
        self.ids = [ct.id for ct in self.trainers]
        self.tasks_of = [ct.task for ct in self.trainers]
        self.n = [len(ct.items_train) for ct in self.trainers]
        self.private = [{} for _ in self.trainers]
        self.pending = [{} for _ in self.trainers]   # this round's private states, kept only if the upload is accepted

    def state(self):
        return {"private": self.private, "pending": self.pending}

    def progress(self):
        return {}

    def restore(self, groups, progress):
        self.private = [p or {} for p in groups["private"]]
        self.pending = [p or {} for p in groups["pending"]]

    def train(self, r, stage, downloads, uploads, done, commit):
        """Every client not yet done in round r, one after another; each upload lands in uploads[k]
        and the client in done (checkpointed after each with --checkpoint client)."""
        stats = []
        for k, ct in enumerate(self.trainers):
            if k in done:
                continue
            report.reset_peak_memory(self.cfg.device)
            uploads[k], self.pending[k], st = client_step(self.bb, ct, downloads[k], self.private[k], stage,
                                                          self.train_tasks, self.train_cfg, r,
                                                          fault_for(self.faults, ct.id, r))
            stats += [st] if st else []
            rss, cuda = report.peak_memory(self.cfg.device)
            trained = (f"{st['steps']} steps, loss {st['loss_first']:.3f} -> {st['loss_last']:.3f}, "
                       f"{st['seconds']:.1f} s" if st else "failed, no upload")
            who = f"client {ct.id}" if ct.id >= 0 else "the pooled client"
            self.log(f"  {who} ({ct.task}) round {r + 1}: {trained}; peak memory {rss or 0:.0f} MB resident"
                     + (f", {cuda:.0f} MB CUDA" if cuda else ""))
            done.append(k)
            if self.cfg.checkpoint == "client":
                commit()
        return stats, ""

    def settle(self, accepted):
        self.private = settle_private(self.private, self.pending, accepted)
        self.pending = [{} for _ in self.trainers]

    def _as_evaluated(self, downloads):
        """Each client's download and private state as it is evaluated (Centralized: the one model,
        its adapter read as each client's task adapter)."""
        if not self.pooled:
            return downloads, self.private
        one = lambda task: {(f"global_task_adapter.{task}." + k.split(".", 2)[2]
                             if k.startswith("global_task_adapter.") else k): v for k, v in downloads[0].items()}
        return [one(ct.task) for ct in self.cts], [self.private[0]] * len(self.cts)

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
    out, lock, saved = open_out(cfg, f"runs/scenario-{cfg.scenario}-{cfg.method}-seed{cfg.seed}")
    log(recipe_line(cfg))
    bb, theta0, expected = load_model(cfg, log)
    cfg, clients = load_clients(cfg)
    cts = [features.prepare_client(bb, c, cfg.device, cfg.max_length, log, cfg.features, cfg.features_max_mb)
           for c in clients]
    del clients     # the training samples are encoded in cts: their text and images need no memory now
    fleet = Simulation(bb, cts, cfg, log)
    log(f"scenario {cfg.scenario}, method {cfg.method}, seed {cfg.seed}: clients {[ct.id for ct in cts]}, "
        f"tasks {fleet.tasks}, train sizes {[len(ct.items_train) for ct in cts]}")
    try:
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
    except (checkpoint.CheckpointError, llava.DataError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)   # one line, exit 2, as for a bad command line
        raise SystemExit(2)


if __name__ == "__main__":
    main()
