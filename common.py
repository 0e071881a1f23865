"""
The few helpers every training script shares: torchrun setup, print0, precision, dataclass ->
flags, the learning-rate schedule and batch plan, building and wrapping the model, moving a batch
to the device, progress and metric logs. The training step itself is written out in each script;
checkpoints, resuming and preemption live in checkpoint.py.
"""

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import normalize_images
from model import PixelBert, PixelBertConfig, copy_weights, count_parameters, load_bert, load_cnn

# -----------------------------------------------------------------------------
# Processes and devices


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def default_device(device=""):
    """torch.device(device), or CUDA when there is a GPU, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def setup_distributed(device=""):
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); one process per GPU with
    NCCL, or processes on the CPU with gloo. Without torchrun: one process."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = default_device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world_size, device)


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


DTYPES = ("auto", "bf16", "fp16", "fp32")


@functools.cache  # asked at every autocast with --dtype auto; the hardware does not change
def native_bf16(device):
    """Whether the device multiplies bf16 matrices in hardware: CUDA GPUs from Ampere on, CPUs
    with AMX or AVX512-BF16. Other CPUs emulate it: on a 2-core AMD EPYC (AVX2) a 1024x1024
    matrix product ran at 1.3 GFLOP/s in bf16 against 115 in fp32."""
    if device.type == "cuda":  # by default the check also counts bf16 emulated on pre-Ampere GPUs
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # a release before the argument existed
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # torch.cpu's feature probes are private; absent in a release, assume no
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported",
                                                                            "_is_avx512_bf16_supported"))
    return True


def resolve_dtype(dtype, device):
    """--dtype auto (the default) -> bf16 where the device has it natively, else fp16 on a GPU
    (with GradScaler) and fp32 on a CPU. An explicit bf16 is kept, with a warning if emulated."""
    if dtype not in DTYPES:
        raise SystemExit(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return "bf16" if native_bf16(device) else "fp16" if device.type == "cuda" else "fp32"
    if dtype == "bf16" and not native_bf16(device):
        print0(f"warning: this {device.type} has no native bf16 (AMX, AVX512-BF16 or an Ampere GPU): bf16 matrix "
               f"products are emulated, ~100x slower than fp32 on the CPU; --dtype auto picks fp32 here")
    return dtype


def autocast(device, dtype):
    """bf16 / fp16 autocast, or nothing for fp32 ("auto": see resolve_dtype). Matrix products then
    run in half precision (bf16 on the CPU's AMX units is ~9x fp32); reductions and the losses stay
    in fp32."""
    dtype = resolve_dtype(dtype, device) if dtype == "auto" else dtype
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


# -----------------------------------------------------------------------------
# Configuration: one dataclass per script, flags generated from its fields


def parse_config(cls, presets=None, argv=None):
    """--kebab-case flags from the dataclass fields. A value comes from, in increasing
    priority: the field default, the preset named by --data (if presets has it), the flag."""
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, type=f.type, default=argparse.SUPPRESS, metavar=f.type.__name__.upper(),
                                help=f"default {f.default!r}")
    given = vars(parser.parse_args(argv))
    preset = (presets or {}).get(given.get("data", getattr(cls, "data", None)), {})
    return cls(**{**preset, **given})


# -----------------------------------------------------------------------------
# Optimisation schedule and batch plan


def lr_factor(step, warmup_steps, warmup_start, milestones):
    """Multiplier of every base learning rate at `step`: a linear warm-up from warmup_start to 1
    over warmup_steps, and a division by 10 at each milestone (in steps)."""
    factor = 0.1 ** sum(step >= m for m in milestones)
    if step < warmup_steps:
        factor *= warmup_start + (1 - warmup_start) * step / warmup_steps
    return factor


def set_lr(optimizers, factor):
    for opt in filter(None, optimizers):
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor


def schedule(epochs, max_steps, lr_milestones, steps_per_epoch):
    """Total optimiser steps (--max-steps caps --epochs) and the lr milestones, given in epochs
    ("25,35"), converted to steps."""
    total = int(epochs * steps_per_epoch)
    total = min(total, max_steps) if max_steps else total
    return total, [int(float(m) * steps_per_epoch) for m in lr_milestones.split(",") if m]


def batch_plan(global_batch, batch_size, world_size, texts_per_image, flag):
    """Accumulation steps and images per micro-batch: global batch = batch_size (texts per
    process and micro-step) x accumulation x processes, and `texts_per_image` texts share each
    image (one CNN pass). `flag` names that setting in the error."""
    accum, rem = divmod(global_batch, batch_size * world_size)
    if rem or accum == 0:
        raise SystemExit(f"--global-batch {global_batch} is not a multiple of --batch-size {batch_size} "
                         f"x {world_size} processes")
    images, rem = divmod(batch_size, texts_per_image)
    if rem:
        raise SystemExit(f"--batch-size {batch_size} is not a multiple of {flag} {texts_per_image}")
    return accum, images


# -----------------------------------------------------------------------------
# The model of a run: built, initialised, resumed, wrapped


def model_preset(name, **overrides):
    """The PixelBertConfig of a --model preset (tiny, r50, x152) with some fields changed."""
    presets = {"tiny": PixelBertConfig.tiny, "r50": PixelBertConfig.r50, "x152": PixelBertConfig.x152}
    if name not in presets:
        raise SystemExit(f"--model {name}: choose one of {', '.join(presets)}")
    return presets[name](**overrides)


def build_model(cfg, heads, vocab_size, num_answers=0, init_state=None):
    """PixelBert for a script's config, with a report of what was loaded and what stayed new.
    From --init (`init_state`: that checkpoint, loaded by checkpoint.init_and_tokenizer), the
    trunk's architecture is the checkpoint's own (only the heads and dropout are this run's);
    otherwise it is the --model preset with the script's visual-embedding flags, optionally
    initialised from --bert and --cnn. --cnn-lr 0 (where a script has it) fixes the CNN."""
    if cfg.init:
        state = init_state
        if state["model_config"]["vocab_size"] != vocab_size:
            raise SystemExit(f"{cfg.init} has {state['model_config']['vocab_size']} word pieces, this run's "
                             f"vocabulary {vocab_size}: pass the --vocab it was trained with")
        model_cfg = PixelBertConfig(**{**state["model_config"], "heads": heads, "num_answers": num_answers,
                                       "dropout": cfg.dropout})
        model = PixelBert(model_cfg)
        print0(copy_weights(model, state["model"], cfg.init))
    else:
        model = PixelBert(model_preset(cfg.model, vocab_size=vocab_size, dropout=cfg.dropout, heads=heads,
                                       num_answers=num_answers, pixel_pool=cfg.pixel_pool,
                                       visual_layernorm=cfg.visual_layernorm, visual_position=cfg.visual_position))
        if cfg.bert:
            print0(load_bert(model, cfg.bert))
        if cfg.cnn:
            print0(load_cnn(model, cfg.cnn))
    if getattr(cfg, "cnn_lr", None) == 0:
        # --cnn-lr 0 keeps the CNN's weights as loaded. Weights that never move need no gradient:
        # autograd then stops at the pixel tokens and skips the CNN's backward pass, and
        # make_optimizers gives them no optimiser. BatchNorm still normalises with batch
        # statistics and updates its running ones (retrieval's frozen CNN keeps both fixed).
        model.cnn.requires_grad_(False)
    return model


def print_model_size(name, model):
    print0(f"model: {name}, {count_parameters(model):,} parameters, "
           f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trained")


def wrap_model(model, ddp, compile=False):
    """DistributedDataParallel across processes, then torch.compile if asked. Keep the raw
    module for saving, evaluation and the heads."""
    if ddp.world_size > 1:
        model = DDP(model, device_ids=[ddp.local_rank] if ddp.device.type == "cuda" else None)
    return torch.compile(model) if compile else model


def batch_to_device(batch, device, channels_last):
    """Tensors to the device; images from uint8 to ImageNet-normalised floats there (a quarter
    of the bytes cross the bus), in channels-last layout if asked."""
    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "images" in batch:
        batch["images"] = normalize_images(batch["images"])
        if channels_last:
            batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
    return batch


# -----------------------------------------------------------------------------
# What a run shows and writes as it goes


class Progress:
    """A training loop's progress on rank 0. On a terminal: a tqdm bar whose postfix shows the
    latest logged figures. Written to a file (a cluster job's log), a bar redraws itself into
    one ever-growing line, so there each log step prints one plain line instead, e.g.
    "step 20/800 | mlm 3.545 | itm 0.688 | lr 5.87e-04 | pairs_s 1347.8"."""

    def __init__(self, total, initial, enabled):
        self.total, self.enabled = total, enabled
        self.bar = tqdm(total=total, initial=initial, disable=not (enabled and sys.stderr.isatty()),
                        dynamic_ncols=True)

    def update(self):
        self.bar.update()

    def show(self, step, **figures):
        if not self.bar.disable:
            self.bar.set_postfix(**figures)
        elif self.enabled:
            print(f"step {step}/{self.total} | " + " | ".join(f"{k} {v}" for k, v in figures.items()), flush=True)

    def write(self, line):
        if self.enabled:
            self.bar.write(line)

    def close(self):
        self.bar.close()


class BadImages:
    """--skip-bad-images: each unreadable image (data.collate left it out of its batch) is
    reported once, with its file and the reason, and counted; report() prints the total."""

    def __init__(self):
        self.messages = set()

    def note(self, batch):
        for message in batch.pop("bad_images", []):
            if message not in self.messages:
                self.messages.add(message)
                print(f"--skip-bad-images: skipped {message}", flush=True)

    def report(self):
        """The number of distinct bad images seen by all processes (printed by rank 0)."""
        seen = [self.messages]
        if dist.is_initialized():
            seen = [None] * dist.get_world_size()
            dist.all_gather_object(seen, self.messages)
        count = len(set().union(*seen))
        print0(f"--skip-bad-images: {count} unreadable image{'s' * (count != 1)} skipped")
        return count


class MetricLog:
    """One JSON object per line in <run folder>/metrics.jsonl (rank 0 only)."""

    def __init__(self, path, enabled=True):
        self.file = open(path, "a") if enabled else None
        self.start = time.time()

    def write(self, **metrics):
        if self.file:
            metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
            self.file.write(json.dumps({"time": round(time.time() - self.start, 2), **metrics}) + "\n")
            self.file.flush()


def write_json(path, obj):
    """Written whole to a temporary file, then renamed: a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)
