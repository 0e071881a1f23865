"""
The few helpers every training script shares: torchrun setup, print0, dataclass -> argparse,
the learning-rate schedule, one optimiser step, building / resuming / wrapping the model,
checkpoints, the metric log, and what keeps a run alive (per-step seeds for exact resumption,
preemption signals, checks before any work). The training loops are written out in each script.
"""

import argparse
import dataclasses
import functools
import glob
import json
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import Tokenizer, normalize_images
from model import PixelBert, PixelBertConfig, copy_weights, count_parameters

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
# Optimisation


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


def optimizer_step(optimizers, scaler, parameters, grad_clip):
    """Unscale (fp16), clip the global gradient norm, step every optimiser, clear gradients.
    Returns the gradient norm before clipping."""
    optimizers = [o for o in optimizers if o is not None]
    for opt in optimizers:
        scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip if grad_clip > 0 else float("inf"))
    if not scaler.is_enabled() and not torch.isfinite(norm):
        # Without fp16's scaler nothing would skip this step: it would write NaN into every weight.
        raise FloatingPointError(f"the gradient norm is {norm.item()}")
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return norm


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


def train_step(model, micro_batches, loss_fn, optimizers, scaler, parameters, grad_clip, out_dir, step):
    """One optimiser step of gradient accumulation over a global batch's micro-batches.
    loss_fn(batch) returns a vector of losses, each already divided by its count over the whole
    global batch; their sum is back-propagated. Only the last micro-step all-reduces gradients
    (DDP's no_sync on the others). Returns the losses summed over micro-steps and processes,
    and the gradient norm (not finite when fp16's scaler skipped the step). A non-finite loss or
    gradient, or an fp16 loss scale that collapsed because every step overflows, stops the run,
    naming the last good checkpoint."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    totals = 0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with model.no_sync() if world_size > 1 and not last else nullcontext():
            losses = loss_fn(batch)
            # DDP averages gradients over processes; the losses are global means already.
            scaler.scale(losses.sum() * world_size).backward()
        totals = totals + losses.detach()
    all_reduce_sum(totals)
    if not torch.isfinite(totals).all():
        raise SystemExit(f"step {step + 1}: the loss is {totals.tolist()}; stopping. {last_good(out_dir)}")
    try:
        norm = optimizer_step(optimizers, scaler, parameters, grad_clip)
    except FloatingPointError as e:  # identical on every rank: gradients are all-reduced
        raise SystemExit(f"step {step + 1}: {e}; stopping before the update. {last_good(out_dir)}") from None
    if scaler.is_enabled() and scaler.get_scale() < MIN_LOSS_SCALE:
        raise SystemExit(f"step {step + 1}: fp16 loss scale {scaler.get_scale():.2g}: the gradients overflow at "
                         f"every step, so every step is skipped; stopping (use --dtype bf16 or a lower lr). "
                         f"{last_good(out_dir)}")
    return totals, norm


# fp16: GradScaler halves the scale (from 65536) at each overflow and only doubles it after 2000
# clean steps, so a scale below 1 means about 16 overflows in a row: every step is being skipped.
MIN_LOSS_SCALE = 1.0


def last_good(out_dir):
    checkpoints = step_checkpoints(out_dir)
    return f"Last good checkpoint: {checkpoints[-1] if checkpoints else 'none'} (resume with --resume)."


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
    From --init, the trunk's architecture is the checkpoint's own (only the heads and dropout
    are this run's); otherwise it is the --model preset with the script's visual-embedding
    flags, optionally initialised from --bert and --cnn. `init_state`: the --init checkpoint,
    if the caller has loaded it already. --cnn-lr 0 (where a script has it) fixes the CNN."""
    if cfg.init:
        state = init_state or load_checkpoint(cfg.init)
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
            print0(model.load_bert(cfg.bert))
        if cfg.cnn:
            print0(model.load_cnn(cfg.cnn))
    if getattr(cfg, "cnn_lr", None) == 0:
        # --cnn-lr 0 keeps the CNN's weights as loaded. Weights that never move need no gradient:
        # autograd then stops at the pixel tokens and skips the CNN's backward pass, and
        # make_optimizers gives them no optimiser. BatchNorm still normalises with batch
        # statistics and updates its running ones (retrieval's frozen CNN keeps both fixed).
        model.cnn.requires_grad_(False)
    return model


def run_demo_pretraining_if_missing(cfg):
    """The fine-tuning demos start from the demo pre-training's runs/demo_pretrain/final.pt:
    when it is missing, run `python pretrain.py` first (every torchrun process joins it)."""
    if cfg.data == "demo" and cfg.init and not os.path.exists(cfg.init):
        import pretrain  # here, not at the top: pretrain.py imports this module
        demo = os.path.join(pretrain.PRESETS["demo"]["out_dir"], "final.pt")
        if os.path.normpath(cfg.init) != os.path.normpath(demo):  # a typo must not start minutes of other work
            raise SystemExit(f"--init {cfg.init}: checkpoint not found")
        print0(f"{cfg.init} not found: running the demo pre-training first (python pretrain.py)")
        pretrain.main([])


def print_model_size(name, model):
    print0(f"model: {name}, {count_parameters(model):,} parameters, "
           f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trained")


def init_and_tokenizer(cfg):
    """The --init checkpoint, loaded once ({} without one; build_model takes it), and the run's
    WordPiece tokenizer from --vocab, else the --bert folder's vocab.txt, else
    <data-root>/vocab.txt, which must be the vocabulary the checkpoint was trained with."""
    init_state = load_checkpoint(cfg.init) if cfg.init else {}
    vocab = cfg.vocab or (os.path.join(cfg.bert, "vocab.txt") if os.path.isdir(cfg.bert) else
                          os.path.join(cfg.data_root, "vocab.txt"))
    tokenizer = Tokenizer(vocab, cfg.max_text_len)
    if init_state.get("vocab") not in (None, tokenizer.vocab_tokens()):
        raise SystemExit(f"{cfg.init} was trained with another WordPiece vocabulary than {vocab}; pass --vocab")
    return init_state, tokenizer


def resume(out_dir, model, optimizers, scaler, config=None):
    """Load the newest complete step checkpoint of the run folder into model, optimisers and
    scaler; returns the checkpoint (its "step" is where to continue: the epoch, the sampler's
    position and the lr follow from it, and seed_step makes every later random draw). A
    checkpoint that does not load (e.g. cut short by a full disk) is reported and the one before
    it taken. `config` (the run's flags): those that decide what data each step sees must match."""
    for path in reversed(step_checkpoints(out_dir)):
        try:
            state = load_checkpoint(path)
            break
        except ValueError as e:
            print0(f"--resume: skipping {e}")
    else:
        raise SystemExit(f"--resume: no loadable checkpoint (ckpt_*.pt) in {out_dir}")
    check_same_model(state.get("model_config", {}), dataclasses.asdict(model.config), path)
    changed = [f"--{k.replace('_', '-')} {state['config'][k]} -> {config[k]}" for k in RESUME_FIXED
               if config and k in config and k in state.get("config", {}) and config[k] != state["config"][k]]
    if changed:
        raise SystemExit(f"--resume: {path} was written with other settings ({'; '.join(changed)}); the "
                         f"resumed run would see other data at each step. Use the original flags or a new --out-dir")
    model.load_state_dict(state["model"])
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        if opt is not None and opt_state is None:  # the CNN was fixed (--cnn-lr 0) until now
            print0(f"--resume: {path} has no CNN optimiser state (written with --cnn-lr 0); it starts fresh")
        elif opt is not None:
            opt.load_state_dict(opt_state)
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    print0(f"resumed from {path} at step {state['step']}")
    return state


# Flags that decide which examples each step draws; the number of processes may change on resume
# (MicroBatchSampler gives step s the same global batch for any split into processes x accumulation).
RESUME_FIXED = ("data", "global_batch", "seed", "captions_per_image", "questions_per_image", "group_aspect",
                "train_split", "min_answer_count", "minival_images", "negatives")


def check_same_model(saved, own, source):
    """A checkpoint's model_config against this run's: any difference (a size, the heads of
    another task) is named, instead of a wall of state-dict shape errors."""
    diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} here" for k, v in own.items()
            if k != "dropout" and _plain(saved.get(k)) != _plain(v)]
    if diff:
        raise SystemExit(f"{source} holds another model than this run builds ({'; '.join(diff)}); pass the "
                         f"--model / task flags it was trained with, or start a new --out-dir")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


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
# Keeping a run alive: checks before any work, per-step seeds, preemption


def prepare_out_dir(out_dir, resume):
    """Fail before any work when the run folder cannot be written, or --resume has nothing to
    resume from. Every process checks (on several nodes the folder must be shared)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test_rank{os.environ.get('RANK', 0)}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--out-dir {out_dir}: cannot write there ({e.strerror}); choose a writable folder") from None
    if resume and not step_checkpoints(out_dir):
        raise SystemExit(f"--resume: no checkpoint (ckpt_*.pt) in {out_dir}; drop --resume to start a new run, "
                         f"or pass the --out-dir of the run to continue")


def seed_step(seed, rank, step):
    """Seed torch (CPU and CUDA), NumPy and Python's random from (seed, rank, step) before each
    training step. Every random draw of the step (dropout, pixel sampling) then depends on these
    three numbers only, not on what ran before (evaluations, DataLoader iterators drawing their
    base seed, an interruption): a resumed run repeats the uninterrupted one exactly. The data's
    own randomness (masks, negatives) is seeded by (seed, epoch, index) in data.py, so it does
    not depend on DataLoader workers or their seeds either."""
    a, b = np.random.SeedSequence([seed, rank, step]).generate_state(2)
    torch.manual_seed((int(a) << 31) ^ int(b))
    np.random.seed(int(a))
    random.seed(int(b))


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


EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after a checkpoint; rerun with --resume


class Preemption:
    """SIGTERM (sent by SLURM, Kubernetes, cloud schedulers, torchrun when it is stopped) and
    SIGUSR1 (SLURM's --signal) only set a flag: the step in flight completes, then the loop
    asks requested(), which every rank answers alike, so all of them stop after the same step."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.signal = None
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def restore(self):
        """Give the signals back to their previous handlers once the loop is over (after the demo
        pre-training inside a fine-tuning run, a later SIGTERM must reach the fine-tuning's own)."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def requested(self, device):
        """True on every rank if any rank received a signal (an all-reduce of the flags)."""
        flag = torch.tensor(float(self.signal is not None), device=device)
        return all_reduce_sum(flag).item() > 0

    def exit(self, out_dir, step):
        """After rank 0 wrote the step's checkpoint: wait for it on every rank, then exit with
        EXIT_PREEMPTED."""
        self.restore()
        if dist.is_initialized():
            dist.barrier()  # no rank leaves (and lets torchrun stop the others) before the save ends
            dist.destroy_process_group()
        print(f"rank {int(os.environ.get('RANK', 0))}: stopped by {self.signal or 'a signal to another process'} "
              f"after step {step}; checkpoint {os.path.join(out_dir, f'ckpt_{step:08d}.pt')}; run the same command "
              f"with --resume to continue", flush=True)
        raise SystemExit(EXIT_PREEMPTED)


# -----------------------------------------------------------------------------
# Checkpoints and logs


def save_checkpoint(state, path):
    """Write to a temporary file, flush it to disk, then rename: a crash or SIGKILL at any moment
    leaves either the old file or the complete new one under `path`, never a partial one."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


def save_weights(state, path):
    """A training checkpoint without what only --resume needs (optimisers, fp16 scaler, random
    states): best.pt and final.pt, for evaluation and --init."""
    save_checkpoint({k: v for k, v in state.items() if k not in ("optimizers", "scaler", "rng")}, path)


def step_checkpoints(out_dir):
    """ckpt_<step>.pt of a run folder, oldest first; temporary files (*.pt.tmp<pid>) never match."""
    return sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))


def save_step_checkpoint(state, out_dir, step, keep):
    """ckpt_<step>.pt, then the oldest beyond the last `keep` and the temporary files that killed
    runs left behind are removed."""
    save_checkpoint(state, os.path.join(out_dir, f"ckpt_{step:08d}.pt"))
    for old in step_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        os.remove(old)
    for stray in glob.glob(os.path.join(out_dir, "*.pt.tmp*")):
        if not stray.endswith(f".tmp{os.getpid()}"):
            os.remove(stray)


def load_checkpoint(path):
    """Load a checkpoint without unpickling code (weights_only=True): only tensors and plain
    values are accepted, so a crafted file cannot run anything."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable checkpoint ({str(e).splitlines()[0]}); it may be truncated, "
                         f"or contain objects other than tensors and plain values, which are refused because "
                         f"unpickling them could run code: use checkpoints written by these scripts") from None


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
