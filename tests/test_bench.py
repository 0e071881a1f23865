"""bench.py: the analytic FLOP count against PyTorch's operator-level count, the baseline is the
same computation as ours, and --quick writes a complete table (no timing assertions)."""

import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import common
from model import PixelBert

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def keep_threads():
    """bench.main sets the process's thread count (--threads); give the next tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def small_cfg(**overrides):
    return bench.Config(**{**dict(device="cpu", model="tiny", quick=True, image_min_size=64, image_max_size=96,
                                  batch_size=4, text_len=12, pixel_samples=3, num_answers=7,
                                  captions_per_image=2), **overrides})


def losses(task, model, batch, cfg):
    return bench.step_losses(task, model, model, batch, CPU, "fp32", cfg.pixel_samples)


@pytest.mark.parametrize("task,arch,per_image,pool", [
    ("pretrain", dict(cnn_depth=18), 2, 2),  # BasicBlock, pixel sampling, two captions per image
    ("vqa", dict(cnn_depth=50, cnn_groups=4, cnn_width_per_group=8), 1, 2),  # grouped Bottleneck (ResNeXt)
    ("pretrain", dict(cnn_depth=34), 1, 1),  # unpooled pixels, fewer tokens than samples
    ("pretrain", dict(cnn_depth=18, pixel_proj_first=False), 1, 2),  # pooled before the projection
])
def test_flop_count_matches_flop_counter(task, arch, per_image, pool):
    """train_flops against torch.utils.flop_counter on a real training step (forward + backward);
    attention runs in the math backend so its matrix products are visible to the counter."""
    torch.manual_seed(0)
    cfg = small_cfg(captions_per_image=per_image, pixel_samples=3 if pool == 2 else 100)
    heads = dict(heads=("mlm", "itm")) if task == "pretrain" else dict(heads=("vqa",), num_answers=7)
    c = bench.model_config("tiny", True, vocab_size=100, pixel_pool=pool, **heads, **arch)
    model = PixelBert(c).train()
    batch = bench.step_batch(cfg, task, 4, per_image, c.vocab_size, torch.Generator().manual_seed(0))
    batch = common.batch_to_device(batch, CPU, False)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward_counter:
            loss = losses(task, model, batch, cfg).sum()
        with FlopCounterMode(display=False) as backward_counter:
            loss.backward()
    images, H, W = batch["images"].shape[0], *batch["images"].shape[2:]
    tokens = batch["image_mask"][0, :: 32 * pool, :: 32 * pool].numel()
    pixels = min(tokens, cfg.pixel_samples) if task == "pretrain" else tokens
    masked = int((batch["mlm_labels"] != -100).sum()) if task == "pretrain" else 0
    assert images == 4 // per_image
    args = (c, images, H, W, 4, batch["input_ids"].shape[1], pixels, masked, 7)
    assert bench.train_flops(*args, backward=False) == forward_counter.get_total_flops()
    if c.cnn_groups == 1:  # the counter charges a grouped conv's input gradient as if ungrouped
        assert bench.train_flops(*args) == forward_counter.get_total_flops() + backward_counter.get_total_flops()


def test_r50_flops_are_the_known_resnet50_count():
    """ResNet-50 at 224x224 is 4.09 GMACs (torchvision's reported 4.09 GFLOPS counts multiply-adds)."""
    total, _, channels = bench.cnn_flops(bench.model_config("r50", False), 224, 224)
    assert channels == 2048 and abs(total / 2 / 1e9 - 4.09) < 0.01


@pytest.mark.parametrize("arch", ["tiny", "r50"])
def test_conv_ceiling_times_every_convolution_of_the_cnn(arch):
    """conv_ceiling finds the CNN's convolutions by recording its forward (on the meta device) and
    times each: its FLOPs are the analytic count of the CNN's training step (forward, weight and
    input gradients, none for the image)."""
    c = bench.model_config(arch, arch == "tiny")
    with torch.device("meta"):
        cnn, images = bench.ResNet(c), torch.empty(2, 3, 64, 96)
    flops, seconds = bench.conv_ceiling(cnn, images, CPU, 1)
    cnn, stem, _ = bench.cnn_flops(c, 64, 96)
    assert flops == 2 * (3 * cnn - stem) and seconds > 0


@pytest.mark.parametrize("task", ["pretrain", "vqa"])
def test_baseline_is_the_same_computation(task):
    """Our weights copied into the torchvision + transformers model give the same outputs, so the
    ours/baseline ratio compares two implementations of one computation."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    heads = dict(heads=("mlm", "itm")) if task == "pretrain" else dict(heads=("vqa",), num_answers=7)
    c = bench.model_config("tiny", True, vocab_size=100, dropout=0.0, **heads)
    ours, glued = PixelBert(c).eval(), bench.GluedBaseline(c).eval()
    renames = {"visual.proj.": "proj.", "visual.type_embedding": "type_embedding", "itm_head.": "cls.seq_relationship."}
    state = {}
    for key, value in ours.state_dict().items():
        for old, new in renames.items():
            key = key.replace(old, new) if key.startswith(old) else key
        state[key] = value
    missing, unexpected = glued.load_state_dict(state, strict=False)
    assert not unexpected
    # itm_head is the NSP classifier under a second name; the decoder is tied to the word embeddings
    assert set(missing) <= {"itm_head.weight", "itm_head.bias", "cls.predictions.decoder.weight",
                            "cls.predictions.decoder.bias"}, missing
    cfg = small_cfg(pixel_samples=0)
    batch = common.batch_to_device(bench.step_batch(cfg, task, 4, 2, c.vocab_size, torch.Generator().manual_seed(1)),
                                   CPU, False)
    batch["text_mask"][0, -3:] = False  # padded text must be masked the same way in both
    with torch.no_grad():
        args = (batch["input_ids"], batch["text_mask"], batch["images"], batch["image_mask"])
        hidden, pooled = ours(*args, image_index=batch["image_index"])
        hidden_b, pooled_b = glued(*args, image_index=batch["image_index"])
        assert torch.allclose(hidden, hidden_b, atol=1e-4) and torch.allclose(pooled, pooled_b, atol=1e-4)
        if task == "pretrain":
            assert torch.allclose(ours.mlm_logits(hidden), glued.mlm_logits(hidden), atol=1e-4)
            assert torch.allclose(ours.itm_head(pooled), glued.itm_head(pooled), atol=1e-5)
        else:
            assert torch.allclose(ours.vqa_head(pooled), glued.vqa_head(pooled), atol=1e-5)


def test_padding_fractions():
    fractions = bench.padding_fractions(32, 800, 1333, count=512)
    assert 0 < fractions["grouped"] < fractions["ungrouped"] < 1


@pytest.mark.slow
def test_quick_run_writes_the_table(tmp_path, capsys):
    """No timing is asserted (it depends on the machine): the figures derived from the timings
    must be the ones their definitions give, and what does not depend on time (FLOPs, losses
    of one computation) must agree between rows."""
    out = tmp_path / "bench.json"
    result = bench.main(["--quick", "--out", str(out), "--loader-images", "4"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    expected = [n for n in bench.DEFAULT_ROWS["cpu"] if "+fold" not in n]  # the tiny model has no frozen BatchNorm
    assert [r["name"] for r in result["rows"]] == expected
    assert not any(r[5] or r[6] for r in bench.ROWS if r[0] in expected)  # no compile, no cuDNN autotuning
    assert set(result["peak_tflops"]) == {"fp32", "bf16"} and all(v > 0 for v in result["peak_tflops"].values())
    texts = result["meta"]["batch_size"] * result["meta"]["accum"]
    measured = []
    for r in result["rows"]:
        assert "error" not in r, r
        if "skipped" in r:  # only the baseline rows may be skipped, when transformers is absent
            assert r["impl"] == "baseline"
            continue
        measured.append(r)
        seconds = r["step_ms"] / 1000
        assert r["samples_per_s"] * seconds == pytest.approx(texts)
        assert r["tflops"] == pytest.approx(r["flops_per_step"] / seconds / 1e12)
        assert r["peak_fraction"] == pytest.approx(r["tflops"] / result["peak_tflops"][r["dtype"]])
        assert r["mem_mb_per_sample"] > 0 and all(math.isfinite(v) for v in r["loss"])
    # FLOPs are the computation's, not the precision's or the memory layout's: every row of one task and
    # captions-per-image setting (the same seeded batch) counts the same, ours and the baseline alike
    flops = {}
    for r in measured:
        flops.setdefault((r["task"], r["captions_per_image"]), set()).add(r["flops_per_step"])
    assert all(len(v) == 1 for v in flops.values()) and len(flops) == 3, flops
    by_name = {r["name"]: r for r in result["rows"]}
    for r in measured:
        if r["impl"] == "baseline":
            mine = by_name[r["name"].removeprefix("baseline ")]
            assert r["vs_baseline"] == mine["vs_baseline"] == f"{mine['step_ms'] / r['step_ms']:.2f}"
    loading = result["loading"]
    assert loading["batch_shape"][1:] == [3, 1088, 1088]  # 1067x800 and 800x1067, padded to 64
    assert loading["step_images_per_s"] == by_name["pretrain bf16 +cl +fused"]["samples_per_s"]
    assert loading["workers_needed"] == pytest.approx(loading["step_images_per_s"] / loading["images_per_s_per_worker"])
    table = capsys.readouterr().out
    assert "| row | samples/s |" in table and all(name in table for name in expected)
    assert "aspect-ratio grouping" in table and "data loading" in table
    retrieval = result["retrieval"]
    assert "error" not in retrieval, retrieval
    # ratio = transformer time / total time = pairs/s overall / pairs/s of the transformer alone
    assert retrieval["ratio"] == pytest.approx(retrieval["pairs_per_s"] / retrieval["transformer_pairs_per_s"])
    # the protocols' hours from one cost per image and one per pair: Flickr30K 1K x 5K, COCO 5K x 25K
    flickr_s, coco_s = 3600 * retrieval["flickr30k_1k_h"], 3600 * retrieval["coco_5k_h"]
    per_pair = retrieval["flickr30k_ratio"] * flickr_s / 5e6
    per_image = (flickr_s - 5e6 * per_pair) / 1000
    assert per_pair == pytest.approx(1 / retrieval["transformer_pairs_per_s"])
    assert coco_s == pytest.approx(5000 * per_image + 1.25e8 * per_pair)
    assert "retrieval scoring: 2 images x 32" in table
    ceiling = result["conv_ceiling"]
    candidates = [r for r in measured if r["impl"] == "ours" and r["task"] == "pretrain" and r["dtype"] == "bf16"
                  and r["captions_per_image"] == 1]
    fastest = min(candidates, key=lambda r: r["step_ms"])
    conv_seconds = result["meta"]["accum"] * ceiling["ms_per_micro_batch"] / 1000
    assert ceiling["fastest_row"] == fastest["name"] and "convolutions alone" in table
    assert ceiling["conv_share_of_fastest"] == pytest.approx(1000 * conv_seconds / fastest["step_ms"])
    assert ceiling["step_bound"] == pytest.approx(
        fastest["flops_per_step"] / conv_seconds / (result["peak_tflops"]["bf16"] * 1e12))


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(SystemExit, match="--device tpu: choose cpu or cuda"):
        bench.main(["--device", "tpu"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: no CUDA device"):
            bench.main(["--device", "cuda"])
    with pytest.raises(SystemExit, match="--rows: unknown"):
        bench.main(["--quick", "--rows", "pretrain fp64", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="autotune cuDNN, which needs --device cuda"):
        bench.main(["--quick", "--rows", "pretrain bf16 +cl +fused +autotune", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="--source-size '640by480': give WIDTHxHEIGHT"):
        bench.main(["--quick", "--source-size", "640by480", "--rows", "pretrain fp32",
                    "--out", str(tmp_path / "x.json")])


def test_a_failing_row_is_recorded_and_the_run_goes_on(tmp_path):
    """3 texts cannot share images 2 by 2: that row records the error, the next row still runs."""
    result = bench.main(["--quick", "--batch-size", "3", "--captions-per-image", "2", "--loader-images", "2",
                         "--rows", "pretrain bf16 +cl +fused +captions/image,pretrain bf16 +cl +fused",
                         "--out", str(tmp_path / "x.json")])
    rows = {r["name"]: r for r in result["rows"]}
    assert "is not a multiple of 2 captions per image" in rows["pretrain bf16 +cl +fused +captions/image"]["error"]
    assert rows["pretrain bf16 +cl +fused"]["samples_per_s"] > 0
