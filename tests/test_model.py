"""model.py against its references: torchvision's ResNets, transformers' BERT (random weights
and a real pretrained checkpoint), plus the masking, sampling, gradient and loading contracts."""

import subprocess
import sys

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from model import (FoldedFrozenBatchNorm2d, FrozenBatchNorm2d, PixelBert, PixelBertConfig, ResNet, VisualEmbedding,
                   count_parameters, fold_frozen_batchnorm, load_bert, load_cnn, make_optimizers, read_state_dict,
                   sample_pixels)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def randomise_batchnorm(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("builder,cfg", [
    ("resnet18", dict(cnn_depth=18)),
    ("resnet50", dict(cnn_depth=50)),
    ("resnext50_32x4d", dict(cnn_depth=50, cnn_groups=32, cnn_width_per_group=4)),
])
@pytest.mark.parametrize("norm", ["frozen", "batch"])
def test_resnet_matches_torchvision(builder, cfg, norm, tmp_path):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, builder)().eval()
    randomise_batchnorm(ref)
    path = tmp_path / f"{builder}.pth"
    torch.save(ref.state_dict(), path)
    model = PixelBert(PixelBertConfig.tiny(norm=norm, cnn_width=64, **cfg)).eval()
    report = load_cnn(model, str(path))
    assert sorted(report.unused) == ["fc.bias", "fc.weight"] and report.new == []
    if norm == "batch":  # the backbone is torchvision's module tree: a strict load works too
        state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
        ResNet(model.config).load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ours = model.cnn.maxpool(model.cnn.relu(model.cnn.bn1(model.cnn.conv1(x))))
        theirs = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        assert rel_err(ours, theirs) < 1e-5
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            ours, theirs = getattr(model.cnn, stage)(ours), getattr(ref, stage)(theirs)
            assert rel_err(ours, theirs) < 1e-5, stage
        assert rel_err(model.cnn(x), theirs) < 1e-5


def small_bert_config(**kw):
    return dict(vocab_size=120, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128,
                max_position_embeddings=40, **kw)


def padded_batch(vocab=120, lengths=(12, 7, 3), T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), T), generator=g)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


@pytest.mark.parametrize("fmt", ["safetensors", "bin-legacy-names"])
def test_bert_matches_transformers(fmt, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = small_bert_config()
    hf_cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=40)
    ref = transformers.BertForPreTraining(hf_cfg).eval()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items() if k != "cls.predictions.decoder.weight"}, path)
        path = tmp_path  # a Hugging Face folder
    else:  # the original TF-converted checkpoints name LayerNorm parameters gamma/beta
        state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                 for k, v in state.items()}
        state["bert.embeddings.position_ids"] = torch.arange(40)[None]
        path = tmp_path / "pytorch_model.bin"
        torch.save(state, path)
    model = PixelBert(PixelBertConfig.tiny(**cfg)).eval()
    report = load_bert(model, str(path))
    assert sorted(report.new) == ["itm_head.bias", "itm_head.weight"]
    assert sorted(report.unused) == ["cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    ids, mask = padded_batch()
    with torch.no_grad():  # text only (no image): PixelBert is exactly BERT
        out = ref(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        hidden, pooled = model(ids, mask)
        ref_pooled = ref.bert(input_ids=ids, attention_mask=mask.long()).pooler_output
    assert torch.allclose(hidden, out.hidden_states[-1], atol=1e-5)
    assert torch.allclose(pooled, ref_pooled, atol=1e-5)
    assert torch.allclose(model.mlm_logits(hidden), out.prediction_logits, atol=1e-5)


def test_real_pretrained_bert_checkpoint(minilm_dir):
    transformers = pytest.importorskip("transformers")
    from tokenizers import BertWordPieceTokenizer
    tok = BertWordPieceTokenizer(f"{minilm_dir}/vocab.txt", lowercase=True)
    sentences = ["A man rides a horse on the beach.", "Two dogs play with a red frisbee in the park!",
                 "Pixel-BERT aligns image pixels with text."]
    enc = tok.encode_batch(sentences)
    T = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in enc])
    mask = ids != 0
    ref = transformers.BertModel.from_pretrained(minilm_dir).eval()
    model = PixelBert(PixelBertConfig.r50(hidden_size=384, num_layers=6, intermediate_size=1536,
                                          cnn_depth=18, cnn_width=8, heads=())).eval()
    report = load_bert(model, minilm_dir)
    assert report.new == [] and report.unused == []
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask.long())
        hidden, pooled = model(ids, mask)
    err = (hidden - out.last_hidden_state)[mask].abs().max().item()
    assert err < 1e-5, err
    assert torch.allclose(pooled, out.pooler_output, atol=1e-5)
    assert enc[0].tokens[:4] == ["[CLS]", "a", "man", "rides"]


def tiny_model(**kw):
    torch.manual_seed(0)
    return PixelBert(PixelBertConfig.tiny(**small_bert_config(**kw)))


@pytest.mark.parametrize("pool, counts", [(2, [12, 4]), (1, [40, 16])])  # 3x4 or 6x8 pixel tokens
def test_padding_never_reaches_real_positions(pool, counts):
    model = tiny_model(pixel_pool=pool).eval()
    ids, text_mask = padded_batch(lengths=(9, 4), T=9)
    images = torch.randn(2, 3, 192, 256)
    image_mask = torch.zeros(2, 192, 256, dtype=torch.bool)
    image_mask[0, :150, :256] = True  # pool 2: 3x4 pixel tokens, all real; pool 1: 5x8 of 6x8
    image_mask[1, :100, :120] = True  # pool 2: 2x2 real; pool 1: 4x4
    with torch.no_grad():
        hidden, pooled = model(ids, text_mask, images, image_mask)
        tokens, pixel_mask = model.encode_image(images, image_mask)
        assert pixel_mask.sum(1).tolist() == counts
        # change padded text ids, padded image pixels, and (separately) padded pixel tokens
        ids2 = ids.masked_fill(~text_mask, 7)
        images2 = torch.where(image_mask[:, None], images, torch.randn_like(images) * 5)
        hidden2, pooled2 = model(ids2, text_mask, images2, image_mask)
        tokens3 = torch.where(pixel_mask[..., None], tokens, torch.randn_like(tokens) * 5)
        hidden3, pooled3 = model(ids, text_mask, pixels=(tokens3, pixel_mask))
    real = torch.cat([text_mask, pixel_mask], 1)
    for h, p in ((hidden2, pooled2), (hidden3, pooled3)):
        assert torch.allclose(h[real], hidden[real], atol=1e-5)
        assert torch.allclose(p, pooled, atol=1e-5)


def test_sample_output_independent_of_batch():
    model = tiny_model().eval()
    ids, text_mask = padded_batch(lengths=(5, 11), T=11)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 12, 64, generator=g)
    pixel_mask = torch.ones(2, 12, dtype=torch.bool)
    pixel_mask[0, 6:] = False
    with torch.no_grad():
        batched, _ = model(ids, text_mask, pixels=(tokens, pixel_mask))
        alone, _ = model(ids[:1, :5], text_mask[:1, :5], pixels=(tokens[:1, :6], pixel_mask[:1, :6]))
    real = torch.cat([text_mask, pixel_mask], 1)[0]
    assert torch.allclose(batched[0][real], alone[0], atol=1e-5)


def test_pixel_sampling():
    B, K, n = 4, 30, 10
    tokens = torch.arange(K, dtype=torch.float)[None, :, None].expand(B, K, 3).clone()  # token k holds value k
    valid = torch.tensor([30, 12, 10, 4])
    mask = torch.arange(K)[None] < valid[:, None]
    out, out_mask = sample_pixels(tokens, mask, n)
    assert out.shape == (B, n, 3) and out_mask.shape == (B, n)
    assert out_mask.sum(1).tolist() == [10, 10, 10, 4]  # min(n, valid)
    picked = out[..., 0]
    assert (picked[out_mask] < valid[:, None].expand(B, n)[out_mask]).all()  # never a padded token
    for b in range(B):  # no token twice, raster order kept
        assert picked[b].unique().numel() == n and (picked[b].diff() > 0).all()
    draws = {tuple(sample_pixels(tokens, mask, n)[0][0, :, 0].tolist()) for _ in range(5)}
    assert len(draws) > 1
    small, small_mask = sample_pixels(tokens[:, :8], mask[:, :8], n)  # fewer than n: keep all
    assert small.shape[1] == 8


def test_sampling_only_in_training_mode():
    model = tiny_model()
    ids, mask = padded_batch()
    tokens, pixel_mask = torch.randn(3, 20, 64), torch.ones(3, 20, dtype=torch.bool)
    model.train()
    assert model(ids, mask, pixels=(tokens, pixel_mask), sample_pixel_count=5)[0].shape[1] == 12 + 5
    model.eval()
    assert model(ids, mask, pixels=(tokens, pixel_mask), sample_pixel_count=5)[0].shape[1] == 12 + 20


@pytest.mark.parametrize("proj_first", [True, False])
def test_pixel_branch_order(proj_first):
    """Paper Fig. 2 reads CNN -> 1x1 conv -> pooling (pixel_proj_first, the default); False pools
    first (SOHO's order). Each order recomputed here from the layer's own weights, on a map whose
    sides do not divide by the pool (ceil_mode keeps the partial cells)."""
    assert PixelBertConfig().pixel_proj_first  # the paper's order unless asked otherwise
    visual = VisualEmbedding(PixelBertConfig.tiny(pixel_proj_first=proj_first), 64)
    nn.init.normal_(visual.type_embedding)
    fmap = torch.randn(2, 64, 5, 7)
    conv = lambda x: F.conv2d(x, visual.proj.weight, visual.proj.bias)  # noqa: E731
    pool = lambda x: F.max_pool2d(x, 2, ceil_mode=True)  # noqa: E731
    expected = pool(conv(fmap)) if proj_first else conv(pool(fmap))  # (2, 128, 3, 4)
    with torch.no_grad():
        tokens = visual(fmap)
    torch.testing.assert_close(tokens, expected.flatten(2).transpose(1, 2) + visual.type_embedding)
    other = VisualEmbedding(PixelBertConfig.tiny(pixel_proj_first=not proj_first), 64)
    other.load_state_dict(visual.state_dict())
    with torch.no_grad():
        assert (other(fmap) - tokens).abs().max() > 0.1  # the flag matters at pixel_pool 2 ...
        same = [VisualEmbedding(PixelBertConfig.tiny(pixel_pool=1, pixel_proj_first=p), 64) for p in (True, False)]
        same[1].load_state_dict(same[0].state_dict())
        assert torch.equal(same[0](fmap), same[1](fmap))  # ... and is the same computation at pixel_pool 1


def test_saved_config_keeps_its_pixel_order():
    """A checkpoint's model_config builds the model it was trained as: one written before
    pixel_proj_first existed pooled first, whatever today's default."""
    fields = dataclasses.asdict(PixelBertConfig.tiny())
    assert PixelBertConfig.saved(fields) == PixelBertConfig.tiny()
    del fields["pixel_proj_first"]
    assert not PixelBertConfig.saved(fields).pixel_proj_first
    assert PixelBertConfig.saved(fields, heads=("itm",)).heads == ("itm",)


def test_every_parameter_gets_a_gradient():
    model = tiny_model(heads=("mlm", "itm", "vqa", "nlvr", "rank"), num_answers=7,
                       visual_layernorm=True, visual_position=True)
    model.train()
    ids, mask = padded_batch(lengths=(12, 7, 3, 5), T=12)
    images, image_mask = torch.randn(4, 3, 128, 192), torch.ones(4, 128, 192, dtype=torch.bool)
    hidden, pooled = model(ids, mask, images, image_mask, sample_pixel_count=4)
    loss = (model.mlm_logits(hidden[:, 1:3]).logsumexp(-1).sum() + model.itm_head(pooled).sum()
            + model.vqa_head(pooled).sum() + model.nlvr_head(pooled.view(2, -1)).sum() + model.rank_head(pooled).sum())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def randomise_frozen_batchnorm(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_frozen_batchnorm_stays_fixed():
    model = tiny_model(norm="frozen").train()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # the CNN's only parameters are its conv weights: SGD gets exactly those, and never a norm's
    convs = {id(m.weight) for m in model.cnn.modules() if isinstance(m, nn.Conv2d)}
    assert {id(p) for p in model.cnn.parameters()} == convs
    sgd, _ = make_optimizers(model)
    assert {id(p) for g in sgd.param_groups for p in g["params"]} == convs
    randomise_frozen_batchnorm(model)
    before = copy.deepcopy(model.cnn.state_dict())
    model.encode_image(torch.randn(2, 3, 64, 96), torch.ones(2, 64, 96, dtype=torch.bool))[0].sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.cnn.state_dict().items() if "conv" not in k)


@pytest.mark.parametrize("cfg", [dict(cnn_depth=18), dict(cnn_depth=50, cnn_groups=4, cnn_width_per_group=8)])
def test_fold_frozen_batchnorm(cfg):
    torch.manual_seed(0)
    plain = PixelBert(PixelBertConfig.tiny(norm="frozen", **small_bert_config(**cfg))).eval()
    folded = fold_frozen_batchnorm(copy.deepcopy(plain))
    norms = [m for m in folded.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and all(type(m) is FoldedFrozenBatchNorm2d for m in norms)  # every norm is folded
    # Same names and parameters: checkpoints load either way. Loading after folding must reach
    # the folded convs, which read their norm's buffers at each call.
    assert list(folded.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in folded.named_parameters()] == [n for n, _ in plain.named_parameters()]
    randomise_frozen_batchnorm(plain)
    folded.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 96, 128)
    ours, theirs = folded.cnn(x), plain.cnn(x)
    assert rel_err(ours, theirs) < 1e-5
    w = torch.randn_like(theirs)  # same loss, so the same gradients w.r.t. the conv weights
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    for (name, p), q in zip(plain.cnn.named_parameters(), folded.cnn.parameters()):
        assert rel_err(q.grad, p.grad) < 1e-4, name
    with pytest.raises(ValueError, match="no FrozenBatchNorm2d"):
        fold_frozen_batchnorm(tiny_model(norm="batch"))


def test_optimizer_groups():
    model = tiny_model(heads=("mlm", "itm", "vqa"), num_answers=5)
    sgd, adamw = make_optimizers(model)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for opt, is_cnn in ((sgd, True), (adamw, False)):
        for group in opt.param_groups:
            for p in group["params"]:
                seen.append(id(p))
                assert names[id(p)].startswith("cnn.") == is_cnn
                assert (group["weight_decay"] == 0) == (p.ndim == 1)
    assert sorted(seen) == sorted(names)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    for p in model.cnn.parameters():  # retrieval fine-tuning freezes the CNN: no SGD at all
        p.requires_grad_(False)
    assert make_optimizers(model)[0] is None


def test_r50_parameter_count_matches_references():
    transformers = pytest.importorskip("transformers")
    H, answers = 768, 3129
    cnn = count_parameters(torchvision.models.resnet50()) - (2048 * 1000 + 1000)
    bert_base = transformers.BertConfig()
    bert = count_parameters(transformers.BertModel(bert_base))
    mlm_head = count_parameters(transformers.BertForMaskedLM(bert_base).cls) - bert_base.vocab_size * H  # tied decoder
    visual = 2048 * H + H + H  # 1x1 projection (weight, bias) + the visual type vector
    heads = ((H * 2 + 2)  # itm
             + (H * 2 * H + 2 * H) + 2 * (2 * H) + (2 * H * answers + answers)  # vqa MLP
             + (2 * H * 2 * H + 2 * H) + 2 * (2 * H) + (2 * H * 2 + 2)  # nlvr MLP
             + (H + 1))  # rank
    model = PixelBert(PixelBertConfig.r50(norm="batch", heads=("mlm", "itm", "vqa", "nlvr", "rank"),
                                          num_answers=answers))
    assert count_parameters(model) == cnn + bert + mlm_head + visual + heads


@pytest.mark.parametrize("width_per_group", [8, 4])  # ResNeXt-152 32x8d (the default) and 32x4d
def test_x152_matches_torchvision_resnext(width_per_group):
    config = PixelBertConfig.x152() if width_per_group == 8 else PixelBertConfig.x152(width_per_group=4)
    assert (config.cnn_depth, config.cnn_groups, config.cnn_width_per_group) == (152, 32, width_per_group)
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        resnext = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [3, 8, 36, 3], groups=32,
                                                   width_per_group=width_per_group)
        cnn = ResNet(PixelBertConfig.x152(width_per_group, norm="batch")).eval()
        model = PixelBert(config).eval()
        conv2 = cnn.layer1[0].conv2  # 32 groups of 8 (or 4) channels per group
        assert conv2.groups == 32 and conv2.in_channels == conv2.out_channels == 32 * width_per_group
        reference = [(k, v.shape) for k, v in resnext.state_dict().items() if not k.startswith("fc.")]
        assert [(k, v.shape) for k, v in cnn.state_dict().items()] == reference
        assert count_parameters(cnn) == count_parameters(resnext) - count_parameters(resnext.fc)
        x = torch.empty(1, 3, 608, 1000)  # a full-size input: stride-32 map 19 x 32, pooled 10 x 16
        trunk = nn.Sequential(*list(resnext.children())[:-2]).eval()  # without avgpool and fc
        assert cnn(x).shape == trunk(x).shape == (1, 2048, 19, 32)
        tokens, mask = model.encode_image(x, torch.ones(1, 608, 1000, dtype=torch.bool))
        assert tokens.shape == (1, 10 * 16, 768) and mask.shape == (1, 10 * 16)


def test_x152_runs():
    model = PixelBert(PixelBertConfig.x152(num_layers=1)).eval()
    images, image_mask = torch.randn(1, 3, 128, 192), torch.ones(1, 128, 192, dtype=torch.bool)
    with torch.no_grad():
        tokens, mask = model.encode_image(images, image_mask)
    assert tokens.shape == (1, 2 * 3, 768) and mask.all() and tokens.isfinite().all()


def test_loader_errors_name_the_key(tmp_path):
    model = tiny_model()
    bad = {k: v for k, v in model.state_dict().items() if k.startswith("bert.")}
    bad["bert.embeddings.word_embeddings.weight"] = torch.zeros(999, 64)
    torch.save(bad, tmp_path / "shape.bin")
    with pytest.raises(ValueError, match="word_embeddings.weight has shape"):
        load_bert(model, str(tmp_path / "shape.bin"))
    extra = dict(model.state_dict())
    extra = {k: v for k, v in extra.items() if k.startswith("bert.")}
    extra["bert.encoder.layer.9.output.dense.weight"] = torch.zeros(1)
    torch.save(extra, tmp_path / "layers.bin")
    with pytest.raises(ValueError, match="layer.9.output.dense.weight has no place"):
        load_bert(model, str(tmp_path / "layers.bin"))
    resnet = torchvision.models.resnet34().state_dict()
    torch.save(resnet, tmp_path / "r34.pth")
    with pytest.raises(ValueError, match="has no place in the CNN|has shape"):
        load_cnn(model, str(tmp_path / "r34.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_cnn(model, str(tmp_path / "nope.pth"))


def test_loading_refuses_pickled_code(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        read_state_dict(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "pwned").exists()


def test_model_imports_only_torch():
    code = ("import sys, model; bad = [m for m in ('transformers', 'torchvision', 'safetensors', 'tokenizers', "
            "'PIL') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_image_index_shares_one_cnn_pass():
    model = tiny_model().eval()
    ids, mask = padded_batch(lengths=(12, 7, 3), T=12)
    images, image_mask = torch.randn(2, 3, 128, 128), torch.ones(2, 128, 128, dtype=torch.bool)
    image_mask[0, 64:] = False
    with torch.no_grad():
        shared, _ = model(ids, mask, images, image_mask, image_index=torch.tensor([1, 0, 1]))
        repeated, _ = model(ids, mask, images[[1, 0, 1]], image_mask[[1, 0, 1]])
    assert torch.allclose(shared, repeated, atol=1e-5)
