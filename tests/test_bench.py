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


def test_in_place_ata_needs_no_second_copy_of_the_uploads():
    # 4 clients x 16M parameters (256 MB of uploads), each aggregation in a fresh process
    peak = bench.aggregation_peak_mb(4, 64 * 250_000)
    uploads_mb = 4 * 64 * 250_000 * 4 / 2**20
    assert peak["ata"] > 0.9 * uploads_mb          # returning new tensors: the uploads' size again
    assert peak["ata_inplace"] < 0.25 * uploads_mb  # in place: one tensor per client (4 MB) plus small buffers
    assert peak["fedavg"] < 0.5 * uploads_mb       # one averaged adapter (64 MB)
