"""tools/convert_detectron.py on small files in Detectron's format written here (Caffe2 names, bare or
under "blobs", Python 3 or Python 2 pickles), the input convention it records and the data path
applies, the restricted unpickler, and the Hugging Face folder's .bin fallback."""

import os
import pickle
import struct
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import data
from model import PixelBert, PixelBertConfig, load_cnn, read_state_dict
from tools import convert_detectron

COUNTS = [3, 8, 36, 3]  # ResNeXt-152's blocks per stage, at a tiny width: stem 16, cardinality 2
STEM, GROUPS = 16, 2


def detectron_blobs(width_per_group, seed=0):
    """Random weights named and shaped as Detectron's ResNeXt pickles hold them: conv weights
    (out, in / groups, k, k), each BatchNorm an AffineChannel (_bn_s, _bn_b), the classifier pred_*."""
    rng = np.random.default_rng(seed)
    blobs = {}

    def conv(name, c_out, c_in, k, groups=1):
        blobs[name + "_w"] = (rng.standard_normal((c_out, c_in // groups, k, k)) * (2 / (c_in // groups * k * k)) ** 0.5
                              ).astype(np.float32)

    def affine(name, c, scale=1.0):
        blobs[name + "_bn_s"] = (rng.uniform(0.5, 1.0, c) * scale).astype(np.float32)
        blobs[name + "_bn_b"] = rng.uniform(-0.2, 0.2, c).astype(np.float32)

    conv("conv1", STEM, 3, 7)
    affine("res_conv1", STEM)
    blobs["res_conv1_bn_s_momentum"] = np.zeros(STEM, np.float32)  # SGD state some files keep: skipped
    c_in = STEM
    for s, n in enumerate(COUNTS):
        planes = STEM * 2 ** s
        width = int(planes * width_per_group / 64) * GROUPS
        for i in range(n):
            p = f"res{s + 2}_{i}_"
            conv(p + "branch2a", width, c_in, 1)
            affine(p + "branch2a", width)
            conv(p + "branch2b", width, width, 3, GROUPS)
            affine(p + "branch2b", width)
            conv(p + "branch2c", planes * 4, width, 1)
            affine(p + "branch2c", planes * 4, scale=0.2)  # small residual branches keep 50 blocks finite
            if i == 0:
                conv(p + "branch1", planes * 4, c_in, 1)
                affine(p + "branch1", planes * 4)
            c_in = planes * 4
    blobs["pred_w"] = rng.standard_normal((7, c_in)).astype(np.float32)
    blobs["pred_b"] = np.zeros(7, np.float32)
    return blobs


def detectron_forward(blobs, x):
    """Detectron's ResNeXt on a BGR, mean-subtracted input, written from its definition: the
    stride of a block on its 3x3 convolution, every BatchNorm the affine x * s + b."""
    w = {k: torch.from_numpy(v) for k, v in blobs.items()}

    def affine(y, name):
        return y * w[name + "_bn_s"][:, None, None] + w[name + "_bn_b"][:, None, None]

    x = F.max_pool2d(F.relu(affine(F.conv2d(x, w["conv1_w"], stride=2, padding=3), "res_conv1")), 3, 2, 1)
    for s, n in enumerate(COUNTS):
        for i in range(n):
            p, stride = f"res{s + 2}_{i}_", 2 if i == 0 and s > 0 else 1
            groups = w[p + "branch2a_w"].shape[0] // w[p + "branch2b_w"].shape[1]
            y = F.relu(affine(F.conv2d(x, w[p + "branch2a_w"]), p + "branch2a"))
            y = F.conv2d(y, w[p + "branch2b_w"], stride=stride, padding=1, groups=groups)
            y = F.relu(affine(y, p + "branch2b"))
            y = affine(F.conv2d(y, w[p + "branch2c_w"]), p + "branch2c")
            short = affine(F.conv2d(x, w[p + "branch1_w"], stride=stride), p + "branch1") if i == 0 else x
            x = F.relu(y + short)
    return x


def python2_pickle(blobs):
    """The bytes Python 2's cPickle (protocol 2) writes for {"blobs": {name: float32 array}}: names
    and array data are 8-bit strings (SHORT_BINSTRING / BINSTRING), which Python 3 reads only with
    encoding="latin1". Written opcode by opcode, since Python 3 writes bytes differently."""
    def string(b):
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def integer(v):
        return b"J" + struct.pack("<i", v)

    out = [b"\x80\x02}(", string(b"blobs"), b"}("]  # PROTO 2, {, MARK, "blobs", {, MARK
    for name, array in blobs.items():
        a = np.ascontiguousarray(array, dtype="<f4")
        dtype = b"cnumpy\ndtype\n" + string(b"f4") + integer(0) + integer(1) + b"\x87R(" + integer(3) + string(b"<") \
            + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb"  # dtype('f4', 0, 1) + its state
        out += [string(name.encode()), b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy\nndarray\n",
                integer(0), b"\x85", string(b"b"), b"\x87R",  # _reconstruct(ndarray, (0,), 'b')
                b"(", integer(1), b"(" + b"".join(integer(d) for d in a.shape) + b"t", dtype, b"\x89",
                string(a.tobytes()), b"tb"]  # __setstate__((1, shape, dtype, False, data))
    out.append(b"uu.")
    return b"".join(out)


def write_pickle(blobs, path, layout):
    if layout == "python2":
        path.write_bytes(python2_pickle(blobs))
    else:
        with open(path, "wb") as f:
            pickle.dump({"blobs": blobs} if layout == "blobs" else blobs, f, protocol=2 if layout == "bare" else 4)
    return str(path)


@pytest.mark.parametrize("layout", ["blobs", "bare", "python2"])
def test_reads_every_pickle_layout(layout, tmp_path):
    blobs = {"a_w": np.arange(6, dtype=np.float32).reshape(2, 3), "b_bn_s": np.array([0.5, 300.0], np.float32),
             "big": np.linspace(-1, 1, 300, dtype=np.float32)}  # data over 255 bytes: BINSTRING, not SHORT_
    read = convert_detectron.read_detectron_pickle(write_pickle(blobs, tmp_path / "w.pkl", layout))
    assert list(read) == list(blobs) and all(np.array_equal(read[k], v) for k, v in blobs.items())


@pytest.mark.parametrize("layout, width_per_group", [("blobs", 8), ("bare", 4), ("python2", 8)])
def test_converted_weights_compute_detectrons_network(layout, width_per_group, tmp_path):
    """The converted file, loaded by load_cnn into the model's CNN and fed through the data path,
    computes what Detectron's network computes on its own input convention."""
    blobs = detectron_blobs(width_per_group)
    source = write_pickle(blobs, tmp_path / "x152.pkl", layout)
    out = str(tmp_path / "x152.pth")
    assert convert_detectron.main([source, out]) == out
    saved = torch.load(out, weights_only=True)
    assert saved["architecture"] == {"cnn_depth": 152, "cnn_groups": GROUPS, "cnn_width_per_group": width_per_group,
                                     "cnn_width": STEM}
    config = PixelBertConfig.tiny(cnn_depth=152, cnn_groups=GROUPS, cnn_width_per_group=width_per_group,
                                  cnn_width=STEM, norm="frozen")
    model = PixelBert(config).eval()
    report = load_cnn(model, out)
    assert sorted(report.unused) == ["fc.bias", "fc.weight"] and report.new == []
    assert "CNN input: BGR in [0, 255]" in str(report)
    assert (config.image_channels, config.image_scale, config.image_std) == ("BGR", 255.0, (1.0, 1.0, 1.0))
    assert config.image_mean == (102.9801, 115.9465, 122.7717)
    # each frozen BatchNorm is exactly Detectron's affine: scale s, shift b
    scale, shift = model.cnn.layer3[5].bn2.scale_shift()
    assert torch.equal(scale, torch.from_numpy(blobs["res4_5_branch2b_bn_s"]))
    assert torch.equal(shift, torch.from_numpy(blobs["res4_5_branch2b_bn_b"]))
    # an RGB uint8 image through the data path == the BGR, mean-subtracted image through Detectron's network
    image = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    bgr = image.flip(1).float() - torch.tensor([102.9801, 115.9465, 122.7717]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours, theirs = model.cnn(data.normalize_images(image, model.config)), detectron_forward(blobs, bgr)
    assert ours.shape == theirs.shape == (2, STEM * 8 * 4, 2, 3)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    # the convention travels with the model config: a checkpoint's model_config rebuilds it
    assert PixelBertConfig(**asdict(model.config)).image_channels == "BGR"


def test_width_mismatch_is_named(tmp_path):
    source = write_pickle(detectron_blobs(4), tmp_path / "x4d.pkl", "blobs")
    convert_detectron.main([source, str(tmp_path / "x4d.pth")])
    model = PixelBert(PixelBertConfig.tiny(cnn_depth=152, cnn_groups=GROUPS, cnn_width_per_group=8, cnn_width=STEM,
                                           norm="frozen"))
    with pytest.raises(ValueError, match="'cnn_width_per_group': 4.*this model has \\{'cnn_width_per_group': 8\\}"):
        load_cnn(model, str(tmp_path / "x4d.pth"))


def test_torchvision_file_keeps_the_imagenet_convention(tmp_path):
    """A torchvision file (no recorded convention) sets torchvision's: RGB, ImageNet mean / std."""
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    config = PixelBertConfig.tiny(cnn_width=64, image_channels="BGR", image_scale=255, image_mean=(1, 2, 3),
                                  image_std=(1, 1, 1))
    load_cnn(PixelBert(config), str(path))
    assert (config.image_channels, config.image_scale) == ("RGB", 1.0)
    assert (config.image_mean, config.image_std) == (data.IMAGENET_MEAN, data.IMAGENET_STD)
    # a model_config saved before these fields existed loads with the same defaults
    old = {k: v for k, v in asdict(PixelBertConfig.tiny()).items() if not k.startswith("image_")}
    assert asdict(PixelBertConfig(**old)) == asdict(PixelBertConfig.tiny())


def test_normalize_images_conventions():
    x = torch.tensor([10, 20, 30], dtype=torch.uint8).view(1, 3, 1, 1)
    imagenet = data.normalize_images(x, PixelBertConfig())
    assert torch.equal(imagenet, data.normalize_images(x))  # None = the config's defaults
    expected = (x.view(3).float() / 255 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    torch.testing.assert_close(imagenet.view(3), expected)
    detectron = PixelBertConfig(**convert_detectron.DETECTRON_INPUT)
    torch.testing.assert_close(data.normalize_images(x, detectron).view(3),
                               torch.tensor([30 - 102.9801, 20 - 115.9465, 10 - 122.7717]))


class RunsCode:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class CallsEval:
    def __reduce__(self):
        return eval, ("1 + 1",)


def test_restricted_unpickler_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    evil = {"conv1_w": np.zeros((1, 3, 7, 7), np.float32), "x": RunsCode(f"touch {marker}")}
    for protocol in (2, 4):
        path = tmp_path / f"evil{protocol}.pkl"
        path.write_bytes(pickle.dumps({"blobs": evil}, protocol=protocol))
        refused = f"names {os.system.__module__}.system, which is refused"  # posix.system on Linux
        with pytest.raises(convert_detectron.ConvertError, match=refused):
            convert_detectron.read_detectron_pickle(str(path))
        with pytest.raises(SystemExit, match="refused"):
            convert_detectron.main([str(path), str(tmp_path / "out.pth")])
    assert not marker.exists() and not (tmp_path / "out.pth").exists()
    (tmp_path / "eval.pkl").write_bytes(pickle.dumps([CallsEval()]))
    with pytest.raises(convert_detectron.ConvertError, match="builtins.eval, which is refused"):
        convert_detectron.read_detectron_pickle(str(tmp_path / "eval.pkl"))
    # any other class, however harmless, is refused by name too
    (tmp_path / "class.pkl").write_bytes(pickle.dumps({"a": torch.nn.Identity()}))
    with pytest.raises(convert_detectron.ConvertError, match="refused"):
        convert_detectron.read_detectron_pickle(str(tmp_path / "class.pkl"))


def test_not_a_resnext_is_refused(tmp_path):
    blobs = detectron_blobs(8)
    blobs["rpn_conv_w"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(SystemExit, match="unexpected blob rpn_conv_w"):
        convert_detectron.main([write_pickle(blobs, tmp_path / "a.pkl", "bare"), str(tmp_path / "a.pth")])
    blobs = detectron_blobs(8)
    del blobs["res4_3_branch2b_bn_b"]
    with pytest.raises(SystemExit, match="layer3.3.bn2 has only its \\['scale'\\]"):
        convert_detectron.main([write_pickle(blobs, tmp_path / "b.pkl", "bare"), str(tmp_path / "b.pth")])
    # cardinality 1: an MSRA ResNet, whose stride sits on the 1x1 convolution
    global GROUPS
    saved, GROUPS = GROUPS, 1
    try:
        plain = detectron_blobs(64)
    finally:
        GROUPS = saved
    with pytest.raises(SystemExit, match="plain ResNet-152"):
        convert_detectron.main([write_pickle(plain, tmp_path / "c.pkl", "bare"), str(tmp_path / "c.pth")])


def hf_folder(path, safetensors_value, bin_value):
    """A Hugging Face folder with both weight files, told apart by their one tensor's value."""
    from safetensors.torch import save_file
    path.mkdir()
    save_file({"w": torch.full((2,), safetensors_value)}, str(path / "model.safetensors"))
    torch.save({"w": torch.full((2,), bin_value)}, path / "pytorch_model.bin")
    return str(path)


def test_bin_fallback_without_safetensors(tmp_path, monkeypatch, capsys):
    pytest.importorskip("safetensors")
    folder = hf_folder(tmp_path / "bert", 1.0, 2.0)
    assert read_state_dict(folder)["w"][0] == 1.0  # with the package: model.safetensors
    monkeypatch.setitem(sys.modules, "safetensors", None)  # now `import safetensors...` raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert read_state_dict(folder)["w"][0] == 2.0
    assert "safetensors package is not installed; reading pytorch_model.bin instead" in capsys.readouterr().out
    os.remove(os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(ImportError, match="needs the safetensors package: pip install safetensors"):
        read_state_dict(folder)
