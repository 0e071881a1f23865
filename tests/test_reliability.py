"""Reliability (issue 7): exact resumption, preemption signals, crash-safe checkpoints, safe
loading, bad input, numerical failure, impossible settings, multi-node runs, logs. Each test drives
the real scripts (pretrain.py, finetune_vqa.py) or the common.py helpers they call."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import common
import data
import finetune_vqa
import pretrain
from model import PixelBert, PixelBertConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def flags(**args):
    """--kebab-case flags; booleans as --name / --no-name."""
    return [(f"--{'' if v else 'no-'}{k.replace('_', '-')}" if isinstance(v, bool) else f"--{k.replace('_', '-')}={v}")
            for k, v in args.items()]


def pretrain_args(root, out_dir, **overrides):
    """Tiny, fp32, 2 accumulation steps per optimiser step, and every source of randomness on:
    dropout, pixel random sampling (2 of the 4 pixel tokens of a 64 px image), masks, negatives,
    a DataLoader worker."""
    args = dict(data="coco_vg", data_root=root, out_dir=out_dir, model="tiny", image_min_size=64, image_max_size=64,
                batch_size=4, global_batch=8, captions_per_image=2, dtype="fp32", dropout=0.1, pixel_pool=1,
                pixel_samples=2, lr=1e-3, cnn_lr=1e-3, cnn_optimizer="adamw", warmup_steps=5, log_every=1,
                num_workers=1, eval_pairs=8, ckpt_every=1000, max_steps=4, seed=0)
    return flags(**{**args, **overrides})


def losses_by_step(out_dir, keys=("mlm_loss", "itm_loss")):
    """Per-step training losses of metrics.jsonl; a resumed run's lines replace the earlier ones."""
    rows = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if keys[0] in r:
                rows[r["step"]] = [r[k] for k in keys]
    return rows


def weights(path):
    return checkpoint.load_checkpoint(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    pretrain.main(pretrain_args(corpus, out))
    return losses_by_step(out), weights(os.path.join(out, "ckpt_00000004.pt"))


# ---- 1 and 2. exact resumption; preemption


@pytest.mark.slow
def test_signal_mid_accumulation_then_exact_resume(corpus, uninterrupted, tmp_path, monkeypatch):
    """SIGUSR1 arrives while step 2 (of an 87-step epoch) is between its two accumulation
    micro-steps: step 2 completes, its checkpoint is written, the run exits with
    EXIT_PREEMPTED; --resume then reproduces the uninterrupted run's losses and weights."""
    pretraining_losses, calls = pretrain.pretraining_losses, []

    def losses_with_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # two micro-batches a step: the second of 0-based step 1
            os.kill(os.getpid(), signal.SIGUSR1)
        return pretraining_losses(*args, **kwargs)

    out = str(tmp_path / "run")
    monkeypatch.setattr(pretrain, "pretraining_losses", losses_with_signal)
    with pytest.raises(SystemExit) as stopped:
        pretrain.main(pretrain_args(corpus, out))
    assert stopped.value.code == checkpoint.EXIT_PREEMPTED
    assert [os.path.basename(p) for p in checkpoint.step_checkpoints(out)] == ["ckpt_00000002.pt"]
    assert sorted(losses_by_step(out)) == [1, 2] and not os.path.exists(os.path.join(out, "final.pt"))
    monkeypatch.setattr(pretrain, "pretraining_losses", pretraining_losses)
    pretrain.main(pretrain_args(corpus, out, resume=True))
    losses, final = uninterrupted
    assert losses_by_step(out) == losses and len(losses) == 4  # metrics.jsonl keeps 6 decimals
    assert_same_weights(weights(os.path.join(out, "ckpt_00000004.pt")), final)


@pytest.mark.slow
def test_vqa_finetuning_resumes_exactly(corpus, tmp_path):
    args = dict(data_root=corpus, init="", model="tiny", image_min_size=64, image_max_size=64, batch_size=10,
                global_batch=20, questions_per_image=2, dropout=0.1, num_workers=0, dtype="fp32", minival_images=5,
                min_answer_count=1, log_every=1, max_steps=3, seed=0, lr=1e-3, cnn_lr=1e-3, cnn_optimizer="adamw")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    finetune_vqa.main(flags(**args, out_dir=one))
    finetune_vqa.main(flags(**{**args, "max_steps": 1}, out_dir=two))
    finetune_vqa.main(flags(**args, out_dir=two, resume=True))
    losses = losses_by_step(one, ("loss",))
    assert losses_by_step(two, ("loss",)) == losses and len(losses) == 3
    assert_same_weights(weights(os.path.join(one, "ckpt_00000003.pt")), weights(os.path.join(two, "ckpt_00000003.pt")))


def test_resume_refuses_other_model_or_settings(tmp_path):
    """A checkpoint of another model size, or of another task, or data settings that would feed
    other examples to each step: one error naming the difference."""
    torch.manual_seed(0)
    cfg = PixelBertConfig.tiny(vocab_size=30, num_layers=1)
    model = PixelBert(cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = {"model": model.state_dict(), "optimizers": [], "scaler": scaler.state_dict(), "step": 3,
             "rng": checkpoint.rng_state(), "model_config": asdict(cfg), "config": {"global_batch": 8, "seed": 0}}
    checkpoint.save_checkpoint(state, str(tmp_path / "ckpt_00000003.pt"))
    bigger = PixelBert(PixelBertConfig.tiny(vocab_size=30, num_layers=2))
    with pytest.raises(SystemExit, match="num_layers: 1 in the checkpoint, 2 here"):
        checkpoint.resume(str(tmp_path), bigger, [], scaler)
    vqa = PixelBert(PixelBertConfig.tiny(vocab_size=30, num_layers=1, heads=("vqa",), num_answers=5))
    with pytest.raises(SystemExit, match=r"heads: \('mlm', 'itm'\) in the checkpoint, \('vqa',\) here"):
        checkpoint.resume(str(tmp_path), vqa, [], scaler)
    with pytest.raises(SystemExit, match="--global-batch 8 -> 16"):
        checkpoint.resume(str(tmp_path), model, [], scaler, {"global_batch": 16, "seed": 0})
    assert checkpoint.resume(str(tmp_path), model, [], scaler, {"global_batch": 8, "seed": 0})["step"] == 3


# ---- 2 and 8. preemption under torchrun; two nodes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(args, port):
    """Two torchrun launches, one process each, rendezvous on 127.0.0.1: two "nodes"."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                              "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                              "pretrain.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for rank in (0, 1)]


def finish(procs, timeout=300):
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return outputs


@pytest.mark.slow
def test_two_nodes_preempted_then_resumed(corpus, tmp_path):
    """Two torchrun "nodes" on this machine. SIGTERM to the second node's torchrun (as a
    scheduler stops one machine): torchrun passes it to its worker, both ranks agree through
    the all-reduce of the flag and stop after the same step, rank 0's checkpoint is complete.
    A second two-node launch with --resume then completes the run and writes its checkpoint."""
    out = str(tmp_path / "run")
    args = pretrain_args(corpus, out, dropout=0.0, num_workers=0, max_steps=1000)
    procs = launch_two_nodes(args, free_port())
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):  # step 1 is done
        assert time.time() < deadline and all(p.poll() is None for p in procs), finish(procs)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outputs = finish(procs)
    stopped = sorted(line.split("after step ")[1].split(";")[0] for text in outputs for line in text.splitlines()
                     if "stopped by" in line)
    assert len(stopped) == 2 and stopped[0] == stopped[1], outputs  # rank 0 and rank 1, the same step
    step = int(stopped[0])
    assert "rank 1: stopped by SIGTERM" in outputs[1], outputs[1]
    assert [os.path.basename(p) for p in checkpoint.step_checkpoints(out)] == [f"ckpt_{step:08d}.pt"]
    assert checkpoint.load_checkpoint(checkpoint.step_checkpoints(out)[0])["step"] == step
    assert sorted(losses_by_step(out)) == list(range(1, step + 1))

    outputs = finish(launch_two_nodes(pretrain_args(corpus, out, dropout=0.0, num_workers=0, max_steps=step + 1,
                                                    resume=True), free_port()))
    assert f"resumed from {checkpoint.step_checkpoints(out)[0]}" in outputs[0], outputs
    assert os.path.exists(os.path.join(out, f"ckpt_{step + 1:08d}.pt")) and os.path.exists(os.path.join(out, "final.pt"))
    assert sorted(losses_by_step(out)) == list(range(1, step + 2))


# ---- 3. crash-safe checkpoints

SAVER = """
import sys, torch, checkpoint
state = {"model": {"w": torch.randn(4_000_000)}, "step": 0}
for step in range(1, 10_000):
    state["step"] = step
    checkpoint.save_step_checkpoint(state, sys.argv[1], step, keep=2)
"""


@pytest.mark.slow
def test_sigkill_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    """A process saving 16 MB checkpoints in a loop is SIGKILLed the moment a temporary file
    exists (in the middle of a save): the previous checkpoints still load, the stray temporary
    file is never taken for a checkpoint, and the next save removes it."""
    out = str(tmp_path)
    saver = subprocess.Popen([sys.executable, "-c", SAVER, out], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    deadline = time.time() + 120
    while True:  # freeze the saver; kill it if it is in the middle of a save, else let it go on
        assert time.time() < deadline and saver.poll() is None
        time.sleep(0.005)
        saver.send_signal(signal.SIGSTOP)
        time.sleep(0.002)  # the stop has taken effect
        names = os.listdir(out)
        if "ckpt_00000002.pt" in names and any(".tmp" in n for n in names):
            saver.send_signal(signal.SIGKILL)
            break
        saver.send_signal(signal.SIGCONT)
    saver.wait()
    names = os.listdir(out)
    assert any(".tmp" in n for n in names), names  # killed mid-save: its partial file is still there
    checkpoints = checkpoint.step_checkpoints(out)
    assert checkpoints and not any(".tmp" in p for p in checkpoints)
    for path in checkpoints:
        state = checkpoint.load_checkpoint(path)
        assert path.endswith(f"ckpt_{state['step']:08d}.pt") and state["model"]["w"].numel() == 4_000_000
    checkpoint.save_step_checkpoint({"step": 99}, out, 99, keep=2)
    assert not any(".tmp" in n for n in os.listdir(out)) and len(checkpoint.step_checkpoints(out)) == 2  # keep 2


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    """A newest checkpoint cut short (a full disk, a copy interrupted) is reported and skipped."""
    torch.manual_seed(0)
    model = PixelBert(PixelBertConfig.tiny(vocab_size=30, num_layers=1))
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in (1, 2, 3):
        state = {"model": model.state_dict(), "optimizers": [opt.state_dict()], "scaler": scaler.state_dict(),
                 "step": step, "rng": checkpoint.rng_state(), "model_config": asdict(model.config)}
        checkpoint.save_step_checkpoint(state, str(tmp_path), step, keep=2)
    assert [os.path.basename(p) for p in checkpoint.step_checkpoints(str(tmp_path))] == ["ckpt_00000002.pt",
                                                                                       "ckpt_00000003.pt"]
    newest = tmp_path / "ckpt_00000003.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (tmp_path / "ckpt_00000004.pt.tmp123").write_bytes(b"partial")
    assert checkpoint.resume(str(tmp_path), model, [opt], scaler)["step"] == 2


# ---- 4. safe loading


class RunsCodeWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling would create this file


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "side_effect"
    path = str(tmp_path / "evil.pt")
    torch.save({"model": {}, "payload": RunsCodeWhenUnpickled(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="evil.pt: not a loadable checkpoint.*could run code"):
        checkpoint.load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really is armed: an unsafe load runs it
    assert marker.exists()


def test_every_torch_load_uses_weights_only():
    import ast
    for name in sorted(os.listdir(REPO)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(REPO, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func.value, "id", None) == "torch":
                kwargs = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kwargs and kwargs["weights_only"].value is True, f"{name}:{node.lineno}"


# ---- 5. bad input


@pytest.mark.slow
def test_skip_bad_images(corpus, tmp_path, capsys):
    """Without the flag a bad image stops the run naming it; with --skip-bad-images each bad image
    is reported once, skipped, counted, and the run completes."""
    root = tmp_path / "demo"
    shutil.copytree(corpus, root, ignore=shutil.ignore_patterns(".pixelbert_cache"))
    tok = data.Tokenizer(str(root / "vocab.txt"))
    index = data.caption_index("coco_vg", str(root), "train", tok)  # cached: sizes known before the damage
    sampler = data.MicroBatchSampler(len(index), 2, 1, 0, 2, 0, epoch_size=len(index) // 2,
                                     group_ids=(index.image_sizes[index.caption_image][:, 0] >=
                                                index.image_sizes[index.caption_image][:, 1]).astype(int))
    first_step = [i for mb in sampler.micro_batches(0)[:2] for i in mb]
    damaged = sorted({index.image_path(int(index.caption_image[i])) for i in first_step})[:2]
    with open(damaged[0], "r+b") as f:
        f.truncate(300)  # a truncated JPEG
    with open(damaged[1], "w") as f:
        f.write("not an image")  # a text file named .jpg
    args = pretrain_args(str(root), str(tmp_path / "strict"), num_workers=0, max_steps=2, dropout=0.0)
    with pytest.raises(data.DataError, match=f"{os.path.basename(damaged[0])}|{os.path.basename(damaged[1])}"):
        pretrain.main(args)
    capsys.readouterr()
    pretrain.main(pretrain_args(str(root), str(tmp_path / "skip"), num_workers=0, max_steps=2, dropout=0.0,
                                skip_bad_images=True))
    printed = capsys.readouterr().out
    for path in damaged:
        assert printed.count(f"--skip-bad-images: skipped {path}") == 1, printed
    assert "--skip-bad-images: 2 unreadable images skipped" in printed


def test_skipped_examples_leave_the_batch(corpus, tmp_path):
    """collate drops an example whose image is an error message, keeps the others' pairs in step
    (image_index), and refuses a batch with no readable image; a missing VQA image is passed on to
    training with --skip-bad-images instead of stopping the reader."""
    good = {"image": torch.zeros(3, 64, 64, dtype=torch.uint8), "pairs": [{"input_ids": [2, 5, 3]}] * 2}
    batch = data.collate([{"image": "x.jpg: cannot decode", "pairs": [{"input_ids": [2, 3]}]}, good, good])
    assert batch["bad_images"] == ["x.jpg: cannot decode"] and batch["images"].shape[0] == 2
    assert batch["image_index"].tolist() == [0, 0, 1, 1]
    with pytest.raises(data.DataError, match="every image of a batch is unreadable, e.g. x.jpg"):
        data.collate([{"image": "x.jpg: cannot decode", "pairs": []}])
    root = tmp_path / "demo"
    shutil.copytree(corpus, root, ignore=shutil.ignore_patterns(".pixelbert_cache"))
    questions, _ = data.read_vqa(str(root), "train")
    os.remove(root / questions[0]["image_path"])
    with pytest.raises(data.DataError, match="not found"):
        data.read_vqa(str(root), "train")
    questions, annotations = data.read_vqa(str(root), "train", skip_bad_images=True)
    tok = data.Tokenizer(str(root / "vocab.txt"))
    answers = {a: i for i, a in enumerate(data.vqa_answer_vocab(annotations, 1))}
    dataset = data.VQAQuestions(str(root), questions, annotations, tok, answers, 64, 64, skip_bad_images=True)
    item = dataset[0, int(np.flatnonzero(dataset.question_ids == questions[0]["question_id"])[0])]
    assert "image file not found" in item["image"]
    (tmp_path / "text.jpg").write_text("not an image")  # indexing reads headers: skipped there too
    assert data.header_size(str(tmp_path / "text.jpg"), skip_bad=True) == (0, 0)
    with pytest.raises(data.DataError, match="text.jpg: cannot read the image header"):
        data.header_size(str(tmp_path / "text.jpg"), skip_bad=False)


def test_image_catalogue(tmp_path, monkeypatch):
    """The catalogue's images not covered by tests/test_data.py: a 1x1 image, and images over
    the decompression-bomb limit (a warning in PIL up to twice the limit: an error here too)."""
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp_path / "dot.png")
    assert data.image_tensor(str(tmp_path / "dot.png"), 64, 96).shape == (3, 64, 64)
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: over the limit, under twice it
    with pytest.raises(data.DataError, match="big.png: cannot decode the image.*DecompressionBomb"):
        data.load_image(str(tmp_path / "big.png"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # over twice the limit: PIL's own error
    with pytest.raises(data.DataError, match="big.png: cannot decode the image.*DecompressionBomb"):
        data.load_image(str(tmp_path / "big.png"))
    with pytest.raises(data.DataError, match="big.png: cannot read the image header"):
        data.image_size(str(tmp_path / "big.png"))


def test_text_catalogue(corpus):
    """A 500-word caption is truncated to --max-text-len keeping [SEP]; a VQA answer outside the
    answer vocabulary gives a zero target instead of an error."""
    tok = data.Tokenizer(os.path.join(corpus, "vocab.txt"), max_length=40)
    ids = tok.wrap(tok.pieces(["red " * 500])[0])
    assert len(ids) == 40 and ids[0] == tok.vocab["[CLS]"] and ids[-1] == tok.vocab["[SEP]"]
    annotation = {"answers": [{"answer": "platypus", "answer_confidence": "yes", "answer_id": i} for i in range(10)]}
    assert data.vqa_soft_targets(annotation, {"yes": 0, "no": 1}) == ([], [])


# ---- 6. numerical failure


def script_step(model, opt, scaler, loss_fn, out_dir, step):
    """The end of the scripts' step on a toy model: backward, unscale, clip, the divergence
    check, update. Returns the loss and the gradient norm."""
    loss = loss_fn(model, torch.ones(2))[None]
    scaler.scale(loss.sum()).backward()
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    checkpoint.check_step(step, out_dir, loss.detach(), norm, scaler)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), norm


def toy_step(loss_fn, out_dir, step, dtype="fp32", model=None):
    model = model or torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == "fp16")
    return model, script_step(model, opt, scaler, loss_fn, out_dir, step)


def test_nan_loss_stops_naming_step_and_checkpoint(tmp_path):
    checkpoint.save_checkpoint({"step": 3}, str(tmp_path / "ckpt_00000003.pt"))
    with pytest.raises(SystemExit, match=r"step 5: the loss is \[nan\]; stopping. Last good checkpoint: .*ckpt_00000003"):
        toy_step(lambda m, b: m(b).sum() * float("nan"), str(tmp_path), 4)
    model = torch.nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    # A finite loss with an infinite gradient (sqrt at 0) would write NaN into every weight: stop first.
    with pytest.raises(SystemExit, match=r"step 8: the gradient norm is (inf|nan); stopping before the update"):
        toy_step(lambda m, b: (m.weight - m.weight.detach()).abs().sqrt().sum(), str(tmp_path), 7, model=model)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.slow
def test_nan_in_pretraining_names_step_and_checkpoint(corpus, tmp_path, monkeypatch):
    """End to end: the loss turns NaN at step 3 of a run that saved a checkpoint at step 2."""
    cross_entropy, calls = torch.nn.functional.cross_entropy, []

    def nan_from_step_3(*args, **kwargs):
        calls.append(1)  # two losses x two micro-steps per step
        return cross_entropy(*args, **kwargs) * (float("nan") if len(calls) > 8 else 1.0)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_from_step_3)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match=r"step 3: the loss is \[nan, nan\]; stopping. Last good checkpoint: "
                                         rf"{out}/ckpt_00000002.pt"):
        pretrain.main(pretrain_args(corpus, out, num_workers=0, ckpt_every=2))


def test_fp16_skipped_steps_counted_and_a_collapse_stops(tmp_path):
    """fp16: an overflowing step is skipped by the scaler (non-finite gradient norm: the scripts
    count it in metrics.jsonl's skipped_steps); when every step overflows the run stops."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    before = [p.detach().clone() for p in model.parameters()]
    skipped = 0
    # 16 overflows halve the scale from 65536 to 1; the 17th takes it to 0.5, which step 18 sees
    with pytest.raises(SystemExit, match=r"step 18: fp16 loss scale 0.5: .*every step is skipped.*Last good "
                                         r"checkpoint: none"):
        for step in range(100):
            _, norm = script_step(model, opt, scaler, lambda m, b: (m.weight - m.weight.detach()).abs().sqrt().sum(),
                                  str(tmp_path), step)
            skipped += not torch.isfinite(norm).item()
    assert skipped == 17 and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    _, (_, norm) = toy_step(lambda m, b: m(b).sum(), str(tmp_path), 0, dtype="fp16")
    assert torch.isfinite(norm)  # a healthy fp16 step is not skipped


def test_dtype_auto_is_bf16_only_where_the_hardware_has_it(monkeypatch, capsys):
    """Emulated bf16 on a CPU without AMX / AVX512-BF16 is ~100x slower than fp32: auto avoids it."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(common, "native_bf16", lambda device: True)
    assert common.resolve_dtype("auto", cpu) == common.resolve_dtype("auto", gpu) == "bf16"
    monkeypatch.setattr(common, "native_bf16", lambda device: False)
    assert (common.resolve_dtype("auto", cpu), common.resolve_dtype("auto", gpu)) == ("fp32", "fp16")
    with common.autocast(cpu, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    assert capsys.readouterr().out == ""
    assert common.resolve_dtype("bf16", cpu) == "bf16"  # asked for explicitly: kept, with a warning
    assert "bf16 matrix products are emulated" in capsys.readouterr().out
    assert common.resolve_dtype("fp32", cpu) == "fp32" and capsys.readouterr().out == ""
    with pytest.raises(SystemExit, match="--dtype fp8: use one of auto, bf16, fp16, fp32"):
        common.resolve_dtype("fp8", cpu)


# ---- 7. impossible settings fail before any work


@pytest.mark.parametrize("script", [pretrain, finetune_vqa])
def test_impossible_settings_fail_before_any_work(script, tmp_path):
    """--data-root does not exist: each error below must come before any data is read."""
    no_data = str(tmp_path / "no_data")
    afile = tmp_path / "file"
    afile.write_text("")
    base = dict(data_root=no_data, model="tiny", init="", num_workers=0)
    with pytest.raises(SystemExit, match="--global-batch 60 is not a multiple of --batch-size 40 x 1 processes"):
        script.main(flags(**base, out_dir=str(tmp_path / "a"), global_batch=60, batch_size=40))
    with pytest.raises(SystemExit, match=f"--out-dir {afile}/run: cannot write there"):
        script.main(flags(**base, out_dir=f"{afile}/run", global_batch=40, batch_size=40))
    if os.geteuid() != 0:  # root writes anywhere; a path under a file (above) is unwritable for everyone
        (tmp_path / "locked").mkdir(mode=0o500)
        with pytest.raises(SystemExit, match="locked: cannot write there"):
            script.main(flags(**base, out_dir=str(tmp_path / "locked"), global_batch=40, batch_size=40))
    with pytest.raises(SystemExit, match=f"--resume: no checkpoint .* in {tmp_path}/b"):
        script.main(flags(**base, out_dir=str(tmp_path / "b"), global_batch=40, batch_size=40, resume=True))


def test_missing_vqa_file_names_the_download(corpus, tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(corpus, root, ignore=shutil.ignore_patterns(".pixelbert_cache", "coco", "vg"))
    os.remove(root / "vqa/v2_mscoco_train2014_annotations.json")
    with pytest.raises(data.DataError, match="v2_mscoco_train2014_annotations.json is missing. Get "
                                             "v2_Annotations_Train_mscoco.zip from https://visualqa.org"):
        finetune_vqa.main(flags(data_root=str(root), init="", model="tiny", out_dir=str(tmp_path / "out"),
                                global_batch=10, batch_size=10))


# ---- 9. logs


def test_progress_prints_plain_lines_into_a_log_file(capsys):
    """Off a terminal (pytest captures the output, as a job's log file does), each log step is one
    plain line, not a redrawn bar; on other ranks nothing is printed."""
    bar = common.Progress(4, 0, enabled=True)
    bar.update()
    bar.show(1, loss="0.500", lr="1.00e-04")
    bar.write("epoch 1.0: val accuracy 50.00")
    bar.close()
    other_rank = common.Progress(4, 0, enabled=False)
    other_rank.update()
    other_rank.show(1, loss="9.000")
    other_rank.write("epoch 1.0")
    other_rank.close()
    out = capsys.readouterr()
    assert out.out.splitlines() == ["step 1/4 | loss 0.500 | lr 1.00e-04", "epoch 1.0: val accuracy 50.00"]
    assert "\r" not in out.out + out.err


def test_progress_is_a_bar_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = common.Progress(4, 0, enabled=True)
    bar.update()
    bar.show(1, loss="0.500")
    bar.close()
    out = capsys.readouterr()
    assert "step 1/4" not in out.out and "loss=0.500" in out.err and "1/4" in out.err
