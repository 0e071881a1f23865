"""
Pixel-BERT fine-tuning on NLVR2 (paper 4.3), the "pair" setting of LXMERT/UNITER: a sentence is
true or false of a pair of images. (sentence, left image) and (sentence, right image) go through
the model as two rows of one batch; their two [CLS] vectors, concatenated, go through an MLP to
two logits (false, true), trained with cross-entropy.

    python finetune_nlvr.py     # demo: fine-tunes runs/demo_pretrain/final.pt (pre-training it first if absent)
    torchrun --nproc_per_node=8 finetune_nlvr.py --data nlvr2 --data-root /datasets \
        --init runs/pretrain/final.pt --batch-size 16

Reads top to bottom like finetune_vqa.py: config -> processes -> data -> model -> optimisers ->
loop (dev accuracy and consistency each epoch, best checkpoint kept) -> the best epoch's figures.
SIGTERM / SIGUSR1 finish the step in flight, write a checkpoint and exit with status 75;
the same command with --resume continues exactly (README: Reliability).
"""

import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import checkpoint
import common
import data
from evaluate import nlvr2_eval_loader, predict_nlvr2
from metrics import nlvr2_score
from model import make_optimizers, nlvr2_loss


@dataclass
class Config:
    """Pixel-BERT fine-tuning on NLVR2. Defaults are the paper's recipe for --data nlvr2."""
    data: str = "demo"  # demo (the built-in corpus) | nlvr2 (the official files under --data-root)
    data_root: str = "data/demo"
    model: str = "r50"  # tiny | r50 | x152
    init: str = ""  # a Pixel-BERT checkpoint (pre-training) to start from
    bert: str = ""  # or a Hugging Face BERT folder/file ...
    cnn: str = ""  # ... and a torchvision ResNet/ResNeXt .pth
    vocab: str = ""  # WordPiece vocab.txt; default: the --bert folder's, else <data-root>/vocab.txt
    out_dir: str = "runs/nlvr"
    train_split: str = "train"
    eval_split: str = "dev"  # dev (model selection; the paper's dev row) | test1 (test-P) | train
    # batch and schedule: 128 examples, 18 epochs, lr / 10 at epochs 12 and 16 (paper 4.3: VQA's, half the batch)
    batch_size: int = 16  # examples per process and micro-step (each is two rows: left and right image)
    global_batch: int = 128
    epochs: float = 18
    max_steps: int = 0
    lr_milestones: str = "12,16"  # epochs
    lr: float = 1e-4  # AdamW, Transformer and head (the pre-training rates)
    weight_decay: float = 1e-2
    cnn_lr: float = 1e-2  # SGD, CNN; 0 keeps the CNN fixed
    cnn_weight_decay: float = 5e-4
    cnn_momentum: float = 0.9
    cnn_optimizer: str = "sgd"  # sgd | adamw
    warmup_steps: int = 500  # not given in the paper
    warmup_start: float = 1 / 3
    grad_clip: float = 10.0
    # data
    image_min_size: int = 800
    image_max_size: int = 1333
    max_text_len: int = 40
    num_workers: int = 6
    skip_bad_images: bool = False  # report, count and skip unreadable training images instead of stopping
    # model
    dropout: float = 0.1
    # visual embedding (paper 3.2); ignored with --init, whose checkpoint fixes the architecture
    pixel_pool: int = 2  # max-pool of the stride-32 feature map (paper: 2)
    visual_layernorm: bool = False  # LayerNorm + dropout on pixel tokens (not in the paper)
    visual_position: bool = False  # learned 2-D position embeddings of pixel tokens (not in the paper)
    # precision and device
    dtype: str = "auto"  # auto (bf16 where the hardware has it; else fp32 on CPUs, fp16 on GPUs), bf16, fp16, fp32
    device: str = ""
    compile: bool = False
    channels_last: bool = True
    # logging, checkpoints
    log_every: int = 50
    ckpt_every: int = 2000
    keep_checkpoints: int = 3  # the last K step checkpoints are kept
    resume: bool = False  # continue exactly from the newest complete checkpoint in --out-dir
    seed: int = 0


# The demo: the tiny model pre-trained by `python pretrain.py`, on the demo corpus's NLVR2 files
# (1,500 train / 300 dev examples). With so few examples it overfits (train loss 0.3 by epoch 6):
# a low lr keeps what pre-training learned (best dev 71.7 at 1e-4, 70.0 at 3e-4 over 8 epochs;
# 72.3 after 12 epochs at 3e-4, with dev falling from epoch 9 on).
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
    if cfg.data not in ("demo", "nlvr2"):
        raise SystemExit(f"--data {cfg.data}: choose demo or nlvr2")
    ddp = common.setup_distributed(cfg.device)
    cfg.dtype = common.resolve_dtype(cfg.dtype, ddp.device)
    common.print0(f"config: {asdict(cfg)}")
    torch.manual_seed(cfg.seed + ddp.rank)
    accum, _ = common.batch_plan(cfg.global_batch, cfg.batch_size, ddp.world_size, 1, "")
    checkpoint.prepare_out_dir(cfg.out_dir, cfg.resume)

    # ---- data: the official JSON Lines files; each example is a sentence and two images
    init_state, tokenizer = checkpoint.init_and_tokenizer(cfg)
    train_records = data.read_nlvr2(cfg.data_root, cfg.train_split, cfg.skip_bad_images)
    eval_records = data.read_nlvr2(cfg.data_root, cfg.eval_split)
    identifiers = [r["identifier"] for r in eval_records]
    train_set = data.NLVR2Examples(cfg.data_root, train_records, tokenizer, cfg.image_min_size, cfg.image_max_size,
                                   cfg.skip_bad_images)
    eval_set = data.NLVR2Examples(cfg.data_root, eval_records, tokenizer, cfg.image_min_size, cfg.image_max_size)
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
    if cfg.channels_last:
        raw_model.cnn.to(memory_format=torch.channels_last)
    optimizers = make_optimizers(raw_model, cfg.cnn_lr, cfg.cnn_momentum, cfg.cnn_weight_decay, cfg.lr,
                                 cfg.weight_decay, fused=ddp.device.type == "cuda" or None,
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
        micro_batches = iter(loader)
        for _ in range(first, steps_per_epoch):
            checkpoint.seed_step(cfg.seed, ddp.rank, step)
            micro = [common.batch_to_device(next(micro_batches), ddp.device, cfg.channels_last) for _ in range(accum)]
            for b in micro:
                bad_images.note(b)
            num_examples = common.all_reduce_sum(torch.tensor(sum(len(b["labels"]) for b in micro),
                                                              device=ddp.device, dtype=torch.float))
            common.set_lr(optimizers, common.lr_factor(step, cfg.warmup_steps, cfg.warmup_start, milestones))
            totals = torch.zeros(1, device=ddp.device)  # the loss summed over micro-batches and processes
            for i, batch in enumerate(micro):
                # DDP all-reduces the gradients in backward(); the earlier micro-batches skip it
                with model.no_sync() if ddp.world_size > 1 and i < accum - 1 else nullcontext():
                    with common.autocast(ddp.device, cfg.dtype):
                        # 2B rows: each example's sentence with its left image, then with its right image
                        _, pooled = model(batch["input_ids"], batch["text_mask"], batch["images"], batch["image_mask"])
                        loss = nlvr2_loss(raw_model, pooled, batch["labels"], num_examples)
                    # DDP averages gradients over processes; the loss is a global mean already
                    scaler.scale(loss.sum() * ddp.world_size).backward()
                totals += loss.detach()
            common.all_reduce_sum(totals)
            for opt in filter(None, optimizers):
                scaler.unscale_(opt)  # fp16: clip the true gradients
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
            checkpoint.stop_if_diverged(step, cfg.out_dir, totals, grad_norm, scaler)
            for opt in filter(None, optimizers):
                scaler.step(opt)  # fp16: skipped when a gradient overflowed
            scaler.update()
            for opt in filter(None, optimizers):
                opt.zero_grad(set_to_none=True)
            step += 1
            skipped_steps += not torch.isfinite(grad_norm).item()  # fp16: the scaler skipped an overflowing step
            stop = preemption.requested(ddp.device)  # every rank stops after the same step
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
    main()
