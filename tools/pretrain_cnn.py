"""
The CNN's own pre-training, image classification: the demo's stand-in for the ImageNet weights that
Pixel-BERT's CNN starts from (paper 4.1: ResNet-50 and ResNeXt-152 pre-trained on ImageNet).

    python3 tools/pretrain_cnn.py     # demo: the tiny ResNet learns data/demo/imagenet's 18 classes

Why the demo needs it. The paper's CNN arrives knowing edges, corners and shapes, and MLM and ITM
only have to tie them to words. Taught by captions alone, the demo's CNN learned colour and never
shape: masked shape words stayed at chance and ITM accepted "a red square" wherever anything was
red (docs/demo.md has the figures). `python3 pretrain.py` runs this stage first
(--cnn-pretrain-epochs); on real data, pass torchvision's ImageNet weights with --cnn instead.

Reads <data-root>/imagenet/{train,val}/<class>/<image> (ImageNet's folder layout, numbered as
torchvision's ImageFolder numbers it) and writes a torchvision-format state dict: the backbone's
tensors under torchvision's names plus the classifier `fc`, which --cnn loads like torchvision's own.
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as `python3 tools/pretrain_cnn.py`: the repository's modules sit one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoint
import common
import data
from model import ResNet


@dataclass
class Config:
    """Classification pre-training of a Pixel-BERT preset's CNN (global average pool + fc), the
    demo's stand-in for ImageNet weights."""
    # data
    data_root: str = "data/demo"  # holds imagenet/train/<class>/ and imagenet/val/<class>/
    image_size: int = 112  # pixels: the shorter side is resized to this, then the centre square is cut
    num_workers: int = 1  # DataLoader processes (0: load in the training process)
    skip_bad_images: bool = False  # report, count and skip unreadable images instead of stopping
    # model
    model: Literal["tiny", "r50", "x152", "x152_32x4d"] = "tiny"  # the Pixel-BERT preset whose CNN is trained
    # optimisation
    epochs: float = 5  # passes over the training images
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # AdamW's learning rate, decayed linearly to 0 over the run
    weight_decay: float = 5e-4  # AdamW's weight decay
    seed: int = 0  # seeds the initialisation and the data order
    # precision and device
    dtype: Literal[common.DTYPES] = "auto"  # auto: bf16 where the device has it natively, else fp32 on a CPU
    #  and fp16 on a GPU
    device: str = ""  # cpu, cuda, cuda:1...; none: cuda if there is a GPU, else cpu
    channels_last: bool = True  # NHWC convolutions (faster with bf16 on GPUs and AMX CPUs)
    # output and logging
    out: str = "runs/demo_cnn/resnet.pth"  # the trained CNN, a torchvision-format state dict (for --cnn)
    log_every: int = 50  # steps between logged losses


def main(argv=None):
    cfg = common.parse_config(Config, argv=argv)
    common.check_config(cfg)
    device = common.default_device(cfg.device)
    cfg.dtype = common.resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)

    # ---- data: the training classes and the held-out images, which must be of the same classes
    paths, labels, classes = data.class_folder_entries(cfg.data_root, "train")
    val_paths, val_labels, val_classes = data.class_folder_entries(cfg.data_root, "val")
    if val_classes != classes:
        raise SystemExit(f"{cfg.data_root}/imagenet: val has classes {val_classes[:5]}..., train {classes[:5]}...; "
                         f"both need the same class folders")

    def loader(paths, labels, train):
        return torch.utils.data.DataLoader(
            data.ClassImages(paths, labels, cfg.image_size, cfg.skip_bad_images and train), cfg.batch_size,
            shuffle=train, drop_last=train, collate_fn=data.collate_classes, num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed), pin_memory=device.type == "cuda")

    train_loader, val_loader = loader(paths, labels, True), loader(val_paths, val_labels, False)
    if not len(train_loader):
        raise SystemExit(f"--batch-size {cfg.batch_size}: more than the {len(paths)} training images")
    total_steps = max(1, round(cfg.epochs * len(train_loader)))
    print(f"CNN classification pre-training: {len(paths):,} images of {len(classes)} classes, "
          f"{len(val_paths):,} held out | {total_steps} steps of {cfg.batch_size}")

    # ---- model: the preset's CNN with trainable BatchNorm (a frozen one cannot learn from scratch)
    cnn = ResNet(common.model_preset(cfg.model, norm="batch")).to(device)
    if cfg.channels_last:
        cnn.to(memory_format=torch.channels_last)
    fc = torch.nn.Linear(cnn.out_channels, len(classes)).to(device)
    params = list(cnn.parameters()) + list(fc.parameters())
    optimizer = torch.optim.AdamW(params, cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16")

    def logits(batch):  # (B, classes); the global average pool and fc of torchvision's ResNet
        with common.autocast(device, cfg.dtype):
            return fc(cnn(batch["images"]).mean((2, 3))).float()

    # ---- loop
    bar, bad_images, step, t0 = common.Progress(total_steps, 0, True), common.BadImages(), 0, time.time()
    while step < total_steps:
        for batch in map(bad_images.note, train_loader):  # --skip-bad-images: report what collate left out
            batch = common.batch_to_device(batch, device, cfg.channels_last)
            for group in optimizer.param_groups:  # linear decay to 0
                group["lr"] = cfg.lr * (1 - step / total_steps)
            loss = F.cross_entropy(logits(batch), batch["labels"])
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))  # measured, not clipped
            if not scaler.is_enabled() and not torch.isfinite(grad_norm):  # fp16's scaler would skip the step
                raise SystemExit(f"CNN pre-training, step {step + 1}: the gradient norm is {grad_norm.item()}; "
                                 f"lower --lr")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            if step % cfg.log_every == 0 or step == total_steps:
                bar.show(step, loss=f"{loss.item():.3f}", images_s=f"{step * cfg.batch_size / (time.time() - t0):.0f}")
            if step == total_steps:
                break
    bar.close()
    if cfg.skip_bad_images:
        bad_images.report()

    # ---- held-out accuracy, and the weights under torchvision's names
    cnn.eval()
    correct = 0
    with torch.no_grad():
        for batch in val_loader:
            batch = common.batch_to_device(batch, device, cfg.channels_last)
            correct += (logits(batch).argmax(-1) == batch["labels"]).sum().item()
    accuracy = correct / len(val_paths)
    print(f"held-out classification accuracy {accuracy:.3f} (chance {1 / len(classes):.3f}) in {time.time() - t0:.0f}s")
    checkpoint.save_checkpoint({**cnn.state_dict(), **{f"fc.{k}": v for k, v in fc.state_dict().items()}}, cfg.out)
    print(f"saved {cfg.out}")
    return {"accuracy": accuracy, "chance": 1 / len(classes), "path": cfg.out}


if __name__ == "__main__":
    common.run(main)  # one line per error, never a stack; exit 2 for a flag, 1 for data (docs/reliability.md)
