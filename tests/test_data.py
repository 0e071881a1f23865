"""data.py: tokenizer, images, collate, MLM masking, ITM negatives, the official-format readers,
the cached caption index and the sampler, on small files written here."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import data


# ---- small corpora in the official formats

def write_image(path, size=(64, 48), color=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def write_vocab(path):
    words = ["a", "red", "blue", "circle", "square", "squares", "dog", "two", "left", "of", "the", ".",
             "1", "2", "3", "4", "10", "11", "12"]
    with open(path, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", *words]) + "\n")
    return str(path)


@pytest.fixture
def root(tmp_path):
    """COCO (Karpathy + captions_train2014) and Visual Genome in the official layout: coco ids
    1, 2 are Karpathy train/restval, 3 val, 4 test; VG image 10 is COCO 2, 11 is COCO 4 (a
    test image), 12 is VG-only."""
    r = tmp_path / "root"
    images = []
    for cid, split, folder in ((1, "train", "train2014"), (2, "restval", "val2014"), (3, "val", "val2014"),
                               (4, "test", "val2014")):
        name = f"COCO_{folder}_{cid:012d}.jpg"
        write_image(str(r / "coco" / folder / name), size=(64 + cid, 48))
        images.append({"filepath": folder, "filename": name, "imgid": cid, "split": split, "cocoid": cid,
                       "sentids": [2 * cid, 2 * cid + 1],
                       "sentences": [{"raw": f"A red circle {cid}.", "tokens": [], "imgid": cid, "sentid": 2 * cid},
                                     {"raw": f"two blue squares {cid}", "tokens": [], "imgid": cid,
                                      "sentid": 2 * cid + 1}]})
    write_json(str(r / "coco/dataset_coco.json"), {"images": images, "dataset": "coco"})
    write_json(str(r / "coco/annotations/captions_train2014.json"), {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 65, "height": 48}],
        "annotations": [{"id": 5, "image_id": 1, "caption": "a dog"}, {"id": 6, "image_id": 1, "caption": "the dog"}]})
    meta, regions = [], []
    for vid, coco_id, folder in ((10, 2, "VG_100K"), (11, 4, "VG_100K_2"), (12, None, "VG_100K_2")):
        write_image(str(r / "vg" / folder / f"{vid}.jpg"), size=(50, 70))
        meta.append({"image_id": vid, "url": f"https://cs.stanford.edu/people/rak248/{folder}/{vid}.jpg",
                     "width": 50, "height": 70, "coco_id": coco_id, "flickr_id": None})
        regions.append({"id": vid, "regions": [
            {"region_id": 1, "image_id": vid, "phrase": f"red circle {vid}", "x": 0, "y": 0, "width": 5, "height": 5},
            {"region_id": 2, "image_id": vid, "phrase": f"red circle {vid}", "x": 1, "y": 1, "width": 5, "height": 5},
            {"region_id": 3, "image_id": vid, "phrase": f"the square {vid}", "x": 1, "y": 1, "width": 5, "height": 5}]})
    write_json(str(r / "vg/image_data.json"), meta)
    write_json(str(r / "vg/region_descriptions.json"), regions)
    write_vocab(r / "vocab.txt")
    return str(r)


# ---- readers

def test_karpathy_pretraining_splits(root):
    entries = data.pretrain_entries("coco", root, "train")
    assert [e.path for e in entries] == ["coco/train2014/COCO_train2014_000000000001.jpg",
                                         "coco/val2014/COCO_val2014_000000000002.jpg"]  # val/test skipped
    assert entries[0].captions == ["A red circle 1.", "two blue squares 1"]
    val = data.pretrain_entries("coco", root, "val")
    assert [e.path for e in val] == ["coco/val2014/COCO_val2014_000000000003.jpg"]


def test_coco2014_and_vg(root):
    (entry,) = data.pretrain_entries("coco2014", root, "train")
    assert entry.captions == ["a dog", "the dog"] and entry.size == (65, 48)
    vg = data.pretrain_entries("vg", root, "train")
    # image 11 is COCO test image 4: excluded; repeated phrases within an image kept once
    assert [e.path for e in vg] == ["vg/VG_100K/10.jpg", "vg/VG_100K_2/12.jpg"]
    assert vg[0].captions == ["red circle 10", "the square 10"]


def test_coco_vg_merges_shared_images(root):
    entries = data.pretrain_entries("coco_vg", root, "train")
    by_path = {e.path: e.captions for e in entries}
    assert len(entries) == 3  # COCO 1, COCO 2 (+ VG 10's phrases), VG 12
    assert by_path["coco/val2014/COCO_val2014_000000000002.jpg"] == [
        "A red circle 2.", "two blue squares 2", "red circle 10", "the square 10"]
    assert "vg/VG_100K/10.jpg" not in by_path


@pytest.mark.parametrize("corrupt,message", [
    (lambda d: d["images"][1].pop("sentences"), r"dataset_coco.json: images\[1\]: field 'sentences' is missing"),
    (lambda d: d["images"][0].update(split=3), r"images\[0\]: field 'split' is missing or not str"),
    (lambda d: d["images"][0]["sentences"][1].update(raw=None), r"images\[0\].sentences\[1\]: field 'raw'"),
])
def test_bad_records_name_file_and_record(root, corrupt, message):
    path = os.path.join(root, "coco/dataset_coco.json")
    d = json.load(open(path))
    corrupt(d)
    write_json(path, d)
    with pytest.raises(data.DataError, match=message):
        data.pretrain_entries("coco", root, "train")


def test_missing_and_broken_files(root):
    os.remove(os.path.join(root, "vg/region_descriptions.json"))
    with pytest.raises(data.DataError, match="region_descriptions.json is missing. Get .*visualgenome"):
        data.pretrain_entries("coco_vg", root, "train")
    with open(os.path.join(root, "coco/dataset_coco.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(data.DataError, match="dataset_coco.json: not a valid JSON file"):
        data.pretrain_entries("coco", root, "train")
    with pytest.raises(data.DataError, match="--data flickr"):
        data.pretrain_entries("flickr", root, "train")


# ---- caption index

def test_caption_index_cached_and_rebuilt(root, tmp_path):
    tok = data.Tokenizer(os.path.join(root, "vocab.txt"))
    index = data.caption_index("coco_vg", root, "train", tok)
    assert len(index) == 4 + 2 + 2 and len(index.image_paths) == 3
    assert tok.tok.decode(index.caption_pieces(0).tolist()) == "a red circle 1 ."
    assert index.image_sizes[0].tolist() == [65, 48]  # read from the file header (Karpathy has no sizes)
    assert len(pickle.dumps(index)) < 1000  # workers get the folder name, never the arrays
    assert data.caption_index("coco_vg", root, "train", tok).folder == index.folder
    path = os.path.join(root, "vg/region_descriptions.json")
    regions = json.load(open(path))
    regions[2]["regions"].append({"region_id": 9, "image_id": 12, "phrase": "a blue dog", "x": 0, "y": 0,
                                  "width": 1, "height": 1})
    write_json(path, regions)
    os.utime(path, (1, 1))  # a changed file: new size and time
    rebuilt = data.caption_index("coco_vg", root, "train", tok)
    assert rebuilt.folder != index.folder and len(rebuilt) == len(index) + 1


def test_missing_image_named_when_indexing(root):
    os.remove(os.path.join(root, "coco/val2014/COCO_val2014_000000000002.jpg"))
    with pytest.raises(data.DataError, match="COCO_val2014_000000000002.jpg: image file not found"):
        data.caption_index("coco", root, "train", data.Tokenizer(os.path.join(root, "vocab.txt")))


def test_empty_captions_dropped(root):
    path = os.path.join(root, "coco/dataset_coco.json")
    d = json.load(open(path))
    d["images"][0]["sentences"][0]["raw"] = "   "
    write_json(path, d)
    index = data.caption_index("coco", root, "train", data.Tokenizer(os.path.join(root, "vocab.txt")))
    assert len(index) == 3
    assert json.load(open(os.path.join(index.folder, "info.json")))["empty_dropped"] == 1


# ---- masking and negatives (the tokenizer: tests/test_tokenizer.py)

def write_masking_vocab(path, words=500):
    """Special tokens at ids 0-14 ([PAD] [UNK] [CLS] [SEP] [MASK] and ten [unusedN], as in BERT's
    vocab.txt), then `words` ordinary word pieces."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"[unused{i}]" for i in range(10)]]
    with open(path, "w") as f:
        f.write("\n".join([*specials, *[f"word{i}" for i in range(words)], *[f"##s{i}" for i in range(5)]]) + "\n")
    return str(path), len(specials)


def test_mlm_masking_statistics(tmp_path):
    vocab, n_special = write_masking_vocab(tmp_path / "vocab.txt")
    tok = data.Tokenizer(vocab)
    ids = np.array([tok.cls_id] + list(range(n_special + 100, n_special + 130)) + [tok.sep_id])
    rng = np.random.default_rng(0)
    chosen = masked = swapped = kept = 0
    drawn = []  # what the random-replacement branch put into the text
    for _ in range(3000):
        inputs, labels = data.mask_tokens(ids, rng, tok)
        assert labels[0] == labels[-1] == data.IGNORE and inputs[0] == tok.cls_id and inputs[-1] == tok.sep_id
        sel = labels != data.IGNORE
        assert (labels[sel] == ids[sel]).all() and sel.any()
        chosen += sel.sum()
        masked += (inputs[sel] == tok.mask_id).sum()
        kept += (inputs[sel] == ids[sel]).sum()
        swap = sel & (inputs != ids) & (inputs != tok.mask_id)
        swapped += swap.sum()
        drawn += inputs[swap].tolist()
        assert (inputs[~sel] == ids[~sel]).all()
    n = 3000 * 30
    assert abs(chosen / n - 0.15) < 0.005
    # "unchanged" also catches random draws that hit the original token (1 in 505)
    assert abs(masked / chosen - 0.8) < 0.015 and abs(swapped / chosen - 0.1) < 0.01 and abs(kept / chosen - 0.1) < 0.01
    # Random replacements are ordinary word pieces only: never [PAD] [UNK] [CLS] [SEP] [MASK] or [unusedN]
    # (ids 0-14; 3% of a uniform draw over this vocabulary, ~40 of these ~1,350 draws), and spread
    # over the whole vocabulary (~470 distinct of 505 expected), word and ##suffix pieces alike.
    drawn = np.array(drawn)
    assert len(drawn) > 1000 and drawn.min() >= n_special and drawn.max() < tok.vocab_size
    assert len(set(drawn.tolist())) > 400 and (drawn >= n_special + 500).any()
    one = data.mask_tokens(np.array([tok.cls_id, 20, tok.sep_id]), rng, tok, prob=1e-9)[1]
    assert (one != data.IGNORE).sum() == 1  # at least one piece per caption
    none = data.mask_tokens(ids, rng, tok, prob=0.0)[1]
    assert (none == data.IGNORE).all()  # prob 0: MLM switched off (--tasks itm)


@pytest.mark.parametrize("n", [1, 2, 5, 20])
def test_mask_rate_with_and_without_the_forced_mask(n, tmp_path):
    """Short captions (Visual Genome phrases): forcing one masked piece per caption raises the real
    rate to p + (1 - p)**n / n (n = 5: 23.9%; n = 1: 100%); --no-mask-at-least-one keeps it at p for
    every length, and a caption draws nothing with probability (1 - p)**n. 20,000 captions each:
    the bounds are 5 standard errors wide."""
    vocab, n_special = write_masking_vocab(tmp_path / "vocab.txt")
    tok = data.Tokenizer(vocab)
    ids = np.array([tok.cls_id] + list(range(n_special, n_special + n)) + [tok.sep_id])
    p, trials = 0.15, 20000
    for at_least_one, rate, empty in ((True, p + (1 - p) ** n / n, 0.0), (False, p, (1 - p) ** n)):
        rng = np.random.default_rng(n)
        counts = np.array([(data.mask_tokens(ids, rng, tok, p, at_least_one)[1] != data.IGNORE).sum()
                           for _ in range(trials)])
        per_piece = counts.sum() / (trials * n)
        assert abs(per_piece - rate) < 5 * np.sqrt(p * (1 - p) / (trials * n)) + 1e-9, (at_least_one, per_piece, rate)
        assert abs((counts == 0).mean() - empty) < 5 * np.sqrt(empty * (1 - empty) / trials) + 1e-9
    assert p + (1 - p) ** 5 / 5 == pytest.approx(0.2387, abs=1e-4)


def test_pretrain_pairs_pass_the_masking_rule_on(root):
    """PretrainPairs (pretrain.py's --mask-at-least-one / --no-mask-at-least-one) applies the rule:
    at a tiny rate every caption has its one forced masked piece, or none at all."""
    tok = data.Tokenizer(os.path.join(root, "vocab.txt"))
    index = data.caption_index("coco_vg", root, "train", tok)
    for at_least_one, expected in ((True, 1), (False, 0)):
        pairs = data.PretrainPairs(index, tok, 32, 64, itm_neg_prob=0.0, mask_prob=1e-9, captions_per_image=2,
                                   mask_at_least_one=at_least_one)
        masked = [sum(label != data.IGNORE for label in pair["mlm_labels"]) for i in range(len(index))
                  for pair in pairs[0, i]["pairs"]]
        assert masked == [expected] * (2 * len(index))


def test_mlm_random_replacement_never_draws_special_tokens(tmp_path):
    """Every chosen piece of long captions, 20,000 random replacements: none is a special token,
    with the special tokens spread through the vocabulary (BERT's [unusedN] sit at ids 1-998)."""
    tokens = ["[PAD]", "[UNK]"] + [f"w{i}" if i % 7 else f"[unused{i}]" for i in range(200)] + [
        "[CLS]", "[SEP]", "[MASK]"]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    tok = data.Tokenizer(str(tmp_path / "vocab.txt"))
    special = {i for i, t in enumerate(tokens) if t.startswith("[")}
    ids = np.array([tok.cls_id] + [tokens.index("w1")] * 200 + [tok.sep_id])
    rng = np.random.default_rng(1)
    drawn = []
    for _ in range(1000):
        inputs, labels = data.mask_tokens(ids, rng, tok, prob=1.0)
        swap = (inputs != ids) & (inputs != tok.mask_id)
        drawn += inputs[swap].tolist()
    assert len(drawn) > 15000 and not special & set(drawn)
    assert set(drawn) | {tokens.index("w1")} == set(range(len(tokens))) - special  # every ordinary piece


def test_itm_negatives_never_same_image(root):
    tok = data.Tokenizer(os.path.join(root, "vocab.txt"))
    index = data.caption_index("coco_vg", root, "train", tok)
    pairs = data.PretrainPairs(index, tok, 64, 96, seed=3)
    captions = {tuple(tok.wrap(index.caption_pieces(i).tolist())): index.caption_image[i] for i in range(len(index))}
    negatives = 0
    for epoch in range(30):
        for i in range(len(index)):
            item = pairs[(epoch, i)]["pairs"][0]
            owner = captions[tuple(item["input_ids"])]
            if item["itm_labels"]:
                assert owner == index.caption_image[i] and (np.array(item["mlm_labels"]) != data.IGNORE).any()
            else:
                negatives += 1
                assert owner != index.caption_image[i] and (np.array(item["mlm_labels"]) == data.IGNORE).all()
                assert item["mlm_ids"] != item["input_ids"] or tok.mask_id not in item["mlm_ids"]
    assert 0.4 < negatives / (30 * len(index)) < 0.6
    assert pairs[(5, 2)]["pairs"] == pairs[(5, 2)]["pairs"]  # a pure function of (epoch, index)
    with_neg = data.PretrainPairs(index, tok, 64, 96, seed=3, mlm_on_negatives=True)
    neg_item = next(p for e in range(50) for p in with_neg[(e, 0)]["pairs"] if not p["itm_labels"])
    assert (np.array(neg_item["mlm_labels"]) != data.IGNORE).any()


# ---- images and batches

def test_collate_pads_to_multiples_of_64():
    items = [{"image": torch.full((3, 100, 150), 7, dtype=torch.uint8), "input_ids": [2, 9, 3],
              "mlm_labels": [-100, 9, -100],
              "itm_labels": 1},
             {"image": torch.full((3, 130, 60), 9, dtype=torch.uint8), "input_ids": [2, 3], "mlm_labels": [-100, -100],
              "itm_labels": 0}]
    b = data.collate(items)
    assert b["images"].shape == (2, 3, 192, 192) and b["image_mask"].shape == (2, 192, 192)
    assert b["image_mask"][0, :100, :150].all() and b["image_mask"][0].sum() == 100 * 150
    assert b["image_mask"][1].sum() == 130 * 60 and (b["images"][1][:, 130:] == 0).all()
    assert b["input_ids"].tolist() == [[2, 9, 3], [2, 3, 0]]
    assert b["text_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert b["mlm_labels"][1].tolist() == [-100, -100, -100] and b["itm_labels"].tolist() == [1, 0]


def test_resize_rule():
    img = Image.new("RGB", (640, 480))
    assert data.resize_image(img, 800, 1333).size == (1067, 800)
    assert data.resize_image(Image.new("RGB", (2000, 500)), 800, 1333).size == (1333, 333)
    assert data.resize_image(Image.new("RGB", (1, 1)), 800, 1333).size == (800, 800)


def test_image_modes_and_orientation(tmp_path):
    p = str(tmp_path / "rot.jpg")
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(p, exif=exif)
    upright = data.load_image(p)
    assert upright.size == (20, 40) and upright.getpixel((10, 2))[2] > 200  # blue on top after rotation
    gray16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    gray16.save(tmp_path / "g16.png")
    assert data.load_image(str(tmp_path / "g16.png")).getpixel((0, 0)) == (255, 255, 255)
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "half.png")
    assert 120 < data.load_image(str(tmp_path / "half.png")).getpixel((0, 0))[0] < 135  # scaled, not clipped
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "alpha.png")
    assert data.load_image(str(tmp_path / "alpha.png")).getpixel((0, 0)) == (255, 255, 255)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = data.load_image(str(tmp_path / "cmyk.jpg")).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    Image.new("P", (8, 8)).save(tmp_path / "pal.png")
    assert data.load_image(str(tmp_path / "pal.png")).mode == "RGB"


def test_bad_images_are_clear_errors(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("truncated.jpg", "text.jpg", "empty.jpg"):
        with pytest.raises(data.DataError, match=f"{name}: cannot decode the image"):
            data.load_image(str(tmp_path / name))
    with pytest.raises(data.DataError, match="missing.jpg: image file not found"):
        data.load_image(str(tmp_path / "missing.jpg"))


# ---- classification images (pretrain_cnn.py): ImageNet's folder layout

def test_class_folders_numbered_as_torchvision_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder
    for rel in ("train/zebra/b.JPEG", "train/zebra/a.png", "train/zebra/deeper/c.jpg", "train/ant/x.webp",
                "train/mole/y.jpeg"):
        write_image(str(tmp_path / "imagenet" / rel))
    (tmp_path / "imagenet/train/ant/notes.txt").write_text("not an image")
    paths, labels, classes = data.class_folder_entries(str(tmp_path), "train")
    reference = ImageFolder(str(tmp_path / "imagenet/train"))
    assert classes == reference.classes == ["ant", "mole", "zebra"]
    assert list(zip(paths, labels)) == reference.samples


def test_class_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(data.DataError, match="imagenet/train is missing. Get a folder per class"):
        data.class_folder_entries(str(tmp_path), "train")
    os.makedirs(tmp_path / "imagenet/val")
    with pytest.raises(data.DataError, match="imagenet/val: no class folders"):
        data.class_folder_entries(str(tmp_path), "val")
    write_image(str(tmp_path / "imagenet/val/cat/1.jpg"))
    (tmp_path / "imagenet/val/dog").mkdir()
    with pytest.raises(data.DataError, match="imagenet/val/dog: no images"):
        data.class_folder_entries(str(tmp_path), "val")


@pytest.mark.parametrize("size", [(150, 100), (133, 100), (100, 133), (112, 112), (101, 300), (120, 113)])
def test_centre_square_is_torchvision_resize_and_centre_crop(size):
    from torchvision import transforms
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = np.asarray(data.centre_square(img, 112))
    reference = np.asarray(transforms.Compose([transforms.Resize(112), transforms.CenterCrop(112)])(img))
    assert ours.shape == (112, 112, 3) and np.array_equal(ours, reference)


def test_class_images_skip_unreadable_ones(tmp_path):
    write_image(str(tmp_path / "ok.png"), size=(80, 60))
    (tmp_path / "bad.png").write_text("not an image")
    paths = [str(tmp_path / "ok.png"), str(tmp_path / "bad.png")]
    with pytest.raises(data.DataError, match="bad.png: cannot decode"):
        data.ClassImages(paths, [3, 5], 48)[1]
    items = data.ClassImages(paths, [3, 5], 48, skip_bad_images=True)
    batch = data.collate_classes([items[0], items[1]])
    assert batch["images"].shape == (1, 3, 48, 48) and batch["images"].dtype == torch.uint8
    assert batch["labels"].tolist() == [3] and "bad.png" in batch["bad_images"][0]


def test_normalize_images():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = data.normalize_images(x)
    assert torch.allclose(out[0, :, 0, 0], (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD))


# ---- sampler

def test_sampler_same_micro_batches_for_any_process_split():
    one = data.MicroBatchSampler(100, 4, world_size=1, rank=0, accum=2, seed=1)
    two = [data.MicroBatchSampler(100, 4, world_size=2, rank=r, accum=1, seed=1) for r in range(2)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 12
    a = list(one)
    b0, b1 = list(two[0]), list(two[1])
    assert [x for step in zip(b0, b1) for x in step] == a
    keys = [k for batch in a for k in batch]
    assert len(set(keys)) == len(keys) == 96 and all(k[0] == 0 for k in keys)
    one.set_position(3, 5)  # resume mid-epoch
    resumed = list(one)
    one.set_position(3, 0)
    assert resumed == list(one)[10:] and resumed[0][0][0] == 3
    one.set_position(4)
    assert list(one) != resumed


def test_sampler_groups_aspect_ratios():
    groups = np.array([0, 1] * 50)
    s = data.MicroBatchSampler(100, 8, seed=0, group_ids=groups)
    batches = list(s)
    assert len(batches) == 12
    pure = [len({groups[i] for _, i in b}) == 1 for b in batches]
    assert sum(pure) >= 11  # at most the leftover batch mixes groups
    with pytest.raises(data.DataError, match="cannot fill one step"):
        data.MicroBatchSampler(10, 8, world_size=2)


def test_several_captions_share_one_image(root):
    tok = data.Tokenizer(os.path.join(root, "vocab.txt"))
    index = data.caption_index("coco_vg", root, "train", tok)
    pairs = data.PretrainPairs(index, tok, 64, 96, seed=1, captions_per_image=3, itm_neg_prob=0.0)
    item = pairs[(0, 2)]  # caption 2 belongs to image 1 (COCO 2 + VG 10: four captions)
    own = {tuple(tok.wrap(index.caption_pieces(c).tolist())) for c in range(len(index)) if index.caption_image[c] == 1}
    texts = [tuple(p["input_ids"]) for p in item["pairs"]]
    assert len(texts) == 3 and len(set(texts)) == 3 and set(texts) <= own
    assert texts[0] == tuple(tok.wrap(index.caption_pieces(2).tolist()))
    batch = data.collate([item, pairs[(0, 0)]])
    assert batch["images"].shape[0] == 2 and batch["input_ids"].shape[0] == 6
    assert batch["image_index"].tolist() == [0, 0, 0, 1, 1, 1]
    sampler = data.MicroBatchSampler(len(index), 2, seed=0, epoch_size=len(index) // 3)
    assert sampler.steps_per_epoch == 1 and len(list(sampler)[0]) == 2
