"""
The client side: one client, one round. From what it downloaded (the global task adapters ψ^t_τ and
its own Θ̄^l_k) and its private state (ψ_s, ψ^c, φ), it builds the connector of the round's stage,
takes its local optimiser steps, and returns its upload (Θ^a: its task adapter; Θ^l) and its new
private state. Plain state dicts in and out, so that run.py's loop and a Flower ClientApp
(flower_app.py) call the same function.

    client_round(bb, ct, download, private, stage, tasks, cfg, round_idx) -> (upload, private, stats)
    client_step(...)   client_round, then fault injection (tests, robustness runs)
"""
import math
import sys
import time

import torch
from tqdm import tqdm

import backbone as bbmod
import pilot
from config import METHODS, Config


def build_connector(bb, stage, tasks, own_task, download, private, seed, cfg: Config):
    """The connector a client trains (or is evaluated with) in this stage, from its download and
    private state, with cfg's method switches and loss weights λ0, λ1, λ2. Round 1 has no global
    task adapters yet: ψ_t starts from the projector."""
    method = METHODS[cfg.method]
    c_v, c = bb.dims
    proj = pilot.projector_state(bb.model)
    # a task whose clients have never had an upload accepted has no global adapter yet: the projector
    globals_ = {t: pilot.sub_state(download, f"global_task_adapter.{t}.") or proj for t in tasks}
    if method.connector == "mlp":  # FedAvg family and Local: the projector-shaped MLP alone
        return pilot.build_stage1(c_v, c, proj, globals_[own_task], use_client=False)
    if stage == 1:
        return pilot.build_stage1(c_v, c, proj, globals_[own_task], private, method.client_adapter,
                                  lambda_d=cfg.lambda_d)
    return pilot.build_ctmoa(c_v, c, proj, tasks if method.ctmoa else [own_task], own_task, globals_, private,
                             use_client=method.client_adapter and method.client_in_stage2, seed=seed,
                             lambda_b=cfg.lambda_b, lambda_z=cfg.lambda_z)


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


def client_round(bb, ct, download, private, stage, tasks, cfg: Config, round_idx, log_bar=None):
    """One client, one round of local training. ct: its encoded data (features.ClientTensors).
    Returns (upload, private, stats): the upload holds 'task_adapter.*' (Θ^a) and 'lora.*' (Θ^l);
    ψ_s, ψ^c and φ stay in private. A progress bar is drawn only on a terminal (log_bar None: when
    stderr is one); a log file gets the round lines."""
    t0 = time.time()
    log_bar = sys.stderr.isatty() if log_bar is None else log_bar
    model = bb.model
    device = model.device
    load_text_adapter(model, download)
    conn = build_connector(bb, stage, tasks, ct.task, download, private, cfg.seed * 1000 + ct.index, cfg).to(device)
    trainable = pilot.trainable_parameters(model, conn)
    params = list(trainable.values())
    anchor = [p.detach().clone() for p in params] if METHODS[cfg.method].prox else None
    lr = cfg.lr_stage1 if stage == 1 else cfg.lr_stage2
    # foreach: a handful of calls per step over all tensors rather than several per tensor. It is
    # torch's default on CUDA; on the CPU it does the same arithmetic, bit for bit.
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    n = len(ct.items_train)
    steps = steps_per_round(cfg, n)
    # one cosine schedule over the client's steps of the whole run, continued from round to round
    total = steps * (cfg.rounds_stage1 + cfg.rounds_stage2)
    sched = bbmod.cosine_schedule(opt, total, max(1, round(cfg.warmup_ratio * total)), offset=round_idx * steps)
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + round_idx * 1009 + ct.index)
    batches = batch_stream(n, cfg.batch_size, g)   # batch_size per forward pass, grad_accum of them per step
    bar = tqdm(total=steps, desc=f"  client {ct.id} ({ct.task}, stage {stage})", leave=False, disable=not log_bar)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.grad_accum):
            idx = next(batches)
            ids, mask, labels = bbmod.collate([ct.items_train[i] for i in idx], bb.pad_id)
            # the connector runs in fp32 (its tensors are trainable); embed() casts to the LLM's dtype
            x_img, aux = conn(ct.h_train[idx].to(device).float())
            ce = pilot.lm_loss(model, x_img, ids.to(device), mask.to(device), labels.to(device))
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


# ----------------------------------------------------------------------------- faults and the server's verdict
def apply_fault(fault, upload, download, task):
    """Fault injection (tests, robustness runs): 'nan' poisons the upload, 'scale=X' multiplies the
    client's update by X, 'drop' loses it (the client crashed)."""
    if fault is None:
        return upload
    if fault == "drop":
        return None
    if fault == "nan":
        bad = dict(upload)
        key = next(iter(bad))
        bad[key] = bad[key].clone()
        bad[key].view(-1)[0] = float("nan")
        return bad
    if fault.startswith("scale="):
        x = float(fault.split("=", 1)[1])
        ref = {**{k: v for k, v in download.items() if k.startswith("lora.")},
               **{"task_adapter." + k: v for k, v in pilot.sub_state(download, f"global_task_adapter.{task}.").items()}}
        return {k: ref[k] + x * (v - ref[k]) if k in ref else v for k, v in upload.items()}
    raise ValueError(f"unknown fault {fault!r}; expected nan, drop or scale=X")


def client_step(bb, ct, download, private, stage, tasks, cfg: Config, round_idx, fault=None, log_bar=None):
    """What a client does in a round, fault injection included: client_round, then the fault.
    Returns (upload or None when the client failed, private state, stats or None)."""
    if fault == "drop":      # the client crashed mid-training: no upload, state unchanged
        return None, private, None
    up, private, stats = client_round(bb, ct, download, private, stage, tasks, cfg, round_idx, log_bar=log_bar)
    return apply_fault(fault, up, download, ct.task), private, stats


def settle_private(private, pending, accepted):
    """A client's private state after the server's verdict on its upload: the state its training
    produced (pending) when the upload was accepted; the state it had before the round when it was
    rejected (the training that produced it is discarded with the upload); unchanged for a client
    that failed (pending is then the state it had)."""
    return [p if ok else old for old, p, ok in zip(private, pending, accepted)]
