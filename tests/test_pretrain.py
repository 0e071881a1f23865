"""pretrain.py end to end on a small demo corpus: the loss falls, checkpoints load safely, and
two processes under torchrun (gloo) reproduce one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import common
import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_run_args(root, out_dir, **overrides):
    """The tiny model on 64-96 px images, fp32, no dropout: fast and deterministic."""
    args = dict(data="coco_vg", data_root=root, out_dir=out_dir, model="tiny", image_min_size=64, image_max_size=96,
                batch_size=8, global_batch=16, dtype="fp32", dropout=0.0, lr=1e-3, cnn_lr=1e-3, cnn_optimizer="adamw",
                warmup_steps=5, log_every=1, num_workers=0, eval_pairs=32, ckpt_every=1000, max_steps=4, seed=0)
    args.update(overrides)
    return [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]


def read_losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["mlm_loss"], r["itm_loss"]) for r in rows if "mlm_loss" in r]


@pytest.mark.slow
def test_short_pretraining_run_learns(corpus, tmp_path):
    out = str(tmp_path / "run")
    metrics = pretrain.main(small_run_args(corpus, out, max_steps=40, global_batch=32, batch_size=16))
    losses = read_losses(out)
    first, last = sum(map(sum, losses[:5])) / 5, sum(map(sum, losses[-5:])) / 5
    assert last < first - 1.0, (first, last)  # MLM quickly learns the corpus' word statistics
    # 25 held-out pairs and 40 steps: accuracy is at or just past the most frequent token's (exactly at it
    # on an AVX2 CPU, whose fp32 kernels round differently from AVX-512's); the loss above shows the learning.
    assert metrics["mlm_acc"] >= metrics["mlm_baseline"]
    state = checkpoint.load_checkpoint(os.path.join(out, "final.pt"))  # weights_only=True
    assert state["task"] == "pretrain" and state["model_config"]["hidden_size"] == 128
    assert state["vocab"][0] == "[PAD]" and os.path.exists(os.path.join(out, "ckpt_00000040.pt"))


@pytest.mark.slow
def test_two_processes_match_one(corpus, tmp_path):
    """1 process x 2 accumulation steps and 2 processes x 1 step see the same micro-batches
    (MicroBatchSampler), and the loss is normalised by global counts, so losses agree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run([sys.executable, "pretrain.py", *small_run_args(corpus, one)], cwd=REPO, env=env, check=True,
                   capture_output=True)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "pretrain.py", *small_run_args(corpus, two)], cwd=REPO, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = read_losses(one), read_losses(two)
    assert len(a) == len(b) == 4
    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5), (a, b)
    wa = checkpoint.load_checkpoint(os.path.join(one, "final.pt"))["model"]
    wb = checkpoint.load_checkpoint(os.path.join(two, "final.pt"))["model"]
    # Parameters agree; BatchNorm's running statistics legitimately differ (one process updates
    # them on both micro-batches, DDP keeps rank 0's), and training mode never reads them.
    params = [k for k in wa if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert max((wa[k] - wb[k]).abs().max().item() for k in params) < 1e-5


def test_cache_dir_and_strict_masking_reach_the_run(corpus, tmp_path):
    """--cache-dir holds the caption index of both splits; --no-mask-at-least-one at a tiny
    --mask-prob leaves every caption unmasked, so the MLM loss is exactly 0 (with the forced piece
    it never is)."""
    out, cache = str(tmp_path / "run"), tmp_path / "cache"
    pretrain.main(small_run_args(corpus, out, cache_dir=cache, tasks="mlm", mask_prob=1e-9, max_steps=2)
                  + ["--no-mask-at-least-one"])
    assert sorted(p.name.split("-")[1] for p in cache.iterdir()) == ["train", "val"]
    assert [mlm for mlm, _ in read_losses(out)] == [0.0, 0.0]
    forced = str(tmp_path / "forced")
    pretrain.main(small_run_args(corpus, forced, cache_dir=cache, tasks="mlm", mask_prob=1e-9, max_steps=1))
    assert read_losses(forced)[0][0] > 0


def test_impossible_batch_split_fails_before_work(corpus, tmp_path):
    with pytest.raises(SystemExit, match="not a multiple of --batch-size"):
        pretrain.main(small_run_args(corpus, str(tmp_path / "x"), global_batch=12, batch_size=8))


def test_missing_data_names_the_download(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")
    with pytest.raises(Exception, match="dataset_coco.json is missing. Get Karpathy's splits"):
        pretrain.main(small_run_args(str(tmp_path), str(tmp_path / "out")))


@pytest.mark.slow
def test_demo_recipe_learns_to_ground(demo_pretraining):
    """The demo's own recipe cut to 500 steps (conftest.py): held-out ITM must leave chance, which
    it only can by matching words to image regions. Measured in fp32 over seeds 0, 1, 2 (docs/demo.md):
    MLM 0.885-0.897 against baselines 0.129-0.152, ITM 0.810-0.817 against 0.502-0.524."""
    metrics = demo_pretraining[2]
    assert metrics["mlm_acc"] > 3 * metrics["mlm_baseline"]
    assert metrics["itm_acc"] > metrics["itm_baseline"] + 0.2, metrics


def test_init_checkpoint_fixes_the_architecture(tmp_path):
    """Fine-tuning from --init builds the checkpoint's own trunk (pool, positions, sizes) whatever
    the script's flags say, and copies every trunk weight; only the new head stays fresh."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from model import PixelBert, PixelBertConfig
    torch.manual_seed(0)
    trained = PixelBert(PixelBertConfig.tiny(vocab_size=50, pixel_pool=1, visual_position=True, num_layers=1))
    path = str(tmp_path / "pre.pt")
    checkpoint.save_checkpoint({"model": trained.state_dict(), "model_config": asdict(trained.config)}, path)
    flags = SimpleNamespace(init=path, model="r50", dropout=0.0, pixel_pool=2, visual_position=False,
                            visual_layernorm=False, bert="", cnn="")
    init_state = checkpoint.load_checkpoint(path)
    model = common.build_model(flags, ("vqa",), 50, num_answers=7, init_state=init_state)
    assert (model.config.pixel_pool, model.config.visual_position, model.config.num_layers) == (1, True, 1)
    assert model.config.heads == ("vqa",) and model.config.num_answers == 7
    for name, value in trained.state_dict().items():
        if not name.startswith(("cls.", "itm_head")):
            assert torch.equal(model.state_dict()[name], value), name
    with pytest.raises(SystemExit, match="pass the --vocab it was trained with"):
        common.build_model(flags, ("vqa",), 60, num_answers=7, init_state=init_state)
