"""The bad-input catalogue (issue 22): every script, driven as a user would drive it, on a tiny
corpus written here. Each case must end in one clear line on stderr ("error: ..." naming the
file, record or flag; exit status 2 for a flag, 1 for data) or in a correct result; none may lose
an earlier run's files, and none may train on a wrong setting. Cases run in-process through
common.run (the scripts' own top level) for speed; the few that test the top level of a real
process run as subprocesses. docs/reliability.md lists every case with its input and outcome."""

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

import checkpoint
import common
import evaluate
import finetune_nlvr
import finetune_retrieval
import finetune_vqa
import pretrain
from tools import pretrain_cnn, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"pretrain": pretrain, "vqa": finetune_vqa, "nlvr": finetune_nlvr, "retrieval": finetune_retrieval,
           "evaluate": evaluate, "cnn": pretrain_cnn}


def flags(**args):
    """--kebab-case=value flags; True / False as --name / --no-name; None leaves the flag out."""
    return [(f"--{'' if v else 'no-'}{k.replace('_', '-')}" if isinstance(v, bool) else f"--{k.replace('_', '-')}={v}")
            for k, v in args.items() if v is not None]


# ---- the corpus and the runs the cases start from, made once


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(synthetic.write_demo_corpus(tmp_path_factory.mktemp("catalogue") / "demo", seed=0, scale=0.02))



def pretrain_flags(root, out, **kw):
    return flags(**{**dict(data="coco_vg", data_root=root, out_dir=out, model="tiny", image_min_size=64,
                           image_max_size=64, batch_size=4, global_batch=4, dtype="fp32", num_workers=0, eval_pairs=4,
                           max_steps=2, log_every=1, warmup_steps=1, ckpt_every=1), **kw})


def vqa_flags(root, out, init, **kw):
    return flags(**{**dict(data="vqa", data_root=root, out_dir=out, init=init, model="tiny", image_min_size=64,
                           image_max_size=64, batch_size=4, global_batch=4, questions_per_image=1, minival_images=5,
                           min_answer_count=1, dtype="fp32", num_workers=0, max_steps=2, log_every=1, ckpt_every=1,
                           warmup_steps=1), **kw})


def nlvr_flags(root, out, init, **kw):
    return flags(**{**dict(data="nlvr2", data_root=root, out_dir=out, init=init, model="tiny", image_min_size=64,
                           image_max_size=64, batch_size=2, global_batch=2, dtype="fp32", num_workers=0, max_steps=2,
                           log_every=1, ckpt_every=1, warmup_steps=1), **kw})


def retrieval_flags(root, out, init, **kw):
    return flags(**{**dict(data="flickr30k", data_root=root, out_dir=out, init=init, model="tiny", image_min_size=64,
                           image_max_size=64, batch_size=2, global_batch=2, negatives=3, hard_negatives=1,
                           eval_images=3, score_batch=64, dtype="fp32", num_workers=0, max_steps=2, log_every=1,
                           ckpt_every=1, warmup_steps=1), **kw})


def cnn_flags(root, out_dir, **kw):
    return flags(**{**dict(data_root=root, model="tiny", out=os.path.join(str(out_dir), "cnn.pth"), epochs=1,
                           batch_size=4, image_size=32, dtype="fp32", num_workers=0, log_every=1), **kw})


def call(script, argv):
    """common.run(script.main, argv) in this process: (exit status, result)."""
    try:
        return 0, common.run(SCRIPTS[script].main, argv)
    except SystemExit as e:
        return (e.code if isinstance(e.code, int) else 1), None


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """A finished run of each training script (folders to copy, checkpoints to start from);
    their locks are released, as they are when a run's process ends."""
    base = tmp_path_factory.mktemp("runs")
    found = {}
    for name, script, argv in (
            ("pretrain", "pretrain", lambda out: pretrain_flags(corpus, out)),
            ("vqa", "vqa", lambda out: vqa_flags(corpus, out, found["pretrain"] + "/final.pt")),
            ("nlvr", "nlvr", lambda out: nlvr_flags(corpus, out, found["pretrain"] + "/final.pt")),
            ("retrieval", "retrieval", lambda out: retrieval_flags(corpus, out, found["pretrain"] + "/final.pt"))):
        out = str(base / name)
        status, _ = call(script, argv(out))
        assert status == 0, name
        checkpoint.release_lock(out)
        found[name] = out
    return found


class Ctx:
    """What a case works with: the shared corpus (read only), a copy to damage, a fresh --out-dir,
    the finished runs, and snapshots of files that must stay intact."""

    def __init__(self, tmp_path, corpus, runs):
        self.tmp, self.corpus, self.runs = tmp_path, corpus, runs
        self.out = str(tmp_path / "out")
        self.final = os.path.join(runs["pretrain"], "final.pt")
        self.snapshots = []

    def own_corpus(self):
        root = str(self.tmp / "demo")
        if not os.path.exists(root):
            shutil.copytree(self.corpus, root, ignore=shutil.ignore_patterns(".pixelbert_cache"))
        return root

    def copy_run(self, name="pretrain"):
        """The finished run copied to --out-dir, its files remembered (see intact)."""
        shutil.copytree(self.runs[name], self.out)
        self.snapshots.append(digests(self.out))
        return self.out

    def intact(self):
        for before in self.snapshots:
            after = digests(self.out)
            assert {k: after.get(k) for k in before} == before, "an earlier run's file changed or vanished"

    def file(self, name, content):
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)


def checkpoints_intact(ctx):
    """The earlier .pt files unchanged (a resumed run appends to metrics.jsonl and rewrites config.json)."""
    after = digests(ctx.out)
    for before in ctx.snapshots:
        assert {k: after.get(k) for k in before if k.endswith(".pt")} == {k: v for k, v in before.items()
                                                                           if k.endswith(".pt")}


def digests(folder):
    return {name: hashlib.sha1(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in os.listdir(folder) if name.endswith((".pt", ".json", ".jsonl"))}


# ---- small tools for the cases


def damaged(script_flags, *damages, **flags):
    """A case's argv: script_flags (pretrain_flags, vqa_flags, ...) on the case's own copy of the
    corpus, after each damage(root) has run on that copy. The fine-tuning scripts start from the
    finished pre-training run's final.pt."""
    def argv(ctx):
        root = ctx.own_corpus()
        for damage in damages:
            damage(root)
        init = [ctx.final] if script_flags in (vqa_flags, nlvr_flags, retrieval_flags) else []
        return script_flags(root, ctx.out, *init, **flags)
    return argv


def image_of(root, folder):
    """The first image file under root/folder."""
    names = sorted(n for n in os.listdir(os.path.join(root, folder)) if n.endswith((".jpg", ".png")))
    return os.path.join(root, folder, names[0])


def images_in(root, *folders):
    """Every image file under each root/folder."""
    return [os.path.join(root, folder, name) for folder in folders for name in os.listdir(os.path.join(root, folder))
            if name.endswith((".jpg", ".png"))]


def damage_all(root, *folders):
    for path in images_in(root, *folders):
        with open(path, "wb") as f:
            f.write(b"not an image")


def convert(path, ext):
    """Re-save an image under the same base name with another extension (the README allows .jpg or .png)."""
    new = os.path.splitext(path)[0] + ext
    Image.open(path).convert("RGB").save(new)
    os.remove(path)
    return new


def convert_all(root, ext, *folders):
    for path in images_in(root, *folders):
        convert(path, ext)


def edit_json(path, change):
    with open(path) as f:
        obj = json.load(f)
    change(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


def plain_state_dict(ctx):
    return str(save(ctx.tmp / "plain.pt", {"w": torch.zeros(2)}))


def save(path, obj):
    torch.save(obj, path)
    return path


def write_lock(out, pid, host=None, job=""):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, checkpoint.LOCK), "w") as f:
        json.dump({"pid": pid, "host": host or socket.gethostname(), "slurm_job": job, "started": "earlier"}, f)


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- expectations


def error(status, pattern, trained_ok=False):
    """One line on stderr, "error: ..." matching `pattern` (the flag, file or record), exit `status`;
    before any training step unless trained_ok (a bad training image is met when training reaches it)."""
    def check(ctx, code, out, err):
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == status, (code, err[-2000:])
        assert len(lines) >= 1 and lines[-1].startswith("error: "), err[-2000:]
        assert sum(line.startswith("error: ") for line in lines) == 1, err
        import re
        assert re.search(pattern, lines[-1]), lines[-1]
        assert trained_ok or "step 1/" not in out, "trained before failing"
    return check


def ok(*printed):
    """Exit 0, and each of `printed` in the output."""
    def check(ctx, code, out, err):
        assert code == 0, err[-2000:]
        for text in printed:
            assert text in out + err, (text, out[-2000:])
    return check


def then(first, *more):
    """An expectation, then further checks on the case's files."""
    def check(ctx, code, out, err):
        first(ctx, code, out, err)
        for extra in more:
            extra(ctx)
    return check


def no_checkpoint(ctx):
    assert not checkpoint.step_checkpoints(ctx.out) if os.path.isdir(ctx.out) else True


# ---- the catalogue: (id, script, argv from ctx, expectation)

BAD_FLAGS = {  # the settings every run checks before any work (exit 2, naming the flag)
    "pretrain": [("batch-size", 0), ("global-batch", 0), ("global-batch", 6), ("log-every", 0), ("ckpt-every", 0),
                 ("eval-every", -1), ("eval-pairs", 0), ("captions-per-image", 0), ("captions-per-image", 3),
                 ("image-min-size", 0), ("image-max-size", 0), ("max-text-len", 1000), ("max-text-len", 2),
                 ("epochs", 0), ("max-steps", -1), ("lr", -1), ("weight-decay", -0.1), ("grad-clip", -1),
                 ("mask-prob", 1.5), ("itm-neg-prob", 2), ("pixel-samples", -1), ("keep-checkpoints", -1),
                 ("tasks", "mlm,foo"), ("model", "huge"), ("dtype", "fp8"), ("data", "nope"), ("dropout", 1.5),
                 ("num-workers", -1), ("warmup-steps", -1), ("lr-milestones", "abc"), ("cnn-optimizer", "lion"),
                 ("pixel-pool", 0)],
    "vqa": [("batch-size", 0), ("minival-images", 0), ("minival-images", -1), ("min-answer-count", 0),
            ("questions-per-image", 0), ("train-split", "test"), ("eval-split", "test"), ("vqa-rules", "2099"),
            ("log-every", 0), ("ckpt-every", 0), ("data", "coco"), ("max-text-len", 1000)],
    "nlvr": [("batch-size", 0), ("data", "vqa"), ("train-split", "test9"), ("eval-split", "nope"), ("log-every", 0),
             ("global-batch", 3)],
    "retrieval": [("negatives", 0), ("hard-negatives", 0), ("hard-negatives", 50), ("eval-images", 0),
                  ("score-batch", 0), ("data", "vg"), ("batch-size", 0)],
    "cnn": [("batch-size", 0), ("epochs", 0), ("image-size", 0), ("batch-size", 100000), ("lr", -1),
            ("model", "huge")],
}


def script_flags(script, ctx, **kw):
    if script == "pretrain":
        return pretrain_flags(ctx.corpus, ctx.out, **kw)
    if script == "cnn":
        return cnn_flags(ctx.corpus, ctx.out, **kw)
    return {"vqa": vqa_flags, "nlvr": nlvr_flags, "retrieval": retrieval_flags}[script](ctx.corpus, ctx.out, ctx.final,
                                                                                      **kw)


def bad_flag_cases():
    for script, bad in BAD_FLAGS.items():
        for flag, value in bad:
            yield (f"{script}--{flag}={value}", script,
                   lambda ctx, s=script, f=flag, v=value: script_flags(s, ctx, **{f.replace("-", "_"): v}),
                   then(error(2, f"--{flag}"), no_checkpoint))


def eval_args(ctx, command, **kw):
    own = {"vqa": dict(checkpoint=os.path.join(ctx.runs["vqa"], "best.pt"), data_root=ctx.corpus, split="minival",
                       batch_size=4, num_workers=0, dtype="fp32"),
           "nlvr2": dict(checkpoint=os.path.join(ctx.runs["nlvr"], "best.pt"), data_root=ctx.corpus, split="dev",
                         batch_size=4, num_workers=0, dtype="fp32"),
           "retrieval": dict(checkpoint=os.path.join(ctx.runs["retrieval"], "best.pt"), data_root=ctx.corpus,
                             data="flickr30k", max_images=2, num_workers=0, dtype="fp32"),
           "match": dict(checkpoint=ctx.final, image=image_of(ctx.corpus, "coco/val2014"), text="a red circle"),
           "ask": dict(checkpoint=os.path.join(ctx.runs["vqa"], "best.pt"), image=image_of(ctx.corpus, "coco/val2014"),
                       question="what colour is the circle?"),
           "attention": dict(checkpoint=ctx.final, image=image_of(ctx.corpus, "coco/val2014"), text="a red circle",
                             out=str(ctx.tmp / "attention.png"))}[command]
    return [command, *flags(**{**own, **kw})]


def vqa_predictions(ctx, change=None):
    questions = json.load(open(os.path.join(ctx.corpus, "vqa/v2_OpenEnded_mscoco_val2014_questions.json")))["questions"]
    predictions = [{"question_id": q["question_id"], "answer": "yes"} for q in questions]
    return ctx.file("predictions.json", json.dumps(change(predictions) if change else predictions))


def nlvr_predictions(ctx, lines=None):
    records = [json.loads(line) for line in open(os.path.join(ctx.corpus, "nlvr2/data/dev.json"))]
    return ctx.file("predictions.csv", "\n".join(lines or [f"{r['identifier']},True" for r in records]) + "\n")


def vqa_score_args(ctx, predictions):
    return ["vqa-score", f"--predictions={predictions}",
            f"--questions={ctx.corpus}/vqa/v2_OpenEnded_mscoco_val2014_questions.json",
            f"--annotations={ctx.corpus}/vqa/v2_mscoco_val2014_annotations.json"]


def check(condition):
    assert condition


def newest_loads(ctx):
    newest = checkpoint.step_checkpoints(ctx.out)[-1]
    assert checkpoint.load_checkpoint(newest)["step"] == checkpoint.checkpoint_step(newest)


def files_are(*names):
    def check(ctx):
        assert sorted(os.path.basename(p) for p in checkpoint.step_checkpoints(ctx.out)) == sorted(names)
    return check


def no_tmp_files(ctx):
    assert not [n for n in os.listdir(ctx.out) if ".tmp" in n]


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def full_disk(monkeypatch):
    """torch.save writing onto /dev/full: the C++ writer's own failure ('enforce fail at inline_container.cc')."""
    real = torch.save

    def save_onto_full_disk(obj, f, *args, **kwargs):
        if isinstance(f, str) and ".tmp" in f:
            with open(f, "wb") as partial:
                partial.write(b"PK\x03\x04 partial")
            return real(obj, "/dev/full")
        return real(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save_onto_full_disk)


def read_only(monkeypatch, root, cache):
    """--data-root read-only (the tests run as root, which chmod does not stop): creating folders there fails."""
    makedirs = os.makedirs
    monkeypatch.setenv("XDG_CACHE_HOME", cache)

    def refuse(path, *args, **kwargs):
        if os.path.abspath(path).startswith(os.path.abspath(root) + os.sep):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return makedirs(path, *args, **kwargs)
    monkeypatch.setattr(os, "makedirs", refuse)


def case_list():
    P, V, N, R = pretrain_flags, vqa_flags, nlvr_flags, retrieval_flags
    cases = list(bad_flag_cases())
    cases += [
        # ---- pretrain.py: data
        ("pretrain-data-root-missing", "pretrain", lambda c: P(str(c.tmp / "nowhere"), c.out),
         error(1, r"nowhere/(vocab.txt: vocabulary file not found|coco/dataset_coco.json is missing)")),
        ("pretrain-karpathy-json-invalid", "pretrain",
         damaged(P, lambda r: open(r + "/coco/dataset_coco.json", "w").write("{oops")),
         error(1, r"dataset_coco.json: not a valid JSON file")),
        ("pretrain-karpathy-record-without-filename", "pretrain",
         damaged(P, lambda r: edit_json(r + "/coco/dataset_coco.json", lambda d: d["images"][0].pop("filename"))),
         error(1, r"dataset_coco.json: images\[0\]: field 'filename' is missing")),
        ("pretrain-vg-json-missing", "pretrain", damaged(P, lambda r: os.remove(r + "/vg/image_data.json")),
         error(1, r"vg/image_data.json is missing. Get")),
        ("pretrain-vocab-missing", "pretrain", lambda c: P(c.corpus, c.out, vocab=str(c.tmp / "none.txt")),
         error(1, r"none.txt: vocabulary file not found")),
        ("pretrain-vocab-not-utf8", "pretrain",
         lambda c: P(c.corpus, c.out, vocab=c.file("vocab.txt", b"[PAD]\n\xff\xfe\n")),
         error(1, r"vocab.txt: not a WordPiece vocabulary .*UTF-8")),
        ("pretrain-vocab-without-specials", "pretrain", lambda c: P(c.corpus, c.out, vocab=c.file("v.txt", "a\nb\n")),
         error(1, r"v.txt: a BERT vocabulary needs \[PAD\] at id 0")),
        ("pretrain-training-image-undecodable", "pretrain",
         damaged(P, lambda r: damage_all(r, "coco/train2014", "vg/VG_100K")),
         error(1, r"\.jpg: cannot (decode the image|read the image header)")),
        ("pretrain-training-image-in-worker", "pretrain",
         damaged(P, lambda r: truncate_images(r, "coco/train2014", "vg/VG_100K"), num_workers=1),
         error(1, r"\.jpg: cannot decode the image")),
        ("pretrain-skip-bad-images", "pretrain",
         damaged(P, bad_training_images, skip_bad_images=True),
         ok("unreadable image")),
        ("pretrain-images-as-png", "pretrain",
         damaged(P, lambda r: convert_all(r, ".png", "coco/train2014", "vg/VG_100K", "coco/val2014")),
         ok("saved")),
        ("pretrain-held-out-image-undecodable", "pretrain", damaged(P, lambda r: truncate_images(r, "coco/val2014")),
         then(error(1, r"val2014/.*\.jpg: cannot"), no_checkpoint)),
        ("pretrain-cnn-not-a-checkpoint", "pretrain", lambda c: P(c.corpus, c.out, cnn=c.file("cnn.pth", "hello")),
         then(error(2, r"--cnn .*cnn.pth: not a weights file"), no_checkpoint)),
        ("pretrain-cnn-truncated", "pretrain",
         lambda c: P(c.corpus, c.out, cnn=str(cut(save(c.tmp / "r.pth", {"w": torch.zeros(1000)})))),
         error(2, r"--cnn .*r.pth: the file is incomplete")),
        ("pretrain-cnn-missing", "pretrain", lambda c: P(c.corpus, c.out, cnn=str(c.tmp / "no.pth")),
         error(2, r"--cnn .*no.pth: file not found")),
        ("pretrain-bert-folder-without-weights", "pretrain",
         lambda c: P(c.corpus, c.out, bert=os.path.dirname(shutil.copy(c.corpus + "/vocab.txt", mkdir(c.tmp / "b")))),
         error(1, r"/b: no model.safetensors or pytorch_model.bin")),
        ("pretrain-init-plain-state-dict", "pretrain", lambda c: P(c.corpus, c.out, init=plain_state_dict(c)),
         error(2, r"--init .*plain.pt: a bare state dict")),
        ("pretrain-init-not-a-file", "pretrain", lambda c: P(c.corpus, c.out, init=c.file("x.pt", "text")),
         error(2, r"--init .*x.pt: not a loadable checkpoint")),
        ("pretrain-init-missing", "pretrain", lambda c: P(c.corpus, c.out, init=str(c.tmp / "none.pt")),
         error(2, r"--init .*none.pt: checkpoint not found")),
        ("pretrain-from-init", "pretrain", lambda c: P(c.corpus, c.out, init=c.final), ok("saved")),
        ("pretrain-out-dir-is-a-file", "pretrain", lambda c: P(c.corpus, c.file("afile", "") + "/run"),
         error(2, r"--out-dir .*afile/run: cannot write there")),
        ("pretrain-resume-empty-folder", "pretrain", lambda c: P(c.corpus, c.out, resume=True),
         error(2, r"--resume: no checkpoint")),
        ("pretrain-read-only-data-root", "pretrain", damaged(P),
         ok("caching the caption index")),
        # ---- nothing lost
        ("loss-new-run-into-finished-run", "pretrain", lambda c: (c.copy_run(), P(c.corpus, c.out, lr=0.5))[-1],
         then(error(2, r"--out-dir .*out holds another run .*--lr 0.0001 -> 0.5.*--resume.*new --out-dir"),
              Ctx.intact)),
        ("loss-same-flags-without-resume", "pretrain", lambda c: (c.copy_run(), P(c.corpus, c.out))[-1],
         then(error(2, r"--out-dir .*holds another run \(.*ckpt_00000002.pt\).*--resume"), Ctx.intact)),
        ("loss-resume-with-other-flags", "pretrain",
         lambda c: (c.copy_run(), P(c.corpus, c.out, resume=True, seed=7, max_steps=3))[-1],
         then(error(2, r"--resume: .*holds a run with other settings \(--seed 0 -> 7\)"), Ctx.intact)),
        ("loss-resume-same-flags-continues", "pretrain",
         lambda c: (c.copy_run(), P(c.corpus, c.out, resume=True, max_steps=3))[-1],
         then(ok("resumed from", "ckpt_00000002.pt at step 2"), files_are("ckpt_00000001.pt", "ckpt_00000002.pt",
                                                                           "ckpt_00000003.pt"), newest_loads)),
        ("loss-unreadable-newest-checkpoint", "pretrain",
         lambda c: (c.copy_run(), truncate(c.out + "/ckpt_00000002.pt"),
                    P(c.corpus, c.out, resume=True, max_steps=3, keep_checkpoints=1))[-1],
         then(ok("skipping", "resumed from", "ckpt_00000001.pt at step 1"), files_are("ckpt_00000003.pt"),
              newest_loads, lambda c: check(os.path.exists(c.out + "/ckpt_00000002.pt.unreadable")))),
        ("loss-pruning-keeps-the-newest-complete", "pretrain",
         lambda c: (c.copy_run(), P(c.corpus, c.out, resume=True, max_steps=4, keep_checkpoints=2))[-1],
         then(ok(), files_are("ckpt_00000003.pt", "ckpt_00000004.pt"), newest_loads)),
        ("loss-live-lock", "pretrain",
         lambda c: (c.copy_run(), write_lock(c.out, os.getppid()), P(c.corpus, c.out, resume=True, max_steps=3))[-1],
         then(error(2, r"--out-dir .*in use by another run \(pid \d+ on"), Ctx.intact)),
        ("loss-lock-on-another-host", "pretrain",
         lambda c: (write_lock(c.out, 1, "elsewhere"), P(c.corpus, c.out))[-1],
         error(2, r"in use by another run \(pid 1 on elsewhere.*delete .*run.lock")),
        ("loss-stale-lock-taken-over", "pretrain", lambda c: (write_lock(c.out, dead_pid()), P(c.corpus, c.out))[-1],
         ok("stale lock", "saved")),
        ("loss-requeued-slurm-job-takes-its-lock", "pretrain",
         lambda c: (c.setenv("SLURM_JOB_ID", "4242"), write_lock(c.out, 1, "node7", "4242"),
                    P(c.corpus, c.out))[-1], ok("stale lock")),
        ("loss-folder-with-other-files", "pretrain",
         lambda c: (mkdir(c.out), open(c.out + "/notes.txt", "w").write("mine"), P(c.corpus, c.out))[-1],
         then(ok("saved"), lambda c: check(open(c.out + "/notes.txt").read() == "mine"))),
        ("loss-restart-before-first-checkpoint", "pretrain",
         lambda c: (c.copy_run(), [os.remove(p) for p in checkpoint.step_checkpoints(c.out)],
                    os.remove(c.out + "/final.pt"), P(c.corpus, c.out))[-1], ok("starting it again", "saved")),
        ("loss-final-pt-without-run", "pretrain",
         lambda c: (mkdir(c.out), shutil.copy(c.final, c.out + "/final.pt"), P(c.corpus, c.out))[-1],
         error(2, r"--out-dir .*holds another run \(final.pt\)")),
        ("loss-disk-full-while-saving", "pretrain", lambda c: (c.copy_run(), c.full_disk(),
                                                              P(c.corpus, c.out, resume=True, max_steps=3))[-1],
         then(error(1, r"ckpt_00000003.pt: cannot write it \(no space left on the device"), checkpoints_intact,
              no_tmp_files)),
        ("loss-vqa-new-run-into-finished-vqa-run", "vqa",
         lambda c: (c.copy_run("vqa"), V(c.corpus, c.out, c.final, lr=0.5))[-1],
         then(error(2, r"holds another run"), Ctx.intact)),
        ("loss-nlvr-new-run-into-pretrain-run", "nlvr", lambda c: (c.copy_run(), N(c.corpus, c.out, c.final))[-1],
         then(error(2, r"holds another run"), Ctx.intact)),
        ("loss-retrieval-resume-continues", "retrieval",
         lambda c: (c.copy_run("retrieval"), R(c.corpus, c.out, c.final, resume=True, max_steps=3))[-1],
         then(ok("resumed from"), newest_loads)),
        # ---- finetune_vqa.py
        ("vqa-annotations-missing", "vqa",
         damaged(V, lambda r: os.remove(r + "/vqa/v2_mscoco_train2014_annotations.json")),
         error(1, r"annotations.json is missing. Get")),
        ("vqa-questions-invalid-json", "vqa",
         damaged(V, lambda r: open(r + "/vqa/v2_OpenEnded_mscoco_train2014_questions.json", "w").write("[")),
         error(1, r"questions.json: not a valid JSON file")),
        ("vqa-question-without-annotation", "vqa",
         damaged(V, lambda r: edit_json(r + "/vqa/v2_mscoco_train2014_annotations.json",
                                        lambda d: d["annotations"].pop(0))),
         error(1, r"have no annotation \(e.g. question_id")),
        ("vqa-image-missing", "vqa", damaged(V, lambda r: os.remove(image_of(r, "coco/train2014"))),
         error(1, r"train2014.*\.jpg \(or .png\): image of VQA image_id \d+ not found")),
        ("vqa-images-as-png", "vqa",
         damaged(V, lambda r: convert_all(r, ".png", "coco/train2014", "coco/val2014")), ok("best")),
        ("vqa-init-plain-state-dict", "vqa", lambda c: V(c.corpus, c.out, plain_state_dict(c)),
         error(2, r"--init .*plain.pt: a bare state dict")),
        ("vqa-init-other-vocabulary", "vqa",
         lambda c: V(c.corpus, c.out, c.final, vocab=c.file("vocab.txt", "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")),
         error(2, r"--vocab .*another WordPiece vocabulary")),
        ("vqa-held-out-image-undecodable", "vqa",
         damaged(V, lambda r: truncate_images(r, "coco/val2014"), train_split="train"),
         then(error(1, r"val2014/.*: cannot"), no_checkpoint)),
        # ---- finetune_nlvr.py
        ("nlvr-dev-missing", "nlvr", damaged(N, lambda r: os.remove(r + "/nlvr2/data/dev.json")),
         error(1, r"nlvr2/data/dev.json is missing")),
        ("nlvr-bad-json-line", "nlvr", damaged(N, lambda r: open(r + "/nlvr2/data/train.json", "a").write("{oops\n")),
         error(1, r"train.json, line \d+")),
        ("nlvr-label-not-boolean", "nlvr",
         damaged(N, lambda r: rewrite_lines(r + "/nlvr2/data/train.json", lambda e: {**e, "label": "maybe"})),
         error(1, r"train.json, line 1")),
        ("nlvr-image-missing", "nlvr", damaged(N, lambda r: os.remove(image_of(r, "nlvr2/images/dev"))),
         error(1, r"dev-.*-img\d.png: image of .*dev.json, line \d+ .* not found")),
        ("nlvr-images-as-jpg", "nlvr", damaged(N, lambda r: convert_all(r, ".jpg", "nlvr2/images/dev")), ok("best")),
        ("nlvr-held-out-image-undecodable", "nlvr", damaged(N, lambda r: truncate_images(r, "nlvr2/images/dev")),
         then(error(1, r"dev-.*\.png: cannot"), no_checkpoint)),
        # ---- finetune_retrieval.py
        ("retrieval-karpathy-missing", "retrieval",
         damaged(R, lambda r: os.remove(r + "/flickr30k/dataset_flickr30k.json")),
         error(1, r"dataset_flickr30k.json is missing. Get")),
        ("retrieval-image-missing", "retrieval", damaged(R, lambda r: os.remove(image_of(r, "flickr30k/images"))),
         error(1, r"flickr30k/images/.*\.jpg: image of .* not found")),
        ("retrieval-images-as-png", "retrieval", damaged(R, lambda r: convert_all(r, ".png", "flickr30k/images")),
         ok("best checkpoint")),
        ("retrieval-test-image-undecodable", "retrieval", damaged(R, lambda r: truncate_images(r, "flickr30k/images")),
         then(error(1, r"\.jpg: cannot"), no_checkpoint)),
        # ---- evaluate.py
        ("evaluate-vqa", "evaluate", lambda c: eval_args(c, "vqa"), ok("overall")),
        ("evaluate-vqa-with-nlvr-checkpoint", "evaluate",
         lambda c: eval_args(c, "vqa", checkpoint=os.path.join(c.runs["nlvr"], "best.pt")),
         error(1, r"best.pt: not a VQA checkpoint")),
        ("evaluate-vqa-checkpoint-missing", "evaluate", lambda c: eval_args(c, "vqa", checkpoint=str(c.tmp / "no.pt")),
         error(1, r"no.pt: checkpoint not found")),
        ("evaluate-vqa-checkpoint-garbage", "evaluate", lambda c: eval_args(c, "vqa", checkpoint=c.file("g.pt", "x")),
         error(1, r"g.pt: not a loadable checkpoint")),
        ("evaluate-vqa-plain-state-dict", "evaluate", lambda c: eval_args(c, "vqa", checkpoint=plain_state_dict(c)),
         error(1, r"plain.pt: a bare state dict")),
        ("evaluate-vqa-batch-size-0", "evaluate", lambda c: eval_args(c, "vqa", batch_size=0),
         error(2, r"--batch-size")),
        ("evaluate-vqa-out-folder-missing", "evaluate",
         lambda c: eval_args(c, "vqa", split="test-dev", out=str(c.tmp / "no/sub.json")),
         error(2, r"--out .*sub.json: the folder .*no does not exist")),
        ("evaluate-vqa-held-out-image-undecodable", "evaluate",
         lambda c: (truncate_images(c.own_corpus(), "coco/val2014"), eval_args(c, "vqa", data_root=c.own_corpus()))[-1],
         error(1, r"val2014/.*: cannot")),
        ("evaluate-nlvr2", "evaluate", lambda c: eval_args(c, "nlvr2"), ok("consistency")),
        ("evaluate-nlvr2-with-vqa-checkpoint", "evaluate",
         lambda c: eval_args(c, "nlvr2", checkpoint=os.path.join(c.runs["vqa"], "best.pt")),
         error(1, r"not an NLVR2 checkpoint")),
        ("evaluate-nlvr2-batch-size-0", "evaluate", lambda c: eval_args(c, "nlvr2", batch_size=0),
         error(2, r"--batch-size")),
        ("evaluate-nlvr2-images-as-jpg", "evaluate",
         lambda c: (convert_all(c.own_corpus(), ".jpg", "nlvr2/images/dev"),
                    eval_args(c, "nlvr2", data_root=c.own_corpus()))[-1], ok("accuracy")),
        ("evaluate-retrieval", "evaluate", lambda c: eval_args(c, "retrieval"), ok("tr_r1")),
        ("evaluate-retrieval-zero-shot", "evaluate", lambda c: eval_args(c, "retrieval", checkpoint=c.final),
         ok("tr_r1")),
        ("evaluate-retrieval-vqa-checkpoint", "evaluate",
         lambda c: eval_args(c, "retrieval", checkpoint=os.path.join(c.runs["vqa"], "best.pt")),
         error(1, r"neither a retrieval nor a pre-training checkpoint")),
        ("evaluate-retrieval-max-images-negative", "evaluate", lambda c: eval_args(c, "retrieval", max_images=-1),
         error(2, r"--max-images")),
        ("evaluate-retrieval-score-batch-0", "evaluate", lambda c: eval_args(c, "retrieval", score_batch=0),
         error(2, r"--score-batch")),
        ("evaluate-retrieval-out-folder-missing", "evaluate",
         lambda c: eval_args(c, "retrieval", out=str(c.tmp / "no/r.json")), error(2, r"--out .*does not exist")),
        ("evaluate-retrieval-save-scores-folder-missing", "evaluate",
         lambda c: eval_args(c, "retrieval", save_scores=str(c.tmp / "no/s.pt")),
         error(2, r"--save-scores .*does not exist")),
        ("evaluate-retrieval-images-as-png", "evaluate",
         lambda c: (convert_all(c.own_corpus(), ".png", "flickr30k/images"),
                    eval_args(c, "retrieval", data_root=c.own_corpus()))[-1], ok("tr_r1")),
        ("evaluate-vqa-score", "evaluate", lambda c: vqa_score_args(c, vqa_predictions(c)), ok("overall")),
        ("evaluate-vqa-score-missing-file", "evaluate", lambda c: vqa_score_args(c, str(c.tmp / "none.json")),
         error(1, r"none.json")),
        ("evaluate-vqa-score-duplicate", "evaluate",
         lambda c: vqa_score_args(c, vqa_predictions(c, lambda p: p + p[:1])), error(1, r"predictions.json")),
        ("evaluate-vqa-score-not-json", "evaluate", lambda c: vqa_score_args(c, c.file("p.json", "{")),
         error(1, r"p.json")),
        ("evaluate-nlvr2-score", "evaluate",
         lambda c: ["nlvr2-score", f"--predictions={nlvr_predictions(c)}",
                    f"--labels={c.corpus}/nlvr2/data/dev.json"], ok("accuracy")),
        ("evaluate-nlvr2-score-bad-line", "evaluate",
         lambda c: ["nlvr2-score", f"--predictions={nlvr_predictions(c, ['dev-0-0-0,Maybe'])}",
                    f"--labels={c.corpus}/nlvr2/data/dev.json"], error(1, r"predictions.csv")),
        ("evaluate-match", "evaluate", lambda c: eval_args(c, "match"), ok("match_probability")),
        ("evaluate-match-image-missing", "evaluate", lambda c: eval_args(c, "match", image=str(c.tmp / "no.jpg")),
         error(1, r"no.jpg: image file not found")),
        ("evaluate-match-image-is-text", "evaluate", lambda c: eval_args(c, "match", image=c.file("t.jpg", "text")),
         error(1, r"t.jpg: cannot decode the image")),
        ("evaluate-match-empty-text", "evaluate", lambda c: eval_args(c, "match", text=" "),
         error(1, r"the text is empty")),
        ("evaluate-ask", "evaluate", lambda c: eval_args(c, "ask"), ok("answers")),
        ("evaluate-ask-with-pretraining-checkpoint", "evaluate", lambda c: eval_args(c, "ask", checkpoint=c.final),
         error(1, r"final.pt: this model's heads are")),
        ("evaluate-attention", "evaluate", lambda c: eval_args(c, "attention"), ok("png")),
        ("evaluate-attention-layer-out-of-range", "evaluate", lambda c: eval_args(c, "attention", layer=99),
         error(1, r"--layer 99")),
        ("evaluate-attention-out-folder-missing", "evaluate",
         lambda c: eval_args(c, "attention", out=str(c.tmp / "no/a.png")), error(2, r"--out .*does not exist")),
        # ---- tools/pretrain_cnn.py
        ("cnn-trains", "cnn", lambda c: cnn_flags(c.corpus, c.out), ok("saved")),
        ("cnn-imagenet-missing", "cnn", lambda c: cnn_flags(str(c.tmp / "nowhere"), c.out),
         error(1, r"imagenet/train is missing")),
        ("cnn-class-folder-empty", "cnn", damaged(cnn_flags, lambda r: mkdir(r + "/imagenet/train/zebra")),
         error(1, r"imagenet/train/zebra: no images")),
        ("cnn-skip-bad-images", "cnn",
         damaged(cnn_flags, damage_one_class, skip_bad_images=True),
         ok("unreadable image")),
        ("cnn-bad-image", "cnn", damaged(cnn_flags, damage_one_class),
         error(1, r"\.JPEG: cannot decode the image", trained_ok=True)),
        ("cnn-out-folder-created", "cnn", lambda c: cnn_flags(c.corpus, c.out, out=str(c.tmp / "new/sub/cnn.pth")),
         ok("saved")),
        ("cnn-out-under-a-file", "cnn", lambda c: cnn_flags(c.corpus, c.out, out=c.file("f", "") + "/cnn.pth"),
         error(1, r"f")),
    ]
    return cases


def bad_training_images(root):
    for folder in ("coco/train2014", "vg/VG_100K"):
        names = sorted(os.listdir(os.path.join(root, folder)))
        for name in names[: len(names) // 3]:
            with open(os.path.join(root, folder, name), "wb") as f:
                f.write(b"\xff\xd8\xff not really a jpeg")


def truncate_images(root, *folders):
    """Every image of the folders cut to its first half: the header still reads (the image is
    indexed), the pixels do not decode."""
    for path in images_in(root, *folders):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def damage_one_class(root):
    folder = os.path.join(root, "imagenet/train")
    first = sorted(os.listdir(folder))[0]
    name = sorted(os.listdir(os.path.join(folder, first)))[0]
    with open(os.path.join(folder, first, name), "wb") as f:
        f.write(b"not an image")


def rewrite_lines(path, change):
    records = [json.loads(line) for line in open(path)]
    with open(path, "w") as f:
        f.write("".join(json.dumps(change(r)) + "\n" for r in records))


def mkdir(path):
    os.makedirs(path, exist_ok=True)
    return path


def cut(path):
    truncate(str(path))
    return path


CASES = case_list()


@pytest.mark.parametrize("case_id, script, argv, expect", CASES, ids=[c[0] for c in CASES])
def test_case(case_id, script, argv, expect, corpus, runs, tmp_path, capsys, monkeypatch):
    ctx = Ctx(tmp_path, corpus, runs)
    ctx.full_disk, ctx.setenv = (lambda: full_disk(monkeypatch)), monkeypatch.setenv
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    if case_id == "pretrain-read-only-data-root":
        read_only(monkeypatch, ctx.own_corpus(), str(tmp_path / "cache"))
    args = [str(a) for a in argv(ctx)]
    capsys.readouterr()
    code, _ = call(script, args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Original Traceback" not in out + err, err[-3000:]
    expect(ctx, code, out, err)


def test_catalogue_is_large_enough():
    assert len(CASES) + len(TOP_LEVEL) + len(HANDLER) >= 100


# ---- the top level itself: common.run, and real processes


def raises(error):
    def main(argv):
        raise error
    return main


HANDLER = [
    ("flag", SystemExit("--batch-size 0: must be at least 1"), 2, "error: --batch-size 0: must be at least 1"),
    ("data", SystemExit("/d/x.json: not a valid JSON file"), 1, "error: /d/x.json: not a valid JSON file"),
    ("preempted", SystemExit(75), 75, None),
    ("argparse", SystemExit(2), 2, None),
    ("done", SystemExit(0), 0, None),
    ("ctrl-c", KeyboardInterrupt(), 130, "error: interrupted (Ctrl-C)"),
    ("zero-division", ZeroDivisionError("division by zero"), 1,
     "error: ZeroDivisionError: division by zero (unexpected"),
    ("os-error", FileNotFoundError(2, "No such file or directory", "/x/y"), 1,
     "error: /x/y: No such file or directory"),
    ("worker", ValueError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                          "last):\n  File \"x.py\", line 1, in f\n    raise DataError(m)\n"
                          "data.DataError: /a.jpg: cannot "
                          "decode the image\n"), 1, "error: /a.jpg: cannot decode the image"),
    ("multi-line", SystemExit("first\nsecond"), 1, "error: first second"),
]


@pytest.mark.parametrize("name, raised, status, line", HANDLER, ids=[h[0] for h in HANDLER])
def test_top_level_handler(name, raised, status, line, capsys):
    with pytest.raises(SystemExit) as exited:
        common.run(raises(raised))
    assert (exited.value.code or 0) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if line:
        assert err.strip().splitlines() == [err.strip()] and err.strip().startswith(line), err


def script_process(args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


TOP_LEVEL = [
    ("pretrain-bad-flag", lambda c: ["pretrain.py", *pretrain_flags(c.corpus, c.out, global_batch=6)], 2,
     r"--global-batch 6"),
    ("pretrain-no-data", lambda c: ["pretrain.py", *pretrain_flags(str(c.tmp / "none"), c.out)], 1,
     r"none/vocab.txt: vocabulary file not found"),
    ("pretrain-worker-data-error",
     lambda c: ["pretrain.py", *damaged(pretrain_flags, lambda r: damage_all(r, "coco/train2014", "vg/VG_100K"),
                                        num_workers=1)(c)], 1, r"\.jpg: cannot"),
    ("evaluate-bad-checkpoint", lambda c: ["evaluate.py", "match", f"--checkpoint={c.file('g.pt', 'x')}",
                                           f"--image={image_of(c.corpus, 'coco/val2014')}", "--text=a"], 1,
     r"g.pt: not a loadable checkpoint"),
    ("synthetic-into-a-foreign-folder", lambda c: (mkdir(c.out), open(c.out + "/mine.txt", "w").write("x"),
                                                   ["tools/synthetic.py", f"--out={c.out}", "--scale=0.01"])[-1], 1,
     r"is not a demo corpus"),
    ("pretrain-cnn-no-data", lambda c: ["tools/pretrain_cnn.py", f"--data-root={c.tmp / 'none'}"], 1, r"is missing"),
]


@pytest.mark.parametrize("name, argv, status, pattern", TOP_LEVEL, ids=[t[0] for t in TOP_LEVEL])
def test_real_process_prints_one_line(name, argv, status, pattern, corpus, tmp_path):
    ctx = Ctx(tmp_path, corpus, {"pretrain": ""})
    result = script_process(argv(ctx))
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    import re
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.stderr[-3000:]
