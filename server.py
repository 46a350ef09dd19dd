"""
The server side: screen one round's uploads, aggregate them (aggregate.py's pure functions) and
return each client's download. Plain state dicts in and out, so that run.py's loop and a Flower
ServerApp (flower_app.py) call the same functions.

    server_round(uploads, tasks_of, n, top_m, method)   aggregation -> each client's download
    server_step(uploads, downloads, ...)             screening (screen_uploads), then server_round
"""
import aggregate
import pilot
from config import METHODS, Config


def server_round(uploads, tasks_of, n, top_m, method=METHODS["pilot"], previous=None, consume=False, record=None):
    """Aggregate one round's uploads (client order; tasks_of[k] is client k's task, n[k] its number
    of training samples) into each client's download. Pilot: all T global task adapters ψ^t_τ
    (task-aware visual aggregation) and the client's own Θ̄^l_k (ATA). FedAvg: the one
    sample-weighted average of both. fedavg-task: that average within the client's own task only.
    Local ("none"): the client's own upload back.
    An upload that is None (rejected, or the client failed) takes no part: that client keeps its
    previous Θ^l (and receives the new global adapters), a task with no upload keeps its previous
    global task adapter, and a round with no usable upload changes nothing. consume=True lets ATA
    write the downloads into the uploads' own Θ^l tensors (each upload must have its own).
    record: a dict that receives ATA's neighbours N_M(k) and the weights of client k's Θ̄^l_k (its
    own λ_k and each neighbour's (1 − λ_k) w_kj), by position in the round (what ATA did)."""
    ok = [k for k, u in enumerate(uploads) if u is not None]
    if not ok:                                   # nothing usable: the server state stays as it was
        return list(previous)
    ups, tk, nk = [uploads[k] for k in ok], [tasks_of[k] for k in ok], [n[k] for k in ok]
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
    elif method.text_agg == "task":
        text = aggregate.mix(text, aggregate.task_fedavg_matrix(tk, nk), inplace=consume)
    prefixed = lambda task, sd: {f"global_task_adapter.{task}.{k}": v for k, v in sd.items()}
    kept = lambda k, t: {key: v for key, v in (previous[k] if previous else {}).items()
                         if key.startswith(f"global_task_adapter.{t}.")}
    by_task = aggregate.task_aware_visual(adapters, tk, nk) if method.visual_agg in ("task", "own-task") else {}
    if method.visual_agg == "task":
        shared = {}
        for t in sorted(set(tasks_of), key=tasks_of.index):   # tasks without an upload keep their adapter
            shared.update(kept(ok[0], t))
        for t, sd in by_task.items():
            shared.update(prefixed(t, sd))
        visual = [shared] * K
    elif method.visual_agg == "own-task":
        visual = [prefixed(tk[i], by_task[tk[i]]) for i in range(K)]
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
            t = tasks_of[k]
            mine = (visual[0] if method.visual_agg == "task" else prefixed(t, avg) if method.visual_agg == "all"
                    else prefixed(t, by_task[t]) if t in by_task else kept(k, t))
            out[k] = {**{key: v for key, v in previous[k].items() if key.startswith("lora.")}, **mine}
    return out


def screen_uploads(uploads, downloads, tasks_of, expected, norm_factor, ids, log=print):
    """The server's checks before aggregation: exact keys, shapes, dtypes, finite values
    (aggregate.validate_upload; expected: {key: (shape, dtype)}), then [our addition beyond the
    paper] an update-norm screen against the round's median (norm_factor; 0 turns it off).
    Rejected uploads become None, with a reason logged naming the client by its id."""
    out = list(uploads)
    for k, u in enumerate(uploads):
        if u is None:
            continue
        reason = aggregate.validate_upload(u, expected)
        if reason:
            log(f"  rejected the upload of client {ids[k]}: {reason}")
            out[k] = None
    if norm_factor:
        refs = [{**{key: v for key, v in d.items() if key.startswith("lora.")},
                 **{"task_adapter." + key: v for key, v in pilot.sub_state(d, f"global_task_adapter.{tasks_of[k]}.").items()}}
                for k, d in enumerate(downloads)]
        norms = [aggregate.update_norm(u, refs[k]) if u is not None else None for k, u in enumerate(out)]
        for k, keep in enumerate(aggregate.norm_screen(norms, norm_factor)):
            if out[k] is not None and not keep:
                log(f"  rejected the upload of client {ids[k]}: update norm {norms[k]:.3g} above "
                    f"{norm_factor:g} x the round's median")
                out[k] = None
    return out


def server_step(uploads, downloads, tasks_of, n, expected, cfg: Config, ids, log=print, record=None):
    """What the server does in a round: check the uploads (screen_uploads), then aggregate them
    (server_round) into each client's next download. uploads[k] is None for a client that failed.
    Returns (downloads, accepted): accepted[k] tells client k whether its upload was used, so that
    it keeps or rolls back the private state of that round (client.settle_private)."""
    method = METHODS[cfg.method]
    communicates = method.text_agg != "none"    # Local's uploads are its own: nothing to screen
    screened = screen_uploads(uploads, downloads, tasks_of, expected, cfg.norm_screen if communicates else 0, ids, log)
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
