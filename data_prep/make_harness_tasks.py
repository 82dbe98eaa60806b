"""Writes the project's small lm-evaluation-harness tasks (tasks/), deterministically.

    python -m data_prep.make_harness_tasks [--output tasks] [--examples 60] [--seed 0]

Four offline tasks built from the sample corpus's sentences (`data_prep/sample_corpus.py`: ten languages,
five scripts), one per kind of request lm-eval makes, so that `mbloom-eval eval.harness.tasks=[...]` can be
tried and tested without a download:

* mbloom_choice.jsonl (`multiple_choice`, loglikelihood of each choice): the first half of a sentence, and
  four second halves of sentences of the same language, one of them its own (nine languages: Chinese has too
  few sentences with a comma to cut);
* mbloom_cloze.jsonl (`loglikelihood`, LAMBADA-style): a sentence without its last word, and that word;
* mbloom_perplexity.jsonl (`loglikelihood_rolling`): whole documents, for word and byte perplexity;
* mbloom_generate.jsonl (`generate_until`): the first half of a sentence, and the rest to generate.

Halves are cut at a space (after a comma in Chinese, which has no spaces). The YAML files beside them say how
lm-eval reads each (tasks/*.yaml); `tasks/local_data.py` loads the jsonl next to it, from any directory.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Dict, List, Tuple

from data_prep.sample_corpus import SENTENCES, generate_documents

LANGUAGES = sorted(language for language in SENTENCES if not language.startswith("code"))


def halves(sentence: str, language: str) -> Tuple[str, str]:
    """(first half, second half with its leading space): cut at the middle space, or in Chinese after the
    first comma. Byte-level BPE never merges across either (a space begins a pre-token, and so does
    punctuation), so the context's tokens are the first tokens of the whole sentence's, whatever the
    vocabulary: lm-eval scores a continuation as the tokens after the context's."""
    if language == "zh":
        cut = sentence.index("，") + 1
        return sentence[:cut], sentence[cut:]
    spaces = [index for index, character in enumerate(sentence) if character == " "]
    cut = spaces[len(spaces) // 2]
    return sentence[:cut], sentence[cut:]


def sentences(language: str) -> List[str]:
    """The sample corpus's sentences of `language` that `halves` can cut."""
    return [s for s in SENTENCES[language] if ("，" in s[:-1] if language == "zh" else " " in s)]


def choice_examples(rng: random.Random, count: int) -> List[dict]:
    languages = [language for language in LANGUAGES if len(sentences(language)) >= 4]  # four choices
    examples = []
    for _ in range(count):
        language = rng.choice(languages)
        sentence, *others = rng.sample(sentences(language), 4)
        context, ending = halves(sentence, language)
        choices = [ending] + [halves(other, language)[1] for other in others]
        rng.shuffle(choices)
        examples.append({"lang": language, "context": context, "choices": choices,
                         "answer": choices.index(ending)})
    return examples


def cloze_examples(rng: random.Random, count: int) -> List[dict]:
    spaced = [language for language in LANGUAGES if language != "zh"]
    examples = []
    for _ in range(count):
        language = rng.choice(spaced)
        sentence = rng.choice(SENTENCES[language]).rstrip(".!?。")
        context, _, word = sentence.rpartition(" ")
        examples.append({"lang": language, "context": context, "target": " " + word})
    return examples


def generation_examples(rng: random.Random, count: int) -> List[dict]:
    examples = []
    for _ in range(count):
        language = rng.choice(LANGUAGES)
        context, rest = halves(rng.choice(sentences(language)), language)
        examples.append({"lang": language, "context": context, "target": rest})
    return examples


def write_tasks(output: Path, examples: int, seed: int) -> Dict[str, int]:
    rng = random.Random(seed)
    files = {
        "mbloom_choice.jsonl": choice_examples(rng, examples),
        "mbloom_cloze.jsonl": cloze_examples(rng, examples),
        "mbloom_perplexity.jsonl": [{"lang": document["lang"], "text": document["text"]}
                                    for document in generate_documents(examples // 2, seed=seed + 1)],
        "mbloom_generate.jsonl": generation_examples(rng, examples),
    }
    output.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        (output / name).write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records),
                                   encoding="utf-8")
    return {name: len(records) for name, records in files.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "tasks")
    parser.add_argument("--examples", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, count in write_tasks(args.output, args.examples, args.seed).items():
        print(f"{args.output / name}: {count} examples")


if __name__ == "__main__":
    main()
