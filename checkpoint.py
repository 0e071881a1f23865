"""
Checkpoints and what keeps a run alive: atomic checkpoint files, resuming exactly where a run
stopped, per-step seeds, preemption signals, and the checks that stop a diverging run before it
writes NaN into the weights. The training scripts call these around the step they write out.
"""

import dataclasses
import glob
import os
import random
import signal

import numpy as np
import torch
import torch.distributed as dist

from common import all_reduce_sum, print0
from data import Tokenizer

# -----------------------------------------------------------------------------
# Checkpoint files


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


def last_good(out_dir):
    checkpoints = step_checkpoints(out_dir)
    return f"Last good checkpoint: {checkpoints[-1] if checkpoints else 'none'} (resume with --resume)."


# -----------------------------------------------------------------------------
# Starting a run: the --init checkpoint and its vocabulary, or the run's own checkpoint (--resume)


def init_and_tokenizer(cfg):
    """The --init checkpoint, loaded once ({} without one; common.build_model takes it), and the
    run's WordPiece tokenizer from --vocab, else the --bert folder's vocab.txt, else
    <data-root>/vocab.txt, which must be the vocabulary the checkpoint was trained with."""
    if cfg.init and not os.path.exists(cfg.init) and cfg.data == "demo":
        raise SystemExit(f"--init {cfg.init}: not found. The demo fine-tunes the demo pre-training's checkpoint: "
                         f"run `python3 pretrain.py` first")
    try:
        init_state = load_checkpoint(cfg.init) if cfg.init else {}
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--init {e}") from None
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
                "train_split", "min_answer_count", "minival_images", "negatives", "vqa_rules")


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


# -----------------------------------------------------------------------------
# Keeping a run alive: checks before any work, per-step seeds, divergence, preemption


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


# fp16: GradScaler halves the scale (from 65536) at each overflow and only doubles it after 2000
# clean steps, so a scale below 1 means about 16 overflows in a row: every step is being skipped.
MIN_LOSS_SCALE = 1.0


def stop_if_diverged(step, out_dir, losses, grad_norm, scaler):
    """Called between clipping and the optimiser step, identically on every rank (losses and
    gradients are all-reduced): a non-finite loss, a non-finite gradient norm without fp16's
    scaler (nothing else would skip the update: it would write NaN into every weight), or an fp16
    loss scale that collapsed because every step overflows stops the run before the update,
    naming the last good checkpoint."""
    if not torch.isfinite(losses).all():
        raise SystemExit(f"step {step + 1}: the loss is {losses.tolist()}; stopping. {last_good(out_dir)}")
    if not scaler.is_enabled() and not torch.isfinite(grad_norm):
        raise SystemExit(f"step {step + 1}: the gradient norm is {grad_norm.item()}; stopping before the update. "
                         f"{last_good(out_dir)}")
    if scaler.is_enabled() and scaler.get_scale() < MIN_LOSS_SCALE:
        raise SystemExit(f"step {step + 1}: fp16 loss scale {scaler.get_scale():.2g}: the gradients overflow at "
                         f"every step, so every step is skipped; stopping (use --dtype bf16 or a lower lr). "
                         f"{last_good(out_dir)}")


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
