"""Readable label names, prompt template sets and files, and CLIP-style prompt ensembles."""

import json

import numpy as np
import pytest
import torch

from cmdcl_cache.extract.encoder import EncoderSpec, load_encoder
from cmdcl_cache.manifest.format import ManifestError
from cmdcl_cache.manifest.io import load_manifest
from cmdcl_cache.cache.format import read_texts, write_texts
from cmdcl_cache.manifest.prompts import DEFAULT_TEMPLATES, PromptError, TEMPLATE_SETS, choose_templates, load_templates, readable_label
from cmdcl_cache.extract.texts import build_text_embeddings


@pytest.mark.parametrize("key,text", [
    ("ChangeCarTire", "change car tire"),
    ("ReplaceCDDriveWithSSD", "replace CD drive with SSD"),
    ("PerformCPR", "perform CPR"),
    ("MakeRJ45Cable", "make RJ45 cable"),
    ("PitchATent", "pitch a tent"),
    ("stir_tea", "stir tea"),
    ("pour_cereals", "pour cereals"),
    ("SIL", "SIL"),                    # Breakfast's builder names it "background"; a user's SIL class stays SIL
    ("C++", "C++"), ("C#", "C#"), ("iPhone", "iPhone"), ("3D_printer", "3D printer"), ("T-shirt", "T-shirt"),
    ("remove the tire", "remove the tire"),          # COIN step names are already text
    ("use the SIM card slot", "use the SIM card slot"),
    ("cereals", "cereals"),
    ("café", "café"),                                 # non-ASCII letters are kept
    ("crème_brûlée", "crème brûlée"),
    ("数据-集", "数据-集"),              # a hyphen is kept: only an underscore is a space
])
def test_readable_label(key, text):
    assert readable_label(key) == text


def test_default_templates_are_a_small_action_set():
    assert 6 <= len(DEFAULT_TEMPLATES) <= 10
    assert all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)
    assert "a video of a person {}." in DEFAULT_TEMPLATES


def test_load_templates(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na video of {}.\n\n  a photo of {}.  \n")
    assert load_templates(path) == ["a video of {}.", "a photo of {}."]


@pytest.mark.parametrize("content,line,what", [
    ("a video of {}.\na photo of something.\n", 2, "exactly once"),
    ("a video of {}.\n# note\n{} and {}\n", 3, "found 2"),
    ("a {0} of {}\n", 1, "other braces"),
    ("a video of {}.\nset {x} of {}\n", 2, "other braces"),
])
def test_template_errors_name_file_and_line(tmp_path, content, line, what):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(PromptError, match=rf"bad\.txt:{line}: .*{what}"):
        load_templates(path)


def test_a_template_file_saved_as_latin_1_names_its_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a video of {}.\nun été de {}.\n".encode("latin-1"))
    with pytest.raises(PromptError, match=r"prompts\.txt:2: not UTF-8 text \(byte 0xe9\)"):
        load_templates(path)


def test_template_file_missing_or_empty(tmp_path):
    with pytest.raises(PromptError, match="missing.txt: cannot read"):
        load_templates(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(PromptError, match="empty.txt: no prompt templates"):
        load_templates(tmp_path / "empty.txt")


class FakeEncoder:
    """A text tower stand-in: a fixed random vector per prompt, with a scale that differs per prompt."""

    def __init__(self, dim=8):
        self.dim, self.seen, self.batches = dim, [], []

    def encode_texts(self, texts, batch_size=256):
        self.seen += list(texts)
        self.batches.append(len(texts))
        rows = []
        for t in texts:
            rng = np.random.default_rng(abs(hash(t)) % 2 ** 32)
            rows.append(rng.normal(size=self.dim) * (1 + len(t) % 5))
        return torch.tensor(np.array(rows), dtype=torch.float32)


def test_build_text_embeddings_shapes_and_ensemble():
    enc = FakeEncoder()
    templates = ["a video of {}.", "a photo of {}.", "{}"]
    out = build_text_embeddings(enc, {"task": ["ChangeCarTire", "MakePizza"],
                                      "action": ["background", "stir_tea", "take_cup", "pour_milk"]}, templates)
    task, action = out["task"], out["action"]
    assert task.per_prompt.shape == (2, 3, 8) and action.per_prompt.shape == (4, 3, 8)
    assert task.names == ["ChangeCarTire", "MakePizza"] and task.texts == ["change car tire", "make pizza"]
    assert action.texts[0] == "background" and task.templates == templates
    assert "a photo of change car tire." in enc.seen
    # per_prompt[c, p] is the embedding of template p filled with label c, as the tower returned it
    expected = enc.encode_texts(["a photo of stir tea."]).numpy()[0]
    np.testing.assert_allclose(action.per_prompt[1, 1], expected, rtol=1e-6)
    # ensemble: normalise each prompt, average, normalise (CLIP); not the plain mean of raw embeddings
    unit = action.per_prompt / np.linalg.norm(action.per_prompt, axis=-1, keepdims=True)
    mean = unit.mean(axis=1)
    np.testing.assert_allclose(action.ensemble, mean / np.linalg.norm(mean, axis=-1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(action.ensemble, axis=-1), 1.0, rtol=1e-5)
    raw = action.per_prompt.mean(axis=1)
    raw /= np.linalg.norm(raw, axis=-1, keepdims=True)
    assert not np.allclose(action.ensemble, raw, atol=1e-3)


def test_build_with_the_tiny_clip_batches_and_round_trips(tmp_path):
    enc = load_encoder(EncoderSpec(model="cmdcl-tiny", pretrained="none", device="cpu"))
    names = {"task": ["ChangeCarTire", "MakePizza", "PerformCPR"]}
    small = build_text_embeddings(enc, names, DEFAULT_TEMPLATES, batch_size=5)  # 24 prompts, 5 batches
    big = build_text_embeddings(enc, names, DEFAULT_TEMPLATES)
    t = small["task"]
    assert t.per_prompt.shape == (3, len(DEFAULT_TEMPLATES), enc.feature_dim)
    np.testing.assert_allclose(t.per_prompt, big["task"].per_prompt, rtol=1e-5, atol=1e-5)
    direct = enc.encode_texts([DEFAULT_TEMPLATES[2].format("perform CPR")]).numpy()[0]
    np.testing.assert_allclose(t.per_prompt[2, 2], direct, rtol=1e-5, atol=1e-5)
    write_texts(tmp_path / "texts.h5", small, enc.provenance())
    back = read_texts(tmp_path / "texts.h5")["task"]
    assert back.texts == ["change car tire", "make pizza", "perform CPR"]
    np.testing.assert_array_equal(back.ensemble, t.ensemble)


# ------------------------------------------------------------------------------------ template sets

def test_every_template_set_reads_well_for_its_kind_of_label():
    assert set(TEMPLATE_SETS) == {"actions", "things", "generic"} and TEMPLATE_SETS["actions"] == DEFAULT_TEMPLATES
    for name, templates in TEMPLATE_SETS.items():
        assert 6 <= len(templates) <= 10 and len(set(templates)) == len(templates), name
        assert all(t.count("{}") == 1 and t.format("x") for t in templates), name
    # a noun ("cartoon rabbit") must never land in a verb slot ("a person {}", "someone {}")
    for name in ("things", "generic"):
        prompts = [t.format("cartoon rabbit") for t in TEMPLATE_SETS[name]]
        assert not any("person cartoon" in p or "someone cartoon" in p or "is cartoon" in p for p in prompts), name
    assert all("the cartoon rabbit" in t.format("cartoon rabbit") for t in TEMPLATE_SETS["things"])


def _manifest_with_prompts(folder, prompts):
    labels = {"label_sets": {"class": {"labels": ["cartoon_rabbit", "dog"]}}}
    if prompts is not None:
        labels["prompts"] = prompts
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps(labels, indent=2))
    (folder / "videos.jsonl").write_text(json.dumps({"video_id": "a", "path": "a.mp4", "split": "train",
                                                     "labels": {"class": "dog"}}) + "\n")
    return folder


def test_choose_templates_flag_then_manifest_then_default(tmp_path, monkeypatch):
    things = load_manifest(_manifest_with_prompts(tmp_path / "t", "things"))
    plain = load_manifest(_manifest_with_prompts(tmp_path / "p", None))
    assert things.prompts == "things" and plain.prompts is None
    assert choose_templates(None, things) == list(TEMPLATE_SETS["things"])
    assert choose_templates(None, plain) == list(DEFAULT_TEMPLATES)
    assert choose_templates("generic", things) == list(TEMPLATE_SETS["generic"])   # the flag wins
    monkeypatch.chdir(tmp_path)
    (tmp_path / "actions").write_text("a film of {}.\n")
    assert choose_templates("actions") == list(DEFAULT_TEMPLATES)     # the exact name is the set ...
    assert choose_templates("./actions") == ["a film of {}."]        # ... ./ names the file
    with pytest.raises(PromptError, match="'nouns': neither a template set .*actions, things, generic.* nor a file"):
        choose_templates("nouns")


def test_an_unknown_template_set_in_labels_json_names_the_line(tmp_path):
    folder = _manifest_with_prompts(tmp_path / "m", "nouns")
    with pytest.raises(ManifestError, match=r"labels.json:\d+: field 'prompts': unknown prompt template set "
                                            r"'nouns'; choose one of actions, things, generic") as info:
        load_manifest(folder)
    assert '"prompts"' in (folder / "labels.json").read_text().splitlines()[info.value.line - 1]


def test_texts_cli_writes_the_chosen_set(tmp_path):
    from typer.testing import CliRunner

    from cmdcl_cache.cli import app

    manifest = _manifest_with_prompts(tmp_path / "mine", "things")
    base = ["texts", "--dataset", str(manifest), "--cache", str(tmp_path / "cache"), "--model", "cmdcl-tiny",
            "--pretrained", "none", "--device", "cpu", "--precision", "fp32"]
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 0, res.output
    texts = read_texts(tmp_path / "cache" / "mine" / "cmdcl-tiny-none" / "texts.h5")["class"]
    assert texts.templates == list(TEMPLATE_SETS["things"]) and texts.texts == ["cartoon rabbit", "dog"]
    res = CliRunner().invoke(app, base + ["--prompts", "generic"])
    assert res.exit_code == 0, res.output
    texts = read_texts(tmp_path / "cache" / "mine" / "cmdcl-tiny-none" / "texts.h5")["class"]
    assert texts.templates == list(TEMPLATE_SETS["generic"])
    res = CliRunner().invoke(app, base + ["--prompts", "nouns"])
    assert res.exit_code == 2 and "neither a template set" in res.output
