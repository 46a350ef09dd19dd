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


def test_rehearsal_extrapolates_from_the_shapes():
    import rehearsal
    e = rehearsal.extrapolate({"feature_bytes_per_image": 0, "dtype": "float32"}, clients=6, tasks=3)
    lora, adapter = 159_907_840, rehearsal.ADAPTER
    assert e["params"] == {"lora": lora, "adapter": adapter, "llm": 6_738_673_664}   # Vicuna-7B's linear layers and embeddings
    assert e["upload_gb_per_client_round"] == round(4 * (lora + adapter) / 1e9, 2) == 0.72
    assert e["download_gb_per_client_round"] == round(4 * (lora + 3 * adapter) / 1e9, 2)
    # a turn writes one client's upload and private state; the old layout rewrote every client's too
    private = 3 * adapter + 3 * 1024 + 3
    assert e["checkpoint_gb"]["turn_file"] == round(4 * (lora + adapter + private) / 1e9, 2)
    assert e["checkpoint_gb"]["whole_state_per_turn_before"] > 6 * e["checkpoint_gb"]["turn_file"]
    assert e["feature_cache_gb"] == round(6 * 5500 * 576 * 1024 * 2 / 1e9, 2)       # bf16 H_v, train + test images
    samples = 6 * 5000 * 4
    assert e["training_pflop"] == round(samples * 640 * 6 * 6_738_673_664 / 1e15)
    assert e["gpu_hours"] == round(samples * 640 * 6 * 6_738_673_664 / (0.25 * 989e12) / 3600, 1)
