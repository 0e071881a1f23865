"""One-line inference (evaluate.py match / ask) and the attention maps of paper Figure 3
(evaluate.py attention) on checkpoints written by short pre-training and VQA runs."""

import json
import os

import pytest
import torch
from PIL import Image

import data
import evaluate
import finetune_vqa
import pretrain
from tools import synthetic

SIZES = ["--image-min-size=64", "--image-max-size=96", "--num-workers=0", "--dtype=fp32"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(synthetic.write_demo_corpus(tmp_path_factory.mktemp("inference") / "demo", seed=0, scale=0.05))


@pytest.fixture(scope="module")
def checkpoints(corpus, tmp_path_factory):
    """(pre-training final.pt, VQA best.pt) after a few steps each."""
    runs = tmp_path_factory.mktemp("runs")
    pretrain.main([f"--data-root={corpus}", f"--out-dir={runs / 'pre'}", "--max-steps=2", "--batch-size=16",
                   "--global-batch=16", "--captions-per-image=2", "--eval-pairs=16", *SIZES])
    finetune_vqa.main([f"--data-root={corpus}", f"--init={runs / 'pre' / 'final.pt'}", f"--out-dir={runs / 'vqa'}",
                       "--batch-size=20", "--global-batch=20", "--questions-per-image=2", "--max-steps=2",
                       "--minival-images=100", *SIZES])
    return str(runs / "pre" / "final.pt"), str(runs / "vqa" / "best.pt")


@pytest.fixture(scope="module")
def image(corpus):
    return os.path.join(corpus, data.read_vqa(corpus, "val")[0][0]["image_path"])


def test_match(checkpoints, image, capsys):
    result = evaluate.main(["match", "--checkpoint", checkpoints[0], "--image", image, "--text", "a red circle"])
    assert 0 <= result["match_probability"] <= 1
    assert json.loads(capsys.readouterr().out) == result
    # the same number as ITM's softmax over a batch the training code builds
    model, tokenizer, state, device = evaluate.load_for_inference(checkpoints[0], "itm")
    batch = data.collate([{"image": data.image_tensor(image, 64, 96), "input_ids": tokenizer.encode("a red circle")}])
    with torch.no_grad():
        _, pooled = model(batch["input_ids"], batch["text_mask"], data.normalize_images(batch["images"]),
                          batch["image_mask"])
    assert model.itm_head(pooled).softmax(-1)[0, 1].item() == pytest.approx(result["match_probability"], abs=1e-4)


def test_ask(checkpoints, image):
    result = evaluate.main(["ask", "--checkpoint", checkpoints[1], "--image", image,
                            "--question", "what colour is the circle?"])
    answers = torch.load(checkpoints[1], weights_only=True)["answers"]
    scores = [a["score"] for a in result["answers"]]
    assert len(result["answers"]) == min(5, len(answers)) and scores == sorted(scores, reverse=True)
    assert all(a["answer"] in answers for a in result["answers"]) and all(0 < s < 1 for s in scores)


@pytest.mark.parametrize("command, checkpoint, message", [
    ("ask", 0, "heads are \\['mlm', 'itm'\\], not 'vqa'; use a VQA checkpoint"),
    ("match", 1, "not 'itm'; use a pre-training checkpoint"),
])
def test_wrong_checkpoint_is_a_clear_error(checkpoints, image, command, checkpoint, message):
    flag = "--question" if command == "ask" else "--text"
    with pytest.raises(SystemExit, match=message):
        evaluate.main([command, "--checkpoint", checkpoints[checkpoint], "--image", image, flag, "a circle"])


def test_bad_image_and_text_are_clear_errors(checkpoints, image, tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(SystemExit, match="notes.jpg: cannot decode the image"):
        evaluate.main(["match", "--checkpoint", checkpoints[0], "--image", str(tmp_path / "notes.jpg"), "--text", "a"])
    with pytest.raises(SystemExit, match="missing.png: image file not found"):
        evaluate.main(["match", "--checkpoint", checkpoints[0], "--image", str(tmp_path / "missing.png"), "--text", "a"])
    with pytest.raises(SystemExit, match="the text is empty"):
        evaluate.main(["match", "--checkpoint", checkpoints[0], "--image", image, "--text", " "])


def test_attention_probabilities_are_the_ones_the_layer_uses(checkpoints, image):
    """softmax(q k^T / sqrt(d)) recomputed outside the layer, times the values, gives exactly
    what the layer's fused attention (SDPA) returned: the drawn weights are the model's own."""
    model, tokenizer, state, device = evaluate.load_for_inference(checkpoints[0])
    batch = evaluate.image_text_batch(image, "a red circle", tokenizer, state, device)
    layer = model.bert.encoder.layer[1].attention.self
    seen = {}
    hook = layer.register_forward_hook(lambda module, args, out: seen.update(x=args[0], mask=args[1], out=out))
    evaluate.run_pooled(model, batch)
    hook.remove()
    probs = evaluate.attention_probabilities(layer, seen["x"], seen["mask"])  # (1, nh, L, L)
    B, L, H = seen["x"].shape
    v = layer.value(seen["x"]).view(B, L, layer.num_heads, -1).transpose(1, 2)
    torch.testing.assert_close((probs @ v).transpose(1, 2).reshape(B, L, H), seen["out"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, layer.num_heads, L))


def test_attention_png(checkpoints, image, tmp_path):
    out = tmp_path / "map.png"
    text = "a red zebra above a circle"  # "zebra" is not in the demo vocabulary: several word pieces
    result = evaluate.main(["attention", "--checkpoint", checkpoints[0], "--image", image, "--text", text,
                            "--layer", "1", "--out", str(out)])
    assert [w["word"] for w in result["words"]] == text.split() and result["png"] == str(out)
    model, tokenizer, state, device = evaluate.load_for_inference(checkpoints[0])
    batch = evaluate.image_text_batch(image, text, tokenizer, state, device)
    assert len(batch["input_ids"][0]) > len(text.split()) + 2  # the word was split, and merged back
    words, maps, share = evaluate.word_pixel_attention(model, batch, tokenizer, layer=1)
    torch.testing.assert_close(maps.sum((1, 2)), torch.ones(len(words)))  # each drawn map is a distribution
    assert ((share > 0) & (share < 1)).all()  # the rest of each word's attention went to the text
    # the sheet: the image, then a panel per word, six panels a row, a 14-pixel label under each
    W, H = data.resize_image(data.load_image(image), 64, 96).size
    assert Image.open(out).size == (6 * W, 2 * (H + 14))
    with pytest.raises(SystemExit, match="--layer 7: this model has layers 0..1"):
        evaluate.main(["attention", "--checkpoint", checkpoints[0], "--image", image, "--text", text, "--layer", "7"])
