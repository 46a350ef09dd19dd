"""
Pilot federated multimodal instruction tuning, simulated: clients are trained one after another in
a plain Python loop on one machine, the server aggregates their uploads between rounds.

    python run.py --scenario A                    # embedded tiny backbone and synthetic data, CPU
    python run.py --scenario B --seed 1 --out runs/b1

The two sides are separate functions with plain state-dict inputs and outputs, so that another
engine can call them:
    client_round(...)  train one client for one round from its download and private state
                       -> (upload, new private state, stats)
    server_round(...)  aggregate the uploads -> each client's download
client_step (client_round + fault injection) and server_step (upload checks + server_round) are
what this loop and flower_app.py (the same steps on Flower, clients on other machines) both call.
The command line (every Config field as a flag) is cli.py's.
Writes OUT/results.json, OUT/results.md and OUT/client_<k>.safetensors (each client's final state:
what it downloaded last plus its private tensors).
"""
import fcntl
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

import aggregate
import backbone as bbmod
import checkpoint
import data
import faults
import features
import pilot
import report

# ----------------------------------------------------------------------------- defaults, in one place
# The schedules behind Config's None fields. "tiny": the embedded benchmark, in the federated-learning
# convention (PILOT_METHOD.md, Schedule): every client takes the same number of steps per round, many
# short rounds, one learning-rate schedule over the whole run. "real": the paper's (R = 1 + 3 rounds
# of whole local epochs, LoRA r 64, alpha 128) for LLaVA checkpoints.
PRESETS = {
    # tiny: one peak rate for both stages (RESULTS.md, steps 47-51: at 6e-3 in stage 2 the bounds and
    # FedAvg spread over seeds more); real: stage 2 at twice stage 1's rate, as in the paper
    "tiny": dict(rounds_stage1=4, rounds_stage2=16, local_steps=10, lora_r=8, lora_alpha=16.0, lr_stage2=3e-3,
                 checkpoint="round"),
    "real": dict(rounds_stage1=1, rounds_stage2=3, local_steps=0, lora_r=64, lora_alpha=128.0, lr_stage2=6e-3,
                 checkpoint="client"),
}


@dataclass
class Config:
    scenario: str = "A"
    method: str = "pilot"
    seed: int = 0
    # the synthetic data's draw: 0, the benchmark's one world, whatever the seed, so that seeds vary the
    # training (adapters' init, batch order) and nothing else; None: each seed draws its own data
    data_seed: int = 0
    # None: the backbone's preset (PRESETS above: the embedded benchmark's schedule, or the paper's)
    rounds_stage1: int = None   # R1 [reading]: stage 1 for the first R1 rounds
    rounds_stage2: int = None   # R2: stage 2 (CT-MoA) for the next R2 rounds
    local_steps: int = None     # optimiser steps per client per round; 0: E whole epochs instead
    local_epochs: int = 1       # E, when local_steps is 0
    top_m: int = None           # M nearest neighbours in ATA; None: min(3, K − 1) for K clients
    backbone: str = "tiny"
    out: str = ""
    device: str = "cpu"
    # optimisation (tiny-backbone scale; the paper's 7B run uses 2e-5 / 4e-5 with r 64, alpha 128)
    lr_stage1: float = 3e-3
    lr_stage2: float = None     # None: the preset's (3e-3 tiny; 6e-3 real, twice stage 1's as in the paper)
    lambda_d: float = pilot.LAMBDA_D   # λ0, difference loss L_d (stage 1)
    lambda_b: float = pilot.LAMBDA_B   # λ1, load balance L_b (stage 2)
    lambda_z: float = pilot.LAMBDA_Z   # λ2, router z-loss L_z (stage 2)
    batch_size: int = 8
    warmup_ratio: float = 0.03  # of each client's steps over the whole run (one cosine schedule, not one per round)
    grad_clip: float = 1.0      # clip the gradient norm of each step to this; 0: off
    loss_mean: str = "tokens"   # training loss: mean over the batch's answer tokens, or "samples" (lm_loss)
    lora_r: int = None          # None: the preset's (8 tiny, 64 real checkpoints, the paper's)
    lora_alpha: float = None    # None: the preset's (16 tiny, 128 real)
    lora_targets: str = ",".join(pilot.LORA_TARGETS)
    dtype: str = "fp32"         # frozen weights' dtype: fp32 or bf16 (trainable tensors stay fp32)
    grad_ckpt: bool = False     # gradient checkpointing in the LLM
    grad_accum: int = 1
    max_length: int = 2048      # tokens; longer samples lose instruction words, never answer words
    features: str = "auto"      # where H_v lives: "memory", "disk" (cache file, memory-mapped), "auto" (features.py)
    features_max_mb: float = 1024.0   # "auto": a client's H_v above this many MB goes to the disk cache
    data: str = ""              # a scenario manifest of LLaVA-format data (default: synthetic scenario)
    formats: str = ""           # synthetic data: changes to the benchmark's knobs, e.g. "box_objects=3" (data.FORMATS)
    eval_batch_size: int = 50
    mu: float = 0.01            # FedProx's μ
    eval_every_round: bool = False    # every client's score and test loss after every round
    # every client's test loss (teacher-forced) after every round, without generating answers: the
    # round-by-round curve of a comparison (about 1.2 s a round for Scenario A's 6 x 400 test samples)
    test_loss_every_round: bool = False
    # reliability
    resume: bool = False        # continue the run checkpointed in OUT
    # when the federation state is written: "client" after every client and every aggregation, "round" after
    # every aggregation only (a tiny client round takes half a second, a checkpoint 70-90 ms)
    checkpoint: str = None
    faults: str = ""            # fault injection, e.g. "client=3:nan", "client=3:scale=100", "client=3:drop"
    norm_screen: float = 5.0    # [our addition beyond the paper] reject updates above this x the round's median norm; 0: off
    # shrinking the scenario (tests, quick looks): None keeps the scenario's own sizes
    clients: list = None
    n_train: int = None
    n_test: int = None

    def __post_init__(self):   # None: the backbone's preset
        for key, value in PRESETS["tiny" if self.backbone == "tiny" else "real"].items():
            if getattr(self, key) is None:
                setattr(self, key, value)


COMPARISON_SEEDS = [0, 1, 2, 3, 4]   # a comparison's seeds unless --seeds is given
MAX_NEW_TOKENS = {"caption": 24, "vqa": 4, "grounding": 32, "ocr": 6}   # the tiny backbone's answers, EOS included
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Method:
    """What a method does, as switches over one implementation (an ablation changes one field)."""
    connector: str = "pilot"        # "pilot" (stage 1 / CT-MoA connectors) or "mlp" (one plain projector-shaped MLP)
    client_adapter: bool = True     # ψ_s and L_d in stage 1 (and ψ_s in stage 2 when client_in_stage2)
    client_in_stage2: bool = True   # ψ_s (frozen) in the stage-2 sum
    ctmoa: bool = True              # stage 2 mixes all tasks' adapters; False: own task adapter only
    text_agg: str = "ata"           # Θ^l: "ata", "fedavg" or "none" (no communication)
    visual_agg: str = "task"        # connector: "task" (per task), "all" (FedAvg over clients) or "none"
    prox: bool = False              # FedProx's proximal term (μ/2)||θ − θ_round_start||² (μ = --mu)
    pooled: bool = False            # one model trained on the union of all clients' training data


# Local and Centralized are the bounds every table shows: no collaboration, and pooling all the data
# (one LoRA + plain MLP connector, the federation's total number of steps, scored on each client's
# own test set; PILOT_METHOD.md, "Baselines and ablations").


METHODS = {
    "local": Method(connector="mlp", text_agg="none", visual_agg="none"),
    "centralized": Method(connector="mlp", text_agg="none", visual_agg="none", pooled=True),
    "fedavg": Method(connector="mlp", text_agg="fedavg", visual_agg="all"),
    "fedprox": Method(connector="mlp", text_agg="fedavg", visual_agg="all", prox=True),
    "pilot": Method(),
    "pilot-no-stage1": Method(client_adapter=False),
    "pilot-no-ctmoa": Method(ctmoa=False),
    "pilot-no-ata": Method(text_agg="fedavg"),
    "pilot-no-client-s2": Method(client_in_stage2=False),
}


# ----------------------------------------------------------------------------- client side
def loss_weights(cfg: Config) -> dict:
    """The auxiliary losses' weights λ0, λ1, λ2, as the connectors take them."""
    return {"lambda_d": cfg.lambda_d, "lambda_b": cfg.lambda_b, "lambda_z": cfg.lambda_z}


def build_connector(bb, stage, tasks, own_task, download, private, seed, method=METHODS["pilot"], weights=None):
    """The connector a client trains (or is evaluated with) in this stage, from its download and
    private state. Round 1 has no global task adapters yet: ψ_t starts from the projector.
    weights: loss_weights(cfg); None keeps the paper's λ0, λ1, λ2."""
    w = {"lambda_d": pilot.LAMBDA_D, "lambda_b": pilot.LAMBDA_B, "lambda_z": pilot.LAMBDA_Z, **(weights or {})}
    c_v, c = bb.dims
    proj = pilot.projector_state(bb.model)
    # a task whose clients have never had an upload accepted has no global adapter yet: the projector
    globals_ = {t: pilot.sub_state(download, f"global_task_adapter.{t}.") or proj for t in tasks}
    if method.connector == "mlp":  # FedAvg family and Local: the projector-shaped MLP alone
        return pilot.build_stage1(c_v, c, proj, globals_[own_task], use_client=False)
    if stage == 1:
        return pilot.build_stage1(c_v, c, proj, globals_[own_task], private, method.client_adapter,
                                  lambda_d=w["lambda_d"])
    return pilot.build_ctmoa(c_v, c, proj, tasks if method.ctmoa else [own_task], own_task, globals_, private,
                             use_client=method.client_adapter and method.client_in_stage2, seed=seed,
                             lambda_b=w["lambda_b"], lambda_z=w["lambda_z"])


def steps_per_round(cfg: Config, n):
    """Optimiser steps a client with n training samples takes per round: --local-steps, or E whole
    epochs of batch_size x grad_accum samples per step when --local-steps is 0."""
    if cfg.local_steps:
        return cfg.local_steps
    return cfg.local_epochs * math.ceil(math.ceil(n / cfg.batch_size) / cfg.grad_accum)


def batch_stream(n, size, g):
    """Index batches without replacement, reshuffled at every pass over the n samples."""
    while True:
        yield from torch.randperm(n, generator=g).split(size)


def load_text_adapter(model, download):
    """Copy the downloaded Θ^l into the LLM's LoRA parameters."""
    live = pilot.lora_state(model)
    with torch.no_grad():
        for k, p in live.items():
            p.copy_(download[k])


def client_round(bb, ct: features.ClientTensors, download, private, stage, tasks, cfg: Config, round_idx, log_bar=None):
    """One client, one round of local training. Returns (upload, private, stats): the upload holds
    'task_adapter.*' (Θ^a) and 'lora.*' (Θ^l); ψ_s, ψ^c and φ stay in private. A progress bar is
    drawn only on a terminal (log_bar None: when stderr is one); a log file gets the round lines."""
    t0 = time.time()
    log_bar = sys.stderr.isatty() if log_bar is None else log_bar
    model = bb.model
    device = model.device
    method = METHODS[cfg.method]
    load_text_adapter(model, download)
    conn = build_connector(bb, stage, tasks, ct.task, download, private, cfg.seed * 1000 + ct.id, method,
                           loss_weights(cfg)).to(device)
    trainable = pilot.trainable_parameters(model, conn)
    params = list(trainable.values())
    anchor = [p.detach().clone() for p in params] if method.prox else None
    lr = cfg.lr_stage1 if stage == 1 else cfg.lr_stage2
    # foreach: a handful of calls per step over all tensors rather than several per tensor. It is
    # torch's default on CUDA; on the CPU it does the same arithmetic, bit for bit (the same runs, the
    # same predictions), and a tiny local step takes 1-2 ms less of 33-38 ms (README, "Time and memory").
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    n = len(ct.items_train)
    steps = steps_per_round(cfg, n)
    # one cosine schedule over the client's steps of the whole run, continued from round to round
    total = steps * (cfg.rounds_stage1 + cfg.rounds_stage2)
    sched = bbmod.cosine_schedule(opt, total, max(1, round(cfg.warmup_ratio * total)), offset=round_idx * steps)
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + round_idx * 1009 + ct.id)
    batches = batch_stream(n, cfg.batch_size, g)   # batch_size per forward pass, grad_accum of them per step
    bar = tqdm(total=steps, desc=f"  client {ct.id} ({ct.task}, stage {stage})", leave=False, disable=not log_bar)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.grad_accum):
            idx = next(batches)
            ids, mask, labels = bbmod.collate([ct.items_train[i] for i in idx], bb.tokenizer.pad_token_id)
            # the connector runs in fp32 (its tensors are trainable); embed() casts to the LLM's dtype
            x_img, aux = conn(ct.h_train[idx].to(device).float())
            ce = pilot.lm_loss(model, x_img, ids.to(device), mask.to(device), labels.to(device),
                               reduction={"tokens": "mean", "samples": "sample"}[cfg.loss_mean])
            loss = ce + aux
            if anchor is not None:  # FedProx: stay near the round's starting point
                loss = loss + cfg.mu / 2 * sum((p - a).pow(2).sum() for p, a in zip(params, anchor))
            (loss / cfg.grad_accum).backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        opt.step()
        sched.step()
        losses.append(ce.item())
        bar.update()
        bar.set_postfix(ce=f"{ce.item():.3f}", aux=f"{aux.item():.3f}")
    bar.close()
    model.eval().requires_grad_(False)
    up_conn, new_private = pilot.split_connector_state(conn)
    # what leaves the client is a plain CPU state dict, whatever device trained it
    upload = {**{k: v.cpu() for k, v in up_conn.items()},
              **{k: v.detach().to("cpu", torch.float32, copy=True) for k, v in pilot.lora_state(model).items()}}
    new_private = {k: v.cpu() for k, v in new_private.items()}
    stats = {"loss_first": losses[0], "loss_last": losses[-1], "steps": steps, "seconds": time.time() - t0,
             "trainable_params": sum(p.numel() for p in params), "upload_params": sum(v.numel() for v in upload.values())}
    del opt, sched, conn, trainable, params, anchor  # nothing of this client's optimisation outlives its round
    return upload, {**private, **new_private}, stats


def client_model(bb, task, download, private, stage, tasks, cfg: Config):
    """A client's model as it is evaluated: the downloaded Θ^l in the LLM and the connector of
    `stage` built from its download and private state (returns the connector, in eval mode)."""
    load_text_adapter(bb.model, download)
    return build_connector(bb, stage, tasks, task, download, private, 0, METHODS[cfg.method],
                           loss_weights(cfg)).to(bb.model.device).eval()


@torch.no_grad()
def answer(bb, conn, task, h_v, prompts, cfg: Config):
    """Greedy answers to encoded prompts about images with features h_v, eval_batch_size at a
    time, with the model client_model() set up."""
    preds = []
    for i in range(0, len(prompts), cfg.eval_batch_size):
        batch = prompts[i:i + cfg.eval_batch_size]
        x_img, _ = conn(h_v[i:i + len(batch)].to(bb.model.device).float())
        ids, mask = bbmod.collate_prompts(batch, bb.tokenizer.pad_token_id)
        # the tiny backbone's answers have known lengths (a named box: up to 29 tokens), also when its
        # data come from files (--data); a real model's answers stop at EOS within 64
        limit = MAX_NEW_TOKENS[task] if cfg.backbone == "tiny" else 64
        out = pilot.generate(bb.model, x_img, ids.to(bb.model.device), mask.to(bb.model.device), limit,
                             bb.tokenizer.eos_token_id, bb.tokenizer.pad_token_id)
        preds += bb.tokenizer.batch_decode(out, skip_special_tokens=True)
    return [p.strip() for p in preds]


@torch.no_grad()
def test_loss(bb, conn, h_v, items, cfg: Config):
    """Mean answer-token cross-entropy of (prompt, answer) items, teacher-forced."""
    ce_sum, n_tokens = 0.0, 0
    for i in range(0, len(items), cfg.eval_batch_size):
        batch = items[i:i + cfg.eval_batch_size]
        x_img, _ = conn(h_v[i:i + len(batch)].to(bb.model.device).float())
        ids, mask, labels = bbmod.collate(batch, bb.tokenizer.pad_token_id)
        dev = bb.model.device
        ce_sum += float(pilot.lm_loss(bb.model, x_img, ids.to(dev), mask.to(dev), labels.to(dev), reduction="sum"))
        n_tokens += int((labels[:, 1:] != -100).sum())
    return ce_sum / max(1, n_tokens)


def evaluate_client(bb, ct: features.ClientTensors, download, private, stage, tasks, cfg: Config):
    """Greedy answers on the client's held-out test set with what it downloaded plus its private
    tensors; returns (score in percent units, predictions, each prediction's score, test loss). The
    test loss is the mean answer-token cross-entropy, teacher-forced: a smooth measure beside the
    generated answers' score, which moves only when a whole answer changes."""
    conn = client_model(bb, ct.task, download, private, stage, tasks, cfg)
    preds = answer(bb, conn, ct.task, ct.h_test, [p for p, _ in ct.items_test], cfg)
    items = data.item_scores(ct.task, preds, ct.test)
    return sum(items) / len(items), preds, items, test_loss(bb, conn, ct.h_test, ct.items_test, cfg)


# ----------------------------------------------------------------------------- server side
def server_round(uploads, tasks, n, top_m, method=METHODS["pilot"], previous=None, consume=False, record=None):
    """Aggregate one round's uploads (client order) into each client's download. Pilot: all T
    global task adapters ψ^t_τ (task-aware visual aggregation) and the client's own Θ̄^l_k (ATA).
    FedAvg: the one sample-weighted average of both. Local ("none"): the client's own upload back.
    An upload that is None (rejected, or the client failed) takes no part: that client keeps its
    previous Θ^l (and receives the new global adapters), a task with no upload keeps its previous
    global task adapter, and a round with no usable upload changes nothing. consume=True lets ATA
    write the downloads into the uploads' own Θ^l tensors (each upload must have its own).
    record: a dict that receives ATA's neighbours N_M(k) and the weights of client k's Θ̄^l_k (its
    own λ_k and each neighbour's (1 − λ_k) w_kj), by client index (what ATA did)."""
    ok = [k for k, u in enumerate(uploads) if u is not None]
    if not ok:                                   # nothing usable: the server state stays as it was
        return list(previous)
    ups, tk, nk = [uploads[k] for k in ok], [tasks[k] for k in ok], [n[k] for k in ok]
    K = len(ok)
    adapters = [pilot.sub_state(u, "task_adapter.") for u in ups]
    text = [{k: v for k, v in u.items() if k.startswith("lora.")} for u in ups]
    if method.text_agg == "ata":
        text, A, nb = aggregate.adaptive_text(text, nk, top_m, inplace=consume)
        if record is not None:
            record["neighbours"] = {ok[i]: [ok[j] for j in row] for i, row in enumerate(nb)}
            record["weights"] = {ok[i]: {ok[j]: float(A[i, j]) for j in [i, *row]} for i, row in enumerate(nb)}
    elif method.text_agg == "fedavg":
        text = [aggregate.fedavg(text, nk)] * K
    prefixed = lambda task, sd: {f"global_task_adapter.{task}.{k}": v for k, v in sd.items()}
    if method.visual_agg == "task":
        shared = {}
        for t in sorted(set(tasks), key=tasks.index):   # tasks without an upload keep their adapter
            shared.update({k: v for k, v in (previous[ok[0]] if previous else {}).items()
                           if k.startswith(f"global_task_adapter.{t}.")})
        for t, sd in aggregate.task_aware_visual(adapters, tk, nk).items():
            shared.update(prefixed(t, sd))
        visual = [shared] * K
    elif method.visual_agg == "all":
        avg = aggregate.fedavg(adapters, nk)
        visual = [prefixed(tk[i], avg) for i in range(K)]
    else:
        visual = [prefixed(tk[i], adapters[i]) for i in range(K)]
    out = list(previous) if previous else [None] * len(uploads)
    for i, k in enumerate(ok):
        out[k] = {**visual[i], **text[i]}
    if method.visual_agg != "none":      # clients left out still get the new global adapters
        for k in set(range(len(uploads))) - set(ok):
            mine = visual[0] if method.visual_agg == "task" else prefixed(tasks[k], avg)
            out[k] = {**{key: v for key, v in previous[k].items() if key.startswith("lora.")}, **mine}
    return out


def screen_uploads(uploads, downloads, tasks, expected, norm_factor, log=print):  # expected: {key: (shape, dtype)}
    """The server's checks before aggregation: exact keys, shapes, dtypes, finite values
    (aggregate.validate_upload), then [our addition beyond the paper] an update-norm screen against
    the round's median (norm_factor; 0 turns it off). Rejected uploads become None, with a reason logged."""
    out = list(uploads)
    for k, u in enumerate(uploads):
        if u is None:
            continue
        reason = aggregate.validate_upload(u, expected)
        if reason:
            log(f"  rejected the upload of client {k}: {reason}")
            out[k] = None
    if norm_factor:
        refs = [{**{key: v for key, v in d.items() if key.startswith("lora.")},
                 **{"task_adapter." + key: v for key, v in pilot.sub_state(d, f"global_task_adapter.{tasks[k]}.").items()}}
                for k, d in enumerate(downloads)]
        norms = [aggregate.update_norm(u, refs[k]) if u is not None else None for k, u in enumerate(out)]
        for k, keep in enumerate(aggregate.norm_screen(norms, norm_factor)):
            if out[k] is not None and not keep:
                log(f"  rejected the upload of client {k}: update norm {norms[k]:.3g} above {norm_factor:g} x the round's median")
                out[k] = None
    return out


# ----------------------------------------------------------------------------- set-up shared by both engines
def load_model(cfg: Config, log=print):
    """The frozen backbone with Θ^l installed at its initial value; returns (bb, Θ^l_0, expected),
    expected being what the server accepts from a client: {key: (shape, dtype)}."""
    bb = bbmod.load_backbone(cfg.backbone, device=cfg.device, dtype=DTYPES[cfg.dtype], log=log)
    # Θ^l's initial value is the server's: one seed, the same for every client, so that ATA's
    # distances measure what local training changed, not initialisation noise.
    pilot.install_lora(bb.model.model.language_model, cfg.lora_r, cfg.lora_alpha, targets=tuple(cfg.lora_targets.split(",")), seed=cfg.seed)
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
        name, clients = data.load_manifest(cfg.data, keep=cfg.clients)
        return replace(cfg, scenario=name), clients
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    return cfg, data.make_scenario(cfg.scenario, data_seed, cfg.clients, cfg.n_train, cfg.n_test,
                                   data.parse_formats(cfg.formats))


def stage_of(cfg: Config, r):
    """[reading] stage 1 for the first R1 rounds, stage 2 (CT-MoA) for the next R2."""
    return 1 if r < cfg.rounds_stage1 else 2


def final_stage(cfg: Config):
    """The stage whose connector the final evaluation uses: the last round's (1 when there is none)."""
    rounds = cfg.rounds_stage1 + cfg.rounds_stage2
    return stage_of(cfg, rounds - 1) if rounds else 1


def with_defaults(cfg: Config, log=print) -> Config:
    """Settings whose default depends on the federation: ATA's M, when not given, is min(3, K − 1)
    (at least 1), so that the default fits a federation of any size."""
    if cfg.top_m is not None:
        return cfg
    k = federation_size(cfg)
    m = max(1, min(3, k - 1))
    log(f"--top-m not given: M = min(3, K - 1) = {m} for K = {k} clients")
    return replace(cfg, top_m=m)


def settle_private(private, pending, accepted):
    """A client's private state after the server's verdict on its upload: the state its training
    produced (pending) when the upload was accepted; the state it had before the round when it was
    rejected (the training that produced it is discarded with the upload); unchanged for a client
    that failed (pending is then the state it had)."""
    return [p if ok else old for old, p, ok in zip(private, pending, accepted)]


def client_step(bb, ct, download, private, stage, tasks, cfg: Config, round_idx, fault=None, log_bar=None):
    """What a client does in a round, fault injection included: client_round, then the fault.
    Returns (upload or None when the client failed, private state, stats or None)."""
    if fault == "drop":      # the client crashed mid-training: no upload, state unchanged
        return None, private, None
    up, private, stats = client_round(bb, ct, download, private, stage, tasks, cfg, round_idx, log_bar=log_bar)
    return faults.apply_fault(fault, up, download, ct.task), private, stats


def server_step(uploads, downloads, tasks_of, n, expected, cfg: Config, log=print, record=None):
    """What the server does in a round: check the uploads (screen_uploads), then aggregate them
    (server_round) into each client's next download. uploads[k] is None for a client that failed.
    Returns (downloads, accepted): accepted[k] tells client k whether its upload was used, so that
    it keeps or rolls back the private state of that round (settle_private)."""
    method = METHODS[cfg.method]
    communicates = method.text_agg != "none"    # Local's uploads are its own: nothing to screen
    screened = screen_uploads(uploads, downloads, tasks_of, expected, cfg.norm_screen if communicates else 0, log)
    accepted = [u is not None for u in screened]
    # consume: the uploads' Θ^l tensors (each client's own, received by the server) become the
    # downloads, so the server holds K text adapters once, not twice
    return server_round(screened, tasks_of, n, cfg.top_m, method, previous=downloads, consume=True,
                        record=record), accepted


def ata_record(neighbours, tasks_of, weights=None, ids=None):
    """What ATA did in a round, for results.json: each client's N_M(k), the fraction of it that
    holds the client's own task, and (weights given) how much of the client's Θ̄^l_k comes from
    clients of other tasks: Σ A_kj over neighbours j of another task. neighbours and weights are by
    position in the round; the record names clients by ids[position] (their scenario index, as in
    results.json's clients), the position itself when ids is None."""
    name = (lambda k: k) if ids is None else ids.__getitem__
    share = {k: sum(tasks_of[j] == tasks_of[k] for j in nb) / max(1, len(nb)) for k, nb in neighbours.items()}
    rec = {"neighbours": {str(name(k)): [name(j) for j in nb] for k, nb in neighbours.items()},
           "same_task": {str(name(k)): round(v, 4) for k, v in share.items()},
           "same_task_mean": round(sum(share.values()) / max(1, len(share)), 4)}
    if weights is not None:
        other = {k: sum(a for j, a in w.items() if tasks_of[j] != tasks_of[k]) for k, w in weights.items()}
        rec["weights"] = {str(name(k)): {str(name(j)): round(a, 4) for j, a in w.items()} for k, w in weights.items()}
        rec["other_task_weight"] = {str(name(k)): round(v, 4) for k, v in other.items()}
        rec["other_task_weight_mean"] = round(sum(other.values()) / max(1, len(other)), 4)
    return rec


def pooled_client(cts, cfg: Config):
    """Centralized: one client holding the union of every client's training data, with the
    federation's total number of steps per round (K x --local-steps; with whole epochs, an epoch
    of the union). Its task is "all"; it is evaluated on each client's own test set."""
    return (features.ClientTensors(-1, "all", torch.cat([ct.h_train for ct in cts]),
                                   features.Tokens(i for ct in cts for i in ct.items_train),
                                   cts[0].h_test[:0], features.Tokens(), []),
            replace(cfg, local_steps=cfg.local_steps * len(cts)))


def as_download_of(task, pooled_download):
    """The pooled model's download as a client of `task` reads it (its one adapter under that task)."""
    return {(f"global_task_adapter.{task}." + k.split(".", 2)[2] if k.startswith("global_task_adapter.") else k): v
            for k, v in pooled_download.items()}


# ----------------------------------------------------------------------------- the simulation
# the settings a --resume must share with the run it continues
RESUME_KEYS = ("scenario", "method", "backbone", "seed", "data_seed", "rounds_stage1", "rounds_stage2", "local_steps", "local_epochs", "top_m",
               "lr_stage1", "lr_stage2", "batch_size", "lora_r", "lora_alpha", "lora_targets", "dtype", "grad_accum",
               "clients", "n_train", "n_test", "data", "formats", "mu", "faults", "norm_screen", "max_length",
               "lambda_d", "lambda_b", "lambda_z", "grad_clip", "warmup_ratio", "loss_mean")


def backbone_recipe(cfg: Config):
    """The tiny backbone's cache key, which changes with its recipe; None for a checkpoint directory
    or hub id, which --backbone names itself."""
    return bbmod.tiny_backbone_key() if cfg.backbone == "tiny" else None


def resume_from(out: Path, cfg: Config):
    """(meta, groups) of the run checkpointed in out, after checking that it was started with cfg's
    settings (RESUME_KEYS); CheckpointError naming each setting that differs."""
    meta = checkpoint.read_meta(out)
    # a setting the checkpoint predates (absent from its config) had its default value then, except
    # data_seed: before it, every seed drew its own data
    default, now = asdict(Config(backbone=cfg.backbone)) | {"data_seed": None}, asdict(cfg)
    saved = {k: meta["config"].get(k, default.get(k)) for k in RESUME_KEYS}
    differ = [f"{k} (saved {saved[k]!r}, now {now.get(k)!r})" for k in RESUME_KEYS if saved[k] != now.get(k)]
    # the same name, 'tiny', after a change of its recipe is another backbone (a checkpoint that
    # predates this record is not checked)
    recipe = backbone_recipe(cfg)
    if meta.get("backbone_recipe", recipe) != recipe:
        differ.append(f"the tiny backbone's recipe (saved {meta['backbone_recipe']!r}, now {recipe!r})")
    if differ:
        raise checkpoint.CheckpointError(f"--resume: the run in {out} was started with other settings: " + ", ".join(differ))
    return checkpoint.load(out)


def evaluate_row(bb, ct, download, private, stage, tasks, cfg):
    """One client's line of the results: its score and test loss on its own test set, three examples,
    and every prediction with its score (written to OUT/predictions_client_<id>.jsonl, not to
    results.json)."""
    s, preds, items, ce = evaluate_client(bb, ct, download, private, stage, tasks, cfg)
    every = [{"id": t.id, "question": t.question, "answer": t.answer, "prediction": p, "score": round(x, 4)}
             for t, p, x in zip(ct.test, preds, items)]
    return {"id": ct.id, "task": ct.task, "n_train": len(ct.items_train), "n_test": len(ct.test),
            "metric": data.METRICS[ct.task], "score": round(s, 2), "test_ce": round(ce, 5), "examples": every[:3],
            "predictions": every}


def evaluate_all(bb, cts, downloads, private, stage, tasks, cfg):
    """Every client's score on its own test set, and the per-task and overall averages."""
    rows = [evaluate_row(bb, ct, downloads[k], private[k], stage, tasks, cfg) for k, ct in enumerate(cts)]
    return (rows, *report.summarise_rows(rows, tasks))


def run(cfg: Config, log=print):
    """One federated run of cfg.method; writes and returns results.json's content. The federation
    state is checkpointed after every aggregation, and after every client with cfg.checkpoint
    "client" (checkpoint.py); with cfg.resume the run continues from OUT's checkpoint."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    cfg = with_defaults(cfg, log)
    method = METHODS[cfg.method]
    out = Path(cfg.out or f"runs/scenario-{cfg.scenario}-{cfg.method}-seed{cfg.seed}")
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")    # one writer per OUT; the kernel drops the lock when the process dies
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise checkpoint.CheckpointError(f"{out}: another run is writing there") from None
    saved = resume_from(out, cfg) if cfg.resume else None
    bb, theta0, expected = load_model(cfg, log)
    cfg, clients = load_clients(cfg)
    tasks_of = [c.task for c in clients]
    tasks = sorted(set(tasks_of), key=data.TASKS.index)
    n = [len(c.train) for c in clients]
    cts = [features.prepare_client(bb, c, cfg.device, cfg.max_length, log, cfg.features, cfg.features_max_mb)
           for c in clients]
    del clients     # the training samples are encoded in cts: their text and images need no memory now
    injected = faults.parse_faults(cfg.faults)
    log(f"scenario {cfg.scenario}, method {cfg.method}, seed {cfg.seed}: {len(cts)} clients, "
        f"tasks {tasks}, train sizes {n}")

    communicates = method.text_agg != "none"   # Local sends and receives nothing
    rounds = cfg.rounds_stage1 + cfg.rounds_stage2
    # who trains: every client, or (centralized) one client holding the union of their data
    trainers, train_cfg, train_tasks, train_tasks_of, train_n = cts, cfg, tasks, tasks_of, n
    if method.pooled:
        pooled, train_cfg = pooled_client(cts, cfg)
        trainers, train_tasks, train_tasks_of, train_n = [pooled], ["all"], ["all"], [sum(n)]

    def for_eval(downloads, private):
        """Each client's download and private state as it is evaluated (centralized: the one model)."""
        if not method.pooled:
            return downloads, private
        return [as_download_of(ct.task, downloads[0]) for ct in cts], [private[0]] * len(cts)

    K = len(trainers)
    if saved:
        meta, groups = saved
        downloads, private = groups["downloads"], [p or {} for p in groups["private"]]
        uploads, pending = groups["uploads"], [p or {} for p in groups.get("pending") or [None] * K]
        p = meta["progress"]
        r0, done, bytes_up, bytes_down = p["round"], p["done"], p["bytes_up"], p["bytes_down"]
        history, trainable, upload_params, losses = p["history"], p["trainable"], p["upload_params"], p["losses"]
        elapsed, ata_log = p["elapsed"], p.get("ata", [])
        log(f"resumed from {out}/state.json: round {r0 + 1}, clients done in it {done}")
    else:
        downloads = [dict(theta0) for _ in trainers]
        private = [{} for _ in trainers]
        pending = [{} for _ in trainers]   # this round's private states, kept only if the upload is accepted
        uploads, r0, done, losses = [None] * K, 0, [], []
        bytes_up, bytes_down = 0, sum(report.nbytes(d) for d in downloads) if communicates else 0
        history, trainable, upload_params, elapsed, ata_log = [], 0, 0, 0.0, []

    def commit(r, done):
        progress = {"round": r, "done": done, "bytes_up": bytes_up, "bytes_down": bytes_down, "history": history,
                    "trainable": trainable, "upload_params": upload_params, "losses": losses,
                    "elapsed": elapsed + time.time() - t0, "ata": ata_log}
        checkpoint.save(out, {"config": asdict(cfg), "backbone_recipe": backbone_recipe(cfg), "progress": progress},
                        {"downloads": downloads, "private": private, "uploads": uploads, "pending": pending})

    for r in range(r0, rounds):
        stage = stage_of(cfg, r)
        tr = time.time()
        for k, ct in enumerate(trainers):
            if k in done:
                continue
            report.reset_peak_memory(cfg.device)
            up, pending[k], st = client_step(bb, ct, downloads[k], private[k], stage, train_tasks, train_cfg, r,
                                             faults.fault_for(injected, k, r))
            if st:
                losses.append(st["loss_last"])
                trainable, upload_params = max(trainable, st["trainable_params"]), max(upload_params, st["upload_params"])
            uploads[k] = up
            rss, cuda = report.peak_memory(cfg.device)
            trained = (f"{st['steps']} steps, loss {st['loss_first']:.3f} -> {st['loss_last']:.3f}, "
                       f"{st['seconds']:.1f} s" if st else "failed, no upload")
            log(f"  client {k} ({ct.task}) round {r + 1}: {trained}; peak memory {rss or 0:.0f} MB resident"
                + (f", {cuda:.0f} MB CUDA" if cuda else ""))
            done = done + [k]
            if cfg.checkpoint == "client":
                commit(r, done)
        ata_did = {}
        downloads, accepted = server_step(uploads, downloads, train_tasks_of, train_n, expected, cfg, log, ata_did)
        private = settle_private(private, pending, accepted)
        pending = [{} for _ in trainers]
        sent = [u for u in uploads if u is not None]
        ru, rd = (sum(report.nbytes(u) for u in sent), sum(report.nbytes(d) for d in downloads)) if communicates else (0, 0)
        bytes_up, bytes_down = bytes_up + ru, bytes_down + rd
        line = (f"round {r + 1}/{rounds} (stage {stage}): mean last loss {sum(losses) / max(1, len(losses)):.3f}, "
                f"up {ru / 1e6:.2f} MB, down {rd / 1e6:.2f} MB, {time.time() - tr:.1f} s")
        if "neighbours" in ata_did:
            ata_log.append({"round": r + 1, **ata_record(ata_did["neighbours"], train_tasks_of, ata_did["weights"],
                                                            [ct.id for ct in trainers])})
            line += f", ATA neighbours of the client's own task {ata_log[-1]['same_task_mean']:.2f}"
        if r < rounds - 1 and (cfg.eval_every_round or cfg.test_loss_every_round):
            evald = for_eval(downloads, private)
            if cfg.eval_every_round:
                rows, pt, avg = evaluate_all(bb, cts, *evald, stage, tasks, cfg)
                entry = {"per_task": pt, "average": avg}
                line += f", average score {avg:.1f}"
            else:
                rows = [{"task": ct.task, "test_ce": round(test_loss(bb, client_model(bb, ct.task, d, p, stage, tasks, cfg),
                                                                    ct.h_test, ct.items_test, cfg), 5)}
                        for ct, d, p in zip(cts, *evald)]
                entry = {}
            per_task_ce, average_ce = report.summarise_rows(rows, tasks, "test_ce", 4)
            history.append({"round": r + 1, **entry, "per_task_ce": per_task_ce, "average_ce": average_ce})
            line += f", test loss {average_ce:.3f}"
        log(line)
        uploads, done, losses = [None] * K, [], []
        commit(r + 1, [])

    # the connector of the last round trained, also when a resumed run has no round left to train
    downloads, private = for_eval(downloads, private)
    rows, per_task, average = evaluate_all(bb, cts, downloads, private, final_stage(cfg), tasks, cfg)
    per_task_ce, average_ce = report.summarise_rows(rows, tasks, "test_ce", 4)
    history.append({"round": rounds, "per_task": per_task, "average": average, "per_task_ce": per_task_ce,
                    "average_ce": average_ce})
    res = {"scenario": cfg.scenario, "seed": cfg.seed, "method": cfg.method, "backbone": cfg.backbone,
           "clients": rows, "per_task": per_task, "average": average, "per_task_ce": per_task_ce,
           "average_ce": average_ce,
           "bytes_up": bytes_up, "bytes_down": bytes_down, "wall_s": round(elapsed + time.time() - t0, 1),
           "rounds": history if cfg.eval_every_round or cfg.test_loss_every_round else history[-1:],
           "trainable_params": trainable, "communicated_params": upload_params if communicates else 0,
           "ata": ata_log, "config": asdict(cfg)}
    out.mkdir(parents=True, exist_ok=True)
    for k in range(len(cts)):
        report.save_client_state(out, cts[k].id, downloads[k], private[k])
    return report.write_results(out, res, log)


def federation_size(cfg: Config):
    """How many clients the run has: --clients, else the manifest's or the scenario's count."""
    if cfg.clients is not None:
        return len(cfg.clients)
    if cfg.data:
        manifest = data._read_json(cfg.data)    # a DataError naming the file when it is not JSON
        return len(manifest.get("clients", [])) if isinstance(manifest, dict) else 0
    return len(data.SCENARIOS[cfg.scenario])


if __name__ == "__main__":
    import cli   # the command line: cli.py
    cli.main()
