"""What only a GPU exercises: every training script for two steps in bf16 and fp16 (CUDA autocast,
GradScaler, fused AdamW), --compile, two processes on NCCL, a 2 -> 1 process resume, and the x152
model at the paper's image size. Marked `gpu`: deselected where CUDA is absent (tests/conftest.py),
so a CPU CI neither runs nor skips them. Run them whenever a GPU is at hand:
    python3 -m pytest -q -m gpu tests/test_gpu.py
and record the result with the card's name (torch.cuda.get_device_name())."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data
import finetune_nlvr
import finetune_retrieval
import finetune_vqa
import pretrain

pytestmark = pytest.mark.gpu
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flags(**args):
    return [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]


def pretrain_args(root, out, **overrides):
    return flags(**{**dict(data="coco_vg", data_root=root, out_dir=out, model="tiny", image_min_size=64,
                           image_max_size=96, batch_size=8, global_batch=16, dropout=0.0, lr=1e-3, cnn_lr=1e-3,
                           cnn_optimizer="adamw", warmup_steps=0, log_every=1, num_workers=0, eval_pairs=16,
                           ckpt_every=1, max_steps=2, dtype="bf16", seed=0), **overrides})


# The fine-tuning scripts' small runs (as in their own tests), from a pre-training checkpoint.
FINETUNES = {
    "vqa": (finetune_vqa, dict(batch_size=20, global_batch=20, questions_per_image=2, minival_images=100)),
    "nlvr": (finetune_nlvr, dict(batch_size=8, global_batch=16)),
    "retrieval": (finetune_retrieval, dict(batch_size=8, global_batch=8, negatives=20, score_batch=128,
                                           warmup_steps=0)),
}


def finetune_args(root, init, out, extra, **overrides):
    return flags(**{**dict(data_root=root, init=init, out_dir=out, image_min_size=64, image_max_size=96, max_steps=2,
                           epochs=1, num_workers=0, log_every=1, dtype="bf16", seed=0), **extra, **overrides})


def logged_losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [[v for k, v in r.items() if k.endswith("loss")] for r in rows if any(k.endswith("loss") for k in r)]


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gpu_pre") / "run")
    pretrain.main(pretrain_args(corpus, out))
    return os.path.join(out, "final.pt")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("script", ["pretrain", "vqa", "nlvr", "retrieval"])
def test_two_steps_on_cuda(corpus, pretrained, tmp_path, script, dtype):
    """Two optimiser steps on the GPU: finite losses each step, a step-2 checkpoint, and in fp16
    a GradScaler whose state is saved with it (what --resume needs)."""
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bf16")
    out = str(tmp_path / "run")
    if script == "pretrain":
        pretrain.main(pretrain_args(corpus, out, dtype=dtype))
    else:
        module, extra = FINETUNES[script]
        module.main(finetune_args(corpus, pretrained, out, extra, dtype=dtype, ckpt_every=1))
    losses = logged_losses(out)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(row)).all() for row in losses), losses
    state = torch.load(os.path.join(out, "ckpt_00000002.pt"), map_location="cpu", weights_only=True)
    assert state["step"] == 2 and state["config"]["dtype"] == dtype
    if dtype == "fp16":
        assert state["scaler"]["scale"] > 0  # enabled and saved (an fp32 / bf16 run saves an empty state)


def test_compile_gives_the_same_losses(corpus, tmp_path):
    """--compile (torch.compile of the model) trains the same computation: its losses follow the
    eager run's to within bf16 rounding."""
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    pretrain.main(pretrain_args(corpus, eager))
    pretrain.main(pretrain_args(corpus, compiled) + ["--compile"])
    a, b = torch.tensor(logged_losses(eager)), torch.tensor(logged_losses(compiled))
    assert a.shape == b.shape == (2, 2) and torch.allclose(a, b, rtol=2e-2, atol=2e-2), (a, b)


def torchrun(args, processes):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={processes}", "pretrain.py", *args], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture
def two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("two processes on NCCL need two GPUs (NCCL refuses two ranks on one GPU)")


def test_two_processes_on_nccl_match_one(two_gpus, corpus, tmp_path):
    """2 processes x 1 micro-step on NCCL and 1 process x 2 micro-steps see the same global batch
    (fp32: only reduction order differs)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    pretrain.main(pretrain_args(corpus, one, dtype="fp32", max_steps=4))
    torchrun(pretrain_args(corpus, two, dtype="fp32", max_steps=4), 2)
    a, b = torch.tensor(logged_losses(one)), torch.tensor(logged_losses(two))
    assert a.shape == b.shape == (4, 2) and torch.allclose(a, b, atol=1e-3), (a, b)


def test_resume_from_two_processes_in_one(two_gpus, corpus, tmp_path):
    """The README's claim: a run checkpointed by 2 processes continues in 1 (same global batch,
    accumulation doubled) as the 1-process run would have."""
    straight, moved = str(tmp_path / "straight"), str(tmp_path / "moved")
    pretrain.main(pretrain_args(corpus, straight, dtype="fp32", max_steps=4))
    torchrun(pretrain_args(corpus, moved, dtype="fp32", max_steps=2), 2)
    pretrain.main(pretrain_args(corpus, moved, dtype="fp32", max_steps=4) + ["--resume"])
    a, b = torch.tensor(logged_losses(straight)), torch.tensor(logged_losses(moved))
    assert a.shape == b.shape == (4, 2) and torch.allclose(a, b, atol=1e-3), (a, b)


def test_x152_parameters_and_full_size_forward(tmp_path):
    """The x152 preset's CNN is torchvision's ResNeXt-152 32x8d tensor for tensor (torchvision builds it
    from its generic ResNet: an independent count and shape of every weight, width per group included),
    its Transformer is transformers' BERT-base, and it runs an 800x1333 image (padded to 832x1344:
    13 x 21 pixel tokens after the 2x2 pool) on the GPU in bf16."""
    from torchvision.models.resnet import Bottleneck, ResNet
    from transformers import BertConfig, BertModel

    from model import PixelBert, PixelBertConfig
    model = PixelBert(PixelBertConfig.x152(heads=("itm",)))
    reference = ResNet(Bottleneck, [3, 8, 36, 3], groups=32, width_per_group=8).state_dict()
    ours = {k: v.shape for k, v in model.cnn.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert ours == {k: v.shape for k, v in reference.items() if not k.startswith("fc.")
                    and not k.endswith("num_batches_tracked")}
    assert model.cnn.state_dict()["layer1.0.conv2.weight"].shape == (256, 8, 3, 3)  # 32 groups x 8 channels
    bert = BertModel(BertConfig())
    assert sum(p.numel() for p in model.bert.parameters()) == sum(p.numel() for p in bert.parameters())
    Image.new("RGB", (1333, 800), (200, 30, 30)).save(tmp_path / "big.jpg")
    pixels = data.image_tensor(str(tmp_path / "big.jpg"), 800, 1333)
    batch = data.collate([{"image": pixels, "input_ids": [101, 1037, 102]}])
    model = model.cuda().eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        hidden, pooled = model(batch["input_ids"].cuda(), batch["text_mask"].cuda(),
                               data.normalize_images(batch["images"].cuda()), batch["image_mask"].cuda())
    assert batch["images"].shape == (1, 3, 832, 1344)
    assert hidden.shape == (1, 3 + 13 * 21, 768) and pooled.shape == (1, 768)
    assert torch.isfinite(hidden.float()).all()
