"""
Pilot's model side: hand-written LoRA (the text adapter Θ^l), the stage-1 connector (task adapter
ψ_t + client adapter ψ_s, difference loss) and the stage-2 CT-MoA connector (own task adapter,
frozen foreign task adapters ψ^t_i each plus a cross-task adapter ψ^c_i, router φ, load-balance and
z losses), and the forward pass that puts a connector between a LLaVA model's frozen vision tower
and its frozen, LoRA-adapted LLM. Equations and notation follow docs/METHOD.md.

Nothing here runs on its own: client.py trains it, evaluate.py scores it, tests/ check it.

State-dict naming (the contract between client, server and checkpoints):
    lora.<module path>.lora_A / .lora_B       Θ^l           uploaded, personalised by ATA
    task_adapter.linear_{1,2}.{weight,bias}   ψ_t / expert 1 uploaded as Θ^a
    client_adapter.*                          ψ_s           private, never leaves the client
    cross_adapter.*                           ψ^c_i         private (stage 2), stacked over i
    router.*                                  φ             private (stage 2)
    global_task_adapter.<task>.linear_*       ψ^t_τ         downloaded, one per task
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The paper's loss weights, used as defaults only: client.py passes the --lambda-* settings into the connectors.
LAMBDA_D = 0.1    # λ0, difference loss weight (stage 1)
LAMBDA_B = 0.1    # λ1, load-balance loss weight (stage 2)
LAMBDA_Z = 0.01   # λ2, router z-loss weight (stage 2)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- LoRA (text adapter Θ^l)
class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x with W frozen and B zero-initialised, so it starts as W exactly."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scaling = alpha / r
        # trainable tensors stay fp32 even when the frozen weights are bf16
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        delta = (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
        return self.base(x) + (self.scaling * delta).to(x.dtype)


def install_lora(language_model: nn.Module, r: int, alpha: float, targets=LORA_TARGETS, seed: int = 0):
    """Wrap every target nn.Linear of the LLM in a LoRALinear. The A matrices are drawn from one
    seeded generator, so every client and the server can build the same initial Θ^l."""
    g = torch.Generator().manual_seed(seed)
    names = [n for n, m in language_model.named_modules()
             if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        raise ValueError(f"no nn.Linear named one of {targets} in the language model")
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = language_model.get_submodule(parent) if parent else language_model
        lora = LoRALinear(getattr(holder, child), r, alpha)
        with torch.no_grad():  # same init as kaiming_uniform_(a=sqrt(5)), but from our generator
            bound = 1.0 / math.sqrt(lora.lora_A.shape[1])
            lora.lora_A.copy_(torch.rand(lora.lora_A.shape, generator=g) * 2 * bound - bound)
        setattr(holder, child, lora)
    return names


def lora_state(model: nn.Module) -> dict:
    """Θ^l as a flat dict 'lora.<path>.lora_A|B' -> tensor (the live parameters, not copies)."""
    return {f"lora.{n}": p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


# ----------------------------------------------------------------------------- adapters
class MLPAdapter(nn.Module):
    """Linear(C_v, C), GELU, Linear(C, C): the LLaVA-1.5 projector's shape and parameter names."""

    def __init__(self, c_v: int, c: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(c_v, c), nn.Linear(c, c)

    def forward(self, h):
        return self.linear_2(F.gelu(self.linear_1(h)))


def difference_loss(x_t, x_s):
    """L_d (Domain Separation Networks' soft orthogonality): rows = tokens of the batch, each row
    L2-normalised with its norm detached, L_d = mean of the squared entries of X̂_tᵀ X̂_s (C x C).
    [reading] per-token rows; the released code flattens a whole sample into one row."""
    xt = x_t.reshape(-1, x_t.shape[-1]).float()
    xs = x_s.reshape(-1, x_s.shape[-1]).float()
    xt = xt / xt.norm(dim=1, keepdim=True).detach().clamp_min(1e-6)
    xs = xs / xs.norm(dim=1, keepdim=True).detach().clamp_min(1e-6)
    return (xt.t() @ xs).pow(2).mean()


class Stage1Connector(nn.Module):
    """Stage 1: x_img = ψ_t(H_v) + ψ_s(H_v); aux loss λ0 L_d(x_t, x_s)."""

    def __init__(self, c_v: int, c: int, use_client: bool = True, lambda_d: float = LAMBDA_D):
        super().__init__()
        self.lambda_d = lambda_d
        self.task_adapter = MLPAdapter(c_v, c)
        self.client_adapter = MLPAdapter(c_v, c) if use_client else None

    def forward(self, h_v):
        x_t = self.task_adapter(h_v)
        if self.client_adapter is None:  # ablation pilot-no-stage1 / plain connector
            return x_t, x_t.new_zeros(())
        x_s = self.client_adapter(h_v)
        return x_t + x_s, self.lambda_d * difference_loss(x_t, x_s)


def router_losses(logits):
    """Switch-Transformer load balance L_b = T Σ_e f_e p̄_e and router z-loss L_z = mean(lse²)."""
    t = logits.shape[-1]
    p = logits.float().softmax(-1).reshape(-1, t)
    f = F.one_hot(p.argmax(-1), t).float().mean(0)   # fraction of tokens whose top-1 expert is e
    l_b = t * (f * p.mean(0)).sum()
    l_z = torch.logsumexp(logits.float(), -1).pow(2).mean()
    return l_b, l_z


def mixture(h, w1, b1, w2, b2, coef):
    """Σ_i coef_i MLP_i(h) for M stacked MLPs in one pair of matmuls, no loop over experts:
    w1 [M, C, C_v] (nn.Linear layout), b1 [M, C], w2 [M, C, C_out] (input-major: y = g @ w2[i]),
    b2 [M, C_out], coef [B, N, M]. Since Σ_i coef_i g_i W2_i = [coef_1 g_1 | ... | coef_M g_M] [W2_1; ...; W2_M],
    the mixture folds into the second matmul. Both reshapes are views: no weight is copied."""
    b, n, _ = h.shape
    m, c = w1.shape[0], w1.shape[1]
    g = F.gelu(h @ w1.reshape(m * c, -1).t() + b1.reshape(-1))          # [B, N, M*C]
    g = (g.view(b, n, m, c) * coef[..., None]).view(b, n, m * c)
    return g @ w2.reshape(m * c, -1) + coef @ b2


def frozen_experts(h, w1, b1, w2, b2):
    """The outputs y_i = MLP_i(h) of M frozen MLPs, [B, N, M, C_out] (weights laid out as in
    mixture). Nothing here is trained and H_v is frozen, so no graph is kept: the router's gradient
    needs only y_i (∂/∂P_i of Σ P_i y_i is y_i). Folding P_i into the second matmul, as mixture()
    does for trainable experts, would make backward repeat that matmul just for the router."""
    b, n, _ = h.shape
    m, c = w1.shape[0], w1.shape[1]
    with torch.no_grad():
        g = F.gelu(h @ w1.reshape(m * c, -1).t() + b1.reshape(-1))          # [B, N, M*C]
        y = torch.baddbmm(b2[:, None, :], g.view(b * n, m, c).transpose(0, 1), w2)   # [M, B*N, C_out]
    return y.transpose(0, 1).reshape(b, n, m, -1)


class CTMoAConnector(nn.Module):
    """Stage 2, cross-task Mixture-of-Adapters for a client of task τ(k) among T tasks.

    Experts in the router's order: 1 = own task adapter (trainable), 2..T = the other tasks' global
    task adapters ψ^t_i (frozen buffers) each plus a trainable cross-task adapter ψ^c_i.
        P = softmax(φ(H_v)),  x_img = ψ_s(H_v) + P_1 ψ_t(H_v) + Σ_{i≥2} P_i (ψ^t_i(H_v) + ψ^c_i(H_v))
    Dense over all T experts, batched (no loop over samples or experts). The frozen experts are
    computed without a graph (frozen_experts) and the trainable cross-task adapters as one stacked
    mixture, so that backward does matmuls for trainable tensors only."""

    def __init__(self, c_v: int, c: int, n_tasks: int, use_client: bool = True,
                 lambda_b: float = LAMBDA_B, lambda_z: float = LAMBDA_Z):
        super().__init__()
        f = n_tasks - 1  # foreign experts
        self.n_tasks, self.lambda_b, self.lambda_z = n_tasks, lambda_b, lambda_z
        self.task_adapter = MLPAdapter(c_v, c)
        self.client_adapter = MLPAdapter(c_v, c).requires_grad_(False) if use_client else None
        self.register_buffer("foreign_w1", torch.zeros(f, c, c_v))
        self.register_buffer("foreign_b1", torch.zeros(f, c))
        self.register_buffer("foreign_w2", torch.zeros(f, c, c))     # input-major, see mixture()
        self.register_buffer("foreign_b2", torch.zeros(f, c))
        self.cross_adapter = nn.ParameterDict({
            "w1": nn.Parameter(torch.zeros(f, c, c_v)), "b1": nn.Parameter(torch.zeros(f, c)),
            "w2": nn.Parameter(torch.zeros(f, c, c)), "b2": nn.Parameter(torch.zeros(f, c))})
        # one expert (ablation pilot-no-ctmoa) needs no router: its weight is always 1
        self.router = nn.Linear(c_v, n_tasks) if n_tasks > 1 else None

    def forward(self, h_v):
        b, n, _ = h_v.shape
        if self.router is None:
            x, aux = self.task_adapter(h_v), h_v.new_zeros(())
        else:
            logits = self.router(h_v)                                         # [B, N, T]
            p = logits.float().softmax(-1).to(h_v.dtype)
            ca, pf = self.cross_adapter, p[..., 1:]
            x = p[..., :1] * self.task_adapter(h_v)
            y = frozen_experts(h_v, self.foreign_w1, self.foreign_b1, self.foreign_w2, self.foreign_b2)
            x = x + (pf.unsqueeze(-2) @ y).squeeze(-2)                        # Σ_i P_i ψ^t_i(H_v)
            x = x + mixture(h_v, ca["w1"], ca["b1"], ca["w2"], ca["b2"], pf)
            l_b, l_z = router_losses(logits)
            aux = self.lambda_b * l_b + self.lambda_z * l_z
        if self.client_adapter is not None:
            x = x + self.client_adapter(h_v)                                  # ψ_s, weight 1, frozen
        return x, aux


# ----------------------------------------------------------------------------- building the connectors
def projector_state(model) -> dict:
    """The backbone's pretrained projector as an MLPAdapter state dict (linear_1/2 weight/bias)."""
    return {k: v.detach().clone().float() for k, v in model.model.multi_modal_projector.state_dict().items()}


def _load_adapter(adapter: MLPAdapter, sd: dict):
    adapter.load_state_dict({k: v.to(adapter.linear_1.weight.dtype) for k, v in sd.items()})


def sub_state(state: dict, prefix: str) -> dict:
    """{key without prefix: tensor} for the keys that start with prefix."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def fresh_client_adapter(projector: dict) -> dict:
    """A new ψ_s. [reading] docs/METHOD.md, "Stage 1", R1: the projector's first layer
    and a ZERO last layer, so ψ_s(H_v) = 0 and x_img = ψ_t(H_v) starts as the projector's output.
    Why not a copy of the projector (the released fragment): ψ_t and ψ_s would start equal, and
    since x_img = x_t + x_s and L_d is symmetric in them, they would get identical gradients at
    every step and stay equal; the zero last layer breaks that symmetry from the first step."""
    return {**{k: v for k, v in projector.items() if k.startswith("linear_1.")},
            **{k: torch.zeros_like(v) for k, v in projector.items() if k.startswith("linear_2.")}}


def _client_adapter_state(projector, private):
    """The client's own ψ_s when it has one (it continues from it), else a fresh one."""
    return sub_state(private or {}, "client_adapter.") or fresh_client_adapter(projector)


def build_stage1(c_v, c, projector: dict, global_task=None, private=None, use_client=True, lambda_d=LAMBDA_D):
    """ψ_t from the global task adapter of the client's task when there is one, else from the
    projector; ψ_s from the client's private state, else fresh (fresh_client_adapter)."""
    conn = Stage1Connector(c_v, c, use_client, lambda_d)
    _load_adapter(conn.task_adapter, global_task or projector)
    if use_client:
        _load_adapter(conn.client_adapter, _client_adapter_state(projector, private))
    return conn


def build_ctmoa(c_v, c, projector: dict, tasks, own_task, global_tasks: dict, private=None,
                use_client=True, seed=0, lambda_b=LAMBDA_B, lambda_z=LAMBDA_Z):
    """CT-MoA for a client of own_task: expert 1 from the global ψ^t of own_task, foreign experts
    from the other tasks' global ψ^t (frozen), ψ_s (frozen), ψ^c and φ from the client's private
    state when it has them. Fresh ψ^c: first layer from the projector, last layer zero
    ([reading] so h_i starts as ψ^t_i). Fresh φ: seeded default nn.Linear init. A client without a
    ψ_s (no stage-1 round) gets a fresh one, whose output is zero: frozen, it adds nothing."""
    private = private or {}
    foreign = [t for t in tasks if t != own_task]
    conn = CTMoAConnector(c_v, c, len(tasks), use_client, lambda_b, lambda_z)
    _load_adapter(conn.task_adapter, global_tasks[own_task])
    with torch.no_grad():
        for i, t in enumerate(foreign):
            gt = global_tasks[t]
            conn.foreign_w1[i], conn.foreign_b1[i] = gt["linear_1.weight"], gt["linear_1.bias"]
            conn.foreign_w2[i], conn.foreign_b2[i] = gt["linear_2.weight"].t(), gt["linear_2.bias"]
        cross = sub_state(private, "cross_adapter.")
        if cross:
            for k, v in cross.items():
                conn.cross_adapter[k].copy_(v)
        else:
            conn.cross_adapter["w1"].copy_(projector["linear_1.weight"].expand_as(conn.cross_adapter["w1"]))
            conn.cross_adapter["b1"].copy_(projector["linear_1.bias"].expand_as(conn.cross_adapter["b1"]))
        router = sub_state(private, "router.")
        if conn.router is None:
            pass
        elif router:
            conn.router.load_state_dict(router)
        else:
            g = torch.Generator().manual_seed(seed)
            bound = 1.0 / math.sqrt(c_v)
            conn.router.weight.copy_(torch.rand(conn.router.weight.shape, generator=g) * 2 * bound - bound)
            conn.router.bias.copy_(torch.rand(conn.router.bias.shape, generator=g) * 2 * bound - bound)
    if use_client:
        _load_adapter(conn.client_adapter, _client_adapter_state(projector, private))
    return conn


# Which connector tensors travel where (see the module docstring).
UPLOADED = ("task_adapter.",)
PRIVATE = ("client_adapter.", "cross_adapter.", "router.")


def trainable_parameters(model: nn.Module, conn: nn.Module) -> dict:
    """Switch on exactly what the paper trains and return it by name: Θ^l ('lora.*') plus the
    connector's trainable tensors (stage 1: ψ_t, ψ_s; stage 2: expert 1, ψ^c, φ). The vision tower,
    the LLM's own weights, the frozen foreign experts and (stage 2) ψ_s stay frozen."""
    model.requires_grad_(False)
    lora = lora_state(model)
    for p in lora.values():
        p.requires_grad_(True)
    return {**lora, **{n: p for n, p in conn.named_parameters() if p.requires_grad}}


def split_connector_state(conn: nn.Module):
    """(uploaded, private) detached copies of the connector's state; frozen foreign experts are
    neither (the client got them from the server and sends nothing back about them)."""
    sd = {k: v.detach().clone().float() for k, v in conn.state_dict().items()}
    up = {k: v for k, v in sd.items() if k.startswith(UPLOADED)}
    private = {k: v for k, v in sd.items() if k.startswith(PRIVATE)}
    return up, private


# ----------------------------------------------------------------------------- forward passes
def image_features(model, pixel_values, grad=False):
    """H_v = f(X_v) as the checkpoint's config selects it: the hidden states of vision_feature_layer
    (an index, or a list of indices whose states are concatenated along the width), the first token
    (CLIP's class token) dropped when vision_feature_select_strategy is "default", every token kept
    when it is "full" (SigLIP has no class token). LLaVA-1.5: layer -2, "default". Frozen during
    federated tuning (grad=False); only the tiny backbone's pretraining trains it."""
    cfg = model.config
    with torch.set_grad_enabled(grad):
        out = model.model.vision_tower(pixel_values.to(model.dtype), output_hidden_states=True)
    layer = cfg.vision_feature_layer
    h = torch.cat([out.hidden_states[i] for i in layer], -1) if isinstance(layer, (list, tuple)) \
        else out.hidden_states[layer]
    return h[:, 1:] if cfg.vision_feature_select_strategy == "default" else h


def embed(model, x_img, input_ids):
    """The LLM's input embeddings with the image placeholder tokens replaced by x_img."""
    emb = model.get_input_embeddings()(input_ids)
    mask = (input_ids == model.config.image_token_id)[..., None]
    return emb.masked_scatter(mask, x_img.to(emb.dtype))


def lm_loss(model, x_img, input_ids, attention_mask, labels, reduction="mean"):
    """Next-token cross-entropy on answer tokens only (labels -100 elsewhere): the mean over those
    tokens of the batch (reduction="sum": their sum). The LM head runs on the answer positions
    alone: the rest of the vocabulary projection would be thrown away."""
    emb = embed(model, x_img, input_ids)
    hidden = model.model.language_model(inputs_embeds=emb, attention_mask=attention_mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), target[keep], reduction=reduction)


@torch.no_grad()
def generate(model, x_img, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id):
    """Greedy decoding from left-padded prompts whose image tokens are replaced by x_img."""
    emb = embed(model, x_img, input_ids)
    return model.generate(inputs_embeds=emb, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
