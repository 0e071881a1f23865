"""
The built-in demo corpus: pictures of coloured circles, squares and triangles with captions, region
phrases, questions and statements, written in the official file formats and folder layout of COCO,
Visual Genome, VQA v2, Flickr30K and NLVR2, so that the demo runs through
exactly the loaders in data.py that read the real datasets; and, in ImageNet's folder layout,
pictures of single objects on which the demo's CNN first learns to see (pretrain_cnn.py).

Every sentence is true of its image and needs the image to check: colours, shapes, counts, and
left/right/above/below, stated only where it holds by a clear margin. All randomness comes from
numpy generators seeded by (seed, part), so a (seed, scale) pair always gives the same bytes.

    python synthetic.py --out data/demo --seed 0 --scale 1.0

Files under the output folder (counts at scale 1.0):
    coco/dataset_coco.json, coco/annotations/captions_train2014.json,
    coco/{train2014,val2014,test2015}/COCO_{subset}_{id:012d}.jpg
        Karpathy train 1500 (train2014), restval 300 / val 100 / test 100 (val2014), 5 captions each;
        test2015: 200 images that only have VQA questions
    vqa/v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json,
    vqa/v2_mscoco_{train2014,val2014}_annotations.json        about 5 questions per COCO image
    vg/region_descriptions.json, vg/image_data.json, vg/{VG_100K,VG_100K_2}/{image_id}.jpg
        800 images, 6-10 regions each; 30% are COCO images (coco_id), a few of them Karpathy val/test
    flickr30k/dataset_flickr30k.json, flickr30k/images/{id}.jpg      600 train / 100 val / 100 test
    nlvr2/data/{train,dev,test1}.json (JSON Lines), nlvr2/images/{train/{directory},dev,test1}/*.png
        about 1500 / 300 / 300 records
    imagenet/{train,val}/{colour}_{shape}/*.JPEG       ImageNet's folder layout, one object per picture
        18 classes, 200 train / 20 val pictures each: the CNN's classification pre-training (pretrain_cnn.py)
    vocab.txt          BERT WordPiece vocabulary covering all the text above
    scenes.json        image path -> scene (size, objects): a debugging aid, not an official format
    DEMO_CORPUS.json   marker: format version, seed, scale
"""

import argparse
import itertools
import json
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 3  # 2: captions that each pin down more than one fact; 3: imagenet/
MARKER = "DEMO_CORPUS.json"
SHAPES = ("circle", "square", "triangle")
COLOURS = {  # far apart in RGB, so a jittered, JPEG-compressed red never passes for orange
    "red": (215, 35, 35), "green": (40, 160, 60), "blue": (35, 75, 215),
    "yellow": (235, 205, 30), "purple": (135, 55, 175), "orange": (240, 130, 20),
}
NUMBERS = ("zero", "one", "two", "three", "four", "five")
RELATIONS = ("left of", "right of", "above", "below")
MARGIN = 24  # px between centres; closer than this a relation is neither stated nor denied
SHORT_SIDES, ASPECTS = (160, 192), ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3))  # varied, so loaders must pad
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] must be id 0, as in BERT
INFO = {"description": "Synthetic demo corpus of coloured shapes, written by synthetic.py", "url": "",
        "version": "1.0", "year": 2014, "contributor": "synthetic.py", "date_created": "2014-01-01 00:00:00"}

# -----------------------------------------------------------------------------
# Scenes and rendering


def sample_scene(rng):
    """An image size, a background and 2-4 non-overlapping objects: everything render() needs."""
    short, (aw, ah) = int(rng.choice(SHORT_SIDES)), ASPECTS[rng.integers(len(ASPECTS))]
    width, height = (round(short * aw / ah), short) if aw >= ah else (short, round(short * ah / aw))
    wanted, objects = int(rng.integers(2, 5)), []
    for _ in range(200):  # placement by rejection; a crowded image just keeps fewer objects
        size = int(rng.integers(12, 37))
        cx, cy = int(rng.integers(size + 2, width - size - 1)), int(rng.integers(size + 2, height - size - 1))
        if any(max(abs(cx - o["centre"][0]), abs(cy - o["centre"][1])) <= size + o["size"] + 4 for o in objects):
            continue
        if objects and rng.random() < 0.25:  # repeat a look now and then, so "two red circles" occurs
            twin = objects[rng.integers(len(objects))]
            shape, colour = twin["shape"], twin["colour"]
        else:
            shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
        objects.append(make_object(rng, shape, colour, cx, cy, size))
        if len(objects) == wanted:
            break
    if len(objects) < 2:
        return sample_scene(rng)
    return {"width": width, "height": height, "background": background(rng), "objects": objects}


def make_object(rng, shape, colour, cx, cy, size):
    rgb = [min(255, max(0, c + int(d))) for c, d in zip(COLOURS[colour], rng.integers(-12, 13, size=3))]
    return {"shape": shape, "colour": colour, "centre": [cx, cy], "size": size, "rgb": rgb}


def background(rng):
    """A light grey 3x4 field of random tints, smoothly upsampled: no one background value to key on."""
    tint = rng.integers(190, 236) + rng.integers(-6, 7, size=3) + rng.normal(0, 4, size=(3, 4, 3))
    return np.clip(tint, 0, 255).round().astype(int).tolist()


def object_picture(rng, shape, colour, side=112):
    """One object on its own, as an ImageNet picture shows one thing: the scene of a classification image.
    Its sizes match an object of a scene after the demo's resize (scenes' short side 160-192 -> 128)."""
    size = int(rng.integers(10, 31))
    cx, cy = (int(rng.integers(size + 2, side - size - 1)) for _ in range(2))
    return {"width": side, "height": side, "background": background(rng),
            "objects": [make_object(rng, shape, colour, cx, cy, size)]}


def render(scene):
    image = Image.fromarray(np.array(scene["background"], dtype=np.uint8))
    image = image.resize((scene["width"], scene["height"]), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for o in scene["objects"]:
        (x, y), s, fill = o["centre"], o["size"], tuple(o["rgb"])
        if o["shape"] == "circle":
            draw.ellipse([x - s, y - s, x + s, y + s], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
        else:
            draw.polygon([(x, y - s), (x - s, y + s), (x + s, y + s)], fill=fill)
    return image


def save_image(out, relpath, scene, scenes=None):
    """Render scene to out/relpath (format from the suffix) and record it for scenes.json."""
    (out / relpath).parent.mkdir(parents=True, exist_ok=True)
    render(scene).save(out / relpath, quality=90)  # quality applies to JPEG; PNG is lossless
    if scenes is not None:
        scenes[relpath] = scene


# -----------------------------------------------------------------------------
# Language: what can truthfully be said about a scene


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def describe(o, with_article=False):
    words = f"{o['colour']} {o['shape']}"
    return f"{article(words)} {words}" if with_article else words


def holds(a, b, relation):
    """Is a `relation` b? True past the margin, False if not at all, None (ambiguous) in between."""
    dx, dy = b["centre"][0] - a["centre"][0], b["centre"][1] - a["centre"][1]  # image y grows downwards
    d = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    return True if d > MARGIN else (False if d <= 0 else None)


def clear_relations(objects):  # between different-looking objects: "a red circle above a red circle" reads oddly
    return [(a, rel, b) for a in objects for b in objects if describe(a) != describe(b)
            for rel in RELATIONS if holds(a, b, rel)]


def pick_diverse(rng, groups, n):
    """Up to n distinct items, one from each group in turn (groups in random order), so that
    e.g. an image's five captions describe five different things."""
    pools = [[g[i] for i in rng.permutation(len(g))] for g in groups if g]
    order, picked = rng.permutation(len(pools)), []
    while len(picked) < n and any(pools):
        for i in order:
            if pools[i] and len(picked) < n:
                item = pools[i].pop()
                if item not in picked:
                    picked.append(item)
    return picked


def plural(word, k):
    return f"{NUMBERS[k]} {word}s" if k > 1 else f"{article(word)} {word}"


def composition(objects):
    """e.g. "two circles and a triangle": how many of each shape, largest group first."""
    parts = [plural(s, k) for s, k in sorted(Counter(o["shape"] for o in objects).items(), key=lambda sk: -sk[1])]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(rng, objects):
    """Five true sentences about one image, as COCO and Flickr30K have five captions per image.
    Each pins down more than one fact (a look and the number of shapes, two looks, a full count,
    a relation), so a caption of another image is rarely true of this one: ITM's negatives are
    captions of other images, and "a red circle" alone would be true of one image in seven."""
    total, others = NUMBERS[len(objects)], len(objects) - 1
    rest = f"{NUMBERS[others]} other shape{'s' if others > 1 else ''}"
    groups = [[f"{start}{describe(o, True)} {middle} {rest}" for o in objects
               for start, middle in (("", "and"), ("there is ", "with"))]]
    pairs = [(a, b) for i, a in enumerate(objects) for b in objects[i + 1:] if describe(a) != describe(b)]
    groups.append([f"{start} {describe(a, True)} and {describe(b, True)}" for a, b in pairs
                   for start in ("a picture with", "an image of")])
    counts = [f"{total} shapes: {composition(objects)}", f"there are {composition(objects)}"]
    counts += [f"{NUMBERS[k]} {c} {s}s" for (c, s), k in Counter((o["colour"], o["shape"]) for o in objects).items()
               if k > 1]
    groups.append(counts)
    groups.append([f"{there}{describe(a, True)} {rel} {describe(b, True)}" for a, rel, b in clear_relations(objects)
                   for there in ("", "there is ")])
    return [s[0].upper() + s[1:] + "." for s in pick_diverse(rng, groups, 5)]


def region_phrases(rng, scene):
    """6-10 Visual Genome (phrase, [x, y, w, h]) regions: single objects and related pairs."""
    objects, looks = scene["objects"], Counter(describe(o) for o in scene["objects"])

    def box(*objs):  # each side jittered a little, like a human-drawn box, and clipped to the image
        x0, y0 = (max(0, min(o["centre"][i] - o["size"] for o in objs) + int(rng.integers(-3, 4))) for i in (0, 1))
        x1 = min(scene["width"], max(o["centre"][0] + o["size"] for o in objs) + int(rng.integers(-3, 4)))
        y1 = min(scene["height"], max(o["centre"][1] + o["size"] for o in objs) + int(rng.integers(-3, 4)))
        return [x0, y0, x1 - x0, y1 - y0]

    groups = []
    for o in objects:
        phrases = [describe(o, True), describe(o), f"{describe(o)} on grey background"]
        phrases += [f"the {describe(o)}"] if looks[describe(o)] == 1 else []  # "the" needs it to be the only one
        groups.append([(p, box(o)) for p in phrases])
    groups.append([(p, box(a, b)) for a, rel, b in clear_relations(objects)
                   for p in (f"{describe(a)} {rel} {describe(b)}", f"{describe(a, True)} {rel} {describe(b, True)}")])
    return pick_diverse(rng, groups, int(rng.integers(6, 11)))


def questions(rng, objects):
    """About five VQA (question, answer, question_type, answer_type) tuples, each needing the image."""
    shapes, colours = Counter(o["shape"] for o in objects), Counter(o["colour"] for o in objects)
    looks = Counter((o["colour"], o["shape"]) for o in objects)
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in looks]
    present, missing = list(looks)[rng.integers(len(looks))], absent[rng.integers(len(absent))]
    groups = [  # "the circle" must pick out one object: asked only when the shape (or colour) is unique
        [(f"what color is the {o['shape']}?", o["colour"], "what color is the", "other")
         for o in objects if shapes[o["shape"]] == 1],
        [(f"what shape is the {o['colour']} object?", o["shape"], "what shape is the", "other")
         for o in objects if colours[o["colour"]] == 1],
        [(f"how many {s}s are there?", str(shapes[s]), "how many", "number") for s in SHAPES]
        + [("how many shapes are there?", str(len(objects)), "how many", "number")],
        # one present and one absent look, and only unequal counts compared: yes and no equally often
        [(f"is there {article(c)} {c} {s}?", answer, "is there a", "yes/no")
         for (c, s), answer in ((present, "yes"), (missing, "no"))],
        [(f"are there more {s}s than {t}s?", "yes" if shapes[s] > shapes[t] else "no", "are there", "yes/no")
         for s in SHAPES for t in SHAPES if shapes[s] != shapes[t]],
    ]
    relational = []
    for ref in objects:
        others = [o for o in objects if o is not ref]
        for rel in RELATIONS:
            verdicts = [holds(o, ref, rel) for o in others]
            # the reference must be unique, and exactly one object clearly in the relation to it
            if looks[(ref["colour"], ref["shape"])] == 1 and verdicts.count(True) == 1 and None not in verdicts:
                answer = others[verdicts.index(True)]["colour"]
                relational.append((f"what color is the shape {rel} the {describe(ref)}?", answer,
                                   "what color is the", "other"))
    return pick_diverse(rng, groups + [relational], 5)


def annotator_answers(rng, answer, answer_type):
    """Ten human answers with realistic disagreement, and their most common (canonical) answer."""
    r = rng.random()
    right = int(rng.integers(8, 11) if r < 0.75 else rng.integers(3, 7) if r < 0.95 else rng.integers(1, 3))
    if answer_type == "yes/no":
        wrong = ["no" if answer == "yes" else "yes"]
    elif answer_type == "number":
        wrong = [str(k) for k in (int(answer) - 1, int(answer) + 1) if k >= 0]
    else:
        wrong = [w for w in (COLOURS if answer in COLOURS else SHAPES) if w != answer]
    answers = [answer] * right + [wrong[rng.integers(len(wrong))] for _ in range(10 - right)]
    answers = [answers[i] for i in rng.permutation(10)]
    while True:  # a tie would leave multiple_choice_answer undefined: resolve it, for the right answer if tied
        ranked = Counter(answers).most_common()
        tied = [a for a, k in ranked if k == ranked[0][1]]
        if len(tied) == 1:
            break
        winner = answer if answer in tied else tied[0]
        answers[answers.index(next(a for a in tied if a != winner))] = winner
    records = []
    for i, a in enumerate(answers):
        confidence = ("yes", "maybe")[rng.random() < 0.2] if a == answer else ("yes", "maybe", "no")[rng.integers(3)]
        if rng.random() < 0.1:  # surface variants that the official answer normaliser maps back
            variants = [a.capitalize(), a + ".", a + " "]
            variants += [NUMBERS[int(a)]] if a.isdigit() else [f"a {a}"] if a in SHAPES else []
            a = variants[rng.integers(len(variants))]
        records.append({"answer": a, "answer_confidence": confidence, "answer_id": i + 1})
    return ranked[0][0], records


def random_statement(rng):
    """An NLVR2-style sentence about an image pair and its test: a function of the pair's object
    lists (left, right) that returns True, False, or None where the sentence would be ambiguous."""
    kind, this = int(rng.integers(6)), int(rng.integers(2))  # this: the image a one-sided sentence is about
    side, other = ("left", "right")[this], ("left", "right")[1 - this]
    colour, shape = list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
    look = f"{article(colour)} {colour} {shape}"

    def count(objs, colour=None, shape=None):
        return sum(colour in (None, o["colour"]) and shape in (None, o["shape"]) for o in objs)

    if kind == 0:
        n = int(rng.integers(1, 4))
        return (f"the {side} image contains exactly {NUMBERS[n]} {shape}{'s' * (n > 1)}",
                lambda pair: count(pair[this], shape=shape) == n)
    if kind == 1:
        return f"both images contain {look}", lambda pair: all(count(objs, colour, shape) for objs in pair)
    if kind == 2:
        return (f"exactly one image contains {look}",
                lambda pair: sum(count(objs, colour, shape) > 0 for objs in pair) == 1)
    if kind == 3:
        return (f"there are more {shape}s in the {side} image than in the {other} image",
                lambda pair: count(pair[this], shape=shape) > count(pair[1 - this], shape=shape))
    if kind == 4 and rng.random() < 0.5:
        return (f"each image contains at least one {colour} shape",
                lambda pair: all(count(objs, colour) for objs in pair))
    if kind == 4:
        return f"each image contains at least one {shape}", lambda pair: all(count(objs, shape=shape) for objs in pair)
    second, rel = [c for c in COLOURS if c != colour][rng.integers(len(COLOURS) - 1)], RELATIONS[rng.integers(4)]

    def relation_test(pair):
        verdicts = [holds(a, b, rel) for a in pair[this] for b in pair[this]
                    if a["colour"] == colour and b["colour"] == second]
        return True if True in verdicts else (None if None in verdicts else False)

    return (f"the {side} image contains {article(colour)} {colour} object {rel} {article(second)} {second} object",
            relation_test)


def nlvr2_set(rng):
    """One NLVR2 set: 2-4 image pairs and 1-2 sentences, each sentence labelled on every pair. A
    sentence's labels vary across its pairs, which is what NLVR2's consistency metric groups on."""
    text, test = random_statement(rng)
    # one pair true, one false, any others at random (in random order): varied within a set, balanced overall
    targets = [True, False] + [bool(rng.random() < 0.5) for _ in range(int(rng.integers(0, 3)))]
    targets = [targets[i] for i in rng.permutation(len(targets))]
    pairs = []
    for target in targets:
        for tries in itertools.count():  # rejection sampling; after many misses any unambiguous pair will do
            pair = (sample_scene(rng), sample_scene(rng))
            verdict = test([scene["objects"] for scene in pair])
            if verdict == target or (verdict is not None and tries > 300):
                break
        pairs.append(pair)
    sentences = [(text, [test([scene["objects"] for scene in pair]) for pair in pairs])]
    if rng.random() < 0.5:  # a second sentence on the same pairs, if one with varying labels turns up
        for _ in range(30):
            text2, test2 = random_statement(rng)
            labels = [test2([scene["objects"] for scene in pair]) for pair in pairs]
            if text2 != text and None not in labels and len(set(labels)) == 2:
                sentences.append((text2, labels))
                break
    return pairs, sentences


# -----------------------------------------------------------------------------
# Writing the datasets


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def karpathy_entry(rng, imgid, filename, split, scene, texts):
    """One image of a Karpathy split file (dataset_coco.json, dataset_flickr30k.json)."""
    raws = captions(rng, scene["objects"])
    texts += raws
    sentences = [{"tokens": re.findall(r"[a-z0-9]+", raw.lower()), "raw": raw, "imgid": imgid, "sentid": 5 * imgid + k}
                 for k, raw in enumerate(raws)]
    return {"filename": filename, "imgid": imgid, "split": split, "sentences": sentences,
            "sentids": [s["sentid"] for s in sentences]}


def write_coco(out, rng, n, scenes, texts):
    """COCO images, the Karpathy split file and the official train2014 captions file. Returns the
    images as (Karpathy split or None for test2015, subset, coco id, relative path, scene)."""
    subsets = [("train", "train2014", n(1500)), ("restval", "val2014", n(300)), ("val", "val2014", n(100)),
               ("test", "val2014", n(100)), (None, "test2015", n(200))]
    # sparse ids, unique across subsets, so that no loader can confuse an id with a list position
    ids, coco = iter(rng.choice(581_929, size=sum(k for _, _, k in subsets), replace=False) + 1), []
    for split, subset, k in subsets:
        for cid in sorted(int(next(ids)) for _ in range(k)):
            coco.append((split, subset, cid, f"coco/{subset}/COCO_{subset}_{cid:012d}.jpg", sample_scene(rng)))
            save_image(out, coco[-1][3], coco[-1][4], scenes)
    karpathy, images, annotations = [], [], []
    for imgid, (split, subset, cid, relpath, scene) in enumerate(c for c in coco if c[0]):
        entry = karpathy_entry(rng, imgid, relpath.split("/")[-1], split, scene, texts)
        karpathy.append({"filepath": subset, **entry, "cocoid": cid})
        if subset == "train2014":
            images.append({"license": 1, "file_name": entry["filename"], "coco_url": "", "height": scene["height"],
                           "width": scene["width"], "date_captured": "2014-01-01 00:00:00", "flickr_url": "",
                           "id": cid})
            annotations += [{"image_id": cid, "id": 1_000_000 + s["sentid"], "caption": s["raw"]}
                            for s in entry["sentences"]]
    write_json(out / "coco/dataset_coco.json", {"images": karpathy, "dataset": "coco"})
    write_json(out / "coco/annotations/captions_train2014.json",
               {"info": INFO, "licenses": [{"url": "", "id": 1, "name": "synthetic"}], "images": images,
                "annotations": annotations})
    return coco


def write_vqa(out, rng, coco, texts):
    """VQA v2 questions on every COCO image, annotations for train2014/val2014 (test answers are
    withheld, as in the real release); test-dev2015 is a quarter of test2015, with the same ids."""
    licence = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons Attribution 4.0"}
    test_images = [c[2] for c in coco if c[1] == "test2015"]
    test_dev = set(rng.choice(test_images, size=max(1, len(test_images) // 4), replace=False).tolist())
    files = {"train2014": [], "val2014": [], "test2015": [], "test-dev2015": []}
    annotations = {"train2014": [], "val2014": []}
    for split, subset, cid, relpath, scene in coco:
        for k, (question, answer, qtype, atype) in enumerate(questions(rng, scene["objects"])):
            qid = cid * 1000 + k  # the real ids follow this pattern, which keeps them unique across files
            files[subset].append({"image_id": cid, "question": question, "question_id": qid})
            files["test-dev2015"] += [files[subset][-1]] if cid in test_dev else []
            texts.append(question)
            if subset in annotations:
                majority, answers = annotator_answers(rng, answer, atype)
                texts += [a["answer"] for a in answers]
                annotations[subset].append({"question_id": qid, "image_id": cid, "question_type": qtype,
                                            "answer_type": atype, "multiple_choice_answer": majority,
                                            "answers": answers})
    for subtype, qs in files.items():
        write_json(out / f"vqa/v2_OpenEnded_mscoco_{subtype}_questions.json",
                   {"info": INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": licence,
                    "data_subtype": subtype, "questions": qs})
    for subtype, anns in annotations.items():
        write_json(out / f"vqa/v2_mscoco_{subtype}_annotations.json",
                   {"info": INFO, "license": licence, "data_type": "mscoco", "data_subtype": subtype,
                    "annotations": anns})


def write_visual_genome(out, rng, n, coco, scenes, texts):
    """Visual Genome with 30% of its images taken from COCO 2014 (same pixels, coco_id set), one or
    more of them Karpathy val/test images, which pre-training must leave out to keep evaluation clean."""
    count, coco2014 = n(800), [c for c in coco if c[0]]
    held_out = [i for i, c in enumerate(coco2014) if c[0] in ("val", "test")]
    first = held_out[rng.integers(len(held_out))]  # guaranteed even at tiny scales, so loaders are tested on it
    rest = rng.choice([i for i in range(len(coco2014)) if i != first], size=round(0.3 * count) - 1, replace=False)
    sources = [coco2014[i] for i in [first, *rest.tolist()]]
    sources += [None] * (count - len(sources))  # None: a picture of VG's own
    vg_ids = rng.choice(2_420_000, size=count, replace=False) + 1  # random order, so shared ones are spread out
    image_data, regions, region_id = [], [], 1
    for vid, source in sorted(zip(vg_ids.tolist(), sources), key=lambda pair: pair[0]):
        folder = "VG_100K_2" if rng.random() < 0.4 else "VG_100K"  # VG 1.2 has two folders; the url says which
        relpath = f"vg/{folder}/{vid}.jpg"
        if source is None:
            scene = sample_scene(rng)
            save_image(out, relpath, scene, scenes)
        else:
            scene, scenes[relpath] = source[4], source[4]
            (out / relpath).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / source[3], out / relpath)
        image_data.append({"image_id": vid, "url": f"https://cs.stanford.edu/people/rak248/{folder}/{vid}.jpg",
                           "width": scene["width"], "height": scene["height"],
                           "coco_id": source[2] if source else None, "flickr_id": None})
        boxes = []
        for phrase, (x, y, w, h) in region_phrases(rng, scene):
            boxes.append({"region_id": region_id, "width": w, "height": h, "image_id": vid, "phrase": phrase,
                          "y": y, "x": x})
            region_id += 1
            texts.append(phrase)
        regions.append({"regions": boxes, "id": vid})
    write_json(out / "vg/region_descriptions.json", regions)
    write_json(out / "vg/image_data.json", image_data)


def write_flickr30k(out, rng, n, scenes, texts):
    splits = ["train"] * n(600) + ["val"] * n(100) + ["test"] * n(100)
    flickr_ids = rng.choice(4_000_000_000, size=len(splits), replace=False) + 1_000_000
    images = []
    for imgid, (split, fid) in enumerate(zip(splits, flickr_ids.tolist())):
        scene = sample_scene(rng)
        save_image(out, f"flickr30k/images/{fid}.jpg", scene, scenes)
        images.append(karpathy_entry(rng, imgid, f"{fid}.jpg", split, scene, texts))
    write_json(out / "flickr30k/dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})


def write_nlvr2(out, rng, n, scenes, texts):
    """NLVR2 records, identifier {split}-{set}-{pair}-{sentence}; a record's images are
    {split}-{set}-{pair}-img0.png (left) and -img1.png (right), under train/{directory}/ for train."""
    for split, wanted in (("train", n(1500)), ("dev", n(300)), ("test1", n(300))):
        records, set_id = [], 0
        while len(records) < wanted:
            pairs, sentences = nlvr2_set(rng)
            directory = str(rng.integers(100))
            folder = f"nlvr2/images/train/{directory}" if split == "train" else f"nlvr2/images/{split}"
            for pair_id, (left, right) in enumerate(pairs):
                save_image(out, f"{folder}/{split}-{set_id}-{pair_id}-img0.png", left, scenes)
                save_image(out, f"{folder}/{split}-{set_id}-{pair_id}-img1.png", right, scenes)
            writer = str(rng.integers(1, 120))
            validators = sorted(rng.choice(120, size=int(rng.integers(1, 6)), replace=False).tolist())
            for sentence_id, (text, labels) in enumerate(sentences):
                sentence = text[0].upper() + text[1:] + "."
                texts.append(sentence)
                for pair_id, label in enumerate(labels):
                    stem = f"{split}-{set_id}-{pair_id}"
                    records.append({"identifier": f"{stem}-{sentence_id}", "sentence": sentence, "label": str(label),
                                    "left_url": f"https://example.org/{stem}-img0.jpg",
                                    "right_url": f"https://example.org/{stem}-img1.jpg", "synset": "n00027807",
                                    "query": f"coloured shapes {set_id}", "writer": writer,
                                    "validation": {str(v): str(label) for v in validators}, "extra_validations": {},
                                    **({"directory": directory} if split == "train" else {})})
            set_id += 1
        (out / "nlvr2/data").mkdir(parents=True, exist_ok=True)
        (out / f"nlvr2/data/{split}.json").write_text("".join(json.dumps(r) + "\n" for r in records))


def write_imagenet(out, rng, n):
    """The demo's stand-in for ImageNet, in ImageNet's folder layout (one folder per class, as
    torchvision's ImageFolder reads it): pictures of one object, 18 classes = colour x shape.
    pretrain_cnn.py trains the CNN on it first, as the paper's CNN comes ImageNet-trained."""
    classes = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    for split, per_class in (("train", n(200)), ("val", n(20))):
        for colour, shape in classes:
            for k in range(per_class):
                save_image(out, f"imagenet/{split}/{colour}_{shape}/{split}_{colour}_{shape}_{k:05d}.JPEG",
                           object_picture(rng, shape, colour))


def write_vocab(path, texts):
    """A BERT WordPiece vocab.txt in which every corpus word is one token.
    The tokenizers library's WordPiece trainer breaks ties in hash-map order, which changes from run
    to run; on a corpus this small it ends with every word a token anyway, so we write that end state
    in a fixed order, finding the words with the library's own BERT normaliser and pre-tokeniser.
    Single characters and their ## continuations let any other lowercase word avoid [UNK]."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts = Counter(w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t)))
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789").union(*counts))
    words = sorted((w for w in counts if w not in chars), key=lambda w: (-counts[w], w))
    tokens = SPECIAL_TOKENS + chars + ["##" + c for c in chars if c.isalnum()] + words
    path.write_text("".join(t + "\n" for t in tokens))


# -----------------------------------------------------------------------------
# Public API


def marker(seed, scale):
    return {"format": "pixel-bert synthetic demo corpus", "format_version": FORMAT_VERSION,
            "seed": int(seed), "scale": float(scale)}


def write_demo_corpus(root, seed=0, scale=1.0):
    """Write the whole corpus to root (see the module docstring) and return root as a Path.
    It is built in a temporary folder beside root and renamed into place, so an interrupted run
    never leaves half a corpus. Call it from one process only (rank 0 in distributed runs)."""
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise FileExistsError(f"{root} exists and is not a demo corpus (it has no {MARKER}); choose another folder")

    def n(count):  # at least two of everything, so that every split is non-empty at small scales
        return max(2, round(count * scale))

    def part(k):  # one generator per dataset, so changing one dataset's code leaves the others' bytes alone
        return np.random.default_rng([seed, k])

    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        scenes, texts = {}, []
        coco = write_coco(tmp, part(1), n, scenes, texts)
        write_vqa(tmp, part(2), coco, texts)
        write_visual_genome(tmp, part(3), n, coco, scenes, texts)
        write_flickr30k(tmp, part(4), n, scenes, texts)
        write_nlvr2(tmp, part(5), n, scenes, texts)
        write_imagenet(tmp, part(6), n)
        write_vocab(tmp / "vocab.txt", texts)
        write_json(tmp / "scenes.json", scenes)
        write_json(tmp / MARKER, marker(seed, scale))
        if root.exists():
            shutil.rmtree(root)  # an older demo corpus (checked above)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_demo_corpus(root="data/demo", seed=None, scale=None):
    """Return root as a Path, first (re)generating the corpus unless its marker matches. Left
    as None, seed and scale accept the corpus already in root at any seed and scale (a smaller
    one a user or a test wrote on purpose), as long as it is of this FORMAT_VERSION; a missing
    or outdated corpus is written with seed 0 at scale 1."""
    root = Path(root)
    try:
        found = json.loads((root / MARKER).read_text())
        wanted = marker(found["seed"] if seed is None else seed, found["scale"] if scale is None else scale)
        if found == wanted:
            return root
    except (OSError, ValueError, KeyError, TypeError):
        pass
    seed, scale = seed or 0, 1.0 if scale is None else scale
    print(f"generating the demo corpus in {root} (seed {seed}, scale {scale}) ...", end=" ", flush=True)
    t0 = time.time()
    write_demo_corpus(root, seed, scale)
    print(f"done in {time.time() - t0:.1f}s")
    return root


if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common.py sits one folder up
    import common

    def main(argv=None):
        parser = argparse.ArgumentParser(description="Write the synthetic demo corpus in the official dataset formats.")
        parser.add_argument("--out", default="data/demo", help="output folder (an older demo corpus there is replaced)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--scale", type=float, default=1.0, help="multiplies every image and record count")
        args = parser.parse_args(argv)
        if not args.scale > 0:
            raise SystemExit(f"--scale {args.scale}: must be above 0")
        t0 = time.time()
        write_demo_corpus(args.out, args.seed, args.scale)
        print(f"wrote {args.out} in {time.time() - t0:.1f}s")

    common.run(main)  # one line per error (an --out that holds other files), never a stack
