"""
Reference vectors for porters: fixed inputs and the outputs PILOT_METHOD.md's equations give, in
float64, written out plainly here, independently of the implementation under test (nothing from
pilot.py or aggregate.py is imported).

    python tests/reference/generate.py          # rewrites vectors.safetensors and index.json here

vectors.safetensors holds float64 tensors named "<case>/<name>"; index.json describes each case:
its equation, which tensors are inputs and which are expected outputs, its scalar settings, and
the tolerance that tests/test_reference.py checks an fp32 implementation against. Layouts: every
MLP adapter is Linear(C_v, C), GELU (exact, erf), Linear(C, C) with weights as nn.Linear stores
them, [out, in]; a token batch is [B, N, C_v]; stacked experts are [T - 1, ...].
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
    """Rows = tokens of the batch, each divided by its L2 norm; mean of the squared entries of X̂_tᵀ X̂_s."""
    xt, xs = x_t.reshape(-1, x_t.shape[-1]), x_s.reshape(-1, x_s.shape[-1])
    xt = xt / xt.norm(dim=1, keepdim=True)
    xs = xs / xs.norm(dim=1, keepdim=True)
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


def distances(states):
    flat = [torch.cat([s[k].reshape(-1) for k in sorted(s)]) for s in states]
    return torch.tensor([[float((a - b).norm()) for b in flat] for a in flat], dtype=torch.float64)


def ata(states, n, m):
    """Θ̄_k = λ_k Θ_k + (1 − λ_k) Σ_{j∈N_M(k)} w_kj Θ_j; N_M(k): the M nearest j ≠ k (ties by index);
    w ∝ 1/d (neighbours at distance 0 share all the weight equally); λ_k = n_k / (n_k + Σ_{N_M(k)} n_j)."""
    d = distances(states)
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
    return tensors, index


def main():
    tensors, index = build()
    save_file(tensors, str(HERE / "vectors.safetensors"))
    (HERE / "index.json").write_text(json.dumps({"format": FORMAT, "cases": index}, indent=1,
                                                ensure_ascii=False) + "\n")
    print(f"wrote {len(tensors)} tensors in {len(index)} cases to {HERE}")


if __name__ == "__main__":
    main()
