"""
Pixel-BERT fine-tuning on NLVR2 (paper 4.3), the "pair" setting of LXMERT/UNITER: a sentence is
true or false of a pair of images. (sentence, left image) and (sentence, right image) go through
the model as two rows of one batch; their two [CLS] vectors, concatenated, go through an MLP to
two logits (false, true), trained with cross-entropy.

    python3 finetune_nlvr.py    # demo: fine-tunes runs/demo_pretrain/final.pt (run python3 pretrain.py first)
    torchrun --nproc_per_node=8 finetune_nlvr.py --data nlvr2 --data-root /datasets \
        --init runs/pretrain_r50/final.pt --batch-size 16

Reads top to bottom like finetune_vqa.py: config -> processes -> data -> model -> optimisers ->
loop (dev accuracy and consistency each epoch, best checkpoint kept) -> the best epoch's figures.
SIGTERM / SIGUSR1 finish the step in flight, write a checkpoint and exit with status 75;
the same command with --resume continues exactly (docs/reliability.md).
"""

import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.distributed as dist

import checkpoint
import common
import data
from evaluate import nlvr2_eval_loader, predict_nlvr2
from metrics import nlvr2_score
from model import fold_frozen_batchnorm, make_optimizers, nlvr2_loss


@dataclass
class Config:
    """Pixel-BERT fine-tuning on NLVR2 (the "pair" setting): is a sentence true of a pair of images?
    The defaults are the paper's recipe for --data nlvr2 (paper 4.3)."""
    # data
    data: Literal["demo", "nlvr2"] = "demo"  # demo: the built-in corpus's NLVR2 files | nlvr2: the official
    #  files under --data-root
    data_root: str = "data/demo"  # folder of the official files (README: Real data) or of the demo corpus
    vocab: str = ""  # WordPiece vocab.txt; none: the --init checkpoint's, else the --bert folder's, else
    #  <data-root>/vocab.txt
    train_split: Literal["train", "dev", "test1"] = "train"  # the examples trained on
    eval_split: Literal["dev", "test1", "train"] = "dev"  # held-out examples scored after each epoch, which
    #  choose best.pt: dev (the paper's dev row) | test1 (test-P) | train
    image_min_size: int = 800  # pixels: each image is resized so that its shorter side is this...
    image_max_size: int = 1333  # pixels: ...or its longer side this, whichever is smaller
    max_text_len: int = 40  # word pieces of a sentence, [CLS] and [SEP] included; longer sentences are cut
    num_workers: int = 6  # DataLoader processes per training process (0: load in the training process)
    skip_bad_images: bool = False  # report, count and skip unreadable training images instead of stopping
    # model: a pre-training checkpoint (--init), or the --model architecture with --bert and --cnn weights
    init: str = ""  # the Pixel-BERT checkpoint to fine-tune (pretrain.py's final.pt)
    model: Literal["tiny", "r50", "x152", "x152_32x4d"] = "r50"  # tiny: the demo's | r50: ResNet-50 + BERT-base |
    #  x152: ResNeXt-152 32x8d + BERT-base | x152_32x4d: ResNeXt-152 32x4d (half the group width) + BERT-base;
    #  the paper does not say which X152 it used. With --init, the checkpoint's architecture
    bert: str = ""  # without --init: a Hugging Face BERT folder or weights file for the Transformer
    cnn: str = ""  # without --init: a torchvision ResNet .pth (or a converted ResNeXt) for the CNN
    from_scratch: bool = False  # allow r50 / x152 on real data without --init, --bert or --cnn (random weights)
    dropout: float = 0.1  # BERT's dropout probability (hidden states and attention)
    pixel_pool: int = 2  # without --init: cells of the stride-32 feature map max-pooled into a pixel token, a
    #  side (paper: 2)
    pixel_proj_first: bool = True  # without --init: the 1x1 projection on every stride-32 cell, then the pooling
    #  (the paper's figure); --no-pixel-proj-first pools first (SOHO's order, pixel-pool^2 fewer cells to project)
    visual_layernorm: bool = False  # without --init: LayerNorm + dropout on pixel tokens (not in the paper)
    visual_position: bool = False  # without --init: learned row and column embeddings of pixel tokens (not in
    #  the paper)
    # optimisation: 128 examples a step, 18 epochs, lr / 10 at epochs 12 and 16 (paper 4.3: VQA's, half the batch)
    batch_size: int = 16  # examples per process and micro-step, each a sentence and two images (two rows)
    global_batch: int = 128  # examples per optimiser step, all processes and micro-steps together
    epochs: float = 18  # passes over the training examples
    max_steps: int = 0  # optimiser steps at most (0: as many as --epochs make)
    lr_milestones: str = "12,16"  # epochs at which every learning rate is divided by 10, comma-separated
    lr: float = 1e-4  # AdamW's learning rate: Transformer, visual embedding and head (pre-training's)
    weight_decay: float = 1e-2  # AdamW's weight decay
    cnn_lr: float = 1e-2  # the CNN's learning rate (0: the CNN stays as loaded)
    cnn_weight_decay: float = 5e-4  # the CNN's weight decay
    cnn_momentum: float = 0.9  # the CNN's SGD momentum
    cnn_optimizer: Literal["sgd", "adamw"] = "sgd"  # sgd: the paper's | adamw
    warmup_steps: int = 500  # optimiser steps of linear learning-rate warm-up (not given in the paper)
    warmup_start: float = 1 / 3  # the warm-up's first learning rates, a fraction of --lr and --cnn-lr
    grad_clip: float = 10.0  # largest global gradient norm (0: no clipping)
    seed: int = 0  # seeds the new head, the data order and dropout
    # precision and device
    dtype: Literal[common.DTYPES] = "auto"  # auto: bf16 where the device has it natively, else fp32 on a CPU
    #  and fp16 on a GPU
    device: str = ""  # cpu, cuda, cuda:1...; none: cuda if there is a GPU, else cpu
    compile: bool = False  # torch.compile the model
    channels_last: bool = True  # NHWC convolutions in the CNN (faster with bf16 on GPUs and AMX CPUs)
    fold_batchnorm: bool = False  # apply the CNN's fixed BatchNorm inside its convolutions (same weights,
    #  checkpoints and gradients, fewer passes over the activations: a speed option for r50 / x152 on GPUs);
    #  only for BatchNorm with fixed statistics (not the tiny model's)
    # logging and checkpoints
    out_dir: str = "runs/nlvr"  # run folder: config.json, metrics.jsonl, ckpt_<step>.pt, best.pt
    log_every: int = 50  # optimiser steps between logged losses (dev accuracy: after each epoch)
    ckpt_every: int = 2000  # optimiser steps between step checkpoints (the last step is always saved)
    keep_checkpoints: int = 3  # step checkpoints kept, the newest
    resume: bool = False  # continue exactly from the newest complete checkpoint in --out-dir


# The demo: the tiny model pre-trained by `python pretrain.py`, on the demo corpus's NLVR2 files
# (docs/demo.md has the measurements). With so few examples it overfits within a few epochs: a low lr
# keeps what pre-training learned.
PRESETS = {"demo": dict(model="tiny", init="runs/demo_pretrain/final.pt", image_min_size=128, image_max_size=192,
                        batch_size=32, global_batch=32, epochs=8, lr_milestones="6", lr=1e-4, cnn_lr=1e-4,
                        cnn_optimizer="adamw", warmup_steps=30, dropout=0.0, num_workers=1, log_every=10,
                        ckpt_every=500, out_dir="runs/demo_nlvr")}


def majority_baseline(records):
    """Accuracy and consistency (percent) of always answering the most frequent label."""
    true = sum(r["label"] == "True" for r in records)
    constant = "True" if 2 * true >= len(records) else "False"
    return nlvr2_score({r["identifier"]: constant for r in records}, records)


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, argv)
    common.check_config(cfg)
    ddp = common.setup_distributed(cfg.device)
    cfg.dtype = common.resolve_dtype(cfg.dtype, ddp.device)
    # bf16 / fp16: autocast runs the matrix products in half precision; reductions and losses stay in fp32
    autocast = common.autocast(ddp.device, cfg.dtype)  # one context, entered at every forward
    common.print0(f"config: {asdict(cfg)}")
    torch.manual_seed(cfg.seed + ddp.rank)
    accum, _ = common.batch_plan(cfg.global_batch, cfg.batch_size, ddp.world_size, 1, "")
    checkpoint.prepare_out_dir(cfg, ddp)

    # ---- data: the official JSON Lines files; each example is a sentence and two images
    init_state, tokenizer = checkpoint.init_and_tokenizer(cfg)
    train_records = data.read_nlvr2(cfg.data_root, cfg.train_split, cfg.skip_bad_images)
    eval_records = data.read_nlvr2(cfg.data_root, cfg.eval_split)
    identifiers = [r["identifier"] for r in eval_records]
    train_set = data.NLVR2Examples(cfg.data_root, train_records, tokenizer, cfg.image_min_size, cfg.image_max_size,
                                   cfg.skip_bad_images)
    eval_set = data.NLVR2Examples(cfg.data_root, eval_records, tokenizer, cfg.image_min_size, cfg.image_max_size)
    data.check_images([os.path.join(cfg.data_root, p) for pair in eval_set.images for p in pair], cfg.eval_split)
    sampler = data.MicroBatchSampler(len(train_set), cfg.batch_size, ddp.world_size, ddp.rank, accum, cfg.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=data.collate_nlvr2,
                                         num_workers=cfg.num_workers, pin_memory=ddp.device.type == "cuda",
                                         persistent_workers=cfg.num_workers > 0)
    held_out = nlvr2_eval_loader(eval_set, cfg.batch_size, ddp, cfg.num_workers)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps, milestones = common.schedule(cfg.epochs, cfg.max_steps, cfg.lr_milestones, steps_per_epoch)
    baseline = majority_baseline(eval_records)
    common.print0(f"data: {len(train_set):,} {cfg.train_split} examples, {len(eval_set):,} {cfg.eval_split} examples "
                  f"(majority baseline: accuracy {baseline['accuracy']:.2f}, consistency {baseline['consistency']:.2f})"
                  f" | global batch {cfg.global_batch} = {cfg.batch_size} per process x {accum} accumulation x "
                  f"{ddp.world_size} processes | {steps_per_epoch} steps/epoch, {total_steps} steps, lr / 10 at "
                  f"steps {milestones}")

    # ---- model: the trunk from --init (or BERT + CNN weights), a new NLVR2 head
    raw_model = common.build_model(cfg, ("nlvr",), tokenizer.vocab_size, 0, init_state).to(ddp.device)
    if cfg.fold_batchnorm:  # check_config made sure the CNN's BatchNorm is the fixed kind
        fold_frozen_batchnorm(raw_model)
    if cfg.channels_last:
        raw_model.cnn.to(memory_format=torch.channels_last)
    optimizers = make_optimizers(raw_model, cfg.cnn_lr, cfg.cnn_momentum, cfg.cnn_weight_decay, cfg.lr,
                                 cfg.weight_decay, fused=True,
                                 cnn_optimizer=cfg.cnn_optimizer)
    scaler = torch.amp.GradScaler(ddp.device.type, enabled=cfg.dtype == "fp16")
    state = checkpoint.resume(cfg.out_dir, raw_model, optimizers, scaler, asdict(cfg)) if cfg.resume else {}
    step, best = state.get("step", 0), state.get("best", {"accuracy": -1.0})
    skipped_steps = state.get("skipped_steps", 0)  # fp16 steps the scaler skipped, over the whole run
    model = common.wrap_model(raw_model, ddp, cfg.compile)
    common.print_model_size(cfg.model, raw_model)

    def checkpoint_state():
        return {"model": raw_model.state_dict(), "optimizers": [o.state_dict() if o else None for o in optimizers],
                "scaler": scaler.state_dict(), "step": step, "rng": checkpoint.rng_state(), "config": asdict(cfg),
                "model_config": asdict(raw_model.config), "vocab": tokenizer.vocab_tokens(), "best": best,
                "task": "nlvr", "skipped_steps": skipped_steps}

    def evaluate():
        predictions = predict_nlvr2(raw_model, held_out, identifiers, ddp, cfg.dtype, cfg.channels_last)
        model.train()
        return nlvr2_score(predictions, eval_records, f"{cfg.eval_split} predictions")

    # ---- training loop
    log = common.MetricLog(os.path.join(cfg.out_dir, "metrics.jsonl"), ddp.is_main)
    if ddp.is_main:
        common.write_json(os.path.join(cfg.out_dir, "config.json"),
                          {"config": asdict(cfg), "model": asdict(raw_model.config)})
    model.train()
    bar = common.Progress(total_steps, step, ddp.is_main)
    t_last, step_last = time.time(), step
    preemption, bad_images = checkpoint.Preemption(), common.BadImages()
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        sampler.set_position(epoch, first)  # the data resumes mid-epoch exactly where it stopped
        micro_batches = map(bad_images.note, loader)  # --skip-bad-images: report what collate left out
        for _ in range(first, steps_per_epoch):
            checkpoint.seed_step(cfg.seed, ddp.rank, step)
            micro = [common.batch_to_device(next(micro_batches), ddp.device, cfg.channels_last, raw_model.config)
                     for _ in range(accum)]
            num_examples = torch.tensor(sum(len(b["labels"]) for b in micro), device=ddp.device, dtype=torch.float)
            if ddp.world_size > 1:
                dist.all_reduce(num_examples)
            # the learning rate: a linear warm-up, then / 10 at each milestone; initial_lr is each group's base rate
            lr_scale = common.lr_factor(step, cfg.warmup_steps, cfg.warmup_start, milestones)
            for group in [g for opt in filter(None, optimizers) for g in opt.param_groups]:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * lr_scale
            totals = torch.zeros(1, device=ddp.device)  # the loss summed over micro-batches and processes
            for i, batch in enumerate(micro):
                # DDP all-reduces the gradients in backward(); the earlier micro-batches skip it
                with model.no_sync() if ddp.world_size > 1 and i < accum - 1 else nullcontext():
                    with autocast:
                        # 2B rows: each example's sentence with its left image, then with its right image
                        _, pooled = model(batch["input_ids"], batch["text_mask"], batch["images"], batch["image_mask"])
                        loss = nlvr2_loss(raw_model, pooled, batch["labels"], num_examples)
                    # DDP averages gradients over processes; the loss is a global mean already
                    scaler.scale(loss.sum() * ddp.world_size).backward()
                totals += loss.detach()
            if ddp.world_size > 1:
                dist.all_reduce(totals)  # summed over the processes, for the log and check_step
            for opt in filter(None, optimizers):
                scaler.unscale_(opt)  # fp16: clip the true gradients
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
            stop, skipped = checkpoint.check_step(step, cfg.out_dir, totals, grad_norm, scaler, preemption)
            for opt in filter(None, optimizers):
                scaler.step(opt)  # fp16: skipped when a gradient overflowed
            scaler.update()
            for opt in filter(None, optimizers):
                opt.zero_grad(set_to_none=True)
            step += 1
            skipped_steps += skipped  # fp16: the scaler skipped an overflowing step
            bar.update()
            if step % cfg.log_every == 0 or step == total_steps:
                rate = (step - step_last) * cfg.global_batch / (time.time() - t_last)
                t_last, step_last = time.time(), step
                lr = optimizers[-1].param_groups[0]["lr"]
                bar.show(step, ce=f"{totals[0]:.3f}", lr=f"{lr:.2e}", examples_s=f"{rate:.1f}")
                log.write(step=step, epoch=step / steps_per_epoch, loss=totals[0].item(), lr=lr,
                          grad_norm=grad_norm.item(), skipped_steps=skipped_steps, examples_per_s=rate)
            # held-out accuracy each epoch, best kept; a stop signal skips it: the checkpoint comes first
            if (step % steps_per_epoch == 0 or step == total_steps) and not stop:
                metrics = evaluate()
                log.write(step=step, epoch=step / steps_per_epoch, **{cfg.eval_split: metrics})
                bar.write(f"epoch {step / steps_per_epoch:.1f}: {cfg.eval_split} accuracy {metrics['accuracy']:.2f}"
                          f", consistency {metrics['consistency']:.2f}")
                if metrics["accuracy"] > best["accuracy"]:
                    best = {**metrics, "step": step}
                    if ddp.is_main:
                        checkpoint.save_weights(checkpoint_state(), os.path.join(cfg.out_dir, "best.pt"))
            if ddp.is_main and (step % cfg.ckpt_every == 0 or step == total_steps or stop):
                checkpoint.save_step_checkpoint(checkpoint_state(), cfg.out_dir, step, cfg.keep_checkpoints)
            if stop:
                bar.close()
                preemption.exit(cfg.out_dir, step)
            if step >= total_steps:
                break
    bar.close()
    preemption.restore()
    if cfg.skip_bad_images:
        bad_images.report()

    common.print0(f"best {cfg.eval_split} NLVR2 accuracy {best['accuracy']:.2f}, consistency "
                  f"{best.get('consistency', 0):.2f} at step {best.get('step')} (majority baseline: accuracy "
                  f"{baseline['accuracy']:.2f}, consistency {baseline['consistency']:.2f}); saved "
                  f"{os.path.join(cfg.out_dir, 'best.pt')}")
    if ddp.world_size > 1:
        dist.destroy_process_group()
    return best


if __name__ == "__main__":
    common.run(main)  # one line per error, never a stack; exit 2 for a flag, 1 for data (docs/reliability.md)
