"""
The federated loop as a library: `federate` drives any fleet of clients through R1 rounds of stage 1
and R2 of stage 2, with the server's step, checkpoints, resume, accounting and results written
once. run.py hands it a fleet trained in its own process (run.Simulation); flower_app.py a fleet of
Flower SuperNodes on other machines (flower_app.Fleet). Anything that implements `Fleet` below can
drive the same loop.

    bb, theta0, expected = load_model(cfg)               # the backbone with Θ^l_0 installed
    cfg, clients = load_clients(cfg)                     # the scenario's or the manifest's clients
    out, lock, saved = open_out(cfg, "runs/x")           # OUT, its lock, the checkpoint to resume
    res = federate(cfg, fleet, theta0, expected, out, saved)

The loop's state is one Progress (JSON) plus tensors: each client's download and the fleet's shared
state, written after every aggregation, and each client's turn (its upload and what its training
changed), written after that client when cfg.checkpoint is "client" (checkpoint.py).
"""
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Protocol

import torch

import backbone as bbmod
import checkpoint
import data
import llava
import pilot
import report
import server
from config import METHODS, Config, final_stage, recipe, stage_of

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The settings a --resume may change: where the run writes and on what device, where the backbone's
# files may come from, how often it checkpoints, where H_v lives, and what the evaluation adds (batch
# size, the per-round figures).
# Every other Config field must equal the checkpointed run's, a field added later included.
RESUME_MAY_DIFFER = ("out", "device", "allow_download", "resume", "checkpoint", "grad_ckpt", "features", "features_max_mb",
                     "eval_batch_size", "eval_every_round", "test_loss_every_round")


# ----------------------------------------------------------------------------- set-up
def load_model(cfg: Config, log=print):
    """The frozen backbone with Θ^l installed at its initial value; returns (bb, Θ^l_0, expected),
    expected being what the server accepts from a client: {key: (shape, dtype)}."""
    bb = bbmod.load_backbone(cfg.backbone, device=cfg.device, dtype=DTYPES[cfg.dtype], log=log,
                             allow_download=cfg.allow_download)
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


def resume_differences(saved: dict, cfg: Config) -> list:
    """What differs between the config a run was checkpointed with and cfg, one phrase each: every
    Config field but RESUME_MAY_DIFFER. A field the checkpoint predates is read as its default."""
    default, now = asdict(Config(backbone=cfg.backbone)), asdict(cfg)
    keys = [f.name for f in fields(Config) if f.name not in RESUME_MAY_DIFFER]
    was = {k: saved.get(k, default[k]) for k in keys}
    return [f"{k} (saved {was[k]!r}, now {now[k]!r})" for k in keys if was[k] != now[k]]


def open_out(cfg: Config, default: str):
    """(OUT, its lock, the checkpoint to resume from or None). One writer per OUT: the kernel drops
    the lock when the process dies. A --resume first checks that the run in OUT was started with
    cfg's settings (resume_differences), raising a CheckpointError that names each one that differs."""
    import fcntl
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
    differ = resume_differences(meta["config"], cfg)
    recipe_key = backbone_recipe(cfg)   # 'tiny' after a change of its recipe is another backbone
    if meta.get("backbone_recipe", recipe_key) != recipe_key:
        differ.append(f"the tiny backbone's recipe (saved {meta['backbone_recipe']!r}, now {recipe_key!r})")
    if differ:
        raise checkpoint.CheckpointError(f"--resume: the run in {out} was started with other settings: " + ", ".join(differ))
    return out, lock, checkpoint.load(out)


# ----------------------------------------------------------------------------- the fleet federate drives
class Fleet(Protocol):
    """The clients of a run, as federate drives them. Positions k = 0..K-1 are the fleet's own order;
    ids[k] names client k in logs and results. The server trusts only ids, tasks_of and n, which
    come from the scenario or manifest on the server's side, never from a client's word."""
    engine: str           # who trains the clients, written in results.json: "run.py", "flower"
    ids: list             # each client's id (its scenario index, or the pooled trainers' negative ids)
    tasks_of: list        # each client's task
    n: list               # each client's number of training samples, n_k: what FedAvg, the task-aware
                          # average and ATA's λ_k weigh by
    tasks: list           # the distinct tasks of the run in router order (data.TASKS): CT-MoA's experts

    def train(self, r: int, stage: int, downloads: list, uploads: list, done: list,
              turn: Callable[[int], None]) -> tuple:
        """Round r (0-based) of `stage`: every client k not in `done` trains from downloads[k] and
        its own private state, puts its upload (a state dict, or None when it failed) in uploads[k],
        appends k to done and calls turn(k) (which checkpoints that client's turn). Returns
        (a stats dict per client trained: loss_last, trainable_params, upload_params; a note for the
        round's log line)."""

    def settle(self, accepted: list) -> None:
        """The server's verdict on this round's uploads: client k keeps the private state its
        training produced when accepted[k], else rolls back to the state it had before the round."""

    def evaluate(self, downloads: list, stage: int, scores: bool = True) -> list:
        """Each client's results row (evaluate.evaluate_client) with what it downloaded last and its
        private state, in the connector of `stage`; scores=False: the test loss only."""

    def save(self, out: Path, downloads: list) -> None:
        """Each client's final state, OUT/client_<id>.safetensors (download + private tensors)."""

    def state(self) -> dict:
        """The fleet's tensors that change only at an aggregation, checkpointed with it: groups of
        per-client state dicts, {name: [dict per client]} ({} when the clients keep their own)."""

    def turn_state(self, k: int) -> dict:
        """What client k's turn changed besides its upload, checkpointed right after it: {name: dict}."""

    def progress(self) -> dict:
        """The fleet's own JSON-able progress (checkpointed with the loop's)."""

    def restore(self, groups: dict, progress: dict) -> None:
        """Continue from a checkpoint: groups holds state()'s groups and every turn_state name, by position."""


@dataclass
class Progress:
    """The loop's whole state besides tensors, saved in every checkpoint and restored whole."""
    round: int = 0                  # rounds aggregated so far: the round being trained is round + 1
    done: list = field(default_factory=list)         # positions of the clients done in that round
    bytes_up: int = 0               # bytes of the uploads the server received, all rounds so far
    bytes_down: int = 0             # bytes of the downloads it sent (Θ^l_0 to every client included)
    losses: list = field(default_factory=list)       # the clients' last training loss, this round
    trainable: int = 0              # the most parameters a client trained in a round
    upload_params: int = 0          # the most parameters a client uploaded in a round
    history: list = field(default_factory=list)      # the per-round figures (--eval-every-round ...)
    ata: list = field(default_factory=list)          # what ATA did each round (server.ata_record)
    elapsed: float = 0.0            # seconds spent before this process started (a resumed run)
    fleet: dict = field(default_factory=dict)        # the fleet's own progress (Fleet.progress)


# ----------------------------------------------------------------------------- the loop
def federate(cfg: Config, fleet: Fleet, theta0, expected, out: Path, saved=None, log=print, t0=None):
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
        p = Progress(**meta["progress"])
        downloads, uploads = groups.pop("downloads"), groups.pop("uploads", None) or [None] * K
        fleet.restore(groups, p.fleet)
        log(f"resumed from {out}/state.json: round {p.round + 1}, clients done in it {[fleet.ids[k] for k in p.done]}")
    else:
        downloads, uploads = [dict(theta0) for _ in range(K)], [None] * K
        p = Progress(bytes_down=sum(report.nbytes(d) for d in downloads) if communicates else 0)

    def meta():
        p.fleet = fleet.progress()
        return {"config": asdict(cfg), "backbone_recipe": backbone_recipe(cfg), "engine": fleet.engine,
                "progress": asdict(replace(p, elapsed=p.elapsed + time.time() - t0))}

    def turn(k):   # client k's turn is over: its upload and what its training changed
        if cfg.checkpoint == "client":
            checkpoint.save_turn(out, meta(), k, {"uploads": uploads[k] or {}, **fleet.turn_state(k)})

    def aggregated():
        checkpoint.save_round(out, meta(), {"downloads": downloads, **fleet.state()})

    if not saved:
        aggregated()
    for r in range(p.round, rounds):
        stage, tr = stage_of(cfg, r), time.time()
        stats, note = fleet.train(r, stage, downloads, uploads, p.done, turn)
        for st in stats:
            p.losses.append(st["loss_last"])
            p.trainable = max(p.trainable, int(st["trainable_params"]))
            p.upload_params = max(p.upload_params, int(st["upload_params"]))
        ata_did = {}
        ru = sum(report.nbytes(u) for u in uploads if u is not None) if communicates else 0
        downloads, accepted = server.server_step(uploads, downloads, fleet.tasks_of, fleet.n, expected, cfg,
                                                 fleet.ids, log, ata_did)
        fleet.settle(accepted)
        rd = sum(report.nbytes(d) for d in downloads) if communicates else 0
        p.bytes_up, p.bytes_down = p.bytes_up + ru, p.bytes_down + rd
        line = (f"round {r + 1}/{rounds} (stage {stage}): mean last loss {sum(p.losses) / max(1, len(p.losses)):.3f}, "
                f"up {ru / 1e6:.2f} MB, down {rd / 1e6:.2f} MB, {time.time() - tr:.1f} s{note}")
        if "neighbours" in ata_did:
            p.ata.append({"round": r + 1, **server.ata_record(ata_did["neighbours"], fleet.tasks_of,
                                                              ata_did["weights"], fleet.ids)})
            line += f", ATA neighbours of the client's own task {p.ata[-1]['same_task_mean']:.2f}"
        if r < rounds - 1 and (cfg.eval_every_round or cfg.test_loss_every_round):
            rows = fleet.evaluate(downloads, stage, scores=cfg.eval_every_round)
            entry = dict(zip(("per_task", "average"), report.summarise_rows(rows, fleet.tasks))) \
                if cfg.eval_every_round else {}
            per_task_ce, average_ce = report.summarise_rows(rows, fleet.tasks, "test_ce", 4)
            p.history.append({"round": r + 1, **entry, "per_task_ce": per_task_ce, "average_ce": average_ce})
            line += (f", average score {entry['average']:.1f}" if entry else "") + f", test loss {average_ce:.3f}"
        log(line)
        uploads, p.done, p.losses, p.round = [None] * K, [], [], r + 1
        aggregated()

    # the connector of the last round trained, also when a resumed run has no round left to train
    rows = fleet.evaluate(downloads, final_stage(cfg), scores=True)
    per_task, average = report.summarise_rows(rows, fleet.tasks)
    per_task_ce, average_ce = report.summarise_rows(rows, fleet.tasks, "test_ce", 4)
    history = p.history + [{"round": rounds, "per_task": per_task, "average": average, "per_task_ce": per_task_ce,
                            "average_ce": average_ce}]
    res = {"scenario": cfg.scenario, "seed": cfg.seed, "method": cfg.method, "backbone": cfg.backbone,
           "engine": fleet.engine, "clients": rows, "per_task": per_task, "average": average,
           "per_task_ce": per_task_ce, "average_ce": average_ce, "bytes_up": p.bytes_up, "bytes_down": p.bytes_down,
           "wall_s": round(p.elapsed + time.time() - t0, 1),
           "rounds": history if cfg.eval_every_round or cfg.test_loss_every_round else history[-1:],
           "trainable_params": p.trainable, "communicated_params": p.upload_params if communicates else 0,
           "ata": p.ata, "recipe": recipe(cfg), "config": asdict(cfg)}
    fleet.save(out, downloads)
    return report.write_results(out, res, log)

