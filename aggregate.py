"""
Server-side aggregation for Pilot: pure functions over {name: tensor} state dicts (one opt-in
exception: mix(..., inplace=True), which the server uses to hold the uploads only once).

    task_aware_visual(...)   task-aware visual aggregation: one global task adapter per task
    adaptive_text(...)       ATA: a personalised text adapter Θ̄^l_k for every client k
    fedavg(...)              sample-count-weighted average (FedIT-style baselines, ablations)
    task_fedavg_matrix(...)  FedAvg within each task (the fedavg-task baseline's text adapters)

Every aggregation here is a mixing matrix A (K x K) applied tensor by tensor:
out_k = Σ_j A[k, j] state_j. Writing it that way keeps each rule a few lines of arithmetic on K
numbers, and the heavy part shared and streamed: no flattened copy of all clients' parameters is
ever made, and a row reads only the states it weighs (M + 1 of them for ATA).
Arithmetic is float32, as the uploads are.
"""
import torch


def mix(states, A, inplace=False):
    """[Σ_j A[k, j] states[j] for each row k of A], one tensor name at a time.
    inplace=True writes out_k into states[k]'s own tensors (A square; the states are consumed):
    the server then holds the uploads plus one reused buffer of one tensor per client, instead of
    the uploads twice (and skips allocating, i.e. page-faulting, a second copy)."""
    rows = [[(j, float(a)) for j, a in enumerate(row) if a != 0] for row in A.tolist()]
    out = [dict() for _ in rows]
    buf = torch.empty(len(rows), max(v.numel() for v in states[0].values())) if inplace else None
    for key, like in states[0].items():
        if inplace and like.numel() and len({s[key].data_ptr() for s in states}) < len(states):
            raise ValueError(f"mix in place: clients share the tensor {key!r}; each needs its own")
        mixed = []
        for r, row in enumerate(rows):       # in place, every input is read before any is overwritten
            (j0, a0), *rest = row
            into = buf[r, :like.numel()].view(like.shape) if inplace else None
            acc = torch.mul(states[j0][key].float(), a0, out=into)
            for j, a in rest:
                acc.add_(states[j][key], alpha=a)
            mixed.append(acc)
        for k, m in enumerate(mixed):
            out[k][key] = states[k][key].copy_(m) if inplace else m
    return out


def fedavg_matrix(n):
    """Every row = n / Σ n: each output is the same sample-count-weighted average."""
    w = torch.tensor(n, dtype=torch.float64)
    return (w / w.sum()).expand(len(n), -1).clone()


def fedavg(states, n):
    """Sample-count-weighted average of the states (one dict)."""
    return mix(states, fedavg_matrix(n)[:1])[0]


def task_fedavg_matrix(tasks_of, n):
    """Row k = the sample-count weights of the clients of k's own task: each client receives the
    average of its task's clients, and nothing from another task."""
    K = len(n)
    A = torch.zeros(K, K, dtype=torch.float64)
    for k in range(K):
        same = [j for j in range(K) if tasks_of[j] == tasks_of[k]]
        total = sum(n[j] for j in same)
        for j in same:
            A[k, j] = n[j] / total
    return A


def task_aware_visual(task_adapters, tasks_of, n):
    """Task-aware visual aggregation: for each task τ, the sample-count-weighted average of the
    uploaded task adapters of that task's clients only (tasks_of: each adapter's client's task).
    Returns {task: state dict}."""
    out = {}
    for tau in sorted(set(tasks_of)):
        idx = [k for k, t in enumerate(tasks_of) if t == tau]
        out[tau] = fedavg([task_adapters[k] for k in idx], [n[k] for k in idx])
    return out


def pairwise_distances(states, chunk=1 << 16):
    """d_kj = ||Θ_k − Θ_j||₂ over all parameters, from one Gram matrix G = Σ X Xᵀ (X: one row per
    client, `chunk` parameters at a time) and d² = G_kk + G_jj − 2 G_kj. Each X is centred on the
    clients' mean: all clients start from the same Θ^l_0, so uncentred norms are dominated by that
    shared start and d² would cancel away; centred, float32 products are accurate (summed in
    float64). A chunk of K x 65,536 float32 (8 MB at K = 32) stays in cache while it is centred and
    multiplied, and is all the working memory."""
    K = len(states)
    G = torch.zeros(K, K, dtype=torch.float64)
    buf = torch.empty(K, min(chunk, max(v.numel() for v in states[0].values())))
    for key in states[0]:
        flat = [s[key].reshape(-1) for s in states]
        for c in range(0, flat[0].numel(), chunk):
            x = torch.stack([f[c:c + chunk] for f in flat], out=buf[:, :len(flat[0][c:c + chunk])])
            x -= x.mean(0)
            G += (x @ x.t()).double()
    sq = G.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * G).clamp_min(0)
    # Rounding leaves tiny positive values for identical clients: call those exactly 0.
    d2[d2 <= 1e-6 * sq.max().clamp_min(1e-30)] = 0
    d2.fill_diagonal_(0)
    return d2.sqrt()


def nearest(d, top_m):
    """N_M(k) for every k: the M clients j ≠ k with the smallest d_kj, ties by client index."""
    K = d.shape[0]
    return [sorted((j for j in range(K) if j != k), key=lambda j: (float(d[k, j]), j))[:min(top_m, K - 1)]
            for k in range(K)]


def ata_matrix(d, n, top_m):
    """ATA's mixing matrix. [reading] docs/METHOD.md, "Server: adaptive text aggregation (ATA)":
        Θ̄_k = λ_k Θ_k + (1 − λ_k) Σ_{j∈N_M(k)} w_kj Θ_j
        N_M(k): the M clients j ≠ k nearest to k (ties by client index)
        w_kj = (1/d_kj) / Σ_{i∈N_M(k)} (1/d_ki),   λ_k = n_k / (n_k + Σ_{j∈N_M(k)} n_j)
    A neighbour at distance 0 is the limit of inverse-distance weighting: the weight goes, in equal
    parts, to the neighbours at distance 0 (no division by zero)."""
    K = len(n)
    A = torch.zeros(K, K, dtype=torch.float64)
    for k, nb in enumerate(nearest(d, top_m)):
        if not nb:
            A[k, k] = 1.0
            continue
        dist = torch.tensor([float(d[k, j]) for j in nb], dtype=torch.float64)
        inv = (dist == 0).double() if (dist == 0).any() else 1.0 / dist
        w = inv / inv.sum()
        lam = n[k] / (n[k] + sum(n[j] for j in nb))
        A[k, k] = lam
        A[k, nb] = (1 - lam) * w
    return A


def adaptive_text(text_adapters, n, top_m=3, inplace=False):
    """ATA: each client's personalised Θ̄^l_k (a list, in client order), the matrix used and each
    client's neighbours N_M(k). inplace: see mix (the uploads become the downloads)."""
    d = pairwise_distances(text_adapters)
    A = ata_matrix(d, n, top_m)
    return mix(text_adapters, A, inplace), A, nearest(d, top_m)


# ----------------------------------------------------------------------------- checking uploads
def validate_upload(upload, expected):
    """None when the upload has exactly the expected keys, each with the expected shape and dtype
    and only finite values; otherwise the reason it is rejected. expected: {key: (shape, dtype)}."""
    missing, extra = sorted(set(expected) - set(upload)), sorted(set(upload) - set(expected))
    if missing:
        return f"missing {len(missing)} tensors (e.g. {missing[0]})"
    if extra:
        return f"{len(extra)} unexpected tensors (e.g. {extra[0]})"
    for key, (shape, dtype) in expected.items():
        v = upload[key]
        if tuple(v.shape) != tuple(shape) or v.dtype != dtype:
            return f"{key}: {tuple(v.shape)} {v.dtype}, expected {tuple(shape)} {dtype}"
        if not torch.isfinite(v).all():
            return f"{key}: non-finite values"
    return None


def update_norm(upload, reference):
    """||upload − reference||₂ over the tensors the reference has (what the client started from)."""
    return sum(float((upload[k].double() - v.double()).pow(2).sum()) for k, v in reference.items() if k in upload) ** 0.5


def norm_screen(norms, factor):
    """[Our addition beyond the paper] accept an update only if its norm is at most factor times
    the median norm of the round (None entries: already rejected)."""
    valid = sorted(x for x in norms if x is not None)
    if not valid:
        return [False] * len(norms)
    median = valid[len(valid) // 2] if len(valid) % 2 else 0.5 * (valid[len(valid) // 2 - 1] + valid[len(valid) // 2])
    return [x is not None and x <= factor * median for x in norms]
