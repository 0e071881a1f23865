"""
Checkpoints and what keeps a run alive: atomic checkpoint files, resuming exactly where a run
stopped, per-step seeds, preemption signals, and the checks that stop a diverging run before it
writes NaN into the weights. The training scripts call these around the step they write out.
"""

import atexit
import dataclasses
import errno
import glob
import json
import os
import random
import signal
import socket
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from common import print0
from data import Tokenizer

# -----------------------------------------------------------------------------
# Checkpoint files


class SaveError(OSError):
    """A checkpoint could not be written (a full disk, a vanished folder); the message names the file."""


def save_checkpoint(state, path):
    """Write to a temporary file, flush it to disk, then rename: a crash or SIGKILL at any moment
    leaves either the old file or the complete new one under `path`, never a partial one. A write
    that fails (a full disk) removes its temporary file and names `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SaveError(f"{path}: cannot write it ({save_failure(e)}); the files written before are intact. Free "
                        f"space or choose another folder, then run the same command again (with --resume if the "
                        f"run has a checkpoint)") from None
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


def save_failure(error):
    """What went wrong in torch.save, in words: its C++ writer reports a full disk only as an
    'enforce fail at inline_container.cc' about a failed or short write."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if getattr(error, "errno", None) == errno.ENOSPC or "inline_container" in text or "write failed" in text:
        return f"no space left on the device: {text}"
    return text


def save_weights(state, path):
    """A training checkpoint without what only --resume needs (optimisers, fp16 scaler, random
    states): best.pt and final.pt, for evaluation and --init. Replaced atomically, and only by the
    run that holds the folder's lock."""
    check_owner(os.path.dirname(os.path.abspath(path)))
    save_checkpoint({k: v for k, v in state.items() if k not in ("optimizers", "scaler", "rng")}, path)


def checkpoint_step(path):
    """The step in a ckpt_<step>.pt name, or None for a name that is not one."""
    digits = os.path.basename(path)[len("ckpt_"): -len(".pt")]
    return int(digits) if digits.isdigit() else None


def step_checkpoints(out_dir):
    """ckpt_<step>.pt of a run folder, oldest step first; temporary files (*.pt.tmp<pid>) and
    checkpoints set aside as unreadable (*.pt.unreadable) never match."""
    found = [p for p in glob.glob(os.path.join(out_dir, "ckpt_*.pt")) if checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def is_complete(path):
    """A torch.save zip archive whose central directory (written last) is in place: a file cut
    short by a kill or a full disk fails this without being loaded."""
    return zipfile.is_zipfile(path)


def save_step_checkpoint(state, out_dir, step, keep):
    """ckpt_<step>.pt, then pruning: of the complete checkpoints of earlier steps, all but the
    newest keep - 1 are removed. Pruning goes by step, never touches a later step's file or an
    incomplete one, and only runs once the new checkpoint is complete, so the newest loadable
    checkpoint always stays. Temporary files that killed processes left behind are removed (the
    folder's lock keeps every other run out, so they are no one's work in progress)."""
    check_owner(out_dir)
    path = os.path.join(out_dir, f"ckpt_{step:08d}.pt")
    save_checkpoint(state, path)
    if keep > 0 and is_complete(path):
        older = [p for p in step_checkpoints(out_dir) if checkpoint_step(p) < step and is_complete(p)]
        for old in older[: max(0, len(older) - (keep - 1))]:
            os.remove(old)
    for stray in glob.glob(os.path.join(out_dir, "*.pt.tmp*")):
        if not stray.endswith(f".tmp{os.getpid()}"):
            os.remove(stray)


def load_checkpoint(path):
    """Load a checkpoint without unpickling code (weights_only=True): only tensors and plain
    values are accepted, so a crafted file cannot run anything. A bare state dict (tensors only,
    e.g. torchvision's or pretrain_cnn.py's .pth) is not a checkpoint of these scripts: refused."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         f"); it may be truncated, or contain objects other than tensors and plain values, which are "
                         f"refused because unpickling them could run code: use checkpoints written by these "
                         f"scripts") from None
    if not isinstance(state, dict) or state and all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: a bare state dict, not a checkpoint written by these scripts (it has no "
                         f"model_config); pass CNN weights with --cnn, BERT weights with --bert, or a "
                         f"pretrain.py final.pt / fine-tuning best.pt with --init")
    return state


def set_aside(path):
    """An unreadable checkpoint is renamed <name>.unreadable (rank 0 only), kept for a look but
    out of the way: neither the next --resume nor pruning takes it for a checkpoint."""
    if int(os.environ.get("RANK", 0)) == 0 and os.path.exists(path):
        os.replace(path, path + ".unreadable")
        print0(f"--resume: set {path} aside as {path}.unreadable")


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
    run's WordPiece tokenizer: from --vocab, else the vocabulary the --init checkpoint was
    trained with (saved in it), else the --bert folder's vocab.txt, else <data-root>/vocab.txt.
    A --vocab must be the checkpoint's own."""
    if cfg.init and not os.path.exists(cfg.init) and cfg.data == "demo":
        raise SystemExit(f"--init {cfg.init}: not found. The demo fine-tunes the demo pre-training's checkpoint: "
                         f"run `python3 pretrain.py` first")
    try:
        init_state = load_checkpoint(cfg.init) if cfg.init else {}
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--init {e}") from None
    if cfg.init and not (isinstance(init_state, dict) and "model_config" in init_state and "model" in init_state):
        raise SystemExit(f"--init {cfg.init}: not a Pixel-BERT checkpoint (no model_config / model): pass a "
                         f"checkpoint these scripts wrote (BERT or ResNet weights go to --bert / --cnn)")
    if init_state.get("vocab") and not cfg.vocab:
        return init_state, Tokenizer(init_state["vocab"], cfg.max_text_len)
    vocab = cfg.vocab or (os.path.join(cfg.bert, "vocab.txt") if os.path.isdir(cfg.bert) else
                          os.path.join(cfg.data_root, "vocab.txt"))
    tokenizer = Tokenizer(vocab, cfg.max_text_len)
    if init_state.get("vocab") not in (None, tokenizer.vocab_tokens()):
        raise SystemExit(f"--vocab {vocab}: {cfg.init} was trained with another WordPiece vocabulary; drop --vocab "
                         f"to use the checkpoint's")
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
            set_aside(path)
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


def prepare_out_dir(cfg, ddp=None):
    """Before any work: the weight files named by --cnn / --bert are weight files, the run
    folder can be written (by every process: on several nodes it must be shared), rank 0 holds
    its lock (every process sees it), and the folder is this run's: empty, or --resume of the
    run in it with the same settings (see check_this_run). Every process raises the same error."""
    rank = ddp.rank if ddp else int(os.environ.get("RANK", 0))
    errors = [weight_file_error(cfg) or writable_error(cfg.out_dir, rank)]
    if rank == 0 and not errors[0]:
        try:
            take_lock(cfg.out_dir)
            check_this_run(cfg.out_dir, cfg.resume, dataclasses.asdict(cfg))
        except SystemExit as e:
            release_lock(cfg.out_dir)
            errors[0] = str(e.code)
    errors = gather(errors[0])
    if not any(errors):
        errors = gather(None if rank == 0 else lock_visible_error(cfg.out_dir, rank))
    first = next((e for e in errors if e), None)
    if first:
        raise SystemExit(first)


def gather(error):
    """Every process's error (or None), in rank order, on every process."""
    if not dist.is_initialized():
        return [error]
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return errors


def writable_error(out_dir, rank):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test_rank{rank}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        return f"--out-dir {out_dir}: cannot write there ({e.strerror}); choose a writable folder"
    return None


def weight_file_error(cfg):
    """--cnn / --bert files that are not weight files, named before any work (torch.load itself
    says only e.g. 'pop from empty list' about a text file). A folder (--bert) is read later."""
    for flag, what in (("cnn", "a torchvision ResNet / ResNeXt state dict (.pth)"),
                       ("bert", "a Hugging Face BERT folder, .safetensors or .bin")):
        path = getattr(cfg, flag, "")
        if not path or os.path.isdir(path):
            continue
        if not os.path.isfile(path):
            return f"--{flag} {path}: file not found; pass {what}"
        kind = weights_format(path)
        if kind is None:
            return f"--{flag} {path}: not a weights file (neither torch.save's format nor safetensors); pass {what}"
        if kind == "zip" and not zipfile.is_zipfile(path):
            return f"--{flag} {path}: the file is incomplete (cut short while copying or downloading?); fetch it again"
    return None


def weights_format(path):
    """'zip' (torch.save since 1.6), 'pickle' (older torch.save), 'safetensors', or None, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return "safetensors"
    return None


def check_output_files(**paths):
    """Output files of a command (flag name -> path, None when not given): their folders must
    exist and be writable before the work that produces them, not after it."""
    for flag, path in paths.items():
        if not path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise SystemExit(f"--{flag.replace('_', '-')} {path}: the folder {folder} does not exist; create it "
                             f"or choose another path")
        if not os.access(folder, os.W_OK):
            raise SystemExit(f"--{flag.replace('_', '-')} {path}: cannot write in {folder}; choose another path")


# -----------------------------------------------------------------------------
# Whose folder it is: one run per folder, held by a lock; --resume continues that run only

LOCK = "run.lock"
# What a run writes: a folder holding any of these holds a run.
RUN_FILES = ("config.json", "metrics.jsonl", "final.pt", "best.pt", "ans2label.json")
# Flags that say how to run, not what to train: a resumed run may change them (more steps or
# epochs, other hardware, precision or workers, the data or the run folder moved elsewhere; the
# weights to start from are the checkpoint's, so --init / --cnn / --bert no longer matter; --cnn-lr
# may unfreeze a CNN that was fixed so far: resume() gives it a fresh optimiser; --fold-batchnorm
# computes the same function from the same state dict; --cache-dir only moves the caption index).
# Every other flag must be the one the run was started with.
RESUME_MAY_CHANGE = ("resume", "out_dir", "max_steps", "epochs", "num_workers", "device", "dtype", "compile",
                     "channels_last", "log_every", "eval_every", "ckpt_every", "keep_checkpoints", "batch_size",
                     "skip_bad_images", "data_root", "init", "cnn", "bert", "cnn_pretrain_epochs", "cnn_lr",
                     "fold_batchnorm", "cache_dir")


def lock_owner():
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def read_lock(path):
    try:
        with open(path) as f:
            held = json.load(f)
        return held if isinstance(held, dict) and "pid" in held and "host" in held else None
    except (OSError, ValueError):
        return None


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def lock_state(held):
    """'mine' (this process: an earlier main() of the same process), 'stale' (its process is
    gone: a dead pid on this host, or an earlier attempt of this SLURM job, which a requeue may
    start on another node) or 'held'."""
    me = lock_owner()
    if held is None:
        return "stale"  # not written by take_lock, which writes the whole file before it appears
    if held["host"] == me["host"]:
        if held["pid"] == me["pid"]:
            return "mine"
        return "held" if pid_alive(held["pid"]) else "stale"
    return "stale" if me["slurm_job"] and held.get("slurm_job") == me["slurm_job"] else "held"


def take_lock(out_dir):
    """Create <out_dir>/run.lock (pid, host, SLURM job) or refuse: the file is complete before it
    appears (written aside, then hard-linked, which fails if a lock exists). A stale lock is
    reported and replaced. Released at exit (release_lock)."""
    path, tmp = os.path.join(out_dir, LOCK), os.path.join(out_dir, f".{LOCK}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(lock_owner(), f)
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                held = read_lock(path)
                state = lock_state(held)
                if state == "mine":
                    break
                if state == "held":
                    raise SystemExit(f"--out-dir {out_dir}: in use by another run (pid {held['pid']} on "
                                     f"{held['host']}, since {held.get('started', '?')}); wait for it to end or choose "
                                     f"another --out-dir (if no such run is alive, delete {path})") from None
                print0(f"{path}: taking over the stale lock of a run that is no longer alive ({held})")
                os.remove(path)
        else:
            raise SystemExit(f"--out-dir {out_dir}: could not take {path}; another run is starting there")
    finally:
        os.remove(tmp)
    atexit.register(release_lock, out_dir)


def release_lock(out_dir):
    path = os.path.join(out_dir, LOCK)
    held = read_lock(path)
    if held and held["pid"] == os.getpid() and held["host"] == socket.gethostname():
        os.remove(path)


def lock_visible_error(out_dir, rank):
    if not os.path.exists(os.path.join(out_dir, LOCK)):
        return (f"--out-dir {out_dir}: rank {rank} on {socket.gethostname()} does not see the lock rank 0 wrote "
                f"there; with several nodes --out-dir must be on a file system every node shares")
    return None


def check_owner(out_dir):
    """Refuse to write into a folder whose lock another live process holds."""
    held = read_lock(os.path.join(out_dir, LOCK))
    if held is not None and lock_state(held) == "held":
        raise SaveError(f"{out_dir}: locked by another run (pid {held['pid']} on {held['host']}); not writing there")


def saved_config(out_dir):
    """The flags of the run in out_dir (config.json's "config"), or None."""
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            saved = json.load(f)
        return saved.get("config") if isinstance(saved, dict) else None
    except (OSError, ValueError):
        return None


def config_changes(saved, config):
    """'--flag old -> new' for each flag that differs (and that a resumed run may not change)."""
    config = json.loads(json.dumps(config))  # tuples as lists, as config.json has them
    return [f"--{k.replace('_', '-')} {saved[k]} -> {config[k]}" for k in config
            if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != config[k]]


def check_this_run(out_dir, resume, config):
    """A run writes only into a folder that is empty of run files, or that holds this same run:
    --resume needs a checkpoint and the same flags (but RESUME_MAY_CHANGE); without --resume,
    only a start that never reached a checkpoint may start again, with the same flags.
    Anything else is refused, naming the folder and the two ways on."""
    checkpoints = step_checkpoints(out_dir)
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))] + [os.path.basename(p) for p in
                                                                                  checkpoints[-2:]]
    saved = saved_config(out_dir)
    changes = config_changes(saved, config) if saved is not None else []
    if resume:
        if not checkpoints:
            raise SystemExit(f"--resume: no checkpoint (ckpt_*.pt) in {out_dir}; drop --resume to start a new run, "
                             f"or pass the --out-dir of the run to continue")
        if changes:
            raise SystemExit(f"--resume: {out_dir} holds a run with other settings ({'; '.join(changes)}); resume it "
                             f"with its own flags ({os.path.join(out_dir, 'config.json')}), or start this run in a new "
                             f"--out-dir")
        return
    if not found:
        return
    if checkpoints or saved is None or changes:
        what = f"with other settings ({'; '.join(changes)})" if changes else f"({', '.join(found)})"
        raise SystemExit(f"--out-dir {out_dir} holds another run {what}; nothing was changed. To continue that run, "
                         f"pass --resume with its flags; to start a new one, choose a new --out-dir")
    print0(f"{out_dir}: this run was started before and stopped before its first checkpoint; starting it again")


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


def check_step(step, out_dir, losses, grad_norm, scaler, preemption=None):
    """The step's one wait for the device, between clipping and the optimiser step: whether a
    stop signal reached any rank (all-reduced, so every rank stops after the same step), and
    whether the step diverged, read back in one transfer. The losses and gradients are
    all-reduced, so every rank decides alike. A non-finite loss, a non-finite gradient norm
    without fp16's scaler (nothing else would skip the update: it would write NaN into every
    weight), or an fp16 loss scale that collapsed because every step overflows stops the run
    before the update, naming the last good checkpoint. Returns (stop after this step, whether
    fp16's scaler will skip this update)."""
    signalled = torch.tensor(float(preemption is not None and preemption.signal is not None), device=losses.device)
    if dist.is_initialized():
        dist.all_reduce(signalled)  # a signal on any rank stops them all
    stop, finite_loss, finite_grad = torch.stack([signalled > 0, torch.isfinite(losses).all(),
                                                  torch.isfinite(grad_norm)]).tolist()
    if not finite_loss:
        raise SystemExit(f"step {step + 1}: the loss is {losses.tolist()}; stopping. {last_good(out_dir)}")
    if not scaler.is_enabled() and not finite_grad:
        raise SystemExit(f"step {step + 1}: the gradient norm is {grad_norm.item()}; stopping before the update. "
                         f"{last_good(out_dir)}")
    if scaler.is_enabled() and scaler.get_scale() < MIN_LOSS_SCALE:  # fp16 only: its scaler waits anyway
        raise SystemExit(f"step {step + 1}: fp16 loss scale {scaler.get_scale():.2g}: the gradients overflow at "
                         f"every step, so every step is skipped; stopping (use --dtype bf16 or a lower lr). "
                         f"{last_good(out_dir)}")
    return stop, not finite_grad


EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after a checkpoint; rerun with --resume


class Preemption:
    """SIGTERM (sent by SLURM, Kubernetes, cloud schedulers, torchrun when it is stopped) and
    SIGUSR1 (SLURM's --signal) only set a flag: the step in flight completes; check_step reads
    the flags of every rank, so all of them stop after the same step."""

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
