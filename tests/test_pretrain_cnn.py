"""pretrain_cnn.py: the CNN's classification pre-training writes torchvision-format weights that
--cnn loads, learns the demo's object classes, refuses mismatched class folders, and pretrain.py's
demo runs it first."""

import os

import pytest
import torch

import checkpoint
from tools import pretrain_cnn
from model import PixelBert, PixelBertConfig, load_cnn


def quick(root, out, **overrides):
    args = dict(data_root=root, out=out, epochs=1, batch_size=16, image_size=64, dtype="fp32", num_workers=0)
    return [f"--{k.replace('_', '-')}={v}" for k, v in {**args, **overrides}.items()]


def held_out_accuracy(root, state, image_size):
    """Accuracy on <root>/imagenet/val of a pretrain_cnn.py state dict: the tiny preset's ResNet
    with learned BatchNorm (in eval mode: its running statistics) + fc on the global average pool."""
    import data
    from model import ResNet
    paths, labels, _ = data.class_folder_entries(root, "val")
    cnn = ResNet(PixelBertConfig.tiny(norm="batch")).eval()
    cnn.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    fc = torch.nn.Linear(*state["fc.weight"].shape[::-1])
    fc.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
    images = data.ClassImages(paths, labels, image_size)
    batch = data.collate_classes([images[i] for i in range(len(paths))])
    with torch.no_grad():
        predicted = fc(cnn(data.normalize_images(batch["images"])).mean((2, 3))).argmax(-1)
    return (predicted == batch["labels"]).float().mean().item(), len(paths)


def test_writes_weights_that_cnn_loads(corpus, tmp_path):
    from torchvision.models import resnet18
    out = str(tmp_path / "cnn" / "resnet.pth")
    result = pretrain_cnn.main(quick(corpus, out))
    assert result["path"] == out and result["chance"] == 1 / 18
    state = torch.load(out, weights_only=True)
    # the reported held-out accuracy is the one the saved weights (BatchNorm statistics and fc included) give
    # on imagenet/val, recomputed here with the model's own ResNet and the data module's loader
    # (to one picture: channels-last convolutions may round a near-tie the other way)
    accuracy, pictures = held_out_accuracy(corpus, state, 64)
    assert result["accuracy"] == pytest.approx(accuracy, abs=1.01 / pictures) and pictures >= 18
    assert set(state) == set(resnet18().state_dict()), "torchvision's names, classifier included"
    assert state["fc.weight"].shape == (18, 128)  # tiny: width 16 -> 128 channels at stride 32
    model = PixelBert(PixelBertConfig.tiny(vocab_size=30))
    report = load_cnn(model, out)
    assert report.new == [] and sorted(report.unused) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.cnn.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_val_classes_must_match_train(corpus, tmp_path):
    import shutil
    root = tmp_path / "demo"
    shutil.copytree(os.path.join(corpus, "imagenet"), root / "imagenet")
    shutil.rmtree(root / "imagenet/val/red_circle")
    with pytest.raises(SystemExit, match="both need the same class folders"):
        pretrain_cnn.main(quick(str(root), str(tmp_path / "x.pth")))


def test_demo_pretraining_starts_from_it_unless_given_a_cnn(corpus, tmp_path):
    """The demo preset trains the CNN first and loads it; --cnn replaces that stage."""
    import pretrain
    small = ["--max-steps=1", "--batch-size=16", "--global-batch=16", "--captions-per-image=2", "--eval-pairs=8",
             "--image-min-size=64", "--image-max-size=96", "--num-workers=0", "--dtype=fp32"]
    out = tmp_path / "demo_run"
    pretrain.main([f"--data-root={corpus}", f"--out-dir={out}", *small])
    trained = checkpoint.load_checkpoint(str(out / "final.pt"))
    assert trained["config"]["cnn"] == str(out / "cnn_pretrain.pth") and (out / "cnn_pretrain.pth").exists()
    given = tmp_path / "given"
    pretrain.main([f"--data-root={corpus}", f"--out-dir={given}", f"--cnn={out / 'cnn_pretrain.pth'}", *small])
    assert not (given / "cnn_pretrain.pth").exists()


@pytest.mark.slow
def test_learns_the_demo_classes(demo_cnn):
    """On the full demo corpus, the demo's 5 epochs (conftest.py's demo_cnn: trained once, the demo
    pre-training fixture starts from it) name the held-out pictures' colour and shape. Measured:
    100% held-out (README); 0.9 leaves room for other seeds: seeds 0, 1, 2 each measured 100%."""
    assert demo_cnn["accuracy"] > 0.9 and demo_cnn["chance"] == 1 / 18, demo_cnn
