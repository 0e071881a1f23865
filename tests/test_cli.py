"""The command lines: --help explains every flag (meaning, range, effective default, what a preset
changes), and every bad or missing flag is refused in one line before any data is read."""

import argparse
import dataclasses
import os
import re
from types import SimpleNamespace

import pytest
import torch

import checkpoint
import common
import evaluate
import finetune_nlvr
import finetune_retrieval
import finetune_vqa
import pretrain
from model import PixelBert, PixelBertConfig
from tools import pretrain_cnn, synthetic

SCRIPTS = {"pretrain": pretrain, "vqa": finetune_vqa, "nlvr": finetune_nlvr, "retrieval": finetune_retrieval,
           "cnn": pretrain_cnn}
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle"]


def parser_of(module):
    return common.config_parser(module.Config, getattr(module, "PRESETS", None))


def flag_helps(parser):
    return {a.option_strings[0]: a.help for a in parser._actions if a.option_strings and a.help != "==SUPPRESS=="
            and a.option_strings[0] != "-h"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_explains_every_flag(name, capsys):
    module = SCRIPTS[name]
    helps = flag_helps(parser_of(module))
    assert len(helps) == len(dataclasses.fields(module.Config))
    for flag, text in helps.items():
        meaning, _, notes = text.rpartition(" (")
        assert len(meaning) > 10 and "default: " in notes, (flag, text)  # never only "default X"
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for title in ("data", "model", "optimisation", "precision and device"):
        assert f"{title}:" in shown or f"{title} (" in shown, title


def test_help_shows_units_effective_defaults_and_presets():
    pre = flag_helps(parser_of(pretrain))
    assert pre["--batch-size"].startswith("pairs per process and micro-step")
    assert pre["--batch-size"].endswith("(>= 1; default: 32; demo: 256)")
    assert "(>= 64; default: 800; demo: 128; x152: 600; x152_32x4d: 600)" in pre["--image-min-size"]
    assert pre["--group-aspect"].endswith("(default: on)") and pre["--compile"].endswith("(default: off)")
    assert "default: demo on the demo corpus, else required" in pre["--data"] and "coco_vg" in pre["--data"]
    assert "0: at the end only" in pre["--eval-every"] and "(>= 0;" in pre["--eval-every"]
    assert flag_helps(parser_of(finetune_vqa))["--batch-size"].startswith("questions per process and micro-step")
    assert flag_helps(parser_of(finetune_nlvr))["--batch-size"].startswith("examples per process and micro-step")
    ret = flag_helps(parser_of(finetune_retrieval))
    assert ret["--batch-size"].startswith("images per process and micro-step, each with its caption and --negatives")
    assert ret["--global-batch"].startswith("images per optimiser step")
    assert "64 images per GPU" in ret["--global-batch"]  # the paper's "8 GPUs x 64", read as images
    assert ret["--epochs"].endswith("(> 0; default: 10; demo: 1; coco: 4)")
    assert "--eval-pairs" not in ret and ret["--score-batch"].startswith("(image, caption) pairs per Transformer")


@pytest.mark.parametrize("command", ["vqa", "retrieval", "vqa-score", "nlvr2", "nlvr2-score", "match", "ask",
                                     "attention"])
def test_evaluate_help_explains_every_flag(command, capsys):
    with pytest.raises(SystemExit) as done:
        evaluate.main([command, "--help"])
    assert done.value.code == 0
    entries = [" ".join(e.split()) for e in re.split(r"\n  (?=--)", capsys.readouterr().out.split("\noptions:")[1])]
    flags = {e.split()[0]: e for e in entries if e.startswith("--")}
    assert flags and "--dataset" not in flags and "--eval-pairs" not in flags
    for flag, entry in flags.items():  # a meaning, then the default (or "required")
        assert re.search(r"\w{3,} .*\((.*; )?(default: .+|required)\)", entry), entry


# ---- refusals: one line naming the flag, before any data is read


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Folders with the files that show each kind of real data (empty: nothing may read them), a
    demo corpus's marker alone, and tiny --init checkpoints (the tiny architecture, 64 positions;
    tiny_pos: learned positions for 32 x 32 pixel tokens of 32 px)."""
    tmp = tmp_path_factory.mktemp("cli")
    for name, files in {"coco_vg": ["coco/dataset_coco.json", "vg/region_descriptions.json"], "vqa": ["vqa/x.json"],
                        "nlvr2": ["nlvr2/data/dev.json"], "flickr30k": ["flickr30k/dataset_flickr30k.json"],
                        "other": ["notes.txt"], "demo": [common.DEMO_MARKER]}.items():
        for f in files:
            (tmp / name / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name / f).write_text("{}")
    tiny = PixelBertConfig.tiny(vocab_size=len(VOCAB))
    torch.save({"model": {}, "model_config": dataclasses.asdict(tiny), "vocab": VOCAB, "config": {"model": "tiny"}},
               tmp / "tiny.pt")
    tiny_pos = PixelBertConfig.tiny(vocab_size=len(VOCAB), pixel_pool=1, visual_position=True)
    torch.save({"model": {}, "model_config": dataclasses.asdict(tiny_pos), "vocab": VOCAB}, tmp / "tiny_pos.pt")
    return SimpleNamespace(**{name: str(tmp / name) for name in ("coco_vg", "vqa", "nlvr2", "flickr30k", "other",
                                                                 "demo")}, tiny=str(tmp / "tiny.pt"),
                           tiny_pos=str(tmp / "tiny_pos.pt"), tmp=tmp)


REFUSALS = [  # (script, argv with {placeholders} from roots, fragment of the one-line message)
    ("pretrain", ["--data-root", "{coco_vg}"], "--data-root .*: real data .* pass --data coco_vg"),
    ("pretrain", ["--data", "demo", "--data-root", "{coco_vg}"], "--data demo: .* is not the demo corpus"),
    ("pretrain", ["--data-root", "{other}"], "choose --data from coco, coco2014, vg, coco_vg"),
    ("pretrain", ["--data", "coco_vg", "--data-root", "{coco_vg}"], "--model r50: without --bert and --cnn"),
    ("pretrain", ["--data", "vg", "--data-root", "{coco_vg}", "--model", "x152", "--bert", "b"],
     "--model x152: without --cnn .*--from-scratch"),
    ("vqa", ["--data-root", "{vqa}"], "pass --data vqa"),
    ("vqa", ["--data", "vqaa"], r"--data: invalid choice: 'vqaa' \(choose from 'demo', 'vqa'\)"),
    ("vqa", ["--data", "vqa", "--data-root", "{vqa}", "--init="], "--model r50: without --bert and --cnn"),
    ("nlvr", ["--data-root", "{nlvr2}"], "pass --data nlvr2"),
    ("retrieval", ["--data-root", "{flickr30k}"], "pass --data flickr30k"),
    ("pretrain", ["--image-min-size", "200", "--image-max-size", "100"], "--image-max-size 100: must be >="),
    ("pretrain", ["--max-text-len", "100"], "--max-text-len 100: the model has 64 text positions"),
    ("vqa", ["--init", "{tiny_pos}", "--image-max-size", "1333"],
     "--image-max-size 1333: the learned pixel positions cover 32 tokens of 32 px a side: use at most 1024"),
    ("vqa", ["--fold-batchnorm"], "--fold-batchnorm: the tiny model's BatchNorm uses batch statistics"),
    ("nlvr", ["--init", "{tiny}", "--fold-batchnorm"], "--fold-batchnorm: .*only fixed ImageNet statistics"),
    ("pretrain", ["--data", "coco_vg", "--data-root", "{coco_vg}", "--from-scratch", "--fold-batchnorm"],
     "--fold-batchnorm: the r50 model's BatchNorm uses batch statistics"),  # from scratch: it learns them
    ("pretrain", ["--lr-milestones", "abc"], "--lr-milestones abc: comma-separated epochs"),
    ("pretrain", ["--tasks", "mlm,foo"], "--tasks mlm,foo: choose"),
    ("pretrain", ["--dtype", "fp8"], "--dtype: invalid choice"),
    ("pretrain", ["--cnn-optimizer", "lion"], "--cnn-optimizer: invalid choice"),
    ("pretrain", ["--bach-size", "3"], "--bach-size 3: unknown flag"),
    ("vqa", ["--train-split", "test"], "--train-split: invalid choice"),
    ("vqa", ["--eval-split", "val"], "--eval-split val: --train-split trainval contains most of val"),
    ("vqa", ["--train-split", "trainval_all"], "--eval-split minival: --train-split trainval_all trains on every val "
                                               "question: pass --eval-split none"),
    ("vqa", ["--eval-split", "test"], "--eval-split: invalid choice"),
    ("vqa", ["--init", "{tiny}", "--model", "r50"], "--model r50: --init .*tiny.pt holds a tiny model"),
    ("vqa", ["--init", "{tiny}", "--max-text-len", "80"], "--max-text-len 80: the model has 64 text positions"),
    ("vqa", ["--init", "{tiny}", "--bert", "weights/bert"], "--init .*tiny.pt: holds every weight"),
    ("nlvr", ["--eval-split", "nope"], "--eval-split: invalid choice"),
    ("retrieval", ["--eval-pairs", "8"], "--eval-pairs 8: unknown flag"),
    ("retrieval", ["--negatives", "5", "--hard-negatives", "9"], "--hard-negatives 9 must be in 1..--negatives"),
    ("evaluate", ["vqa", "--checkpoint", "c", "--data-root", "r", "--batch-size", "0"], "--batch-size: must be >= 1"),
    ("evaluate", ["retrieval", "--checkpoint", "c", "--data-root", "r", "--dataset", "coco"], "--data: required"),
    ("evaluate", ["retrieval", "--checkpoint", "c", "--data-root", "r", "--data", "vg"], "--data: invalid choice"),
    ("evaluate", ["retrieval", "--checkpoint", "c", "--data-root", "r", "--data", "coco", "--max-images", "-1"],
     "--max-images: must be >= 0"),
]

# Numbers outside their range, each refused as "--flag value: must be <range>": (flag, value, range).
OUT_OF_RANGE = {
    "pretrain": [("--epochs", "0", "> 0"), ("--batch-size", "0", ">= 1"), ("--global-batch", "-8", ">= 1"),
                 ("--captions-per-image", "0", ">= 1"), ("--eval-pairs", "0", ">= 1"), ("--eval-every", "-1", ">= 0"),
                 ("--log-every", "0", ">= 1"), ("--ckpt-every", "0", ">= 1"), ("--keep-checkpoints", "0", ">= 1"),
                 ("--num-workers", "-1", ">= 0"), ("--image-min-size", "0", ">= 64"),
                 ("--mask-prob", "1.5", "in [0, 1]"), ("--lr", "0", "> 0"), ("--lr", "nan", "> 0"),
                 ("--weight-decay", "-0.1", ">= 0"), ("--grad-clip", "-1", ">= 0")],
    "vqa": [("--minival-images", "-1", ">= 1"), ("--questions-per-image", "0", ">= 1")],
    "retrieval": [("--score-batch", "0", ">= 1"), ("--eval-images", "0", ">= 1")],
    "cnn": [("--image-size", "0", ">= 32"), ("--batch-size", "0", ">= 1")],
}
REFUSALS += [(script, [flag, value], re.escape(f"{flag} {value}: must be {bound}"))
             for script, cases in OUT_OF_RANGE.items() for flag, value, bound in cases]


@pytest.mark.parametrize("script, argv, message", REFUSALS, ids=[" ".join(c[1]) for c in REFUSALS])
def test_bad_flags_are_refused_in_one_line(script, argv, message, roots, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/demo or runs/ of a developer's checkout: nothing to read there
    argv = [a.format(**vars(roots)) for a in argv]
    main = evaluate.main if script == "evaluate" else SCRIPTS[script].main
    if script != "evaluate" and "--data-root" not in argv:
        argv += ["--data-root", str(tmp_path / "none")]  # a folder still empty: the demo corpus would go there
    with pytest.raises(SystemExit) as refused:
        main(argv)
    text = str(refused.value.code)
    assert re.search(message, text) and text.startswith("--") and "\n" not in text, text
    assert not os.path.exists(tmp_path / "none") and not os.path.exists(tmp_path / "runs")  # no work began


# ---- what the flags resolve to


def test_demo_preset_only_on_the_demo_corpus(roots, tmp_path):
    demo = common.parse_config(pretrain.Config, pretrain.PRESETS, ["--data-root", roots.demo])
    assert (demo.data, demo.model, demo.batch_size) == ("demo", "tiny", 256)
    empty = common.parse_config(pretrain.Config, pretrain.PRESETS, ["--data-root", str(tmp_path / "new")])
    assert empty.data == "demo"  # pretrain.py renders the corpus there
    real = common.parse_config(pretrain.Config, pretrain.PRESETS, ["--data", "coco_vg", "--data-root", roots.coco_vg,
                                                                   "--model", "r50", "--from-scratch"])
    assert (real.batch_size, real.model, real.image_min_size) == (32, "r50", 800)
    common.check_config(real)  # --from-scratch says the random start is meant
    assert common.DEMO_MARKER == synthetic.MARKER


def test_x152_sets_the_paper_image_sizes_unless_given(roots):
    def sizes(*argv):
        cfg = common.parse_config(finetune_vqa.Config, finetune_vqa.PRESETS,
                                  ["--data", "vqa", "--data-root", roots.vqa, "--init=", *argv])
        return cfg.image_min_size, cfg.image_max_size
    assert sizes("--model", "x152") == (600, 1000)
    assert sizes("--model", "x152", "--image-min-size", "700") == (700, 1000)
    assert sizes("--model", "r50") == (800, 1333)


def test_init_decides_the_model(roots):
    cfg = common.parse_config(finetune_vqa.Config, finetune_vqa.PRESETS,
                              ["--data", "vqa", "--data-root", roots.vqa, "--init", roots.tiny])
    assert cfg.model == "tiny"  # what the run logs and saves is the checkpoint's architecture, not the default r50
    common.check_config(cfg)  # --init: no --bert / --cnn needed


def test_init_brings_its_vocabulary(roots, tmp_path):
    """README's fine-tuning commands give --init and a --data-root without vocab.txt: the
    checkpoint's own vocabulary is used; a --vocab that differs from it is refused."""
    flags = SimpleNamespace(init=roots.tiny, data="vqa", data_root=str(tmp_path), vocab="", bert="", max_text_len=40)
    _, tokenizer = checkpoint.init_and_tokenizer(flags)
    assert tokenizer.vocab_tokens() == VOCAB and tokenizer.encode("a red circle") == [2, 5, 6, 7, 3]
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB[:-1] + ["square"]) + "\n")
    with pytest.raises(SystemExit, match="--vocab .*vocab.txt: .* another WordPiece vocabulary; drop --vocab"):
        checkpoint.init_and_tokenizer(SimpleNamespace(**{**vars(flags), "vocab": str(tmp_path / "vocab.txt")}))


def test_section_comments_become_groups():
    helps, sections = common.field_docs(pretrain.Config)
    assert sections["batch_size"][0] == "optimisation" and "4096 pairs" in sections["batch_size"][1]
    assert helps["data"].endswith("coco_vg: coco and vg (the paper's)")  # a help continued on the next lines
    assert isinstance(common.config_parser(pretrain.Config, pretrain.PRESETS), argparse.ArgumentParser)


def test_pixel_order_flag(tmp_path):
    """--pixel-proj-first (the default, the paper's order) reaches a model built without --init;
    --no-pixel-proj-first pools first; an --init checkpoint keeps the order it was trained with."""
    def built(*flags, init_state=None):
        cfg = common.parse_config(pretrain.Config, pretrain.PRESETS,
                                  ["--data-root", str(tmp_path / "none"), "--pixel-pool", "2", *flags])
        return common.build_model(cfg, ("itm",), len(VOCAB), init_state=init_state).config

    assert built().pixel_proj_first and not built("--no-pixel-proj-first").pixel_proj_first
    pooled_first = PixelBert(PixelBertConfig.tiny(vocab_size=len(VOCAB), heads=("itm",), pixel_proj_first=False))
    state = {"model": pooled_first.state_dict(), "model_config": dataclasses.asdict(pooled_first.config)}
    torch.save(state, tmp_path / "pooled_first.pt")
    assert not built("--init", str(tmp_path / "pooled_first.pt"), init_state=state).pixel_proj_first


def test_fresh_position_table_covers_the_images(roots, tmp_path):
    """--visual-position with --pixel-pool 1 at the paper's 800 x 1333: the longer side pads to 1344
    px, 42 tokens, past the default table of 32. A model built without --init gets a table sized
    from --image-max-size (never below 32); an --init checkpoint keeps its own and is checked up
    front (REFUSALS)."""
    assert common.pixel_grid(1333, 1) == 42 and common.pixel_grid(1333, 2) == 21
    assert common.pixel_grid(1300, 1) == 42  # padded to 1344 first: 1300 / 32 alone would say 41
    cfg = common.parse_config(pretrain.Config, pretrain.PRESETS, ["--data-root", str(tmp_path / "none"),
                                                                  "--pixel-pool", "1", "--image-max-size", "1333"])
    assert cfg.model == "tiny" and cfg.visual_position  # the demo preset
    common.check_config(cfg)
    model = common.build_model(cfg, ("itm",), len(VOCAB))
    assert model.config.max_pixel_grid == 42
    demo = common.parse_config(pretrain.Config, pretrain.PRESETS, ["--data-root", str(tmp_path / "none")])
    assert common.fresh_model_fields(demo)["max_pixel_grid"] == 32  # the demo's 192 px: the default table
    with torch.no_grad():  # the widest image fits: a 1333 x 800 picture, every token with its position
        image = torch.zeros(1, 3, 832, 1344)
        mask = torch.zeros(1, 832, 1344, dtype=torch.bool)
        mask[:, :800, :1333] = True
        tokens, pixel_mask = model.eval().encode_image(image, mask)
    assert tokens.shape[1] == 26 * 42 and pixel_mask.sum() == 25 * 42


def test_x152_32x4d_from_the_command_line(roots, tmp_path):
    """Both ResNeXt-152 widths are --model choices with the paper's X152 image sizes, and an --init
    checkpoint of either is named by its own width."""
    cfg = common.parse_config(finetune_vqa.Config, finetune_vqa.PRESETS, ["--data", "vqa", "--data-root", roots.vqa,
                                                                          "--init=", "--model", "x152_32x4d"])
    assert (cfg.model, cfg.image_min_size, cfg.image_max_size) == ("x152_32x4d", 600, 1000)
    narrow, wide = common.model_preset("x152_32x4d"), common.model_preset("x152")
    assert (narrow.cnn_depth, narrow.cnn_groups, narrow.cnn_width_per_group) == (152, 32, 4)
    assert wide.cnn_width_per_group == 8
    for name, config in (("x152_32x4d", narrow), ("x152", wide)):
        path = tmp_path / f"{name}.pt"
        torch.save({"model": {}, "model_config": dataclasses.asdict(config)}, path)
        assert common.init_model(str(path), None, "r50") == name
    with pytest.raises(SystemExit, match="--model x152: --init .* holds a x152_32x4d model"):
        common.init_model(str(tmp_path / "x152_32x4d.pt"), "x152", "r50")
    assert "x152_32x4d: ResNeXt-152 32x4d" in flag_helps(parser_of(pretrain))["--model"]
