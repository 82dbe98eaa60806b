"""Loads a shipped task's jsonl (beside this file) as lm-eval's `custom_dataset`, whatever the working
directory: `custom_dataset: !function local_data.load` with `dataset_kwargs: {file: NAME.jsonl}`."""

from pathlib import Path


def load(file: str, **metadata):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(Path(__file__).parent / file))})
