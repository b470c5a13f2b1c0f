"""Prompt templates and class embeddings (``tools/extract_concept_features.py``,
``clip_backbone.py: CLIPLangEncoder``, ``get_prompt_templates``) on a tiny random CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from rclip_core.errors import InputError
from rclip_core.models.text import (SINGLE_TEMPLATE, EmbeddingCache, class_embeddings,
                                    clean_class_name, clean_lvis_name, default_cache_root, embed_class_names,
                                    encode_prompts, fill_template, get_tokenizer, load_templates)

ASSETS = Path(__file__).resolve().parents[1] / "rclip_core" / "assets"


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=[1, 1, 1, 1], width=16, image_size=64),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32,
                                             heads=2, layers=1),
        quick_gelu=True,
    )
    return m.eval()


class CountingModel(torch.nn.Module):
    """Wraps a CLIP model and counts encode_text calls and prompts seen."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.prompts = 0

    def encode_text(self, tokens):
        self.calls += 1
        self.prompts += tokens.shape[0]
        return self.inner.encode_text(tokens)


# ----------------------------------------------------------------------------- templates


def test_clip81_templates_match_shipped_file():
    t = load_templates()
    shipped = json.loads((ASSETS / "prompt_templates.json").read_text())
    assert len(t) == 81 and t == shipped == load_templates("clip81")
    assert t[0] == "{}." and t[1] == "a photo of a {}." and t[-1] == "a tattoo of the {}."
    assert t[37] == "a {} in a video game."
    assert all(x.count("{}") == 1 for x in t)
    t.append("mutated {}")  # callers get a copy
    assert len(load_templates()) == 81


def test_single_list_and_file_templates(tmp_path):
    assert load_templates("single") == [SINGLE_TEMPLATE] == ["a photo of a {}."]
    assert load_templates(["x {}", "y {} z"]) == ["x {}", "y {} z"]
    lines = tmp_path / "t.txt"
    lines.write_text("a {} here.\n\n  #{}  \nthe {}\n")
    assert load_templates(lines) == ["a {} here.", "#{}", "the {}"]
    js = tmp_path / "t.json"
    js.write_text(json.dumps(["{}!", "a big {}"]))
    assert load_templates(str(js)) == ["{}!", "a big {}"]


@pytest.mark.parametrize("spec, match", [
    ("clip80", "unknown template set"),
    (["a photo"], "has no"),
    (["{} and {}"], "has 2"),
    ([], "no templates"),
    ([3], "not a string"),
])
def test_bad_templates(spec, match):
    with pytest.raises(InputError, match=match):
        load_templates(spec)


def test_bad_template_files(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a {}\nno placeholder\n")
    with pytest.raises(InputError, match=r"template 2 of template file .*bad.txt has no"):
        load_templates(bad)
    broken = tmp_path / "broken.json"
    broken.write_text('["a {}",')
    with pytest.raises(InputError, match="not valid JSON"):
        load_templates(broken)
    with pytest.raises(InputError, match="directory"):
        load_templates(tmp_path)


def test_fill_template_edits_the_name_only():
    # official: template.replace('{}', name.replace(',', '').replace('+', ' '))
    assert fill_template("a photo of a {}.", "salt+pepper, shaker") == "a photo of a salt pepper shaker."
    assert fill_template("{}.", "a,b") == "ab."  # comma deleted, not turned into a space
    assert fill_template("one, two + {}", "x+y") == "one, two + x y"  # template text untouched
    assert fill_template("a {}.", "kite") == "a kite."


def test_clean_class_name():
    assert clean_class_name("window_box_(for_plants)", "lvis") == "window box for plants"
    assert clean_class_name("bull", "lvis") == "bull"
    assert clean_class_name("bat_(animal)") == "bat animal"
    assert clean_class_name("hair drier", "coco") == "hair drier"
    assert clean_class_name("a_(b)", "none") == "a_(b)"
    with pytest.raises(InputError, match="unknown class-name style"):
        clean_class_name("x", "voc")


# ----------------------------------------------------------------------------- tokenizer / encoding


def test_tokenizer_ids_and_truncation(tokenizer):
    tok = tokenizer(["a photo of a kite."])
    assert tok.shape == (1, 77) and tok.dtype == torch.long
    # SOT, 'a', 'photo', 'of', 'a', 'kite', '.', EOT: OpenAI CLIP BPE ids
    assert tok[0, :8].tolist() == [49406, 320, 1125, 539, 320, 19867, 269, 49407]
    assert tok[0, 8:].eq(0).all()
    assert tokenizer(["A  Photo\tof a KITE."]).equal(tok)  # lower-case + whitespace collapse
    long = tokenizer(["cat " * 100])
    # open_clip keeps EOT in the last slot when truncating (RegionCLIP would not)
    assert long[0, 0] == 49406 and long[0, -1] == 49407 and long[0, 1:-1].ne(0).all()
    assert get_tokenizer() is tokenizer


def test_encode_prompts_batches_equal_one_batch(model, tokenizer):
    prompts = ["a photo of a kite.", "a boy.", "itap of my dog.", "x", "graffiti of a cat."]
    ref = model.encode_text(tokenizer(prompts)).detach()
    counting = CountingModel(model)
    out = encode_prompts(counting, tokenizer, prompts, batch_size=2)
    assert counting.calls == 3 and counting.prompts == 5
    assert out.shape == (5, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert not out.is_inference() and not out.requires_grad
    # usable as frozen weights inside a training graph
    x = torch.randn(3, 32, requires_grad=True)
    (x @ out.T).sum().backward()
    assert x.grad is not None
    with pytest.raises(InputError):
        encode_prompts(model, tokenizer, [], batch_size=4)


# ----------------------------------------------------------------------------- class embeddings

NAMES = ["kite", "salt+pepper, shaker", "window box for plants"]


def _prompt_features(model, tokenizer, templates, name):
    prompts = [t.replace("{}", name.replace(",", "").replace("+", " ")) for t in templates]
    with torch.no_grad():
        return model.encode_text(tokenizer(prompts))  # [T, D]


def test_raw_average_is_plain_mean(model, tokenizer):
    templates = load_templates("clip81")
    emb = class_embeddings(model, tokenizer, NAMES, templates="clip81", average="raw", batch_size=100)
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    for i, name in enumerate(NAMES):
        feats = _prompt_features(model, tokenizer, templates, name)
        torch.testing.assert_close(emb[i], feats.mean(0), rtol=1e-5, atol=1e-6)
    # not renormalised: the raw mean of this random model is far from unit length
    assert (emb.norm(dim=-1) - 1).abs().min() > 0.5
    # rows are independent of batching / chunking
    emb2 = class_embeddings(model, tokenizer, NAMES, average="raw", batch_size=7)
    torch.testing.assert_close(emb, emb2, rtol=1e-5, atol=1e-6)


def test_normalized_average(model, tokenizer):
    templates = ["a photo of a {}.", "{}.", "a tattoo of the {}."]
    emb = class_embeddings(model, tokenizer, NAMES, templates=templates, average="normalized")
    for i, name in enumerate(NAMES):
        feats = _prompt_features(model, tokenizer, templates, name)
        expected = feats / feats.norm(dim=-1, keepdim=True)
        expected = expected.mean(0)
        expected = expected / expected.norm()
        torch.testing.assert_close(emb[i], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    raw = class_embeddings(model, tokenizer, NAMES, templates=templates, average="raw")
    assert not torch.allclose(F.normalize(raw, dim=-1), emb, atol=1e-4)  # the modes differ


def test_single_template(model, tokenizer):
    emb = class_embeddings(model, tokenizer, ["kite", "boy"], templates="single")
    with torch.no_grad():
        ref = model.encode_text(tokenizer(["a photo of a kite.", "a photo of a boy."]))
    torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-6)
    nrm = class_embeddings(model, tokenizer, ["kite", "boy"], templates="single", average="normalized")
    torch.testing.assert_close(nrm, F.normalize(ref, dim=-1), rtol=1e-5, atol=1e-6)


def test_names_are_checked_and_progress_counts(model, tokenizer):
    seen = []
    emb = class_embeddings(model, tokenizer, [" kite ", "boy", "cat"], templates="single",
                           progress=seen.append, batch_size=2)
    assert seen == [2, 1]
    torch.testing.assert_close(emb[0], class_embeddings(model, tokenizer, ["kite"], templates="single")[0])
    with pytest.raises(InputError, match=r"duplicate class name 'kite' \(entries 1 and 3\)"):
        class_embeddings(model, tokenizer, ["kite", "boy", " kite"])
    with pytest.raises(InputError, match="class name 2 is empty"):
        class_embeddings(model, tokenizer, ["kite", "  "])
    with pytest.raises(InputError, match="no class names"):
        class_embeddings(model, tokenizer, [])
    with pytest.raises(InputError, match="not one string"):
        class_embeddings(model, tokenizer, "kite")
    with pytest.raises(InputError, match="unknown averaging mode"):
        class_embeddings(model, tokenizer, ["kite"], average="mean")


# ----------------------------------------------------------------------------- cache


def test_cache_hit_skips_model(model, tokenizer, tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    counting = CountingModel(model)
    first = class_embeddings(counting, tokenizer, NAMES, templates="clip81", cache=cache,
                             model_id="tiny:seed0")
    calls = counting.calls
    assert calls > 0 and counting.prompts == 3 * 81
    files = list((tmp_path / "c").glob("*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "c").glob(".*tmp"))
    seen = []
    second = class_embeddings(counting, tokenizer, NAMES, templates="clip81", cache=tmp_path / "c",
                              model_id="tiny:seed0", progress=seen.append)
    assert counting.calls == calls  # served from disk
    assert seen == [3]
    assert torch.equal(first, second)

    from safetensors import safe_open
    with safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["names"]) == NAMES and meta["model_id"] == "tiny:seed0"
    assert meta["average"] == "raw" and len(json.loads(meta["templates"])) == 81

    # another model id / averaging mode is a miss and runs the model again
    class_embeddings(counting, tokenizer, NAMES, cache=cache, model_id="tiny:seed1")
    assert counting.calls == 2 * calls
    class_embeddings(counting, tokenizer, NAMES, cache=cache, model_id="tiny:seed0", average="normalized")
    assert counting.calls == 3 * calls
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 3

    with pytest.raises(InputError, match="model_id"):
        class_embeddings(model, tokenizer, NAMES, cache=cache)


def test_cache_key_changes_with_every_input():
    t81, single = load_templates("clip81"), load_templates("single")
    base = EmbeddingCache.key("RN50:openai", t81, "raw", ["kite", "boy"])
    assert len(base) == 64 and base == EmbeddingCache.key("RN50:openai", list(t81), "raw", ("kite", "boy"))
    others = {
        EmbeddingCache.key("RN50:other", t81, "raw", ["kite", "boy"]),
        EmbeddingCache.key("RN50:openai", single, "raw", ["kite", "boy"]),
        EmbeddingCache.key("RN50:openai", t81[:-1], "raw", ["kite", "boy"]),
        EmbeddingCache.key("RN50:openai", t81, "normalized", ["kite", "boy"]),
        EmbeddingCache.key("RN50:openai", t81, "raw", ["boy", "kite"]),
        EmbeddingCache.key("RN50:openai", t81, "raw", ["kite", "boys"]),
    }
    assert len(others) == 6 and base not in others


def test_cache_corrupt_or_mismatched_entry_is_a_miss(model, tokenizer, tmp_path):
    cache = EmbeddingCache(tmp_path)
    counting = CountingModel(model)
    names = ["kite", "boy"]
    ref = class_embeddings(counting, tokenizer, names, templates="single", cache=cache, model_id="m")
    key = EmbeddingCache.key("m", ["a photo of a {}."], "raw", names)
    assert cache.get(key, names) is not None and cache.get(key, ["boy", "kite"]) is None
    cache.path(key).write_bytes(b"not a safetensors file")
    calls = counting.calls
    again = class_embeddings(counting, tokenizer, names, templates="single", cache=cache, model_id="m")
    assert counting.calls == calls + 1 and torch.equal(again, ref)
    assert torch.equal(cache.get(key, names), ref)  # rewritten


def test_default_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("RCLIP_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path / "text"
    assert EmbeddingCache().root == tmp_path / "text"
    monkeypatch.delenv("RCLIP_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "rclip" / "text"


def test_clean_lvis_name():
    assert clean_lvis_name("bow_(weapon)") == "bow weapon"


def test_embed_class_names_the_one_rule(monkeypatch, tmp_path):
    from rclip_core.weights.loaders import load_model

    monkeypatch.setenv("RCLIP_CACHE", str(tmp_path / "cache"))
    m = load_model(model="test-micro", random_init=True, seed=0)
    tok = get_tokenizer(m.arch.context_length)
    want = class_embeddings(m.clip, tok, ["cat", "dog"], templates="single")
    got = embed_class_names(m, ["cat", "dog"], templates="single")
    torch.testing.assert_close(got, want)
    assert not (tmp_path / "cache").exists()  # random weights are never cached
    m.info.source_format = "rclip"  # trained weights: cached
    embed_class_names(m, ["cat", "dog"], templates="single")
    assert any((tmp_path / "cache").rglob("*.safetensors"))
    m.info.text_loaded = False  # e.g. a detector exported without its text tower
    with pytest.raises(InputError, match="no text encoder") as e:
        embed_class_names(m, ["cat"])
    assert "--class-embeddings" in e.value.hint
