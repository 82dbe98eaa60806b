"""Writes the project's small fine-tuning datasets (data_prep/tasks/), deterministically.

    python -m data_prep.make_task_data [--output data_prep/tasks] [--train 300] [--valid 100] [--seed 0]

Three tasks in the formats of `megatron_bloom.tasks.formats`, in English, French and Spanish (BLOOM is
multilingual), written for this project from templates and word lists, so that they carry a signal a tiny
model can learn and a test can check, with no download:

* sentiment.{train,valid}.jsonl: sequence classification, labels negative / neutral / positive, decided by
  the adjective of a review sentence;
* entities.{train,valid}.jsonl: token classification, BIO tags of people (PER) and places (LOC);
* questions.{train,valid}.jsonl: extractive question answering (SQuAD layout) over short biographies.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SENTIMENT = {
    "en": ("The {thing} was {adjective}.", "things", {
        "positive": ["wonderful", "excellent", "delightful", "great", "superb"],
        "negative": ["terrible", "awful", "dreadful", "bad", "disappointing"],
        "neutral": ["ordinary", "average", "acceptable", "standard", "typical"]},
        ["film", "meal", "hotel", "book", "concert", "service"]),
    "fr": ("Le {thing} était {adjective}.", "things", {
        "positive": ["merveilleux", "excellent", "superbe", "formidable"],
        "negative": ["horrible", "affreux", "mauvais", "décevant"],
        "neutral": ["ordinaire", "moyen", "correct", "banal"]},
        ["film", "repas", "livre", "concert", "service"]),
    "es": ("El {thing} fue {adjective}.", "things", {
        "positive": ["maravilloso", "excelente", "estupendo", "genial"],
        "negative": ["horrible", "terrible", "malo", "decepcionante"],
        "neutral": ["normal", "corriente", "aceptable", "regular"]},
        ["libro", "concierto", "hotel", "servicio", "viaje"]),
}
PEOPLE = [("Ada", "Lovelace"), ("Marie", "Curie"), ("Alan", "Turing"), ("Frida", "Kahlo"), ("Pablo", "Neruda"),
          ("Simone", "Veil"), ("Nelson", "Mandela"), ("Rosalind", "Franklin"), ("Miguel", "Cervantes"),
          ("Hedy", "Lamarr"), ("Emmy", "Noether"), ("Victor", "Hugo")]
PLACES = ["Paris", "London", "Madrid", "Lagos", "Lima", "Dakar", "Montreal", "Hanoi", "Quito", "Lyon", "Seville",
          "Nairobi", "Mumbai", "Valparaiso"]
ENTITY_TEMPLATES = ["{person} lives in {place} .", "Yesterday {person} flew from {place} to {place2} .",
                    "{person} a visité {place} .", "{person} nació en {place} .",
                    "In {place} , {person} met {person2} ."]
BIOGRAPHY = ("{first} {last} was born in {place} in {year}. After studying {field}, {first} moved to {place2}, "
             "where {first} worked for {years} years.")
QUESTIONS = [("Where was {first} {last} born?", "place"), ("In which year was {first} {last} born?", "year"),
             ("What did {first} {last} study?", "field"), ("Where did {first} {last} move to?", "place2")]
FIELDS = ["mathematics", "chemistry", "painting", "law", "poetry", "physics", "music", "medicine"]


def sentiment(rng: random.Random) -> dict:
    template, _, adjectives, things = SENTIMENT[rng.choice(sorted(SENTIMENT))]
    label = rng.choice(sorted(adjectives))
    return {"text": template.format(thing=rng.choice(things), adjective=rng.choice(adjectives[label])),
            "label": label}


def entities(rng: random.Random) -> dict:
    template = rng.choice(ENTITY_TEMPLATES)
    (first, last), (first2, last2) = rng.sample(PEOPLE, 2)
    place, place2 = rng.sample(PLACES, 2)
    values = {"{person}": [(first, "B-PER"), (last, "I-PER")], "{person2}": [(first2, "B-PER"), (last2, "I-PER")],
              "{place}": [(place, "B-LOC")], "{place2}": [(place2, "B-LOC")]}
    tokens, tags = [], []
    for word in template.split():
        for token, tag in values.get(word, [(word, "O")]):
            tokens.append(token)
            tags.append(tag)
    return {"tokens": tokens, "tags": tags}


def question(rng: random.Random, identifier: str) -> dict:
    first, last = rng.choice(PEOPLE)
    place, place2 = rng.sample(PLACES, 2)
    facts = {"first": first, "last": last, "place": place, "place2": place2, "year": str(rng.randint(1800, 1990)),
             "field": rng.choice(FIELDS), "years": str(rng.randint(2, 40))}
    context = BIOGRAPHY.format(**facts)
    template, slot = rng.choice(QUESTIONS)
    answer = facts[slot]
    # the answer's first occurrence after the name (a place may not repeat, a year appears once)
    start = context.index(answer, len(first) + len(last) + 1)
    return {"id": identifier, "context": context, "question": template.format(**facts),
            "answers": {"text": [answer], "answer_start": [start]}}


def write(path: Path, records) -> None:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(Path(__file__).parent / "tasks"))
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--valid", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for split, count, offset in (("train", args.train, 0), ("valid", args.valid, 1)):
        rng = random.Random(args.seed * 2 + offset)
        write(output / f"sentiment.{split}.jsonl", [sentiment(rng) for _ in range(count)])
        write(output / f"entities.{split}.jsonl", [entities(rng) for _ in range(count)])
        write(output / f"questions.{split}.jsonl", [question(rng, f"{split}-{i}") for i in range(count)])
    print(f"wrote {args.train} training and {args.valid} validation examples per task to {output}")


if __name__ == "__main__":
    main()
