"""Server aggregation on hand-computed cases."""
import pytest
import torch

import aggregate

# Four clients, one scalar parameter each (plus an all-zero tensor that must not change distances):
# Θ = 0, 1, 3, 7 and n = 1, 1, 2, 4, with M = 2. By hand (docs/METHOD.md's ATA):
#   k=0: N = {1, 2}, d = (1, 3), w = (3/4, 1/4), λ = 1/4 -> 1/4*0 + 3/4*(3/4*1 + 1/4*3) = 9/8
#   k=1: N = {0, 2}, d = (1, 2), w = (2/3, 1/3), λ = 1/4 -> 1/4*1 + 3/4*(1/3*3)         = 1
#   k=2: N = {1, 0}, d = (2, 3), w = (3/5, 2/5), λ = 1/2 -> 1/2*3 + 1/2*(3/5*1)         = 9/5
#   k=3: N = {2, 1}, d = (4, 6), w = (3/5, 2/5), λ = 4/7 -> 4/7*7 + 3/7*(3/5*3 + 2/5*1) = 4 + 33/35
THETA = [0.0, 1.0, 3.0, 7.0]
N = [1, 1, 2, 4]


def _states(values):
    return [{"lora.a": torch.tensor([[v]]), "lora.z": torch.zeros(2, 3)} for v in values]


def test_pairwise_distances_from_gram():
    d = aggregate.pairwise_distances(_states(THETA))
    expected = torch.tensor([[abs(a - b) for b in THETA] for a in THETA], dtype=torch.float64)
    assert torch.allclose(d, expected, atol=1e-12)


def test_ata_hand_computed_four_clients():
    out, A, nb = aggregate.adaptive_text(_states(THETA), N, top_m=2)
    expected = [9 / 8, 1.0, 9 / 5, 4 + 33 / 35]
    for k in range(4):
        assert abs(out[k]["lora.a"].item() - expected[k]) < 1e-6
        assert torch.equal(out[k]["lora.z"], torch.zeros(2, 3))
        assert out[k]["lora.a"].shape == (1, 1)
    # neighbours: the non-zero off-diagonal entries of each row
    neighbours = [sorted(j for j in range(4) if j != k and A[k, j] > 0) for k in range(4)]
    assert neighbours == [[1, 2], [0, 2], [0, 1], [1, 2]]
    assert nb == [[1, 2], [0, 2], [1, 0], [2, 1]]              # N_M(k), nearest first
    assert torch.allclose(A.sum(1), torch.ones(4, dtype=torch.float64))


def test_ata_identical_clients_no_division_by_zero():
    out, A, _ = aggregate.adaptive_text(_states([2.0, 2.0, 5.0, 9.0]), [1, 1, 1, 1], top_m=2)
    assert all(torch.isfinite(o["lora.a"]).all() for o in out)
    # client 0's nearest is client 1 at distance 0: all neighbour weight goes there
    assert A[0, 1] == 1 - A[0, 0] and A[0, 2] == 0
    assert abs(out[0]["lora.a"].item() - 2.0) < 1e-6
    # all four identical: everyone keeps the common value
    out, _, _ = aggregate.adaptive_text(_states([4.0] * 4), [3, 1, 2, 1], top_m=3)
    assert all(abs(o["lora.a"].item() - 4.0) < 1e-6 for o in out)


def test_ata_ties_broken_by_client_index():
    _, A, _ = aggregate.adaptive_text(_states([0.0, 1.0, -1.0, 5.0]), [1, 1, 1, 1], top_m=1)
    assert A[0, 1] > 0 and A[0, 2] == 0


def test_task_aware_visual_averages_within_task_by_sample_count():
    ads = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([100.0, 100.0])}, {"w": torch.tensor([5.0, 4.0])}]
    out = aggregate.task_aware_visual(ads, ["caption", "vqa", "caption"], [1, 5, 3])
    assert set(out) == {"caption", "vqa"}
    assert torch.allclose(out["caption"]["w"], torch.tensor([(1 + 15) / 4, 12 / 4]))
    assert torch.equal(out["vqa"]["w"], torch.tensor([100.0, 100.0]))


def test_fedavg_weights_by_sample_count():
    out = aggregate.fedavg([{"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}], [3, 1])
    assert out["w"].item() == 1.0


def test_mix_in_place_writes_each_clients_own_tensors():
    g = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)} for _ in range(4)]
    A = aggregate.ata_matrix(aggregate.pairwise_distances(states), [1, 2, 3, 4], 2)
    expected = aggregate.mix(states, A)
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    out = aggregate.mix(states, A, inplace=True)
    for k in range(4):
        for key in ("a", "b"):
            assert out[k][key] is states[k][key]                  # the upload's own tensor, overwritten
            assert torch.equal(out[k][key], expected[k][key])
            # and the value is the mix of the inputs as they were before any write
            ref = sum(float(A[k, j]) * before[j][key].double() for j in range(4)).float()
            assert torch.allclose(out[k][key], ref, atol=1e-6)


def test_distances_exact_for_clients_sharing_a_large_start():
    # As in Pilot: every client starts from the same Θ^l_0 and moves a little. float32 products of
    # the raw parameters would lose d² to cancellation (|Θ|² ~ 1e6 x d² here); centred ones do not.
    g = torch.Generator().manual_seed(0)
    start = {"a": 100 * torch.randn(1000, generator=g), "b": 100 * torch.randn(77, generator=g)}
    states = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in start.items()} for _ in range(5)]
    exact = torch.tensor([[sum(float((s[k].double() - t[k].double()).pow(2).sum()) for k in start) ** 0.5
                           for t in states] for s in states], dtype=torch.float64)
    for chunk in (1 << 16, 64):          # 64: several chunks per tensor, a short last one
        d = aggregate.pairwise_distances(states, chunk=chunk)
        assert torch.allclose(d, exact, rtol=1e-5, atol=0)


def test_mix_in_place_refuses_clients_sharing_a_tensor():
    shared = {"a": torch.ones(2)}
    with pytest.raises(ValueError, match="'a'"):
        aggregate.mix([shared, shared], torch.eye(2, dtype=torch.float64), inplace=True)
