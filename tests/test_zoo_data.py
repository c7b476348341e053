"""Skills, splits, tokenizer and task files: the zoo's data, without any training."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from fuse_evo.zoo.skills import (
    N_CHOICES, SKILLS, Example, GenericText, choices, eval_splits, increment, reverse, shift,
)
from fuse_evo.zoo.tasks import write_tasks
from fuse_evo.zoo.tokenizer import build_tokenizer
from fuse_evo.zoo.train import IGNORE, MixtureBatches


def test_skills_compute_their_answers():
    rng = random.Random(0)
    for _ in range(200):
        ex = increment(rng)
        assert int(ex.answer) == int(ex.prompt.split()[1]) + 1
        ex = reverse(rng)
        assert ex.answer == ex.prompt.split()[1][::-1]
        ex = shift(rng)
        word = ex.prompt.split()[1]
        assert all((ord(b) - ord(a)) % 26 == 3 for a, b in zip(word, ex.answer))


def test_shift_wraps_and_increment_carries():
    class Fixed(random.Random):
        def __init__(self, values):
            super().__init__(0)
            self.values = list(values)

        def randint(self, a, b):
            return self.values.pop(0)

        def randrange(self, a, b=None):
            return self.values.pop(0)

        def choice(self, seq):
            return self.values.pop(0)

    assert increment(Fixed([4, 9999])).answer == "10000"
    assert shift(Fixed([3, "x", "y", "z"])).answer == "abc"


def test_eval_splits_are_disjoint_deterministic_and_seeded():
    search, heldout = eval_splits("reverse", seed=0, n_search=50, n_heldout=100)
    assert len(search) == 50 and len(heldout) == 100
    assert not {e.prompt for e in search} & {e.prompt for e in heldout}
    again = eval_splits("reverse", seed=0, n_search=50, n_heldout=100)
    assert (search, heldout) == again
    other = eval_splits("reverse", seed=1, n_search=50, n_heldout=100)
    assert other[0] != search


def test_tokenizer_is_char_level_with_bos_from_post_processor(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "rot abz = dec"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    # a prompt's encoding is a prefix of prompt + continuation: lm-eval's split is exact
    assert tok("inc 41 = 42")["input_ids"][: len(tok("inc 41 =")["input_ids"])] == tok("inc 41 =")[
        "input_ids"
    ]


def test_batches_train_on_the_continuation_only_and_skip_excluded_prompts():
    tok = build_tokenizer()
    # exclude almost every 3-digit increment prompt: batches must still never show one
    excluded = {f"inc {n} =" for n in range(100, 1000) if n != 555}
    batches = MixtureBatches(tok, {"increment": 1.0}, 64, seed=0, excluded=excluded, generic_seed=0)
    ids, mask, labels = next(batches)
    for row in range(ids.shape[0]):
        text = tok.decode(ids[row][mask[row].bool()], skip_special_tokens=True)
        assert text.split(" =")[0] + " =" not in excluded
        targets = tok.decode(labels[row][labels[row] != IGNORE])
        answer = text.split(" = ")[1]
        assert targets == f" {answer}{tok.eos_token}"


def test_unknown_mixture_source_is_named():
    with pytest.raises(ValueError, match="sorting"):
        MixtureBatches(build_tokenizer(), {"sorting": 1.0}, 4, 0, set(), 0)


def test_generic_text_uses_a_fixed_lexicon():
    g = GenericText(seed=3)
    words = set(g(random.Random(0)).split()) | set(g(random.Random(1)).split())
    assert words <= set(g.lexicon)
    assert GenericText(seed=3).lexicon == g.lexicon


def test_task_files_have_absolute_paths_and_one_generation_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    splits = {
        skill: dict(zip(("search", "heldout"), eval_splits(skill, 0, 5, 7))) for skill in SKILLS
    }
    names = write_tasks(tmp_path / "tasks", splits, generation_skill="increment")
    assert names["reverse"] == {
        "search": "zoo_reverse_search", "heldout": "zoo_reverse_heldout",
        "mc_search": "zoo_reverse_mc_search", "mc_heldout": "zoo_reverse_mc_heldout",
    }
    assert names["increment"]["generate_heldout"] == "zoo_increment_gen_heldout"
    kinds = {"generate": "generate_until", "mc": "multiple_choice"}
    for skill, by_split in names.items():
        for key, name in by_split.items():
            kind, _, split = key.rpartition("_")
            spec = yaml.safe_load((tmp_path / "tasks" / f"{name}.yaml").read_text())
            data = spec["dataset_kwargs"]["data_files"]["test"]
            assert data.startswith("/")
            rows = [json.loads(line) for line in open(data)]
            expected = splits[skill][split]
            assert [r["prompt"] for r in rows] == [e.prompt for e in expected]
            assert spec["output_type"] == kinds.get(kind, "loglikelihood")


def test_multiple_choice_rows_hold_the_answer_among_distinct_near_misses(tmp_path):
    splits = {skill: dict(zip(("search", "heldout"), eval_splits(skill, 0, 40, 40))) for skill in SKILLS}
    names = write_tasks(tmp_path / "tasks", splits, generation_skill=None)
    for skill in SKILLS:
        spec = yaml.safe_load((tmp_path / "tasks" / f"{names[skill]['mc_search']}.yaml").read_text())
        assert (spec["doc_to_choice"], spec["doc_to_target"]) == ("choices", "gold")
        assert [m["metric"] for m in spec["metric_list"]] == ["acc", "acc_norm"]
        rows = [json.loads(line) for line in open(spec["dataset_kwargs"]["data_files"]["test"])]
        golds = set()
        for row, ex in zip(rows, splits[skill]["search"], strict=True):
            assert len(set(row["choices"])) == N_CHOICES == len(row["choices"])
            assert row["choices"][row["gold"]] == ex.answer
            golds.add(row["gold"])
        assert golds == set(range(N_CHOICES))  # the answer is not always in one place
    # near misses are the slips each skill invites, and never the answer itself
    assert choices("increment", Example("inc 4829 =", "4830"), 0) == (["4830", "4829", "4831", "4840"], 0)
    options, gold = choices("reverse", Example("rev aba =", "aba"), 1)
    assert gold == 1 and options[1] == "aba" and len(set(options)) == N_CHOICES
    assert choices("shift", Example("rot abz =", "dec"), 3)[0] == ["abz", "cdb", "efd", "dec"]
