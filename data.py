"""
Data for Pixel-BERT: the WordPiece tokenizer, image decoding and resizing, padded batches with
masks, MLM masking and ITM negatives (paper 3.4), the readers of the official annotation files
(COCO captions, Visual Genome, VQA v2, NLVR2, each read directly), and the training sampler.

Large caption sets (Visual Genome has over 5M region phrases) are tokenised once into a few
flat numpy arrays cached next to the data and memory-mapped, so DataLoader workers share them
through the page cache instead of each copying millions of Python objects.
"""

import errno
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from metrics import (EvaluationError, canonical_answer, check_nlvr2_record, leave_one_out_accuracy,
                     process_human_answers, process_prediction, read_json_lines)
from model import MLM_IGNORE, PixelBertConfig

IMAGENET_MEAN, IMAGENET_STD = PixelBertConfig.image_mean, PixelBertConfig.image_std  # torchvision's; RGB in [0, 1]
# Padded sizes are multiples of 64, the pixel-token cell (CNN stride 32 x the 2x2 pool; 32 unpooled), so the batch
# tensor has no partial cell. A smaller image in the batch still gets zeros beyond its own edge (evaluate.py
# encodes held-out images at their own padded size).
PAD_MULTIPLE = 64
IGNORE = MLM_IGNORE  # label of text positions without an MLM target (model.pretraining_losses leaves them out)

# Where each official file comes from; shown whenever one is missing.
DOWNLOADS = {
    "coco/dataset_coco.json": "Karpathy's splits: caption_datasets.zip from https://cs.stanford.edu/people/karpathy/deepimagesent/",
    "coco/annotations/captions_train2014.json": "annotations_trainval2014.zip from https://cocodataset.org/#download",
    "coco/train2014": "train2014.zip from https://cocodataset.org/#download",
    "coco/val2014": "val2014.zip from https://cocodataset.org/#download",
    "vg/region_descriptions.json": "region_descriptions.json.zip (v1.2) from https://homes.cs.washington.edu/~ranjay/visualgenome/api.html",
    "vg/image_data.json": "image_data.json.zip (v1.2) from https://homes.cs.washington.edu/~ranjay/visualgenome/api.html",
    "coco/test2015": "test2015.zip from https://cocodataset.org/#download",
    "vqa/v2_OpenEnded_mscoco_train2014_questions.json": "v2_Questions_Train_mscoco.zip from https://visualqa.org/download.html",
    "vqa/v2_OpenEnded_mscoco_val2014_questions.json": "v2_Questions_Val_mscoco.zip from https://visualqa.org/download.html",
    "vqa/v2_OpenEnded_mscoco_test2015_questions.json": "v2_Questions_Test_mscoco.zip from https://visualqa.org/download.html",
    "vqa/v2_OpenEnded_mscoco_test-dev2015_questions.json": "v2_Questions_Test_mscoco.zip from https://visualqa.org/download.html",
    "vqa/v2_mscoco_train2014_annotations.json": "v2_Annotations_Train_mscoco.zip from https://visualqa.org/download.html",
    "vqa/v2_mscoco_val2014_annotations.json": "v2_Annotations_Val_mscoco.zip from https://visualqa.org/download.html",
    "nlvr2/data/train.json": "nlvr2/data/train.json from https://github.com/lil-lab/nlvr",
    "nlvr2/data/dev.json": "nlvr2/data/dev.json from https://github.com/lil-lab/nlvr",
    "nlvr2/data/test1.json": "nlvr2/data/test1.json from https://github.com/lil-lab/nlvr",
    "nlvr2/images/train": "the NLVR2 train images (train_img.zip; request access through the form linked from "
                          "https://github.com/lil-lab/nlvr/tree/master/nlvr2), unzipped to its 100 numbered folders",
    "nlvr2/images/dev": "the NLVR2 dev images (dev_img.zip; see https://github.com/lil-lab/nlvr/tree/master/nlvr2)",
    "nlvr2/images/test1": "the NLVR2 test1 images (test1_img.zip; see https://github.com/lil-lab/nlvr/tree/master/nlvr2)",
    "imagenet/train": "a folder per class of training images (ImageNet's layout, e.g. ILSVRC2012_img_train.tar from "
                      "https://image-net.org); for the paper's runs pass torchvision's weights with --cnn instead",
    "imagenet/val": "a folder per class of held-out images, the same classes as imagenet/train",
}

# Kept apart from DOWNLOADS, whose .json files stamp the pre-training caption cache.
RETRIEVAL_DOWNLOADS = {
    "flickr30k/dataset_flickr30k.json": "Karpathy's splits: caption_datasets.zip from https://cs.stanford.edu/people/karpathy/deepimagesent/",
    "flickr30k/images": "flickr30k-images.tar.gz (request it at https://shannon.cs.illinois.edu/DenotationGraph/)",
}


class DataError(ValueError):
    """Bad or missing input data. The message names the file or record and what to do."""


# -----------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """bert-base-uncased's WordPiece tokenizer, assembled from a vocab.txt with the `tokenizers`
    library: BERT's normaliser (clean text, lower-case, strip accents, split CJK characters),
    BERT's pre-tokeniser (whitespace and punctuation), WordPiece, then [CLS] ... [SEP]."""

    def __init__(self, vocab_path, max_length=40):
        """vocab_path: a vocab.txt, or the list of tokens itself (as checkpoints store it)."""
        from tokenizers import Tokenizer as HFTokenizer, models, normalizers, pre_tokenizers, processors
        if isinstance(vocab_path, (list, tuple)):
            wordpiece, vocab_path = models.WordPiece({t: i for i, t in enumerate(vocab_path)}, unk_token="[UNK]"), None
        elif os.path.isfile(vocab_path):
            try:
                wordpiece = models.WordPiece.from_file(vocab_path, unk_token="[UNK]")
            except Exception as e:  # tokenizers says only e.g. "stream did not contain valid UTF-8"
                raise DataError(f"{vocab_path}: not a WordPiece vocabulary ({e}); it must be UTF-8 text, one token "
                                f"per line, e.g. bert-base-uncased's vocab.txt") from None
        else:
            raise DataError(f"{vocab_path}: vocabulary file not found (a WordPiece vocab.txt, one token per line)")
        tok = HFTokenizer(wordpiece)
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self.vocab = tok.get_vocab()
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in self.vocab]
        if missing or self.vocab["[PAD]"] != 0:
            raise DataError(f"{vocab_path}: a BERT vocabulary needs [PAD] at id 0 and {missing or 'the special tokens'}")
        self.pad_id, self.cls_id, self.sep_id, self.mask_id = (self.vocab[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]"))
        tok.post_processor = processors.BertProcessing(("[SEP]", self.sep_id), ("[CLS]", self.cls_id))
        tok.enable_truncation(max_length)  # truncation keeps the final [SEP]
        self.tok, self.max_length, self.vocab_path = tok, max_length, vocab_path
        self.vocab_size = len(self.vocab)
        # Tokens MLM may substitute at random: real word pieces, not [PAD]/[CLS]/[unused0]...
        self.ordinary_ids = np.array(sorted(i for t, i in self.vocab.items() if not (t.startswith("[") and t.endswith("]"))))

    def encode(self, text):
        """'A dog.' -> [CLS] a dog . [SEP] ids, at most max_length."""
        return self.tok.encode(text).ids

    def pieces(self, texts):
        """Word-piece ids of many texts, without [CLS]/[SEP] or truncation (for the caption index)."""
        self.tok.no_truncation()
        try:
            return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        finally:
            self.tok.enable_truncation(self.max_length)

    def wrap(self, pieces):
        """Word pieces -> [CLS] pieces [SEP], truncated to max_length."""
        return [self.cls_id, *pieces[: self.max_length - 2], self.sep_id]

    def vocab_tokens(self):
        return [t for t, _ in sorted(self.vocab.items(), key=lambda kv: kv[1])]


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


# -----------------------------------------------------------------------------
# Images


def load_image(path):
    """Decode any image file to 8-bit RGB, upright (EXIF orientation applied). Images beyond
    PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89M pixels) are refused: no dataset
    image is that large, and decoding one could exhaust memory."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img)
                img.load()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found; check --data-root and the folder layout in the README")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: cannot decode the image ({type(e).__name__}: {e}); re-download it or remove "
                        f"its records (a training image: or pass --skip-bad-images)") from None
    return rgb_image(img)


def rgb_image(img):
    """A decoded PIL image as 8-bit RGB: 16/32-bit grayscale rescaled, transparency over white."""
    if img.mode.startswith("I"):  # 16/32-bit grayscale: rescale to 8 bits instead of clipping at 255
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")  # transparent areas become white, as a viewer shows them
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def image_size(path):
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found; check --data-root and the folder layout in the README") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read the image header ({e}); re-download it or remove its records") from None


def header_size(path, skip_bad):
    try:
        return image_size(path)
    except DataError:
        if not skip_bad:
            raise
        return (0, 0)


def check_images(paths, what):
    """Decode every image of a held-out set before training: one that cannot be read would
    otherwise stop the run at its first evaluation, after the training work. Threads overlap the
    decoding (PIL releases the GIL). `what` names the set in the error."""
    from concurrent.futures import ThreadPoolExecutor

    def problem(path):
        try:
            load_image(path)
        except DataError as e:
            return str(e)
        return None
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        bad = [p for p in pool.map(problem, sorted(set(paths))) if p]
    if bad:
        first = bad[0].split("; ")[0]
        raise DataError(f"{len(bad)} {what} image{'s' * (len(bad) != 1)} cannot be read, e.g. {first}; "
                        f"held-out images are never skipped: re-download them or remove their records")


def try_image_tensor(path, min_size, max_size, skip_bad, square=False):
    """image_tensor, or with skip_bad (--skip-bad-images) the error message in place of a
    missing or undecodable image; collate drops such examples and reports them."""
    try:
        return image_tensor(path, min_size, max_size, square)
    except DataError as e:
        if not skip_bad:
            raise
        return str(e)


def resize_image(img, min_size, max_size):
    """Scale so the shorter side is min_size, unless that makes the longer side exceed
    max_size (paper: 800 / 1333 for ResNet-50, 600 / 1000 for ResNeXt-152); aspect kept."""
    w, h = img.size
    scale = min(min_size / min(w, h), max_size / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img if size == img.size else img.resize(size, Image.BILINEAR)


def centre_square(img, size):
    """ImageNet's evaluation transform, exactly as torchvision's Resize(size) + CenterCrop(size) do
    it to a PIL image: the shorter side to `size` (the longer one truncated), then the centre square."""
    w, h = img.size
    resized = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if resized != img.size:
        img = img.resize(resized, Image.BILINEAR)
    left, top = (int(round((side - size) / 2.0)) for side in resized)
    return img.crop((left, top, left + size, top + size))


def image_tensor(path, min_size, max_size, square=False):
    """(3, H, W) uint8, resized by resize_image, or with square=True by centre_square to a
    min_size square (classification). Images stay 8-bit until they reach the device (4x less to copy)."""
    img = load_image(path)
    img = centre_square(img, min_size) if square else resize_image(img, min_size, max_size)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def normalize_images(images, config=None):
    """uint8 RGB (B, 3, H, W) -> float (B, 3, H, W), the CNN's input, on the images' device, in the
    input convention of `config`, the model's PixelBertConfig (every caller passes model.config):
    channel order, value scale, per-channel mean and std. None: the config's defaults, torchvision's
    ImageNet RGB mean and std, right for every CNN but a converted Detectron one."""
    config = config or PixelBertConfig  # the class holds the defaults
    if config.image_channels == "BGR":
        images = images.flip(1)
    # (x * scale / 255 - mean) / std, computed as (x - mean') / std' with mean and std brought to 0-255 units
    to_8bit = 255.0 / config.image_scale
    mean = torch.tensor(config.image_mean, device=images.device).view(1, 3, 1, 1) * to_8bit
    std = torch.tensor(config.image_std, device=images.device).view(1, 3, 1, 1) * to_8bit
    return (images.float() - mean) / std


def image_text_examples(images, texts, tokenizer, min_size, max_size):
    """Image-text pairs as the examples `collate` batches, prepared as the training data is: each
    image (a PIL image or a file path) upright 8-bit RGB (load_image; ImageOps.exif_transpose and
    rgb_image for a PIL image), resized by resize_image, as uint8 (3, H, W); each text as
    [CLS] text [SEP] word pieces. images[i] goes with texts[i]; an image given for several texts
    (the same object or path) is prepared once and carries them as its "pairs", so the CNN sees it
    once (collate's image_index points the texts at it). Each text keeps its position as
    "text_index", so results can be put back in the order of `texts`."""
    if len(images) != len(texts):
        raise DataError(f"{len(images)} images for {len(texts)} texts: give one image per text")
    examples, seen = [], {}
    for i, (image, text) in enumerate(zip(images, texts)):
        if not isinstance(text, str) or not text.strip():
            raise DataError("the text is empty" + (f" (text {i + 1} of {len(texts)})" if len(texts) > 1 else ""))
        key = os.fspath(image) if isinstance(image, (str, os.PathLike)) else id(image)
        if key not in seen:
            if isinstance(image, (str, os.PathLike)):
                pixels = image_tensor(image, min_size, max_size)  # what the training datasets call
            else:
                img = resize_image(rgb_image(ImageOps.exif_transpose(image)), min_size, max_size)
                pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
            seen[key] = {"image": pixels, "pairs": []}
            examples.append(seen[key])
        seen[key]["pairs"].append({"input_ids": tokenizer.encode(text), "text_index": i})
    return examples


def pad_sequences(seqs, value):
    out = torch.full((len(seqs), max(map(len, seqs))), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def drop_bad_images(items):
    """Examples whose image could not be read (--skip-bad-images: the error message stands in for
    the image) are left out; the messages go in batch["bad_images"] for the loop to report."""
    bad = [it["image"] for it in items if isinstance(it.get("image"), str)]
    if bad:
        items = [it for it in items if not isinstance(it.get("image"), str)]
        if not items:
            raise DataError(f"every image of a batch is unreadable, e.g. {bad[0]}; check the data")
    return items, {"bad_images": bad} if bad else {}


def collate(items):
    """List of examples -> batch. Images are padded bottom/right to the batch's largest height
    and width, rounded up to a multiple of 64, with image_mask (B, H, W) True on real pixels;
    sequences are padded with 0 ([PAD]), or with IGNORE when the key ends in "_labels";
    text_mask (B, T) is True on real tokens of input_ids. An example with "pairs" (several
    texts for its one image) contributes one row per text, and image_index says whose image.
    Examples whose image could not be read (--skip-bad-images) are left out; their messages
    travel in batch["bad_images"] so the training loop can report each once."""
    items, batch = drop_bad_images(items)
    if "image" in items[0]:
        sizes = [it["image"].shape[1:] for it in items]
        H = -(-max(h for h, _ in sizes) // PAD_MULTIPLE) * PAD_MULTIPLE
        W = -(-max(w for _, w in sizes) // PAD_MULTIPLE) * PAD_MULTIPLE
        batch["images"] = torch.zeros(len(items), 3, H, W, dtype=torch.uint8)
        batch["image_mask"] = torch.zeros(len(items), H, W, dtype=torch.bool)
        for i, (it, (h, w)) in enumerate(zip(items, sizes)):
            batch["images"][i, :, :h, :w] = it["image"]
            batch["image_mask"][i, :h, :w] = True
    if "pairs" in items[0]:
        batch["image_index"] = torch.tensor([b for b, it in enumerate(items) for _ in it["pairs"]])
        items = [pair for it in items for pair in it["pairs"]]
    for key in items[0]:
        if key == "image":
            continue
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):  # fixed-size vectors, e.g. VQA soft targets
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (list, tuple, np.ndarray)):  # a sequence per example
            batch[key] = pad_sequences(values, IGNORE if key.endswith("_labels") else 0)
        else:
            batch[key] = torch.as_tensor(values)
    if "input_ids" in batch:
        batch["text_mask"] = pad_sequences([[1] * len(it["input_ids"]) for it in items], 0).bool()
    return batch


# -----------------------------------------------------------------------------
# Pre-training objectives on one example (paper 3.4)


def mask_tokens(ids, rng, tokenizer, prob=0.15, at_least_one=True):
    """BERT's masking of [CLS] w1..wn [SEP]: each word piece is chosen with probability `prob`
    (with at_least_one, one piece at random when none was, unless prob is 0); a chosen piece
    becomes [MASK] 80% of the time, a random word piece 10%, and stays unchanged 10%. [CLS]/[SEP]
    are never chosen. The forced piece raises the real rate on short captions, to
    prob + (1 - prob)**n / n per piece for n pieces (prob 0.15: 0.24 at 5, 1 at 1);
    without it every piece is chosen with probability `prob` exactly, and a caption may have
    nothing to predict. Returns (input ids, labels) with labels IGNORE where nothing is predicted."""
    ids = np.asarray(ids)
    n = len(ids) - 2
    inputs, labels = ids.copy(), np.full(len(ids), IGNORE)
    if n <= 0 or prob == 0:
        return inputs, labels
    chosen = rng.random(n) < prob
    if at_least_one and not chosen.any():
        chosen[rng.integers(n)] = True
    u = rng.random(n)
    words = inputs[1:-1]  # a view: writes go into inputs
    labels[1:-1][chosen] = words[chosen]
    words[chosen & (u < 0.8)] = tokenizer.mask_id
    swap = chosen & (u >= 0.8) & (u < 0.9)
    words[swap] = rng.choice(tokenizer.ordinary_ids, swap.sum())
    return inputs, labels


# -----------------------------------------------------------------------------
# The caption index: every caption of a dataset as flat, memory-mappable arrays

INDEX_VERSION = 1
INDEX_FIELDS = ("image_paths", "image_sizes", "caption_image", "offsets", "pieces")


@dataclass
class ImageEntry:
    path: str  # relative to the data root
    captions: list
    size: tuple = None  # (width, height) if the annotation file gives it


class CaptionIndex:
    """image_paths (I,) str, image_sizes (I, 2) [w, h], caption_image (N,) -> image row,
    offsets (N + 1,) into pieces (word-piece ids of all captions, concatenated).
    Pickles as its folder name only, so each DataLoader worker maps the files itself."""

    def __init__(self, folder, root):
        self.folder, self.root, self._arrays = folder, root, None

    def __getstate__(self):
        return {"folder": self.folder, "root": self.root, "_arrays": None}

    def __getattr__(self, name):
        if name in INDEX_FIELDS:
            if self._arrays is None:
                self._arrays = {f: np.load(os.path.join(self.folder, f + ".npy"), mmap_mode="r") for f in INDEX_FIELDS}
            return self._arrays[name]
        raise AttributeError(name)

    def __len__(self):
        return len(self.caption_image)

    def caption_pieces(self, i):
        return self.pieces[self.offsets[i]: self.offsets[i + 1]]

    def image_path(self, image):
        return os.path.join(self.root, str(self.image_paths[image]))

    @staticmethod
    def build(folder, root, entries, tokenizer, skip_bad_images=False):
        """Tokenise every caption, drop empty ones, and write the arrays to `folder` atomically.
        skip_bad_images: an image whose header cannot be read gets size 0 x 0 here, and is
        reported and skipped when training reaches it."""
        texts = [c for e in entries for c in e.captions]
        pieces = tokenizer.pieces(texts)
        owner = np.repeat(np.arange(len(entries)), [len(e.captions) for e in entries])
        keep = np.array([len(p) > 0 for p in pieces], dtype=bool)
        if not keep.any():
            raise DataError(f"{root}: no non-empty captions found")
        kept = [p for p, k in zip(pieces, keep) if k]
        sizes = [e.size or header_size(os.path.join(root, e.path), skip_bad_images) for e in entries]
        arrays = {
            "image_paths": np.array([e.path for e in entries]),
            "image_sizes": np.array(sizes, dtype=np.int32).reshape(-1, 2),
            "caption_image": owner[keep].astype(np.int32),
            "offsets": np.concatenate([[0], np.cumsum([len(p) for p in kept])]).astype(np.int64),
            "pieces": np.fromiter((t for p in kept for t in p), dtype=np.int32),
        }
        tmp = f"{folder}.tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        for name, arr in arrays.items():
            np.save(os.path.join(tmp, name + ".npy"), arr)
        with open(os.path.join(tmp, "info.json"), "w") as f:
            json.dump({"images": len(entries), "captions": int(keep.sum()), "empty_dropped": int((~keep).sum())}, f)
        if os.path.exists(folder):  # another process finished the same index first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
        return CaptionIndex(folder, root)


# -----------------------------------------------------------------------------
# Readers of the official annotation files


def image_file(root, rel):
    """An image's path under root as the annotation names it, or, when that file is absent, the
    same base name as .jpg or .png (the README lets either format stand for the official one).
    A path found under neither is returned as named, for the caller to report."""
    if os.path.exists(os.path.join(root, rel)):
        return rel
    base = os.path.splitext(rel)[0]
    return next((base + ext for ext in (".jpg", ".png") if os.path.exists(os.path.join(root, base + ext))), rel)


def require(root, rel):
    path = os.path.join(root, rel)
    if not os.path.exists(path):
        hint = DOWNLOADS.get(rel) or RETRIEVAL_DOWNLOADS.get(rel, "see the README's Real data section")
        raise DataError(f"{path} is missing. Get {hint} and put it at {rel} under --data-root ({root}).")
    return path


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a valid JSON file ({e}); re-download it") from None


def field(record, name, kind, where):
    value = record.get(name) if isinstance(record, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DataError(f"{where}: field '{name}' is missing or not {getattr(kind, '__name__', kind)}")
    return value


def karpathy_entries(root, dataset, splits):
    """Images of Karpathy's dataset_{coco,flickr30k}.json in the given splits, with their raw
    sentences. COCO images live in coco/{filepath}/, Flickr30K's in flickr30k/images/."""
    path = require(root, f"{dataset}/dataset_{dataset}.json")
    entries, ids = [], []
    for i, img in enumerate(field(read_json(path), "images", list, path)):
        where = f"{path}: images[{i}]"
        if field(img, "split", str, where) not in splits:
            continue
        folder = f"coco/{field(img, 'filepath', str, where)}" if dataset == "coco" else "flickr30k/images"
        captions = [field(s, "raw", str, f"{where}.sentences[{j}]")
                    for j, s in enumerate(field(img, "sentences", list, where))]
        entries.append(ImageEntry(image_file(root, f"{folder}/{field(img, 'filename', str, where)}"), captions))
        ids.append(img.get("cocoid", img.get("imgid")))
    return entries, ids


def karpathy_coco_ids(root, splits):
    """COCO ids of the Karpathy images in `splits`, e.g. the val/test images pre-training must not see."""
    path = os.path.join(root, "coco/dataset_coco.json")
    if not os.path.exists(path):
        return set()
    return {img.get("cocoid") for img in read_json(path)["images"] if img.get("split") in splits}


def coco2014_entries(root):
    """The official captions_train2014.json: images[] (id, file_name, width, height) and
    annotations[] (image_id, caption)."""
    path = require(root, "coco/annotations/captions_train2014.json")
    data = read_json(path)
    by_id = {}
    for i, img in enumerate(field(data, "images", list, path)):
        where = f"{path}: images[{i}]"
        by_id[field(img, "id", int, where)] = ImageEntry(
            image_file(root, f"coco/train2014/{field(img, 'file_name', str, where)}"), [],
            (field(img, "width", int, where), field(img, "height", int, where)))
    for i, ann in enumerate(field(data, "annotations", list, path)):
        where = f"{path}: annotations[{i}]"
        image_id = field(ann, "image_id", int, where)
        if image_id not in by_id:
            raise DataError(f"{where}: image_id {image_id} is not in images[]")
        by_id[image_id].captions.append(field(ann, "caption", str, where))
    return list(by_id.values()), list(by_id)


def vg_entries(root):
    """Visual Genome 1.2: each region phrase is used as a caption of the whole image (paper 4.1).
    Returns entries and their coco_id (None for images not in COCO)."""
    meta_path, regions_path = require(root, "vg/image_data.json"), require(root, "vg/region_descriptions.json")
    meta = {}
    for i, m in enumerate(read_json(meta_path)):
        where = f"{meta_path}: [{i}]"
        url = field(m, "url", str, where)  # .../VG_100K_2/123.jpg tells the folder
        meta[field(m, "image_id", int, where)] = (f"vg/{url.split('/')[-2]}/{url.split('/')[-1]}",
                                                  (field(m, "width", int, where), field(m, "height", int, where)),
                                                  m.get("coco_id"))
    entries, coco_ids = [], []
    for i, img in enumerate(read_json(regions_path)):
        where = f"{regions_path}: [{i}]"
        image_id = field(img, "id", int, where)
        if image_id not in meta:
            raise DataError(f"{where}: image {image_id} is not in {meta_path}")
        phrases = [field(r, "phrase", str, f"{where}.regions[{j}]") for j, r in enumerate(field(img, "regions", list, where))]
        path, size, coco_id = meta[image_id]
        entries.append(ImageEntry(image_file(root, path), list(dict.fromkeys(p.strip() for p in phrases)),
                                  size))  # drop repeats
        coco_ids.append(coco_id)
    return entries, coco_ids


def pretrain_entries(name, root, split):
    """Image entries for pre-training. split "train": COCO Karpathy train + restval (`coco`), or
    the official captions_train2014.json (`coco2014`), and/or Visual Genome (`vg`); "val": the
    Karpathy val images, for held-out MLM/ITM accuracy. VG images that are COCO images become
    extra captions of the COCO entry; VG images of Karpathy val/test are dropped, so no
    retrieval test image is seen in pre-training."""
    if split == "val":
        return karpathy_entries(root, "coco", ("val",))[0]
    parts = name.split("_")  # coco_vg -> coco + vg
    if not set(parts) <= {"coco", "coco2014", "vg"}:
        raise DataError(f"--data {name}: choose coco, coco2014, vg or coco_vg (or demo)")
    entries, coco_ids = [], []
    if "coco" in parts:
        entries, coco_ids = karpathy_entries(root, "coco", ("train", "restval"))
    if "coco2014" in parts:
        entries, coco_ids = coco2014_entries(root)
    if "vg" in parts:
        held_out = karpathy_coco_ids(root, ("val", "test"))
        by_coco = dict(zip(coco_ids, entries))
        for entry, coco_id in zip(*vg_entries(root)):
            if coco_id in held_out:
                continue
            if coco_id in by_coco:
                by_coco[coco_id].captions.extend(entry.captions)
            else:
                entries.append(entry)
    return entries


def caption_index(name, root, split, tokenizer, cache_root=None, skip_bad_images=False):
    """The cached CaptionIndex for (dataset, split, vocabulary); rebuilt when a source file or
    the vocabulary changes. Cached under cache_root if given (pretrain.py's --cache-dir), else
    under <root>/.pixelbert_cache, or user_cache_dir() when <root> is read-only."""
    sources = sorted(os.path.join(root, rel) for rel in DOWNLOADS if rel.endswith(".json"))
    stamp = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in sources if os.path.exists(p)]
    vocab = file_digest(tokenizer.vocab_path) if tokenizer.vocab_path else \
        hashlib.sha1("\n".join(tokenizer.vocab_tokens()).encode()).hexdigest()  # a checkpoint's own vocabulary
    key = hashlib.sha1(json.dumps([INDEX_VERSION, name, split, stamp, vocab]).encode())
    name_key = f"{name}-{split}-{key.hexdigest()[:16]}"
    places = [cache_root] if cache_root else [os.path.join(root, ".pixelbert_cache"), user_cache_dir()]
    for place in places:
        if os.path.exists(os.path.join(place, name_key, "info.json")):
            return CaptionIndex(os.path.join(place, name_key), root)
    entries = pretrain_entries(name, root, split)
    for n, place in enumerate(places):
        try:
            os.makedirs(place, exist_ok=True)
            return CaptionIndex.build(os.path.join(place, name_key), root, entries, tokenizer, skip_bad_images)
        except OSError as e:  # a read-only --data-root: the user's own cache instead
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            if n + 1 == len(places):
                raise DataError(f"{place}: cannot write the caption cache there ({e.strerror}); make it writable"
                                ) from None
            print(f"{place}: not writable ({e.strerror}); caching the caption index in {places[n + 1]} instead",
                  flush=True)


def user_cache_dir():
    """Where the caption index goes when --data-root is read-only: $XDG_CACHE_HOME/pixelbert, or
    ~/.cache/pixelbert."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "pixelbert")


# -----------------------------------------------------------------------------
# The pre-training dataset and the sampler


class PretrainPairs(torch.utils.data.Dataset):
    """Item (epoch, i): the image of caption i with `captions_per_image` texts - caption i and
    others of the same image - each swapped for a caption of another image with probability
    itm_neg_prob (ITM), then masked (MLM). One caption per image is the paper's setting; more
    share one CNN pass among several pairs (the authors' follow-up SOHO uses 4).
    Every random choice comes from a generator seeded by (seed, epoch, i), so a batch is the
    same whatever the number of workers or processes, and a resumed run replays it exactly."""

    def __init__(self, index, tokenizer, min_size, max_size, seed=0, itm_neg_prob=0.5, mask_prob=0.15,
                 mlm_on_negatives=False, captions_per_image=1, skip_bad_images=False, mask_at_least_one=True):
        self.index, self.tok, self.skip_bad_images = index, tokenizer, skip_bad_images
        self.min_size, self.max_size, self.seed = min_size, max_size, seed
        self.itm_neg_prob, self.mask_prob, self.mlm_on_negatives = itm_neg_prob, mask_prob, mlm_on_negatives
        self.captions_per_image, self.mask_at_least_one = captions_per_image, mask_at_least_one

    def __len__(self):
        return len(self.index)

    def __getitem__(self, key):
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        image = int(self.index.caption_image[i])
        chosen = [i]
        if self.captions_per_image > 1:  # the index stores an image's captions contiguously
            first, end = np.searchsorted(self.index.caption_image, [image, image + 1])
            others = [c for c in range(first, end) if c != i] or [i]
            more = self.captions_per_image - 1
            chosen += rng.choice(others, more, replace=len(others) < more).tolist()
        return {"image": try_image_tensor(self.index.image_path(image), self.min_size, self.max_size,
                                          self.skip_bad_images),
                "pairs": [self.pair(c, image, rng) for c in chosen]}

    def pair(self, i, image, rng):
        matched = rng.random() >= self.itm_neg_prob
        j = i
        while not matched and self.index.caption_image[j] == image:  # a caption of another image
            j = int(rng.integers(len(self.index)))
        ids = self.tok.wrap(self.index.caption_pieces(j).tolist())
        # Every caption is masked, matched or not: if only matched ones carried [MASK], ITM
        # could be solved by spotting [MASK]. MLM labels are kept on matched pairs only, since
        # a caption of another image teaches the wrong grounding (the paper leaves this open).
        mlm_ids, mlm_labels = mask_tokens(ids, rng, self.tok, self.mask_prob, self.mask_at_least_one)
        if not matched and not self.mlm_on_negatives:
            mlm_labels[:] = IGNORE
        return {"input_ids": ids, "mlm_ids": mlm_ids.tolist(), "mlm_labels": mlm_labels.tolist(),
                "itm_labels": int(matched)}


# -----------------------------------------------------------------------------
# Image classification, the CNN's own pre-training (pretrain_cnn.py): ImageNet's folder layout

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's


def class_folder_entries(root, split):
    """Paths, labels and class names of <root>/imagenet/<split>/<class>/.../<image>, numbered as
    torchvision's ImageFolder does: classes sorted by folder name from 0, files in sorted walk order."""
    folder = require(root, f"imagenet/{split}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class folders; it needs one folder of images per class")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = [os.path.join(d, f) for d, _, files in sorted(os.walk(os.path.join(folder, name), followlinks=True))
                 for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
        if not found:
            raise DataError(f"{os.path.join(folder, name)}: no images ({', '.join(IMAGE_SUFFIXES)}) in this class folder")
        paths += found
        labels += [label] * len(found)
    return paths, labels, classes


class ClassImages(torch.utils.data.Dataset):
    """Item i: {"image": (3, size, size) uint8 (centre_square), "label": int}; with skip_bad_images
    an unreadable image is its error message instead, which collate_classes drops and reports."""

    def __init__(self, paths, labels, size, skip_bad_images=False):
        self.paths, self.labels, self.size, self.skip_bad_images = paths, labels, size, skip_bad_images

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = try_image_tensor(self.paths[i], self.size, self.size, self.skip_bad_images, square=True)
        return {"image": image, "label": self.labels[i]}


def collate_classes(items):
    """ClassImages examples -> {"images": (B, 3, size, size) uint8, "labels": (B,)}."""
    items, batch = drop_bad_images(items)
    return {**batch, "images": torch.stack([it["image"] for it in items]),
            "labels": torch.tensor([it["label"] for it in items])}


# -----------------------------------------------------------------------------
# Image-text retrieval (paper 4.4): Karpathy's splits of Flickr30K and COCO

RETRIEVAL_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}  # Flickr30K has no restval


def retrieval_entries(root, dataset, split, skip_missing=False):
    """The images of a Karpathy split (flickr30k or coco; train, val or test) with their raw
    captions, in file order: the order COCO's five 1K test folds follow. Every image must have
    a caption and exist on disk (checked here, so a long evaluation cannot fail half-way),
    unless skip_missing (training with --skip-bad-images reports and skips missing images)."""
    if dataset not in ("flickr30k", "coco"):
        raise DataError(f"retrieval dataset {dataset!r}: choose flickr30k or coco")
    if split not in RETRIEVAL_SPLITS:
        raise DataError(f"retrieval split {split!r}: choose one of {', '.join(RETRIEVAL_SPLITS)}")
    entries, _ = karpathy_entries(root, dataset, RETRIEVAL_SPLITS[split])
    path = os.path.join(root, f"{dataset}/dataset_{dataset}.json")
    if not entries:
        raise DataError(f"{path}: no image has split {'/'.join(RETRIEVAL_SPLITS[split])}; is it Karpathy's file?")
    for e in entries:
        if not e.captions:
            raise DataError(f"{path}: image {e.path} has no sentences; every retrieval image needs a caption")
        if not skip_missing and not os.path.exists(os.path.join(root, e.path)):
            require(root, os.path.dirname(e.path))  # a whole missing folder gets its download hint
            raise DataError(f"{os.path.join(root, e.path)}: image of {path} not found; complete the image folder")
    return entries


class RetrievalCaptions:
    """Every caption of a retrieval split, tokenised once, as flat arrays: caption_image (N,)
    gives each caption's image row (an image's captions are contiguous, in file order) and
    image_first (I + 1,) where each image's captions start; offsets/pieces hold the word pieces."""

    def __init__(self, entries, tokenizer):
        self.image_paths = [e.path for e in entries]
        counts = [len(e.captions) for e in entries]
        self.caption_image = np.repeat(np.arange(len(entries)), counts).astype(np.int64)
        self.image_first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        pieces = tokenizer.pieces([c for e in entries for c in e.captions])
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
        self.pieces = np.fromiter((t for p in pieces for t in p), dtype=np.int32)
        self.tok = tokenizer

    def __len__(self):
        return len(self.caption_image)

    def input_ids(self, c):
        """[CLS] caption c [SEP], truncated to the tokenizer's max_length."""
        return self.tok.wrap(self.pieces[self.offsets[c]: self.offsets[c + 1]].tolist())


class RetrievalPairs(torch.utils.data.Dataset):
    """Item (epoch, i): caption i's image with 1 + `negatives` texts (paper 4.4): caption i
    first, then captions of other images drawn uniformly without replacement. An epoch is one
    pass over the ground-truth captions (each image five times). Random choices come from a
    generator seeded by (seed, epoch, i), so batches do not depend on workers or processes.
    skip_bad_images: an unreadable image becomes its error message, and collate drops the item."""

    def __init__(self, root, captions, min_size, max_size, negatives=20, seed=0, skip_bad_images=False):
        own = np.diff(captions.image_first).max()
        if len(captions) - own < negatives:
            raise DataError(f"{root}: {len(captions)} captions cannot give {negatives} negatives from other images; "
                            f"lower --negatives")
        self.root, self.captions, self.min_size, self.max_size = root, captions, min_size, max_size
        self.negatives, self.seed, self.skip_bad_images = negatives, seed, skip_bad_images

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, key):
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        image = int(self.captions.caption_image[i])
        first, end = self.captions.image_first[image], self.captions.image_first[image + 1]
        # Draw from the captions minus this image's contiguous block, then step over the block.
        drawn = rng.choice(len(self.captions) - (end - first), self.negatives, replace=False)
        negatives = drawn + (drawn >= first) * (end - first)
        return {"image": try_image_tensor(os.path.join(self.root, self.captions.image_paths[image]), self.min_size,
                                          self.max_size, self.skip_bad_images),
                "pairs": [{"input_ids": self.captions.input_ids(int(c))} for c in [i, *negatives.tolist()]]}


class ImageFiles(torch.utils.data.Dataset):
    """Item i: (i, (3, H, W) uint8 image); for evaluation, where each image is encoded once."""

    def __init__(self, root, paths, min_size, max_size):
        self.root, self.paths, self.min_size, self.max_size = root, paths, min_size, max_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return i, image_tensor(os.path.join(self.root, self.paths[i]), self.min_size, self.max_size)


# -----------------------------------------------------------------------------
# VQA v2 (paper 4.2): questions, the answer vocabulary and soft targets

VQA_SPLITS = {  # split -> question/annotation files; answers to the test questions are withheld
    "train": ["train2014"], "val": ["val2014"], "trainval": ["train2014", "val2014"], "minival": ["val2014"],
    "trainval_all": ["train2014", "val2014"],  # trainval with minival: the final run's training set
    "test-dev": ["test2015"], "test": ["test2015"],  # test-dev is a part of test2015; see read_vqa
}


def vqa_minival_images(val_image_ids, count):
    """The held-out minival: `count` val2014 images (at most a fifth of them) drawn by a fixed
    seed from the sorted ids, so every run and every script agrees on it without a file."""
    ids = np.array(sorted(set(val_image_ids)))
    count = min(count, len(ids) // 5)
    return set(np.random.default_rng(0).permutation(ids)[:count].tolist())


def vqa_image_path(root, subset, image_id, skip_missing=False):
    """coco/{subset}/COCO_{subset}_{id:012d}.jpg, or .png with the same base name (subset:
    train2014, val2014 or test2015). skip_missing: the .jpg path even if absent (training
    reports and skips it)."""
    base = f"coco/{subset}/COCO_{subset}_{image_id:012d}"
    for ext in (".jpg", ".png"):
        if os.path.exists(os.path.join(root, base + ext)):
            return base + ext
    require(root, f"coco/{subset}")
    if skip_missing:
        return base + ".jpg"
    raise DataError(f"{os.path.join(root, base)}.jpg (or .png): image of VQA image_id {image_id} not found; "
                    f"complete {subset}.zip from https://cocodataset.org/#download")


def read_vqa(root, split, minival_images=5000, skip_bad_images=False):
    """The questions of a split and, where they exist, their annotations, each a list of the
    official records, in file order. minival is held out of val (see vqa_minival_images) and
    trainval is train + val without it; trainval_all is all of train + val, for a final run that
    selects nothing on minival. test-dev and test both return every test2015 question:
    the evaluation server wants all of them in either phase. skip_bad_images: a missing image
    is left for training to report and skip (--skip-bad-images) instead of stopping here."""
    if split not in VQA_SPLITS:
        raise DataError(f"VQA split {split!r}: choose one of {', '.join(VQA_SPLITS)}")
    labelled = not split.startswith("test")
    questions, annotations, subsets = [], [], []
    for subset in VQA_SPLITS[split]:
        path = require(root, f"vqa/v2_OpenEnded_mscoco_{subset}_questions.json")
        records = field(read_json(path), "questions", list, path)
        for i, q in enumerate(records):
            where = f"{path}: questions[{i}]"
            field(q, "question_id", int, where), field(q, "image_id", int, where), field(q, "question", str, where)
        questions += records
        subsets += [subset] * len(records)
    by_question = {}
    for subset in VQA_SPLITS[split] if labelled else []:
        path = require(root, f"vqa/v2_mscoco_{subset}_annotations.json")
        for i, a in enumerate(field(read_json(path), "annotations", list, path)):
            where = f"{path}: annotations[{i}]"
            field(a, "question_id", int, where), field(a, "question_type", str, where)
            field(a, "answer_type", str, where), field(a, "multiple_choice_answer", str, where)
            for j, h in enumerate(field(a, "answers", list, where)):
                field(h, "answer", str, f"{where}.answers[{j}]")
            by_question[a["question_id"]] = a
    if split in ("trainval", "minival"):
        held_out = vqa_minival_images([q["image_id"] for q, s in zip(questions, subsets) if s == "val2014"],
                                      minival_images)
        in_minival = [s == "val2014" and q["image_id"] in held_out for q, s in zip(questions, subsets)]
        keep = in_minival if split == "minival" else [not m for m in in_minival]
        questions = [q for q, k in zip(questions, keep) if k]
        subsets = [s for s, k in zip(subsets, keep) if k]
    if labelled:
        missing = [q["question_id"] for q in questions if q["question_id"] not in by_question]
        if missing:
            raise DataError(f"{root}/vqa: {len(missing)} {split} questions have no annotation (e.g. question_id "
                            f"{missing[0]}); the question and annotation files must come from the same release")
        annotations = [by_question[q["question_id"]] for q in questions]
    paths = {}  # image -> path; about five questions share each image
    for q, s in zip(questions, subsets):
        if (s, q["image_id"]) not in paths:
            paths[s, q["image_id"]] = vqa_image_path(root, s, q["image_id"], skip_bad_images)
        q["image_path"] = paths[s, q["image_id"]]
    return questions, annotations


# The vocabulary's entries are answers in normalize_answer's form (canonical_answer: a form that
# processing leaves unchanged, so an entry is compared as itself), and an entry's soft target is
# exactly the official accuracy of predicting that string, under the rule set the run is scored
# with (metrics.VQA_RULES; "current" by default). Under the current rules a prediction is
# normalised whenever the annotators disagree, so the one entry "2" scores for "two", "Two" and
# "2." alike, where raw spellings as entries would split one answer over several labels. A
# question whose annotators all wrote one string is compared unprocessed: an entry scores there
# only if it is that string exactly, as clean answers ("yes", "2") are; for one like "Yes" no
# entry scores, its target is zero, and the training sees what the metric sees.


def vqa_answer_vocab(annotations, min_count=9):
    """Answers whose normalised multiple_choice_answer occurs at least min_count times, most
    frequent first (ties alphabetical). On VQA v2 train + val, min_count 9 gives the standard ~3,129."""
    counts = {}
    for a in annotations:
        answer = canonical_answer(a["multiple_choice_answer"])
        counts[answer] = counts.get(answer, 0) + 1
    vocab = sorted((a for a, k in counts.items() if k >= min_count), key=lambda a: (-counts[a], a))
    if not vocab:
        raise DataError(f"no answer occurs {min_count} times; lower --min-answer-count")
    return vocab


def vqa_soft_targets(annotation, answer_to_label, rules="current"):
    """(labels, scores): every vocabulary answer that scores on this question, with the official
    accuracy it scores as a prediction under `rules` - the paper's soft target."""
    humans = annotation["answers"]
    records = process_human_answers(humans, rules)  # processed once, scored against every candidate
    # An entry scores only where its processed form equals a processed human answer, and entries
    # are their own processed form (canonical_answer), so those answers are the only candidates.
    candidates = {r["answer"] for r in records} & answer_to_label.keys()
    scored = [(answer_to_label[c], leave_one_out_accuracy(process_prediction(c, humans, rules), records))
              for c in sorted(candidates)]
    return [l for l, s in scored if s > 0], [s for l, s in scored if s > 0]


class VQAQuestions(torch.utils.data.Dataset):
    """Item (epoch, i): the image of question i with `questions_per_image` of its questions
    (question i, then others of the same image; 1 is the paper's setting; 0 takes all of them,
    for evaluation, with i the image's first question). Each question comes
    with its id and, when answers are known, the soft-target vector over the answer vocabulary
    (each answer's official accuracy under `vqa_rules`, the rules the run is scored with).
    Questions are stored as flat numpy arrays, which forked DataLoader workers share for free."""

    def __init__(self, root, questions, annotations, tokenizer, answer_to_label, min_size, max_size, seed=0,
                 questions_per_image=1, skip_bad_images=False, vqa_rules="current"):
        order = sorted(range(len(questions)), key=lambda i: (questions[i]["image_path"], i))  # an image's questions together
        self.image_paths, question_image = np.unique([questions[i]["image_path"] for i in order], return_inverse=True)
        self.question_image = question_image.astype(np.int32)
        self.question_ids = np.array([questions[i]["question_id"] for i in order], dtype=np.int64)
        pieces = tokenizer.pieces([questions[i]["question"] for i in order])
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
        self.pieces = np.fromiter((t for p in pieces for t in p), dtype=np.int32)
        self.num_answers, self.labelled = len(answer_to_label), bool(annotations)
        if self.labelled:
            targets = [vqa_soft_targets(annotations[i], answer_to_label, vqa_rules) for i in order]
            self.target_offsets = np.concatenate([[0], np.cumsum([len(l) for l, _ in targets])]).astype(np.int64)
            self.target_labels = np.fromiter((l for ls, _ in targets for l in ls), dtype=np.int32)
            self.target_scores = np.fromiter((s for _, ss in targets for s in ss), dtype=np.float32)
        self.root, self.tok, self.min_size, self.max_size = root, tokenizer, min_size, max_size
        self.seed, self.questions_per_image, self.skip_bad_images = seed, questions_per_image, skip_bad_images

    def __len__(self):
        return len(self.question_ids)

    def first_questions(self):
        """The first question of each image: the keys that cover every question once when
        questions_per_image is 0."""
        return np.searchsorted(self.question_image, np.arange(len(self.image_paths)))

    def __getitem__(self, key):
        epoch, i = key
        image = int(self.question_image[i])
        first, end = np.searchsorted(self.question_image, [image, image + 1])  # this image's questions
        chosen = [i]
        if self.questions_per_image == 0:
            chosen = list(range(first, end))
        elif self.questions_per_image > 1:
            rng = np.random.default_rng([self.seed, epoch, i])
            others = [q for q in range(first, end) if q != i] or [i]
            more = self.questions_per_image - 1
            chosen += rng.choice(others, more, replace=len(others) < more).tolist()
        return {"image": try_image_tensor(os.path.join(self.root, str(self.image_paths[image])), self.min_size,
                                          self.max_size, self.skip_bad_images),
                "pairs": [self.question(q) for q in chosen]}

    def question(self, q):
        item = {"input_ids": self.tok.wrap(self.pieces[self.offsets[q]: self.offsets[q + 1]].tolist()),
                "question_id": int(self.question_ids[q])}
        if self.labelled:
            span = slice(self.target_offsets[q], self.target_offsets[q + 1])
            targets = torch.zeros(self.num_answers)
            targets[torch.from_numpy(self.target_labels[span]).long()] = torch.from_numpy(self.target_scores[span])
            item["targets"] = targets
        return item


# -----------------------------------------------------------------------------
# NLVR2 (paper 4.3): a sentence about a pair of images, true or false

NLVR2_SPLITS = ("train", "dev", "test1")


def read_nlvr2(root, split, skip_bad_images=False):
    """The records of nlvr2/data/{split}.json (the official JSON Lines file), in file order, each
    with "left" and "right": its image paths relative to root. An identifier split-set-pair-sentence
    names the images split-set-pair-img0.png (left) and -img1.png (right), in
    nlvr2/images/train/{directory}/ for train and nlvr2/images/{split}/ otherwise. A missing image
    is an error, unless skip_bad_images (training then reports and skips its examples)."""
    if split not in NLVR2_SPLITS:
        raise DataError(f"NLVR2 split {split!r}: choose one of {', '.join(NLVR2_SPLITS)}")
    path = require(root, f"nlvr2/data/{split}.json")
    try:
        lines = read_json_lines(path)
        for number, record in lines:
            check_nlvr2_record(record, f"{path}, line {number}")
    except EvaluationError as e:
        raise DataError(str(e)) from None
    if not lines:
        raise DataError(f"{path}: no records; re-download it")
    folder = f"nlvr2/images/{split}"
    require(root, folder)
    records, seen = [], set()
    for number, record in lines:
        where = f"{path}, line {number} ({record['identifier']})"
        if not isinstance(record.get("sentence"), str):
            raise DataError(f"{where}: field 'sentence' is missing or not a string")
        if split == "train":
            directory = record.get("directory")
            if not isinstance(directory, (int, str)) or isinstance(directory, bool):
                raise DataError(f"{where}: train records need 'directory' (the image folder's number)")
            folder = f"nlvr2/images/train/{directory}"
        stem = record["identifier"].rsplit("-", 1)[0]
        record = {**record, "left": image_file(root, f"{folder}/{stem}-img0.png"),
                  "right": image_file(root, f"{folder}/{stem}-img1.png")}
        for image in (record["left"], record["right"]):  # a pair of images is shared by its sentences
            if image not in seen and not skip_bad_images and not os.path.exists(os.path.join(root, image)):
                raise DataError(f"{os.path.join(root, image)}: image of {where} not found; check --data-root and "
                                f"the NLVR2 layout in the README")
            seen.add(image)
        records.append(record)
    return records


class NLVR2Examples(torch.utils.data.Dataset):
    """Item i (or (epoch, i), as MicroBatchSampler gives it): example i's two images (left,
    right), its sentence's token ids, its label (1 = True) and i itself, which names its identifier."""

    def __init__(self, root, records, tokenizer, min_size, max_size, skip_bad_images=False):
        self.root, self.min_size, self.max_size, self.skip_bad_images = root, min_size, max_size, skip_bad_images
        self.images = [(r["left"], r["right"]) for r in records]
        self.input_ids = [tokenizer.wrap(p) for p in tokenizer.pieces([r["sentence"] for r in records])]
        self.labels = [int(r["label"] == "True") for r in records]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        i = key[1] if isinstance(key, tuple) else key
        return {"images": [try_image_tensor(os.path.join(self.root, p), self.min_size, self.max_size,
                                            self.skip_bad_images) for p in self.images[i]],
                "input_ids": self.input_ids[i], "label": self.labels[i], "index": i}


def collate_nlvr2(items):
    """B examples -> one batch of 2B (sentence, image) rows for the "pair" setting: row 2b is
    example b's sentence with its left image, row 2b + 1 with its right one, so the model's
    pooled output (2B, H) reshapes to (B, 2H) = [left CLS, right CLS]. labels (B,), index (B,).
    An example with an unreadable image (--skip-bad-images) is left out whole, as collate does."""
    bad = [image for it in items for image in it["images"] if isinstance(image, str)]
    items = [it for it in items if not any(isinstance(image, str) for image in it["images"])]
    if not items:
        raise DataError(f"every example of a batch has an unreadable image, e.g. {bad[0]}; check the data")
    batch = collate([{"image": image, "input_ids": it["input_ids"]} for it in items for image in it["images"]])
    if bad:
        batch["bad_images"] = bad
    batch["labels"] = torch.tensor([it["label"] for it in items])
    batch["index"] = torch.tensor([it["index"] for it in items])
    return batch


class MicroBatchSampler:
    """This rank's micro-batches, as lists of (epoch, index) keys.

    An epoch is a seeded permutation cut into micro-batches; with `group_ids` (e.g. landscape vs
    portrait) each micro-batch takes samples of one group, to cut padding. Training step s uses
    micro-batches s*W*A .. (s+1)*W*A - 1 (W processes, A accumulation steps); rank r takes every
    W-th of them. One process with A = 2 and two processes with A = 1 therefore see the same
    micro-batches, and (epoch, step) is all a checkpoint needs to resume the data exactly."""

    def __init__(self, num_samples, micro_batch, world_size=1, rank=0, accum=1, seed=0, group_ids=None,
                 epoch_size=None):
        self.n, self.micro_batch, self.world, self.rank, self.accum = num_samples, micro_batch, world_size, rank, accum
        self.seed, self.group_ids = seed, group_ids
        self.epoch_size = epoch_size or num_samples  # samples drawn per epoch (fewer with several captions each)
        self.steps_per_epoch = self.epoch_size // (micro_batch * world_size * accum)
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.epoch_size} samples cannot fill one step of {micro_batch * world_size * accum} "
                            f"(batch size x processes x accumulation); lower --global-batch")
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch, step=0):
        self.epoch, self.start_step = epoch, step

    def micro_batches(self, epoch):
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)[: self.epoch_size]
        mb = self.micro_batch
        if self.group_ids is None:
            groups = [order]
        else:  # split the permutation by group, keeping its order within each group
            groups = [order[self.group_ids[order] == g] for g in np.unique(self.group_ids)]
        batches = [g[k: k + mb] for g in groups for k in range(0, len(g) - mb + 1, mb)]
        if self.group_ids is not None:  # interleave the groups' batches in a seeded order
            batches = [batches[k] for k in np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))]
        rest = np.concatenate([g[len(g) // mb * mb:] for g in groups])  # each group's leftovers, mixed
        batches += [rest[k: k + mb] for k in range(0, len(rest) - mb + 1, mb)]
        return batches[: self.steps_per_epoch * self.world * self.accum]

    def __iter__(self):
        batches = self.micro_batches(self.epoch)
        per_step = self.world * self.accum
        for step in range(self.start_step, self.steps_per_epoch):
            for a in range(self.accum):
                yield [(self.epoch, int(i)) for i in batches[step * per_step + a * self.world + self.rank]]

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * self.accum
