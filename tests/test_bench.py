"""bench.py's reference and arithmetic (its timings are printed, never asserted)."""
import bench


def test_loop_reference_matches_batched_ctmoa():
    r = bench.bench_ctmoa(2, 4, 8, 16, 3, "cpu", repeats=1)
    assert r["max_abs_diff"] < 1e-5 and r["batched_s"] > 0 and r["loop_s"] > 0


def test_llava_7b_communication_arithmetic():
    r = bench.comm_7b(r=64, tasks=3)
    per_layer = 4 * 64 * (4096 + 4096) + 2 * 64 * (4096 + 11008) + 64 * (11008 + 4096)
    assert r["lora_params"] == 32 * per_layer == 159_907_840
    assert r["adapter_params"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert r["pilot_down_params"] == r["lora_params"] + 3 * r["adapter_params"]
    assert r["bytes_up_per_round_pilot_7b"] == 4 * (r["lora_params"] + r["adapter_params"])
