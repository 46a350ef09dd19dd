"""The model side: LoRA, stage-1 and CT-MoA connectors, losses, which tensors are trained and sent."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import pilot


def _random_adapter_state(c_v, c, g):
    return {"linear_1.weight": torch.randn(c, c_v, generator=g), "linear_1.bias": torch.randn(c, generator=g),
            "linear_2.weight": torch.randn(c, c, generator=g), "linear_2.bias": torch.randn(c, generator=g)}


def test_lora_with_zero_B_is_the_frozen_layer_exactly():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    x = torch.randn(3, 4, 7)
    expected = base(x)
    lora = pilot.LoRALinear(base, r=2, alpha=4)
    assert torch.equal(lora(x), expected)
    with torch.no_grad():
        lora.lora_B.normal_()
    delta = 2.0 * (x @ lora.lora_A.t() @ lora.lora_B.t())   # alpha / r = 2
    assert torch.allclose(lora(x), expected + delta, atol=1e-6)
    assert not base.weight.requires_grad and lora.lora_A.requires_grad


def test_install_lora_is_deterministic_and_targets_linears():
    def build():
        torch.manual_seed(1)
        m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        m.q_proj, m.other = nn.Linear(4, 3), nn.Linear(4, 3)
        pilot.install_lora(m, r=2, alpha=2, targets=("q_proj",), seed=5)
        return m
    a, b = build(), build()
    assert isinstance(a.q_proj, pilot.LoRALinear) and isinstance(a.other, nn.Linear)
    assert torch.equal(a.q_proj.lora_A, b.q_proj.lora_A)
    assert set(pilot.lora_state(a)) == {"lora.q_proj.lora_A", "lora.q_proj.lora_B"}


def test_difference_loss_zero_for_orthogonal_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    # X_tᵀ X_s sums over token rows: it vanishes when no token carries both features
    x_t = torch.zeros(2, 6, 5)
    x_s = torch.zeros(2, 6, 5)
    x_t[:, :3] = torch.randn(2, 3, 5, generator=g)
    x_s[:, 3:] = torch.randn(2, 3, 5, generator=g)
    assert pilot.difference_loss(x_t, x_s).item() == 0.0
    assert pilot.difference_loss(x_t, x_t).item() > 0
    # per-token rows are unit-normalised: scaling a token does not change the loss
    assert torch.allclose(pilot.difference_loss(3 * x_t, x_t), pilot.difference_loss(x_t, x_t))


def _ctmoa(n_tasks=3, c_v=4, c=5, use_client=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = ["caption", "vqa", "grounding"][:n_tasks]
    globals_ = {t: _random_adapter_state(c_v, c, g) for t in tasks}
    proj = _random_adapter_state(c_v, c, g)
    private = {f"client_adapter.{k}": v for k, v in _random_adapter_state(c_v, c, g).items()}
    conn = pilot.build_ctmoa(c_v, c, proj, tasks, "vqa", globals_, private, use_client=use_client, seed=3)
    with torch.no_grad():  # give ψ^c non-trivial values (its last layer starts at zero)
        for p in conn.cross_adapter.values():
            p.normal_(generator=g)
    return conn, globals_, private


def test_router_probabilities_sum_to_one_per_token():
    conn, _, _ = _ctmoa()
    h = torch.randn(2, 7, 4)
    p = conn.router(h).softmax(-1)
    assert p.shape == (2, 7, 3)
    assert torch.allclose(p.sum(-1), torch.ones(2, 7))


def test_ctmoa_equals_naive_per_sample_per_expert_reference():
    for use_client in (True, False):
        conn, globals_, private = _ctmoa(use_client=use_client)
        h = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
        out, aux = conn(h)

        def mlp(sd, x, pre=""):
            return F.linear(F.gelu(F.linear(x, sd[pre + "linear_1.weight"], sd[pre + "linear_1.bias"])),
                            sd[pre + "linear_2.weight"], sd[pre + "linear_2.bias"])
        ca = conn.cross_adapter
        ref = torch.zeros(2, 3, 5)
        for b in range(2):
            for n in range(3):
                x = h[b, n]
                p = (conn.router.weight @ x + conn.router.bias).softmax(-1)
                y = p[0] * mlp(globals_["vqa"], x)                     # expert 1: own task (vqa)
                for i, t in enumerate(["caption", "grounding"]):       # experts 2..T: foreign + cross
                    cross = F.gelu(F.linear(x, ca["w1"][i], ca["b1"][i])) @ ca["w2"][i] + ca["b2"][i]
                    y = y + p[i + 1] * (mlp(globals_[t], x) + cross)
                if use_client:
                    y = y + mlp(private, x, "client_adapter.")
                ref[b, n] = y
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
        logits = conn.router(h)
        l_b, l_z = pilot.router_losses(logits)
        assert torch.allclose(aux, pilot.LAMBDA_B * l_b + pilot.LAMBDA_Z * l_z)


def test_fresh_cross_adapter_leaves_foreign_expert_unchanged():
    g = torch.Generator().manual_seed(0)
    tasks = ["caption", "vqa"]
    globals_ = {t: _random_adapter_state(4, 5, g) for t in tasks}
    conn = pilot.build_ctmoa(4, 5, _random_adapter_state(4, 5, g), tasks, "caption", globals_, {}, seed=0)
    assert torch.count_nonzero(conn.cross_adapter["w2"]) == 0 and torch.count_nonzero(conn.cross_adapter["b2"]) == 0


def test_load_balance_and_z_loss_values():
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]])   # uniform router over T = 2
    l_b, l_z = pilot.router_losses(logits)
    # f = (1, 0) (argmax ties go to expert 0), p̄ = (0.5, 0.5): L_b = 2 * 0.5 = 1; lse = log 2
    assert torch.isclose(l_b, torch.tensor(1.0)) and torch.isclose(l_z, torch.tensor(2.0).log() ** 2)


def test_trainable_parameters_per_stage():
    """Only what the paper trains: Θ^l plus stage 1 {ψ_t, ψ_s} / stage 2 {expert 1, ψ^c, φ}."""
    model = nn.Module()
    model.backbone = nn.Linear(4, 4)
    model.q_proj = nn.Linear(4, 4)
    pilot.install_lora(model, r=2, alpha=2, targets=("q_proj",))
    g = torch.Generator().manual_seed(0)
    proj = _random_adapter_state(4, 5, g)
    s1 = pilot.build_stage1(4, 5, proj)
    names1 = set(pilot.trainable_parameters(model, s1))
    assert names1 == {"lora.q_proj.lora_A", "lora.q_proj.lora_B"} | {
        f"{a}.linear_{i}.{w}" for a in ("task_adapter", "client_adapter") for i in (1, 2) for w in ("weight", "bias")}
    assert not model.backbone.weight.requires_grad and not model.q_proj.base.weight.requires_grad

    conn, _, _ = _ctmoa()
    names2 = set(pilot.trainable_parameters(model, conn))
    assert names2 == {"lora.q_proj.lora_A", "lora.q_proj.lora_B", "router.weight", "router.bias"} | {
        f"task_adapter.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")} | {
        f"cross_adapter.{k}" for k in ("w1", "b1", "w2", "b2")}
    assert all(not p.requires_grad for p in conn.client_adapter.parameters())
    assert "foreign_w1" in dict(conn.named_buffers())


def test_split_connector_state_keeps_private_tensors_private():
    conn, _, _ = _ctmoa()
    up, private = pilot.split_connector_state(conn)
    assert up and all(k.startswith("task_adapter.") for k in up)
    assert {k.split(".")[0] for k in private} == {"client_adapter", "cross_adapter", "router"}
    assert not any(k.startswith("foreign") for k in {**up, **private})


def test_stage1_starts_at_the_projector_and_separates_task_from_client_adapter():
    """ψ_s starts with a zero last layer, so x_img is the projector's output exactly at step 0; the
    two adapters then get different gradients, and L_d reaches both once ψ_s is non-zero."""
    g = torch.Generator().manual_seed(0)
    proj = _random_adapter_state(4, 5, g)
    projector = pilot.MLPAdapter(4, 5)
    projector.load_state_dict(proj)
    conn = pilot.build_stage1(4, 5, proj)
    h = torch.randn(2, 3, 4, generator=g)
    x, aux = conn(h)
    assert torch.equal(x, projector(h))
    assert torch.count_nonzero(conn.client_adapter.linear_2.weight) == 0
    assert torch.equal(conn.client_adapter.linear_1.weight, proj["linear_1.weight"])
    opt = torch.optim.AdamW(conn.parameters(), lr=1e-2, weight_decay=0.0)
    target = torch.randn(2, 3, 5, generator=g)
    x, aux = conn(h)
    ((x - target).pow(2).mean() + aux).backward()
    opt.step()
    opt.zero_grad()
    t, s = conn.task_adapter.state_dict(), conn.client_adapter.state_dict()
    assert (t["linear_2.weight"] - s["linear_2.weight"]).abs().max() > 1e-3
    x_t, x_s = conn.task_adapter(h), conn.client_adapter(h)
    assert x_s.abs().max() > 0
    pilot.difference_loss(x_t, x_s).backward()
    for adapter in (conn.task_adapter, conn.client_adapter):
        assert adapter.linear_2.weight.grad.abs().max() > 0
    # a client that has a ψ_s continues from it
    mine = {f"client_adapter.{k}": v + 1 for k, v in proj.items()}
    again = pilot.build_stage1(4, 5, proj, private=mine)
    assert torch.equal(again.client_adapter.linear_2.weight, proj["linear_2.weight"] + 1)


def test_loss_weights_are_passed_into_the_connectors():
    g = torch.Generator().manual_seed(0)
    proj = _random_adapter_state(4, 5, g)
    h = torch.randn(2, 3, 4, generator=g)
    a, b = pilot.build_stage1(4, 5, proj, lambda_d=0.1), pilot.build_stage1(4, 5, proj, lambda_d=0.3)
    with torch.no_grad():
        for conn in (a, b):
            conn.client_adapter.linear_2.weight.copy_(proj["linear_2.weight"])
    assert torch.allclose(b(h)[1], 3 * a(h)[1]) and a(h)[1] > 0
    tasks = ["caption", "vqa"]
    globals_ = {t: _random_adapter_state(4, 5, g) for t in tasks}
    c = pilot.build_ctmoa(4, 5, proj, tasks, "vqa", globals_, {}, lambda_b=0.5, lambda_z=0.0)
    l_b, _ = pilot.router_losses(c.router(h))
    assert torch.allclose(c(h)[1], 0.5 * l_b)
