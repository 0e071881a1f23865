"""synthetic.py: the demo corpus has every official file in its official schema, every sentence is
true of its scene, the bytes depend only on (seed, scale), and its own vocab covers all its text."""

import hashlib
import json
import re
from collections import Counter

import pytest
from PIL import Image

from tools import synthetic

SCALE = 0.02
COLOURS, SHAPES = "|".join(synthetic.COLOURS), "|".join(synthetic.SHAPES)
NUMBER = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
FILES = ["vocab.txt", "scenes.json", "DEMO_CORPUS.json", "coco/dataset_coco.json",
         "coco/annotations/captions_train2014.json", "vg/region_descriptions.json", "vg/image_data.json",
         "flickr30k/dataset_flickr30k.json", "nlvr2/data/train.json", "nlvr2/data/dev.json", "nlvr2/data/test1.json"]
FILES += [f"vqa/v2_OpenEnded_mscoco_{s}_questions.json" for s in ("train2014", "val2014", "test2015", "test-dev2015")]
FILES += [f"vqa/v2_mscoco_{s}_annotations.json" for s in ("train2014", "val2014")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthetic.write_demo_corpus(tmp_path_factory.mktemp("corpus") / "demo", seed=0, scale=SCALE)


def load(root, relpath):
    return json.loads((root / relpath).read_text())


def load_nlvr2(root, split):
    return [json.loads(line) for line in (root / f"nlvr2/data/{split}.json").read_text().splitlines()]


def digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


_scenes = {}


def load_scenes(root):  # scenes.json: image path -> the objects drawn in it
    if root not in _scenes:
        _scenes[root] = load(root, "scenes.json")
    return _scenes[root]


def check_image(root, relpath, width=None, height=None):
    """The image exists, decodes, and has the size its scene (and the annotation, if given) records."""
    scene = load_scenes(root)[relpath]
    with Image.open(root / relpath) as image:
        assert image.size == (scene["width"], scene["height"]) == (width or scene["width"], height or scene["height"])
        assert image.mode == "RGB"


def normalise(answer):  # the parts of the official VQA answer normalisation our variants need
    words = re.sub(r"[.,?!]", "", answer.lower()).split()
    digits = {w: str(i) for i, w in enumerate(["zero", "one", "two", "three", "four", "five"])}
    return " ".join(digits.get(w, w) for w in words if w not in ("a", "an", "the"))


def check_grounded(text, objects):
    """Every look mentioned exists, every count is exact, every relation holds by the margin."""
    text = text.lower()

    def matching(colour, shape):
        return [o for o in objects if o["colour"] == colour and o["shape"] == shape]

    for colour, shape in re.findall(rf"\b({COLOURS}) ({SHAPES})", text):
        assert matching(colour, shape), (text, objects)
    for number, colour, shape in re.findall(rf"\b(two|three|four) (?:({COLOURS}) )?({SHAPES})s\b", text):
        assert NUMBER[number] == sum(o["shape"] == shape and colour in ("", o["colour"]) for o in objects), text
    for number in re.findall(r"\b(two|three|four) shapes\b", text):
        assert NUMBER[number] == len(objects), text
    for number in re.findall(r"\b(one|two|three) other shapes?\b", text):
        assert NUMBER[number] == len(objects) - 1, text
    for c1, s1, rel, c2, s2 in re.findall(rf"({COLOURS}) ({SHAPES}) (left of|right of|above|below) (?:an? |the )?"
                                          rf"({COLOURS}) ({SHAPES})", text):
        assert any(offset(a, b, rel) > synthetic.MARGIN
                   for a in matching(c1, s1) for b in matching(c2, s2) if a is not b), (text, objects)


def offset(a, b, relation):
    """How far (px, between centres) object a is `relation` object b; negative: the other way."""
    axis, sign = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}[relation]
    return sign * (b["centre"][axis] - a["centre"][axis])


def test_every_file_exists_and_parses(corpus):
    for relpath in FILES:
        assert (corpus / relpath).is_file(), relpath
        if relpath.endswith(".json") and not relpath.startswith("nlvr2"):
            load(corpus, relpath)
    assert load(corpus, "DEMO_CORPUS.json")["format_version"] == synthetic.FORMAT_VERSION


def test_coco_karpathy_and_official_captions(corpus):
    karpathy = load(corpus, "coco/dataset_coco.json")
    assert karpathy["dataset"] == "coco"
    images = karpathy["images"]
    assert {im["split"] for im in images} == {"train", "restval", "val", "test"}
    sentids = [s["sentid"] for im in images for s in im["sentences"]]
    assert len(set(sentids)) == len(sentids) and len({im["cocoid"] for im in images}) == len(images)
    for imgid, im in enumerate(images):
        assert set(im) == {"filepath", "filename", "imgid", "split", "sentences", "sentids", "cocoid"}
        assert im["imgid"] == imgid and isinstance(im["cocoid"], int)
        assert im["filepath"] == ("train2014" if im["split"] == "train" else "val2014")
        assert im["filename"] == f"COCO_{im['filepath']}_{im['cocoid']:012d}.jpg"
        assert len(im["sentences"]) == 5 and im["sentids"] == [s["sentid"] for s in im["sentences"]]
        for s in im["sentences"]:
            assert set(s) == {"tokens", "raw", "imgid", "sentid"} and s["imgid"] == imgid
            assert s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())  # Karpathy: words, no punctuation
        check_image(corpus, f"coco/{im['filepath']}/{im['filename']}")
    official = load(corpus, "coco/annotations/captions_train2014.json")
    assert set(official) >= {"info", "licenses", "images", "annotations"}
    train = {im["cocoid"]: im for im in images if im["split"] == "train"}
    assert {im["id"] for im in official["images"]} == set(train)
    for im in official["images"]:
        assert im["file_name"] == train[im["id"]]["filename"]
        check_image(corpus, f"coco/train2014/{im['file_name']}", im["width"], im["height"])
    by_image = Counter(a["image_id"] for a in official["annotations"])
    assert all(by_image[cid] == 5 for cid in train)
    for a in official["annotations"]:
        assert isinstance(a["id"], int) and a["caption"] in [s["raw"] for s in train[a["image_id"]]["sentences"]]


def test_vqa_questions_and_annotations(corpus):
    karpathy = load(corpus, "coco/dataset_coco.json")["images"]
    images = {"train2014": {im["cocoid"] for im in karpathy if im["filepath"] == "train2014"},
              "val2014": {im["cocoid"] for im in karpathy if im["filepath"] == "val2014"}}
    questions, all_ids = {}, []
    for subtype in ("train2014", "val2014", "test2015", "test-dev2015"):
        data = load(corpus, f"vqa/v2_OpenEnded_mscoco_{subtype}_questions.json")
        assert data["task_type"] == "Open-Ended" and data["data_type"] == "mscoco"
        assert data["data_subtype"] == subtype and {"info", "license"} <= set(data)
        questions[subtype] = {q["question_id"]: q for q in data["questions"]}
        for q in data["questions"]:
            assert set(q) == {"image_id", "question", "question_id"} and q["question"].endswith("?")
            assert q["question_id"] // 1000 == q["image_id"]
        if subtype != "test-dev2015":
            all_ids += list(questions[subtype])
    assert len(all_ids) == len(set(all_ids)), "question ids must be unique across files"
    assert 0 < len(questions["test-dev2015"]) < len(questions["test2015"])
    assert set(questions["test-dev2015"]) <= set(questions["test2015"])
    for q in questions["test2015"].values():
        check_image(corpus, f"coco/test2015/COCO_test2015_{q['image_id']:012d}.jpg")
    for subtype in ("train2014", "val2014"):
        assert {q["image_id"] for q in questions[subtype].values()} == images[subtype]
        data = load(corpus, f"vqa/v2_mscoco_{subtype}_annotations.json")
        assert data["data_subtype"] == subtype and {"info", "license"} <= set(data)
        assert {a["question_id"] for a in data["annotations"]} == set(questions[subtype])
        for a in data["annotations"]:
            assert set(a) == {"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer",
                              "answers"}
            assert a["answer_type"] in ("yes/no", "number", "other")
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert all(x["answer_confidence"] in ("yes", "maybe", "no") for x in a["answers"])
            ranked = Counter(normalise(x["answer"]) for x in a["answers"]).most_common()
            assert ranked[0][0] == a["multiple_choice_answer"] and (len(ranked) == 1 or ranked[0][1] > ranked[1][1])


def test_vqa_answers_are_true_of_the_scene(corpus):
    scenes = load_scenes(corpus)
    questions = load(corpus, "vqa/v2_OpenEnded_mscoco_train2014_questions.json")["questions"]
    questions = {q["question_id"]: q["question"] for q in questions}
    checked = 0
    for a in load(corpus, "vqa/v2_mscoco_train2014_annotations.json")["annotations"]:
        q = questions[a["question_id"]]
        objects = scenes[f"coco/train2014/COCO_train2014_{a['image_id']:012d}.jpg"]["objects"]
        answers = {normalise(x["answer"]) for x in a["answers"]}
        if m := re.fullmatch(rf"how many ({SHAPES})s are there\?", q):
            truth = str(sum(o["shape"] == m[1] for o in objects))
        elif m := re.fullmatch(rf"is there an? ({COLOURS}) ({SHAPES})\?", q):
            truth = "yes" if any((o["colour"], o["shape"]) == (m[1], m[2]) for o in objects) else "no"
        elif m := re.fullmatch(rf"what color is the ({SHAPES})\?", q):
            (truth,) = [o["colour"] for o in objects if o["shape"] == m[1]]
        else:
            continue
        assert truth in answers, (q, objects, a["answers"])  # at least one annotator is right
        checked += 1
    assert checked > 20


def test_visual_genome(corpus):
    image_data, regions = load(corpus, "vg/image_data.json"), load(corpus, "vg/region_descriptions.json")
    karpathy = {im["cocoid"]: im for im in load(corpus, "coco/dataset_coco.json")["images"]}
    assert [im["image_id"] for im in image_data] == [r["id"] for r in regions]
    shared = [im for im in image_data if im["coco_id"] is not None]
    assert 0.2 <= len(shared) / len(image_data) <= 0.4
    assert any(karpathy[im["coco_id"]]["split"] in ("val", "test") for im in shared), "some VG images are COCO val/test"
    folders = set()
    for im, r in zip(image_data, regions):
        assert set(im) == {"image_id", "url", "width", "height", "coco_id", "flickr_id"} and im["flickr_id"] is None
        folder, name = im["url"].split("/")[-2:]
        assert folder in ("VG_100K", "VG_100K_2") and name == f"{im['image_id']}.jpg"
        folders.add(folder)
        check_image(corpus, f"vg/{folder}/{name}", im["width"], im["height"])
        if im["coco_id"] is not None:
            coco = karpathy[im["coco_id"]]
            same_picture = corpus / "coco" / coco["filepath"] / coco["filename"]
            assert (corpus / f"vg/{folder}/{name}").read_bytes() == same_picture.read_bytes()
        objects = load_scenes(corpus)[f"vg/{folder}/{name}"]["objects"]
        assert 6 <= len(r["regions"]) <= 10
        for region in r["regions"]:
            assert set(region) == {"region_id", "image_id", "phrase", "x", "y", "width", "height"}
            assert region["image_id"] == im["image_id"]
            assert 0 <= region["x"] < region["x"] + region["width"] <= im["width"]
            assert 0 <= region["y"] < region["y"] + region["height"] <= im["height"]
            check_grounded(region["phrase"], objects)
    assert folders == {"VG_100K", "VG_100K_2"}
    region_ids = [region["region_id"] for r in regions for region in r["regions"]]
    assert len(set(region_ids)) == len(region_ids)


def test_flickr30k(corpus):
    data = load(corpus, "flickr30k/dataset_flickr30k.json")
    assert data["dataset"] == "flickr30k"
    assert {im["split"] for im in data["images"]} == {"train", "val", "test"}
    for imgid, im in enumerate(data["images"]):
        assert set(im) == {"filename", "imgid", "split", "sentences", "sentids"} and im["imgid"] == imgid
        assert re.fullmatch(r"\d+\.jpg", im["filename"]) and len(im["sentences"]) == 5
        check_image(corpus, f"flickr30k/images/{im['filename']}")


def test_captions_are_grounded(corpus):
    scenes = load_scenes(corpus)
    for im in load(corpus, "coco/dataset_coco.json")["images"]:
        for s in im["sentences"]:
            check_grounded(s["raw"], scenes[f"coco/{im['filepath']}/{im['filename']}"]["objects"])
        assert len({s["raw"] for s in im["sentences"]}) == 5
    for im in load(corpus, "flickr30k/dataset_flickr30k.json")["images"]:
        for s in im["sentences"]:
            check_grounded(s["raw"], scenes[f"flickr30k/images/{im['filename']}"]["objects"])


def test_captions_of_other_images_are_rarely_true(corpus):
    """ITM's negatives are captions of other images: few of them may be true of this image, or
    the "mismatched" label is wrong (a look alone, "a red circle.", is true of one image in seven)."""
    scenes, images = load_scenes(corpus), load(corpus, "coco/dataset_coco.json")["images"]
    true = total = 0
    for im, other in zip(images, images[1:] + images[:1]):
        objects = scenes[f"coco/{im['filepath']}/{im['filename']}"]["objects"]
        for s in other["sentences"]:
            try:
                check_grounded(s["raw"], objects)
                true += 1
            except AssertionError:
                pass
            total += 1
    assert true / total < 0.06, (true, total)


def test_nlvr2(corpus):
    scenes = load_scenes(corpus)
    for split in ("train", "dev", "test1"):
        records = load_nlvr2(corpus, split)
        labels = Counter(r["label"] for r in records)
        assert set(labels) == {"True", "False"} and min(labels.values()) >= 0.3 * len(records)
        groups = {}
        for r in records:
            keys = {"identifier", "sentence", "label", "left_url", "right_url", "synset", "query", "writer",
                    "validation", "extra_validations"}
            assert set(r) == (keys | {"directory"} if split == "train" else keys)
            prefix, set_id, pair_id, sentence_id = r["identifier"].rsplit("-", 3)
            assert prefix == split
            folder = f"train/{r['directory']}" if split == "train" else split
            left, right = (f"nlvr2/images/{folder}/{r['identifier'].rsplit('-', 1)[0]}-img{k}.png" for k in (0, 1))
            check_image(corpus, left)
            check_image(corpus, right)
            groups.setdefault((set_id, sentence_id), []).append(r["label"])
            check_statement(r["sentence"], r["label"], scenes[left]["objects"], scenes[right]["objects"])
        # NLVR2's consistency metric groups a sentence's pairs: 2-4 of them, labels not all equal
        assert all(2 <= len(g) <= 4 and len(set(g)) == 2 for g in groups.values())


def check_statement(sentence, label, left, right):
    """Recheck the simplest NLVR2 statement kinds independently of synthetic.py."""
    text, expected = sentence.lower().rstrip("."), label == "True"

    def has(objs, colour, shape):
        return any(o["colour"] == colour and o["shape"] == shape for o in objs)

    if m := re.fullmatch(rf"the (left|right) image contains exactly (\w+) ({SHAPES})s?", text):
        objs = left if m[1] == "left" else right
        assert (sum(o["shape"] == m[3] for o in objs) == NUMBER[m[2]]) == expected, sentence
    elif m := re.fullmatch(rf"both images contain an? ({COLOURS}) ({SHAPES})", text):
        assert (has(left, m[1], m[2]) and has(right, m[1], m[2])) == expected, sentence
    elif m := re.fullmatch(rf"each image contains at least one ({COLOURS}) shape", text):
        assert all(any(o["colour"] == m[1] for o in objs) for objs in (left, right)) == expected, sentence
    elif m := re.fullmatch(rf"the (left|right) image contains an? ({COLOURS}) object (left of|right of|above|below) "
                           rf"an? ({COLOURS}) object", text):
        objs = left if m[1] == "left" else right
        offsets = [offset(a, b, m[3]) for a in objs for b in objs if a["colour"] == m[2] and b["colour"] == m[4]]
        # true: some pair clearly in the relation; false: no pair in it at all (ambiguous pairs are never used)
        assert (max(offsets, default=0) > synthetic.MARGIN) if expected else max(offsets, default=0) <= 0, sentence


def test_imagenet_pictures_show_their_class(corpus):
    """ImageNet's folder layout, a class per colour x shape, and each picture is one object of its
    class: its pixels have the class colour and fill their bounding box as the shape does
    (square 1, circle pi/4, triangle 1/2)."""
    import numpy as np
    classes = sorted(f"{c}_{s}" for c in synthetic.COLOURS for s in synthetic.SHAPES)
    for split, count in (("train", max(2, round(200 * SCALE))), ("val", 2)):
        folder = corpus / "imagenet" / split
        assert sorted(p.name for p in folder.iterdir()) == classes
        for name in classes:
            files = sorted((folder / name).iterdir())
            assert len(files) == count and all(f.suffix == ".JPEG" for f in files)
            colour, shape = name.split("_")
            for f in files:
                pixels = np.asarray(Image.open(f).convert("RGB")).astype(int)
                near = np.abs(pixels - synthetic.COLOURS[colour]).sum(-1) < 60
                ys, xs = np.nonzero(near)
                fill = near.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
                assert {"square": 0.9 < fill, "circle": 0.65 < fill < 0.9, "triangle": fill < 0.65}[shape], (f, fill)


def test_vocab_covers_all_text(corpus):
    from tokenizers import BertWordPieceTokenizer

    vocab = (corpus / "vocab.txt").read_text().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) == len(set(vocab))
    tokenizer = BertWordPieceTokenizer(str(corpus / "vocab.txt"), lowercase=True)
    texts = [s["raw"] for name in ("coco/dataset_coco.json", "flickr30k/dataset_flickr30k.json")
             for im in load(corpus, name)["images"] for s in im["sentences"]]
    texts += [region["phrase"] for r in load(corpus, "vg/region_descriptions.json") for region in r["regions"]]
    for subtype in ("train2014", "val2014", "test2015"):
        texts += [q["question"] for q in load(corpus, f"vqa/v2_OpenEnded_mscoco_{subtype}_questions.json")["questions"]]
    for subtype in ("train2014", "val2014"):
        texts += [x["answer"] for a in load(corpus, f"vqa/v2_mscoco_{subtype}_annotations.json")["annotations"]
                  for x in a["answers"]]
    texts += [r["sentence"] for split in ("train", "dev", "test1") for r in load_nlvr2(corpus, split)]
    for encoding in tokenizer.encode_batch(texts):
        assert 1 not in encoding.ids
    assert tokenizer.token_to_id("[PAD]") == 0
    assert 1 not in tokenizer.encode("a zebra left of 7 quokkas").ids  # unseen words fall back to characters


def test_same_seed_same_bytes_other_seed_other_data(corpus, tmp_path):
    again = synthetic.write_demo_corpus(tmp_path / "again", seed=0, scale=SCALE)
    assert digest(again) == digest(corpus)
    other = synthetic.write_demo_corpus(tmp_path / "other", seed=1, scale=SCALE)
    assert digest(other) != digest(corpus)
    assert (other / "coco/dataset_coco.json").read_bytes() != (corpus / "coco/dataset_coco.json").read_bytes()


def test_ensure_demo_corpus_reuses_or_regenerates(tmp_path, monkeypatch, capsys):
    root = synthetic.ensure_demo_corpus(tmp_path / "demo", seed=0, scale=0.01)
    assert "generating" in capsys.readouterr().out and (root / "DEMO_CORPUS.json").is_file()
    calls = []
    monkeypatch.setattr(synthetic, "write_demo_corpus", lambda *args: calls.append(args))
    assert synthetic.ensure_demo_corpus(root, seed=0, scale=0.01) == root and calls == []
    assert synthetic.ensure_demo_corpus(root) == root and calls == [], "any scale is fine when none is asked"
    synthetic.ensure_demo_corpus(root, seed=1, scale=0.01)
    assert calls == [(root, 1, 0.01)], "a different seed must regenerate"
    (root / "DEMO_CORPUS.json").write_text((root / "DEMO_CORPUS.json").read_text().replace('"format_version": ',
                                                                                             '"format_version": -'))
    synthetic.ensure_demo_corpus(root)
    assert calls[-1] == (root, 0, 1.0), "an outdated corpus is rewritten, at the default seed and scale"


def test_refuses_to_overwrite_a_folder_that_is_not_a_demo_corpus(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo corpus"):
        synthetic.write_demo_corpus(tmp_path / "data", scale=0.01)
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["data"], "no temporary folder is left behind"
