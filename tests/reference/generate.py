"""
Reference vectors for porters: fixed inputs and the outputs docs/METHOD.md's equations give, in
float64, written out plainly here, independently of the implementation under test (nothing from
pilot.py or aggregate.py is imported).

    python tests/reference/generate.py          # rewrites vectors.safetensors and index.json here

vectors.safetensors holds float64 tensors named "<case>/<name>"; index.json describes each case:
its equation, which tensors are inputs and which are expected outputs, its scalar settings, and
the tolerance that tests/test_reference.py checks an fp32 implementation against; and, once, the
conventions a port must share (CONVENTIONS below). Besides one case per equation, "trajectory" is
a whole federation small enough to follow by hand: 3 clients of 2 tasks, a stage-1 round and a
stage-2 round of 2 plain SGD steps each on fixed tensors, a stand-in LLM of one LoRA linear layer,
ATA with M = 1, and every client's upload, private state and download after each round.
"""
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
C_V, C, B, N = 4, 5, 2, 3
FORMAT = ("vectors.safetensors: float64 tensors named '<case>/<name>'; per case, 'inputs' and 'outputs' name them, "
          "'settings' gives the scalars; an fp32 implementation must match each output within "
          "|got - expected| <= atol + rtol |expected|; MLP weights [out, in] (nn.Linear), tokens [B, N, C_v]")


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def linear(x, w, b):
    return x @ w.T + b


def mlp(x, p, pre):
    return linear(gelu(linear(x, p[pre + "linear_1.weight"], p[pre + "linear_1.bias"])),
                  p[pre + "linear_2.weight"], p[pre + "linear_2.bias"])


def adapter(g, pre, scale=0.5):
    return {pre + "linear_1.weight": scale * torch.randn(C, C_V, generator=g, dtype=torch.float64),
            pre + "linear_1.bias": scale * torch.randn(C, generator=g, dtype=torch.float64),
            pre + "linear_2.weight": scale * torch.randn(C, C, generator=g, dtype=torch.float64),
            pre + "linear_2.bias": scale * torch.randn(C, generator=g, dtype=torch.float64)}


def difference_loss(x_t, x_s):
    """Rows = tokens of the batch, each divided by its L2 norm (a constant in the gradient, at least
    1e-6: a new ψ_s outputs exact zeros); mean of the squared entries of X̂_tᵀ X̂_s."""
    xt, xs = x_t.reshape(-1, x_t.shape[-1]), x_s.reshape(-1, x_s.shape[-1])
    xt = xt / xt.norm(dim=1, keepdim=True).detach().clamp_min(1e-6)
    xs = xs / xs.norm(dim=1, keepdim=True).detach().clamp_min(1e-6)
    return ((xt.T @ xs) ** 2).mean()


def router_losses(logits):
    """L_b = T Σ_e f_e p̄_e (f_e: fraction of tokens whose top-1 expert is e), L_z = mean(logsumexp²)."""
    t = logits.shape[-1]
    flat = logits.reshape(-1, t)
    p = torch.softmax(flat, -1)
    top1 = flat.argmax(-1)
    f = torch.stack([(top1 == e).double().mean() for e in range(t)])
    l_b = t * (f * p.mean(0)).sum()
    l_z = (torch.logsumexp(flat, -1) ** 2).mean()
    return l_b, l_z


def weighted_sum(states, weights):
    return {k: sum(w * s[k] for s, w in zip(states, weights)) for k in states[0]}


def distances(states, identical=0.0, weights=None):
    """d_kj = ||Θ_k − Θ_j||, 0 where d² <= identical x the largest squared norm of a state minus the
    mean state: the plain mean of the K states (weights, only to show what the other reading gives:
    the mean weighted by them)."""
    flat = [torch.cat([s[k].reshape(-1) for k in sorted(s)]) for s in states]
    d = torch.tensor([[float((a - b).norm()) for b in flat] for a in flat], dtype=torch.float64)
    w = [1.0 / len(flat)] * len(flat) if weights is None else [x / sum(weights) for x in weights]
    mean = sum(wi * f for wi, f in zip(w, flat))
    d[d ** 2 <= identical * max(float(((f - mean) ** 2).sum()) for f in flat)] = 0.0
    return d


def ata(states, n, m, identical=1e-6):
    """Θ̄_k = λ_k Θ_k + (1 − λ_k) Σ_{j∈N_M(k)} w_kj Θ_j; N_M(k): the M nearest j ≠ k (ties by index);
    w ∝ 1/d (neighbours at distance 0 share all the weight equally); λ_k = n_k / (n_k + Σ_{N_M(k)} n_j)."""
    d = distances(states, identical)
    K = len(states)
    A = torch.zeros(K, K, dtype=torch.float64)
    for k in range(K):
        nb = sorted((j for j in range(K) if j != k), key=lambda j: (float(d[k, j]), j))[:m]
        zero = [j for j in nb if d[k, j] == 0]
        w = {j: (1.0 / len(zero) if j in zero else 0.0) for j in nb} if zero else \
            {j: (1 / d[k, j]) / sum(1 / d[k, i] for i in nb) for j in nb}
        lam = n[k] / (n[k] + sum(n[j] for j in nb))
        A[k, k] = lam
        for j in nb:
            A[k, j] = (1 - lam) * w[j]
    return d, A, [weighted_sum(states, A[k].tolist()) for k in range(K)]


CONVENTIONS = {
    "gelu": "exact GELU, 0.5 x (1 + erf(x / sqrt(2))), not the tanh approximation",
    "mlp_adapter": "Linear(C_v, C), GELU, Linear(C, C): y = x W^T + b with W stored [out, in] as nn.Linear stores it; "
                   "names linear_1.weight, linear_1.bias, linear_2.weight, linear_2.bias",
    "lora": "y = x W^T + b + (alpha / r) (x A^T) B^T; A [r, in], B [out, r], B zero at the start",
    "tokens": "a batch of image features H_v is [B, N, C_v]; L_d and the router losses take every token of the batch",
    "difference_loss": "each token's row of X_t and X_s is divided by its L2 norm (clamped below at 1e-6), the norm "
                       "treated as a constant (detached) in the gradient; L_d = mean of the squared entries of X_t^T X_s",
    "router_order": "column 1 of the router phi (and of P = softmax(phi(H_v))) is the client's own task; columns "
                    "2..T are the other tasks in the order caption, vqa, grounding, ocr, the own task left out",
    "stacked_experts": "CT-MoA's frozen foreign task adapters psi^t_i and trainable cross-task adapters psi^c_i are "
                       "stacked on a first axis of length T - 1 in router order 2..T, each in nn.Linear layout "
                       "[T - 1, out, in] (cases 'ctmoa', 'trajectory': foreign.*, cross.*)",
    "load_balance": "f_e = fraction of tokens whose top-1 expert (argmax of P, the lowest index on a tie) is e, no "
                    "gradient through f; L_b = T sum_e f_e mean(P_e); L_z = mean over tokens of logsumexp(logits)^2",
    "ata_neighbours": "N_M(k): the M clients j != k with the smallest d_kj, ties broken by the lower client index",
    "ata_identical": "d_kj is taken to be exactly 0 when d_kj^2 <= 1e-6 max_i ||Theta_i - mean_j Theta_j||^2, the mean "
                     "being the plain (unweighted) mean of the round's K text adapters, not the n-weighted one: "
                     "clients equal up to float32 rounding are identical (case 'ata_near'; case 'ata_threshold' tells "
                     "the plain mean from the n-weighted one)",
    "ata_outputs": "'distances' is the K x K matrix of d_kj after the identical-client rule (entries taken as identical "
                   "are 0), symmetric, zero diagonal; 'mixing' is the K x K matrix A with Theta-bar_k = sum_j A[k, j] "
                   "Theta_j: row k is the receiving client k, column j the client it takes from, each row sums to 1",
    "zero_last_layer": "a 'zero last layer' sets both linear_2.weight and linear_2.bias to 0, so the adapter outputs "
                       "exact zeros until it has trained",
    "ata_zero_distance": "neighbours at distance 0 share the neighbour weight (1 - lambda_k) equally, the others in "
                         "N_M(k) get 0: the limit of inverse-distance weighting; no division by zero",
    "ata_lambda": "lambda_k = n_k / (n_k + sum over N_M(k) of n_j) counts every neighbour in N_M(k), those given no "
                  "weight by a distance of 0 included",
    "stage1_init": "round 1: psi_t = the backbone's projector; a new psi_s = the projector's first layer and a zero "
                   "last layer; later rounds: psi_t from the global task adapter of the client's task, psi_s its own",
    "stage2_init": "expert 1 = the global task adapter of the client's task (trainable); foreign experts = the other "
                   "tasks' global task adapters (frozen); a new psi^c_i = the projector's first layer (weight and "
                   "bias) and a zero last layer, for every foreign expert i; psi_s frozen, added with weight 1; phi's "
                   "initial values are a client's own (given here)",
    "uploads": "a client uploads task_adapter.* (psi_t, or expert 1 in stage 2) and lora.* (Theta^l); psi_s "
               "(client_adapter.*), psi^c and phi (router.*) never leave it. psi^c is named cross.linear_{1,2}.{weight,"
               "bias} in the vectors, stacked [T - 1, out, in] (stacked_experts); this implementation's state dicts "
               "name the same tensors cross_adapter.w1, b1, w2, b2, with w2 stored input-major [T - 1, in, out]",
    "downloads": "client k downloads global_task_adapter.<task>.* for every task (sample-count-weighted mean of that "
                 "task's uploaded psi_t) and its own lora.* (ATA's Theta-bar^l_k)",
}


def trajectory(g):
    """The 'trajectory' case: the federated loop on fixed tensors, in float64, by autograd."""
    rnd = lambda *shape, scale=0.5: scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    c_out, r, alpha, lr, steps = 3, 2, 4.0, 0.1, 2
    tasks, n, top_m = ["caption", "caption", "vqa"], [2, 3, 4], 1
    lam_d, lam_b, lam_z = 0.1, 0.1, 0.01
    proj = adapter(g, "")
    w, b = rnd(c_out, C), rnd(c_out)
    theta0 = {"lora.lm.lora_A": rnd(r, C), "lora.lm.lora_B": torch.zeros(c_out, r, dtype=torch.float64)}
    h = [rnd(B, N, C_V, scale=1.0) for _ in tasks]
    y = [rnd(B, N, c_out, scale=1.0) for _ in tasks]
    router0 = [{"router.weight": rnd(2, C_V), "router.bias": rnd(2)} for _ in tasks]
    inputs = {**{f"projector.{k}": v for k, v in proj.items()}, "lm.weight": w, "lm.bias": b, **theta0,
              **{f"client{k}.h_v": h[k] for k in range(3)}, **{f"client{k}.target": y[k] for k in range(3)},
              **{f"client{k}.{key}": v for k in range(3) for key, v in router0[k].items()}}

    def lm(x, p):
        return linear(x, w, b) + (alpha / r) * (x @ p["lora.lm.lora_A"].T) @ p["lora.lm.lora_B"].T

    def sgd(p, loss_of):
        p = {k: v.clone().requires_grad_(True) for k, v in p.items()}
        for _ in range(steps):
            grads = torch.autograd.grad(loss_of(p), list(p.values()))
            p = {k: (v - lr * gr).detach().requires_grad_(True) for (k, v), gr in zip(p.items(), grads)}
        return {k: v.detach() for k, v in p.items()}

    def server(uploads):
        task_avg = {}
        for t in sorted(set(tasks)):
            idx = [k for k in range(3) if tasks[k] == t]
            task_avg.update({f"global_task_adapter.{t}.{key}": v for key, v in weighted_sum(
                [{key: uploads[k]["task_adapter." + key] for key in proj} for k in idx],
                [n[k] / sum(n[i] for i in idx) for k in idx]).items()})
        _, _, text = ata([{k: v for k, v in u.items() if k.startswith("lora.")} for u in uploads], n, top_m)
        return [{**task_avg, **text[k]} for k in range(3)]

    outputs, private = {}, [{} for _ in tasks]
    # round 1, stage 1: x_img = psi_t(H) + psi_s(H), L = MSE + lambda0 L_d
    uploads = []
    for k in range(3):
        start = {**{"task_adapter." + key: v for key, v in proj.items()},
                 **{"client_adapter." + key: (v if key.startswith("linear_1") else torch.zeros_like(v)) for key, v in proj.items()},
                 **theta0}

        def loss(p, k=k):
            x_t, x_s = mlp(h[k], p, "task_adapter."), mlp(h[k], p, "client_adapter.")
            return ((lm(x_t + x_s, p) - y[k]) ** 2).mean() + lam_d * difference_loss(x_t, x_s)
        p = sgd(start, loss)
        uploads.append({key: v for key, v in p.items() if key.startswith(("task_adapter.", "lora."))})
        private[k] = {key: v for key, v in p.items() if key.startswith("client_adapter.")}
    downloads = server(uploads)
    for k in range(3):
        outputs.update({f"round1/client{k}/upload/{key}": v for key, v in uploads[k].items()})
        outputs.update({f"round1/client{k}/private/{key}": v for key, v in private[k].items()})
        outputs.update({f"round1/client{k}/download/{key}": v for key, v in downloads[k].items()})
    # round 2, stage 2: x_img = psi_s(H) + P_1 psi_t(H) + P_2 (psi^t_other(H) + psi^c(H)), L = MSE + l1 L_b + l2 L_z
    uploads = []
    for k in range(3):
        own, other = tasks[k], [t for t in ("caption", "vqa") if t != tasks[k]][0]
        glob = lambda t: {key: downloads[k][f"global_task_adapter.{t}.{key}"] for key in proj}
        start = {**{"task_adapter." + key: v for key, v in glob(own).items()},
                 **{"cross." + key: (v if key.startswith("linear_1") else torch.zeros_like(v)) for key, v in proj.items()},
                 **router0[k], **{key: v for key, v in downloads[k].items() if key.startswith("lora.")}}
        foreign = glob(other)

        def loss(p, k=k, foreign=foreign):
            logits = linear(h[k], p["router.weight"], p["router.bias"])
            prob = torch.softmax(logits, -1)
            x = mlp(h[k], private[k], "client_adapter.") + prob[..., :1] * mlp(h[k], p, "task_adapter.")
            x = x + prob[..., 1:2] * (mlp(h[k], foreign, "") + mlp(h[k], p, "cross."))
            l_b, l_z = router_losses(logits)
            return ((lm(x, p) - y[k]) ** 2).mean() + lam_b * l_b + lam_z * l_z
        p = sgd(start, loss)
        uploads.append({key: v for key, v in p.items() if key.startswith(("task_adapter.", "lora."))})
        # psi^c stacked on a first axis of T - 1 = 1 foreign expert (CONVENTIONS["stacked_experts"])
        private[k] = {**private[k], **{key: v[None] if key.startswith("cross.") else v for key, v in p.items()
                                       if key.startswith(("cross.", "router."))}}
    downloads = server(uploads)
    for k in range(3):
        outputs.update({f"round2/client{k}/upload/{key}": v for key, v in uploads[k].items()})
        outputs.update({f"round2/client{k}/private/{key}": v for key, v in private[k].items()})
        outputs.update({f"round2/client{k}/download/{key}": v for key, v in downloads[k].items()})
    settings = dict(tasks=tasks, n=n, top_m=top_m, lr=lr, sgd_steps=steps, lora_r=r, lora_alpha=alpha, lambda_d=lam_d,
                    lambda_b=lam_b, lambda_z=lam_z, loss="mean over batch, tokens and outputs of (lm(x_img) - target)^2, "
                    "plus the stage's auxiliary loss; lm is the frozen linear layer lm.* with the LoRA lora.lm.*",
                    batch="every SGD step of client k sees its whole batch: client<k>.h_v [2, 3, 4] (B = 2 samples of "
                    "N = 3 tokens) and client<k>.target [2, 3, 3]",
                    n_meaning="n is each client's sample count as the server weighs it (the task-aware average, "
                    "ATA's lambda_k); it is a setting of the case, unrelated to the 2 samples of each client's batch",
                    sgd="plain SGD: theta <- theta - lr * gradient of the loss, from the round's starting point; no "
                    "momentum, no weight decay, no gradient clipping, no learning-rate schedule, no loss scaling",
                    task_count="T = 2, the tasks present in the federation (caption, vqa, in the order of the task "
                    "list), not the four of the task list: CT-MoA has 2 experts, the router 2 outputs, psi^c 1",
                    sensitivity="L_d is exactly 0 at the first stage-1 step (psi_s starts with a zero last layer, its "
                    "rows are 0 and the 1e-6 clamp keeps them 0) and about 1 at the second; X_s is divided by its "
                    "detached row norms (0.05 to 0.43 after the first step), so the second step's L_d gradient is "
                    "scaled by 1 / ||x_s||: a port that differs in the first step, the clamp or the detach drifts "
                    "visibly from then on")
    return inputs, outputs, settings


def build():
    g = torch.Generator().manual_seed(20250123)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    tensors, index = {}, {}

    def case(name, equation, inputs, outputs, **settings):
        for k, v in {**inputs, **outputs}.items():
            tensors[f"{name}/{k}"] = v.detach().clone().contiguous()
        index[name] = {"equation": equation, "inputs": sorted(inputs), "outputs": sorted(outputs),
                       "settings": settings, "rtol": 1e-4, "atol": 1e-5}

    # LoRA: y = W x + b + (alpha / r) B A x
    x, w, b, a_, b_ = rnd(B, N, 6), rnd(5, 6), rnd(5), rnd(2, 6), rnd(5, 2)
    case("lora", "y = x Wᵀ + b + (alpha / r) (x Aᵀ) Bᵀ", {"x": x, "weight": w, "bias": b, "lora_A": a_, "lora_B": b_},
         {"y": linear(x, w, b) + (4.0 / 2) * (x @ a_.T) @ b_.T}, r=2, alpha=4.0)

    # Stage 1: x_img = ψ_t(H_v) + ψ_s(H_v), aux = λ0 L_d
    h = rnd(B, N, C_V)
    p = {**adapter(g, "task_adapter."), **adapter(g, "client_adapter.")}
    x_t, x_s = mlp(h, p, "task_adapter."), mlp(h, p, "client_adapter.")
    case("stage1", "x_img = ψ_t(H_v) + ψ_s(H_v); L_d = mean((X̂_tᵀ X̂_s)²); aux = λ0 L_d", {"h_v": h, **p},
         {"x_img": x_t + x_s, "l_d": difference_loss(x_t, x_s), "aux": 0.1 * difference_loss(x_t, x_s)}, lambda_d=0.1)

    # Router losses
    logits = rnd(B, N, 3)
    l_b, l_z = router_losses(logits)
    case("router_losses", "L_b = T Σ_e f_e p̄_e; L_z = mean over tokens of logsumexp(logits)²", {"logits": logits},
         {"l_b": l_b, "l_z": l_z})

    # CT-MoA, T = 3: experts in router order = own task (expert 1), then the two foreign tasks
    h = rnd(B, N, C_V)
    own, client = adapter(g, "task_adapter."), adapter(g, "client_adapter.")
    foreign = [adapter(g, "") for _ in range(2)]
    cross = [adapter(g, "", scale=0.3) for _ in range(2)]
    router_w, router_b = rnd(3, C_V), rnd(3)
    logits = linear(h, router_w, router_b)
    prob = torch.softmax(logits, -1)
    x = mlp(h, client, "client_adapter.") + prob[..., 0:1] * mlp(h, own, "task_adapter.")
    for i in range(2):
        x = x + prob[..., i + 1:i + 2] * (mlp(h, foreign[i], "") + mlp(h, cross[i], ""))
    l_b, l_z = router_losses(logits)
    stack = lambda ps, key: torch.stack([q[key] for q in ps])
    inputs = {"h_v": h, **own, **client, "router.weight": router_w, "router.bias": router_b,
              **{f"foreign.{k}": stack(foreign, k) for k in foreign[0]},
              **{f"cross.{k}": stack(cross, k) for k in cross[0]}}
    case("ctmoa", "P = softmax(φ(H_v)); x_img = ψ_s(H_v) + P_1 ψ_t(H_v) + Σ_{i=2..T} P_i (ψ^t_i(H_v) + ψ^c_i(H_v)); "
         "aux = λ1 L_b + λ2 L_z", inputs, {"x_img": x, "aux": 0.1 * l_b + 0.01 * l_z}, lambda_b=0.1, lambda_z=0.01,
         n_tasks=3)

    # Task-aware visual aggregation: per task, the sample-count-weighted mean of its clients' ψ_t
    tasks, n = ["caption", "vqa", "caption", "vqa", "caption"], [1, 3, 2, 2, 5]
    ups = [adapter(g, "") for _ in tasks]
    inputs = {f"client{k}.{key}": v for k, u in enumerate(ups) for key, v in u.items()}
    outputs = {}
    for t in ("caption", "vqa"):
        idx = [k for k in range(len(tasks)) if tasks[k] == t]
        avg = weighted_sum([ups[k] for k in idx], [n[k] / sum(n[i] for i in idx) for k in idx])
        outputs.update({f"{t}.{key}": v for key, v in avg.items()})
    case("task_aware_visual", "ψ^t_τ = Σ_{k: τ(k)=τ} n_k ψ_t,k / Σ_{k: τ(k)=τ} n_k", inputs, outputs, tasks=tasks, n=n)

    # ATA with a zero distance and ties: 4 clients whose Θ^l differ along one entry only (0, 0, 2, 4),
    # over a shared start; exact in binary floating point, so fp32 sees the same ties.
    start = {"lora.a": torch.tensor([[3.0, -1.0], [2.0, 5.0]], dtype=torch.float64),
             "lora.b": torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64)}
    states = []
    for v in (0.0, 0.0, 2.0, 4.0):
        s = {k: t.clone() for k, t in start.items()}
        s["lora.b"][1] += v
        states.append(s)
    n = [1, 2, 3, 4]
    d, A, out = ata(states, n, 2)
    case("ata_ties", "d_kj = ||Θ_k − Θ_j||; Θ̄_k = λ_k Θ_k + (1 − λ_k) Σ_{j∈N_M(k)} w_kj Θ_j "
         "(client 0 and 1 at distance 0; client 2 equidistant from 0, 1 and 3: neighbours by index)",
         {f"client{k}.{key}": v for k, s in enumerate(states) for key, v in s.items()},
         {"distances": d, "mixing": A, **{f"out{k}.{key}": v for k, s in enumerate(out) for key, v in s.items()}},
         n=n, top_m=2)

    # ATA, general position: 5 clients from a shared start, M = 3
    start = {"lora.a": rnd(3, 4), "lora.b": rnd(6)}
    states = [{k: v + 0.1 * rnd(*v.shape) for k, v in start.items()} for _ in range(5)]
    n = [4, 1, 2, 8, 3]
    d, A, out = ata(states, n, 3)
    case("ata", "as ata_ties, clients in general position", {f"client{k}.{key}": v for k, s in enumerate(states) for key, v in s.items()},
         {"distances": d, "mixing": A, **{f"out{k}.{key}": v for k, s in enumerate(out) for key, v in s.items()}},
         n=n, top_m=3)

    # FedAvg: Σ_k n_k Θ_k / Σ_k n_k
    states = [{"w": rnd(2, 3), "b": rnd(4)} for _ in range(3)]
    n = [1, 2, 5]
    case("fedavg", "Θ = Σ_k n_k Θ_k / Σ_k n_k", {f"client{k}.{key}": v for k, s in enumerate(states) for key, v in s.items()},
         {f"out.{key}": v for key, v in weighted_sum(states, [x / sum(n) for x in n]).items()}, n=n)

    # ATA with two clients nearly equal: d_01^2 = 1e-7 of the largest centred squared norm, below the
    # 1e-6 under which a port must take them as identical (CONVENTIONS["ata_identical"])
    start = {"lora.a": rnd(3, 4), "lora.b": rnd(6)}
    moves = [{k: 0.3 * rnd(*v.shape) for k, v in start.items()} for _ in range(4)]
    unit = {k: rnd(*v.shape) for k, v in start.items()}
    norm = math.sqrt(sum(float((v ** 2).sum()) for v in unit.values()))
    moves[1] = {k: moves[0][k] for k in start}       # client 1 = client 0 + eps * unit, eps set below
    states = [{k: start[k] + m[k] for k in start} for m in moves]
    mean = {k: sum(s_[k] for s_ in states) / 4 for k in start}
    biggest = max(sum(float(((s_[k] - mean[k]) ** 2).sum()) for k in start) for s_ in states)
    eps = math.sqrt(1e-7 * biggest) / norm
    states[1] = {k: states[0][k] + eps * unit[k] for k in start}
    n = [3, 1, 2, 5]
    d, A, out = ata(states, n, 2, identical=1e-6)
    assert d[0, 1] == 0 and d[0, 2] > 0
    case("ata_near", "as ata_ties; clients 0 and 1 differ by d^2 = 1e-7 max_i ||Theta_i - mean||^2: identical "
         "(CONVENTIONS ata_identical), so each takes all of its neighbour weight from the other",
         {f"client{k}.{key}": v for k, s_ in enumerate(states) for key, v in s_.items()},
         {"distances": d, "mixing": A, **{f"out{k}.{key}": v for k, s_ in enumerate(out) for key, v in s_.items()}},
         n=n, top_m=2)

    # The federated loop on fixed tensors (trajectory)
    inputs, outputs, settings = trajectory(g)
    case("trajectory", "two rounds of the whole method (stage 1, then CT-MoA), each client 2 plain SGD steps, the "
         "server's task-aware average and ATA (M = 1); every upload, private state and download", inputs, outputs,
         **settings)
    # ATA's identical-client threshold: the plain mean, not the n-weighted one. A heavy client (n 1000)
    # sits between the others, so the n-weighted mean is near it while the plain mean is pulled toward
    # the four clients at +R; the largest centred squared norm is then S_p under the plain mean and
    # S_w < S_p / 2 under the weighted one. Clients 2 and 3 differ by d^2 = 1e-6 sqrt(S_p S_w): identical
    # under the plain reading, not under the weighted one, so each reading gives other distances and mixing.
    start = {"lora.a": rnd(2, 3), "lora.b": rnd(4)}
    dim = 10
    e1, e2, u = (rnd(dim) for _ in range(3))
    e1 = e1 / e1.norm()
    e2 = e2 - (e2 @ e1) * e1
    e2, u = e2 / e2.norm(), u / u.norm()
    at = [0 * e1, -e1, e1, e1, e1 + 0.2 * e2, e1 - 0.2 * e2]
    n = [1000, 1, 2, 3, 1, 2]
    flat = lambda v: {"lora.a": start["lora.a"] + v[:6].reshape(2, 3), "lora.b": start["lora.b"] + v[6:]}
    states = [flat(v) for v in at]
    s_p = max(float(((v - sum(at) / 6) ** 2).sum()) for v in at)
    w_mean = sum(w * v for w, v in zip(n, at)) / sum(n)
    s_w = max(float(((v - w_mean) ** 2).sum()) for v in at)
    assert s_p > 2 * s_w
    states[3] = flat(at[3] + math.sqrt(1e-6 * math.sqrt(s_p * s_w)) * u)
    d, A, out = ata(states, n, 2, identical=1e-6)
    assert d[2, 3] == 0 and distances(states, 1e-6, weights=n)[2, 3] > 1e-4
    case("ata_threshold", "as ata_ties; clients 2 and 3 differ by d^2 = 1e-6 sqrt(S_p S_w), where S_p and S_w are the "
         "largest squared norm of a client's Theta minus the plain and the n-weighted mean (S_p > 2 S_w): identical "
         "under the plain mean (CONVENTIONS ata_identical), not under the n-weighted one",
         {f"client{k}.{key}": v for k, s_ in enumerate(states) for key, v in s_.items()},
         {"distances": d, "mixing": A, **{f"out{k}.{key}": v for k, s_ in enumerate(out) for key, v in s_.items()}},
         n=n, top_m=2)
    return tensors, index


def main():
    tensors, index = build()
    save_file(tensors, str(HERE / "vectors.safetensors"))
    (HERE / "index.json").write_text(json.dumps({"format": FORMAT, "conventions": CONVENTIONS, "cases": index}, indent=1,
                                                ensure_ascii=False) + "\n")
    print(f"wrote {len(tensors)} tensors in {len(index)} cases to {HERE}")


if __name__ == "__main__":
    main()
