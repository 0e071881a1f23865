"""
Convert Detectron's (Caffe2) ImageNet ResNeXt weights into this model's CNN names, for `--cnn`.
The ResNeXt-152 usually paired with vision-language models, the ImageNet-5k ResNeXt-152 32x8d
(X-152-32x8d-IN5k.pkl from Detectron's ImageNet-pretrained models), exists only in that form:

    python3 tools/convert_detectron.py X-152-32x8d-IN5k.pkl weights/x152-32x8d-in5k.pth
    python3 pretrain.py --model x152 --cnn weights/x152-32x8d-in5k.pth ...

The input is a pickle of numpy arrays with Caffe2 names (conv1_w, res_conv1_bn_s / _b,
res2_0_branch2a_w, res2_0_branch2a_bn_s, res2_0_branch1_w, ..., pred_w), either bare or as
{"blobs": {...}}, usually written by Python 2. It is read by a restricted unpickler that builds
only numpy arrays, numpy scalars and plain containers: any other class or function the file names
is refused by name before anything is called, so a crafted file cannot run code.

What changes on the way (the output is a torchvision-style state dict, what model.load_cnn reads):
  - names: conv1 / bn1 / layer{1-4}.{block}.conv{1-3}, bn{1-3}, downsample.{0,1}; pred -> fc
    (kept, as in torchvision's files, and reported unused by load_cnn);
  - BatchNorm: Detectron's is a fixed per-channel affine y = x * s + b (an AffineChannel), so
    weight = s, bias = b, running_mean = 0 and running_var = 1 - eps (eps: FrozenBatchNorm2d's),
    with which (x - running_mean) * weight / sqrt(running_var + eps) + bias is exactly x * s + b
    (1 - eps + eps is 1.0 in float32: checked at conversion);
  - the input convention: Detectron feeds BGR in 0-255 minus its PIXEL_MEANS, without dividing by
    a std. The output records it ("input_convention"), load_cnn puts it in the model config and the
    data path applies it; the weights themselves are unchanged (folding the mean into conv1 would
    not be exact along the zero-padded borders).
The stride of a downsampling block is on its 3x3 convolution in both (Detectron's ResNeXt configs
set STRIDE_1X1 False). Plain ResNets (cardinality 1) are refused: Detectron's R-50 / R-101 are
MSRA's, with the stride on the 1x1 convolution, which this model's blocks do not have; use
torchvision's ResNet weights for those.
"""

import argparse
import builtins
import codecs
import os
import pickle
import re
import sys
from collections import OrderedDict

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: the reference files are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import RESNET_LAYERS, FrozenBatchNorm2d, PixelBertConfig, ResNet  # noqa: E402

# Detectron's cfg.PIXEL_MEANS, subtracted from BGR pixels in 0-255; there is no std.
DETECTRON_INPUT = {"image_channels": "BGR", "image_scale": 255.0, "image_mean": (102.9801, 115.9465, 122.7717),
                   "image_std": (1.0, 1.0, 1.0)}


class ConvertError(ValueError):
    """A file that is not a Detectron ResNeXt pickle, or one that names a refused class."""


# -----------------------------------------------------------------------------
# Reading the pickle: numpy arrays and plain containers only


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """_codecs.encode as Python 3 writes bytes into a protocol-2 pickle; only the latin-1 codec."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise ConvertError(f"_codecs.encode with codec {encoding!r}: refused (only latin-1 rebuilds bytes)")
    return codecs.encode(text, "latin1", errors)


def _allowed_globals():
    """(module, name) -> the object a pickle may name. The numpy functions are taken from numpy's own
    reductions, so they are the ones this numpy writes, under both module names numpy has used."""
    reconstruct = np.ndarray(0).__reduce__()[0]  # _reconstruct(ndarray, shape, dtype), then __setstate__
    scalar = np.float32(0).__reduce__()[0]  # scalar(dtype, bytes)
    frombuffer = np.arange(1).__reduce_ex__(5)[0]  # protocol 5: _frombuffer(buffer, dtype, shape, order)
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode,
               ("collections", "OrderedDict"): OrderedDict}
    for core in ("numpy.core", "numpy._core"):  # numpy 1 writes numpy.core, numpy 2 numpy._core
        allowed.update({(f"{core}.multiarray", "_reconstruct"): reconstruct, (f"{core}.multiarray", "scalar"): scalar,
                        (f"{core}.numeric", "_frombuffer"): frombuffer})
    for name in ("set", "frozenset", "bytearray"):  # containers and values pickled by reduction
        allowed[("builtins", name)] = getattr(builtins, name)
    return allowed


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers. A pickle calls nothing but the objects that
    find_class returns for the names it holds, so refusing every other name here means no code
    the file chooses can run. Python 2's __builtin__ arrives here as builtins (fix_imports)."""

    ALLOWED = _allowed_globals()

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise ConvertError(f"the pickle names {module}.{name}, which is refused: only numpy arrays and plain "
                               f"containers are loaded, so that a crafted file cannot run code")
        return self.ALLOWED[(module, name)]

    def persistent_load(self, pid):
        raise ConvertError("the pickle holds a persistent reference, which is refused (not a Detectron weights file)")


def read_detectron_pickle(path):
    """{Caffe2 name: numpy array} from a Detectron weights pickle, bare or under "blobs". Python 2
    pickles hold 8-bit strings (names and array data), decoded as latin-1 as numpy expects."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        try:
            obj = ArraysOnlyUnpickler(f, encoding="latin1").load()
        except ConvertError as e:
            raise ConvertError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise ConvertError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("blobs"), dict):
        obj = obj["blobs"]
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: holds a {type(obj).__name__}, not a dict of named arrays")
    blobs = {}
    for name, value in obj.items():
        name = name.decode("latin1") if isinstance(name, bytes) else name
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "fiu":
                raise ConvertError(f"{path}: array {name} has dtype {value.dtype}, not numbers")
            blobs[name] = value
    return blobs


# -----------------------------------------------------------------------------
# Caffe2 names -> torchvision names

BRANCHES = {"2a": ("conv1", "bn1"), "2b": ("conv2", "bn2"), "2c": ("conv3", "bn3"),  # branch -> (conv, norm)
            "1": ("downsample.0", "downsample.1")}
BLOCK = re.compile(r"res(\d+)_(\d+)_branch(1|2a|2b|2c)(_bn_s|_bn_b|_w)")


def torchvision_name(name):
    """(module, "weight" | "scale" | "shift") for a Caffe2 blob name, or None for a blob to skip.
    conv weights map to "weight"; an AffineChannel's _s / _b to "scale" / "shift"."""
    if name.endswith("_momentum"):
        return None  # SGD state saved beside the weights
    if name == "conv1_w":
        return "conv1", "weight"
    if name in ("res_conv1_bn_s", "res_conv1_bn_b"):
        return "bn1", {"s": "scale", "b": "shift"}[name[-1]]
    if name in ("pred_w", "pred_b", "fc1000_w", "fc1000_b"):
        return "fc", {"w": "weight", "b": "bias"}[name[-1]]
    match = BLOCK.fullmatch(name)
    if not match:
        raise ConvertError(f"unexpected blob {name}: not a Detectron ResNet/ResNeXt ImageNet weights file?")
    stage, block, branch, kind = match.groups()
    conv, bn = BRANCHES[branch]
    prefix = f"layer{int(stage) - 1}.{int(block)}."
    return (prefix + conv, "weight") if kind == "_w" else (prefix + bn, {"_bn_s": "scale", "_bn_b": "shift"}[kind])


def infer_architecture(state):
    """cnn_depth / cnn_groups / cnn_width_per_group / cnn_width from the tensors' names and shapes."""
    counts = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    bottleneck = "layer1.0.conv3.weight" in state
    depths = [d for d, layers in RESNET_LAYERS.items() if layers == counts and (d >= 50) == bottleneck]
    if not depths:
        raise ConvertError(f"blocks per stage {counts} match no ResNet depth ({sorted(RESNET_LAYERS)})")
    stem = state["conv1.weight"].shape[0]
    width, in_per_group = state["layer1.0.conv2.weight"].shape[:2]  # (width, width / groups, 3, 3)
    groups = width // in_per_group if bottleneck else 1
    # torchvision: a stage-1 bottleneck is int(planes * width_per_group / 64) * groups wide, planes = the stem
    return {"cnn_depth": depths[0], "cnn_groups": groups, "cnn_width_per_group": width // groups * 64 // stem,
            "cnn_width": stem}


def convert(blobs, source="the pickle"):
    """Caffe2 blobs -> (torchvision-style state dict, architecture). Every tensor the ResNet of the
    inferred architecture has must be there with its shape, and every blob must find a place."""
    eps = FrozenBatchNorm2d(1).eps
    running_var = torch.tensor(1.0) - eps  # in float32, so that running_var + eps is exactly 1
    if (running_var + eps).rsqrt().item() != 1.0:
        raise ConvertError(f"eps {eps}: 1 - eps + eps is not exactly 1 in float32; pick running_var anew")
    state, affine = {}, {}
    for name, array in blobs.items():
        target = torchvision_name(name)
        if target is None:
            continue
        module, kind = target
        value = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if kind in ("scale", "shift"):
            affine.setdefault(module, {})[kind] = value
        elif module == "fc" and kind == "weight":
            state["fc.weight"] = value.reshape(value.shape[0], -1)  # (classes, 2048), as torchvision's
        else:
            state[f"{module}.{kind}"] = value
    for module, parts in affine.items():
        if set(parts) != {"scale", "shift"}:
            raise ConvertError(f"{source}: {module} has only its {list(parts)} (an AffineChannel needs _s and _b)")
        state[f"{module}.weight"], state[f"{module}.bias"] = parts["scale"], parts["shift"]
        state[f"{module}.running_mean"] = torch.zeros_like(parts["scale"])
        state[f"{module}.running_var"] = running_var.expand_as(parts["scale"]).clone()
        state[f"{module}.num_batches_tracked"] = torch.tensor(0)  # torchvision's files have it; frozen BN skips it
    if "conv1.weight" not in state or "layer1.0.conv2.weight" not in state:
        raise ConvertError(f"{source}: no conv1_w or res2_0_branch2b_w: not a Detectron ResNet/ResNeXt")
    arch = infer_architecture(state)
    if arch["cnn_depth"] >= 50 and arch["cnn_groups"] == 1:
        raise ConvertError(f"{source}: a plain ResNet-{arch['cnn_depth']} (cardinality 1). Detectron's are MSRA's, "
                           f"with the stride on the 1x1 convolution, which this model's torchvision blocks do not "
                           f"have: use torchvision's ImageNet weights for a ResNet instead")
    with torch.device("meta"):  # the names and shapes of the model's CNN, without allocating it
        expected = ResNet(PixelBertConfig(**arch, norm="batch")).state_dict()
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected and not k.startswith("fc.")]
    if wrong or missing or extra:
        raise ConvertError(f"{source}: does not convert into a ResNet with {arch}: wrong shapes {wrong[:3]}, "
                           f"missing {missing[:3]}, unplaced {extra[:3]}")
    ordered = OrderedDict((k, state[k]) for k in [*expected, "fc.weight", "fc.bias"] if k in state)
    return ordered, arch


def describe(arch):
    name = f"ResNeXt-{arch['cnn_depth']} {arch['cnn_groups']}x{arch['cnn_width_per_group']}d"
    if (arch["cnn_depth"], arch["cnn_groups"], arch["cnn_width"]) == (152, 32, 64):
        wide = arch["cnn_width_per_group"]
        how = "--model x152" if wide == 8 else f"PixelBertConfig.x152(width_per_group={wide})"
    else:
        how = "PixelBertConfig(" + ", ".join(f"{k}={v}" for k, v in arch.items()) + ")"
    return name, how


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a Detectron (Caffe2) ResNeXt ImageNet weights pickle, e.g. "
                                                 "X-152-32x8d-IN5k.pkl, into a .pth file for --cnn.")
    parser.add_argument("pickle", help="the Detectron .pkl file (numpy arrays with Caffe2 names)")
    parser.add_argument("out", help="the .pth file to write (torchvision names + the input convention)")
    args = parser.parse_args(argv)
    try:
        state, arch = convert(read_detectron_pickle(args.pickle), args.pickle)
    except (ConvertError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save({"model": state, "architecture": arch, "input_convention": DETECTRON_INPUT,
                "source": os.path.basename(args.pickle)}, args.out)
    name, how = describe(arch)
    print(f"wrote {args.out}: {name}, {len(state)} tensors; input BGR in 0-255 minus {DETECTRON_INPUT['image_mean']}, "
          f"no std (recorded: --cnn sets it in the model config)\nbuild the model as {how} and pass --cnn {args.out}")
    return args.out


if __name__ == "__main__":
    main()
