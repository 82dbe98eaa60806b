"""The documentation in docs/ covers the public interface: every config key (the reference is generated from
the schema and must be current), every command and each of its flags; nothing the README or docs/ link
to lies outside the repository; and the commands' module names of earlier versions still work."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from megatron_bloom.config import compose_dictconfig
from megatron_bloom.config.reference import config_keys, render_markdown
from tests.conftest import REPO

DOCS = REPO / "docs"


def leaf_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_configuration_reference_is_generated_from_the_current_schema():
    written = (DOCS / "configuration.md").read_text()
    assert written == render_markdown(), ("docs/configuration.md is out of date: run "
                                          "python -m megatron_bloom.config.reference > docs/configuration.md")


def test_every_schema_key_is_documented_with_its_default_and_meaning():
    composed = OmegaConf.to_container(compose_dictconfig([]), resolve=False)
    schema_keys = set(leaf_keys(composed))
    documented = {key.key: key for key in config_keys()}
    assert set(documented) == schema_keys
    page = (DOCS / "configuration.md").read_text()
    for key in sorted(schema_keys):
        reference = documented[key]
        assert reference.doc, f"{key} has no documentation string in the schema"
        assert f"| `{key}` | {reference.type} | `{reference.default}` | {reference.doc}" in page, key


def console_scripts():
    text = (REPO / "setup.py").read_text()
    return dict(re.findall(r'"(mbloom-[a-z-]+)=([\w.]+):main"', text))


def section(page: str, command: str) -> str:
    start = page.index(f"## `{command}`")
    end = page.find("\n## ", start + 1)
    return page[start: end if end >= 0 else None]


def parser_flags(parser: argparse.ArgumentParser):
    for action in parser._actions:  # argparse keeps no public list of its options
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield name
                yield from parser_flags(subparser)
        else:
            yield from action.option_strings


@pytest.mark.parametrize("command", sorted(console_scripts()))
def test_every_command_and_flag_is_documented(command):
    module = importlib.import_module(console_scripts()[command])
    page = (DOCS / "commands.md").read_text()
    text = section(page, command)
    assert f"`{module.__name__}`" in page
    if hasattr(module, "build_parser"):
        flags = set(parser_flags(module.build_parser()))
    else:  # Hydra overrides, plus the few flags the command declares
        flags = {"-h", "--help", *getattr(module, "SWITCHES", ()), *getattr(module, "OPTIONS", ())}
    missing = [flag for flag in sorted(flags) if f"`{flag}" not in text and f"{flag}`" not in text]
    assert not missing, f"docs/commands.md does not document {command}'s {missing}"


def markdown_files():
    return [REPO / "README.md", REPO / "launch" / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_documents_link_only_to_files_of_the_repository(path):
    text = path.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(REPO), f"{path.name} links outside the repository: {target}"
        assert resolved.exists(), f"{path.name} links to a missing file: {target}"


def test_nothing_refers_to_files_outside_the_repository():
    """The interface is documented here (docs/); no file may send a reader to documents the repository
    does not hold."""
    outside = re.compile(r"INTERFACE\.md|NOTES\.md|STYLE\.md|\.\./shared")
    offenders = []
    for path in sorted(REPO.rglob("*")):
        if (not path.is_file() or ".git" in path.parts or "__pycache__" in path.parts
                or path.suffix not in (".py", ".md", ".yaml", ".sh", ".sbatch", ".txt", ".cfg", ".ini", "")):
            continue
        if path == REPO / "tests" / "test_docs.py":
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if outside.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_readme_links_the_docs():
    readme = (REPO / "README.md").read_text()
    for page in ("docs/architecture.md", "docs/commands.md", "docs/configuration.md", "docs/files.md"):
        assert f"]({page})" in readme, page


EARLIER_MODULES = {"megatron_bloom.train": "megatron_bloom.cli.train", "megatron_bloom.eval": "megatron_bloom.cli.eval",
                   "megatron_bloom.generate": "megatron_bloom.cli.generate",
                   "megatron_bloom.launch": "megatron_bloom.cli.launch", "megatron_bloom.plan": "megatron_bloom.cli.plan",
                   "megatron_bloom.convert": "megatron_bloom.cli.convert"}


@pytest.mark.parametrize("earlier", sorted(EARLIER_MODULES))
def test_the_module_names_of_earlier_versions_still_run_the_commands(earlier):
    """`python -m megatron_bloom.train` (users' torchrun and SLURM scripts) runs mbloom-train's `main`."""
    module = importlib.import_module(earlier)
    assert module.main is importlib.import_module(EARLIER_MODULES[earlier]).main
    assert 'if __name__ == "__main__":\n    main()' in (REPO / (earlier.replace(".", "/") + ".py")).read_text()


def test_an_earlier_module_name_starts_the_command():
    result = subprocess.run([sys.executable, "-m", "megatron_bloom.train", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: mbloom-train"), result.stderr


@pytest.mark.parametrize("command", ["train", "convert"])
def test_help_prints_no_warning(command):
    """No accelerator warning (DeepSpeed's "Setting accelerator to CPU ...") or other noise on --help."""
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    result = subprocess.run([sys.executable, "-m", f"megatron_bloom.cli.{command}", "--help"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: mbloom-{command}")
    assert result.stderr == ""
