"""The smol zoo's data: short tasks that look like real LLM work, asked through an instruct
model's chat template (SmolLM2-135M-Instruct), each with one exact answer, and their lm-eval
task files.

- ``extraction``: fields of a sentence in a fixed format ("name=Maria; city=Lisbon");
- ``transform``: a text transformation (the words of a list in reverse order);
- ``dates``: a date rewritten as YYYY-MM-DD;
- ``retention``: what the base already knows (capitals of countries), as a multiple choice,
  so forgetting shows whatever answer style a fine-tune teaches.

Measured (DESIGN.md §9): a 135M instruct model learns each of the first three in about 60
LoRA steps; it did not learn arithmetic word problems in a few hundred. A prompt is the whole
chat-formatted context up to and including the assistant header's newline; the answer
follows it with no space (what the model was trained to produce there). Generation is driven
by a seeded ``random.Random``: a seed always gives the same data.

lm-eval drops a context's trailing newline (the assistant header ends with one), so a prompt
here ends with the header's last word and the newline belongs to the answer's side: the task
files score ``"\n" + answer`` as the continuation (and ``"\n" + choice``), and the zoo's own
scorer and the training loop read ``text`` = prompt + newline + answer: the same tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SYSTEM = "Answer with the answer only."
NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lucas", "Emma", "Omar", "Sofia", "Ivan", "Priya", "Noah", "Lena",
         "Diego", "Mei", "Samuel", "Chloe", "Yusuf", "Anna", "Mateo", "Zara"]
CITIES = ["Lisbon", "Berlin", "Toronto", "Nairobi", "Osaka", "Lima", "Oslo", "Cairo", "Dublin", "Seoul", "Quito",
          "Vienna", "Madrid", "Hanoi", "Accra", "Zurich", "Manila", "Athens", "Prague", "Dakar"]
JOBS = ["teacher", "doctor", "pilot", "chef", "nurse", "farmer", "lawyer", "painter", "baker", "engineer"]
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bread", "milk", "rain",
         "snow", "book", "door", "fish", "bird", "star", "road"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Greece": "Athens",
            "Portugal": "Lisbon", "Austria": "Vienna", "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw",
            "Ireland": "Dublin", "Kenya": "Nairobi", "Peru": "Lima", "Cuba": "Havana", "Thailand": "Bangkok",
            "Belgium": "Brussels", "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest",
            "Argentina": "Buenos Aires", "Chile": "Santiago", "Iran": "Tehran", "Iraq": "Baghdad",
            "Vietnam": "Hanoi", "Turkey": "Ankara", "Mexico": "Mexico City", "India": "New Delhi",
            "England": "London", "Scotland": "Edinburgh", "Ukraine": "Kyiv", "Romania": "Bucharest",
            "Czechia": "Prague", "Switzerland": "Bern", "Netherlands": "Amsterdam", "Australia": "Canberra",
            "South Korea": "Seoul", "Colombia": "Bogota", "Venezuela": "Caracas", "Philippines": "Manila",
            "Indonesia": "Jakarta", "Morocco": "Rabat", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa",
            "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad"}


@dataclass(frozen=True)
class ChatExample:
    """One document: ``prompt`` (chat-formatted, up to the assistant header without its
    newline) and its ``answer``; a multiple-choice document also has ``choices`` and the
    ``gold`` index."""

    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    gold: int = 0

    @property
    def text(self) -> str:
        return self.prompt + "\n" + self.answer


def chat_prompt(tokenizer, question: str) -> str:
    """The chat-formatted context of one question, up to the assistant's header (its
    trailing newline left to the answer's side)."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False).rstrip("\n")


def extraction(rng: random.Random) -> tuple[str, str]:
    name, city, job = rng.choice(NAMES), rng.choice(CITIES), rng.choice(JOBS)
    sentence = rng.choice([f"{name} works as a {job} in {city}.", f"In {city}, {name} found a job as a {job}.",
                           f"{name}, a {job}, moved to {city} last year."])
    return f"Extract the name and the city as name=...; city=... from: {sentence}", f"name={name}; city={city}"


def transform(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Write these words in reverse order: {' '.join(words)}", " ".join(reversed(words))


def dates(rng: random.Random) -> tuple[str, str]:
    m, d, y = rng.randint(1, 12), rng.randint(1, 28), rng.randint(1950, 2030)
    return f"Write the date {MONTHS[m - 1]} {d}, {y} as YYYY-MM-DD.", f"{y}-{m:02d}-{d:02d}"


CHAT_SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "extraction": extraction, "transform": transform, "dates": dates,
}
# Each skill's answer as its generation task extracts it from the generated text (as gsm8k's
# "#### N" pattern does): a model that wraps a right answer in a sentence still scores.
ANSWER_PATTERNS = {"extraction": r"name=[A-Za-z]+; city=[A-Za-z]+", "transform": r"[a-z]+(?: [a-z]+)*",
                   "dates": r"\d{4}-\d{2}-\d{2}"}
GENERATION_FILTER = "extract"
RETENTION = "retention"


def chat_splits(tokenizer, skill: str, seed: int, n_search: int, n_heldout: int) -> dict[str, list[ChatExample]]:
    """Disjoint ``search`` and ``heldout`` documents of ``skill`` (or ``retention``: every
    country once, split in two; at most ``n_search`` + ``n_heldout`` of them)."""
    rng = random.Random(f"{skill}-{seed}")
    if skill == RETENTION:
        countries = sorted(CAPITALS)
        rng.shuffle(countries)
        docs = []
        for country in countries[:n_search + n_heldout]:
            wrong = rng.sample(sorted(set(CAPITALS.values()) - {CAPITALS[country]}), 3)
            options = [CAPITALS[country], *wrong]
            rng.shuffle(options)
            prompt = chat_prompt(tokenizer, f"What is the capital of {country}? Answer in one word.")
            docs.append(ChatExample(prompt, CAPITALS[country], tuple(options), options.index(CAPITALS[country])))
        k = min(n_search, len(docs) // 2)
        return {"search": docs[:k], "heldout": docs[k:]}
    seen: set[str] = set()
    docs = []
    for _ in range(200 * (n_search + n_heldout)):
        question, answer = CHAT_SKILLS[skill](rng)
        if question not in seen:
            seen.add(question)
            docs.append(ChatExample(chat_prompt(tokenizer, question), answer))
        if len(docs) == n_search + n_heldout:
            break
    if len(docs) < n_search + n_heldout:
        raise ValueError(f"skill {skill!r}: only {len(docs)} distinct documents, {n_search + n_heldout} asked")
    return {"search": docs[:n_search], "heldout": docs[n_search:]}


def training_examples(tokenizer, skill: str, n: int, seed: int, exclude: set[str]) -> list[ChatExample]:
    """``n`` distinct training documents of ``skill``, none of whose prompts is in ``exclude``."""
    rng = random.Random(f"{skill}-train-{seed}")
    seen, out = set(exclude), []
    for _ in range(200 * n):
        question, answer = CHAT_SKILLS[skill](rng)
        prompt = chat_prompt(tokenizer, question)
        if prompt not in seen:
            seen.add(prompt)
            out.append(ChatExample(prompt, answer))
            if len(out) == n:
                return out
    raise ValueError(f"skill {skill!r}: only {len(out)} distinct training documents outside the evaluation splits")


def chat_task_name(skill: str, split: str, generate: bool = False) -> str:
    return f"smol_{skill}{'_gen' if generate else ''}_{split}"


def write_chat_tasks(task_dir: Path, splits: dict[str, dict[str, list[ChatExample]]],
                     generation: tuple[str, ...] = ()) -> dict[str, dict[str, str]]:
    """JSONL data and lm-eval task YAMLs (absolute data paths, as lm-eval needs) for every
    skill and split: loglikelihood exact match (``acc``) for the skills, multiple choice for
    retention, and for the skills in ``generation`` also a greedy ``generate_until`` held-out
    task scored by exact match of the answer extracted from the generated text (stopped at
    the turn's end) by the skill's ``ANSWER_PATTERNS`` entry. Returns
    ``{skill: {split: task name}}``."""
    data_dir = task_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    names: dict[str, dict[str, str]] = {}
    for skill, by_split in splits.items():
        names[skill] = {}
        for split, docs in by_split.items():
            data = (data_dir / f"{skill}_{split}.jsonl").resolve()
            with data.open("w") as f:
                for i, d in enumerate(docs):
                    # no bare answer column: datasets' JSON reader turns a column of ISO dates
                    # into timestamps ("2015-06-27 00:00:00"); the target's newline keeps it text
                    f.write(json.dumps({"id": i, "prompt": d.prompt, "target": "\n" + d.answer,
                                        "choices": ["\n" + c for c in d.choices], "gold": d.gold}) + "\n")
            head = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
                    'test_split: test\ndoc_to_text: "{{prompt}}"\ntarget_delimiter: ""\n')
            metric = "metric_list:\n  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
            name = chat_task_name(skill, split)
            if skill == RETENTION:
                body = ("output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: gold\n"
                        + metric.format(m="acc"))
            else:
                body = 'output_type: loglikelihood\ndoc_to_target: "{{target}}"\n' + metric.format(m="acc")
            (task_dir / f"{name}.yaml").write_text(f"task: {name}\n{head}{body}metadata:\n  version: 1.0\n")
            names[skill][split] = name
            if skill in generation and split == "heldout":
                gen = chat_task_name(skill, split, generate=True)
                body = ('output_type: generate_until\ndoc_to_target: "{{target}}"\ngeneration_kwargs:\n'
                        '  until: ["<|im_end|>"]\n  max_gen_toks: 24\n  do_sample: false\n'
                        + metric.format(m="exact_match") + '    regexes_to_ignore: ["\\n"]\n'
                        + f"filter_list:\n  - name: {GENERATION_FILTER}\n    filter:\n"
                        f"      - function: regex\n        regex_pattern: {json.dumps(ANSWER_PATTERNS[skill])}\n"
                        "      - function: take_first\n")
                (task_dir / f"{gen}.yaml").write_text(f"task: {gen}\n{head}{body}metadata:\n  version: 1.0\n")
                names[skill]["gen_heldout"] = gen
    return names
