"""The smol zoo's data on the real SmolLM2-135M-Instruct: chat-formatted documents, disjoint
seeded splits, task files lm-eval scores as the zoo's own scorer does, and a retention task
the base already passes."""

from __future__ import annotations

import re

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from fuse_evo.evaluate.evaluator import Evaluator
from fuse_evo.zoo.chat_skills import (ANSWER_PATTERNS, CAPITALS, CHAT_SKILLS, GENERATION_FILTER, RETENTION,
                                      ChatExample, chat_prompt, chat_splits, training_examples, write_chat_tasks)
from fuse_evo.zoo.scoring import choice_accuracy, greedy_exact_match

FORMATS = {"extraction": r"name=[A-Z][a-z]+; city=[A-Z][a-z]+", "transform": r"[a-z]+( [a-z]+){2,4}",
           "dates": r"(19[5-9]\d|20[0-3]\d)-(0[1-9]|1[0-2])-(0[1-9]|[12]\d)"}


@pytest.fixture(scope="module")
def smol(smol_base):
    return AutoModelForCausalLM.from_pretrained(smol_base).eval(), AutoTokenizer.from_pretrained(smol_base)


def test_documents_are_chat_formatted_seeded_and_disjoint(smol):
    _, tok = smol
    for skill, pattern in FORMATS.items():
        splits = chat_splits(tok, skill, seed=0, n_search=30, n_heldout=40)
        assert splits == chat_splits(tok, skill, seed=0, n_search=30, n_heldout=40)
        assert splits != chat_splits(tok, skill, seed=1, n_search=30, n_heldout=40)
        prompts = [d.prompt for docs in splits.values() for d in docs]
        assert len(prompts) == len(set(prompts)) == 70
        assert all(p.endswith("<|im_start|>assistant") and "Answer with the answer only." in p for p in prompts)
        assert all(re.fullmatch(pattern, d.answer) for docs in splits.values() for d in docs)
        train = training_examples(tok, skill, 50, seed=0, exclude=set(prompts))
        assert not {d.prompt for d in train} & set(prompts)
    retention = chat_splits(tok, RETENTION, seed=0, n_search=20, n_heldout=30)
    docs = retention["search"] + retention["heldout"]
    assert len(docs) == len(CAPITALS) and all(d.choices[d.gold] == d.answer and len(set(d.choices)) == 4 for d in docs)


def _greedy_answer(model, tok, prompt: str) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    return tok.decode(out).split("<|im_end|>")[0]


def _extracted(skill: str, text: str) -> str:
    found = re.findall(ANSWER_PATTERNS[skill], text)
    return found[0].strip() if found else "[invalid]"


def test_the_task_files_score_as_the_zoo_scorer_and_the_base_knows_its_capitals(smol, tmp_path):
    model, tok = smol
    splits = {s: chat_splits(tok, s, seed=0, n_search=16, n_heldout=8) for s in CHAT_SKILLS}
    splits[RETENTION] = chat_splits(tok, RETENTION, seed=0, n_search=20, n_heldout=30)
    # half the generation documents get the base's own greedy answer as their target: the
    # generate_until task must count exactly those (its context, stop sequence and newline)
    held = splits["dates"]["heldout"]
    held[:4] = [ChatExample(d.prompt, _extracted("dates", _greedy_answer(model, tok, d.prompt))) for d in held[:4]]
    # two documents the base surely answers with an ISO date (an echo): their targets must
    # reach lm-eval as text (datasets reads a column of ISO dates as timestamps)
    held[4:6] = [ChatExample(chat_prompt(tok, f"Repeat exactly: {day}"), day) for day in ("2015-06-27", "1984-03-01")]
    assert all(_extracted("dates", _greedy_answer(model, tok, d.prompt)) == d.answer for d in held[4:6])
    expected = sum(_extracted("dates", _greedy_answer(model, tok, d.prompt)) == d.answer for d in held) / len(held)
    assert expected >= 0.5
    names = write_chat_tasks(tmp_path / "tasks", splits, generation=("dates",))
    search = [names[s]["search"] for s in splits]
    scores = Evaluator(model, tok, search + [names["dates"]["gen_heldout"]], include_path=tmp_path / "tasks",
                       batch_size=16).score().flat()
    for skill in CHAT_SKILLS:  # lm-eval's loglikelihood acc is the zoo's greedy exact match
        assert scores[f"{names[skill]['search']}/acc,none"] == pytest.approx(
            greedy_exact_match(model, tok, splits[skill]["search"]))
    retention = scores[f"{names[RETENTION]['search']}/acc,none"]
    assert retention >= 0.8  # what the base knows, whatever the style
    assert retention == pytest.approx(choice_accuracy(model, tok, splits[RETENTION]["search"]))
    assert scores[f"{names['dates']['gen_heldout']}/exact_match,{GENERATION_FILTER}"] == pytest.approx(expected)
