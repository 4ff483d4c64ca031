"""Rewrite the generated blocks of the README and of docs/configuration.md.

    python docs/update_readme.py              # docs/configuration.md's settings tables, from the dataclasses
    python docs/update_readme.py --demo       # also every command-output block of the README, from a real run
    python docs/update_readme.py --demo NAME  # only the output block NAME (a key of OUTPUTS)

An output block sits between `<!-- output NAME:start -->` and `<!-- output NAME:end -->`; OUTPUTS names the command
that fills it. The command runs as in a fresh clone: from a temporary folder that links every top-level entry of
the repository except `outputs/`, so nothing a previous run built is reused. The block shows its standard output
without TRL's training log lines (they carry timings), then the command and the library versions it ran with.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from sstoken_trl.tools.arguments import fields_markdown

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIG_PAGE = ROOT / "docs" / "configuration.md"  # holds the configuration tables, between START and END
START, END = "<!-- sstoken-config:start -->", "<!-- sstoken-config:end -->"
BLOCK = re.compile(re.escape(START) + r"\n(.*?)" + re.escape(END), re.DOTALL)

# Output blocks of the README: name -> the command line whose output fills it (a console script of this package).
OUTPUTS = {
    "demo-cpu": "sstoken-train --config recipes/demo-cpu.yaml",
    "smollm2-135m-cpu": "sstoken-train --config recipes/smollm2-135m-cpu.yaml",
}
SCRIPTS = {"sstoken-train": "sstoken_trl.tools.cli", "sstoken-inspect": "sstoken_trl.tools.inspection"}
FRESH_EXCLUDES = {"outputs"}  # what a run builds: left out of the fresh folder
VERSIONS = ("torch", "transformers", "trl", "peft", "tokenizers")
LOG_LINE = re.compile(r"^\{'.*\}$")  # the trainer's metric dicts, printed every logging_steps


def config_block(text: str) -> str:
    """The text between the configuration markers of `text` (the content of docs/configuration.md)."""
    match = BLOCK.search(text)
    if match is None:
        raise ValueError(f"{CONFIG_PAGE.relative_to(ROOT)} lacks the markers {START} ... {END}.")
    return match.group(1)


def output_markers(name: str) -> tuple[str, str]:
    return f"<!-- output {name}:start -->", f"<!-- output {name}:end -->"


def output_block(text: str, name: str) -> str:
    """The printed output shown in the README's output block `name` (the content of its ```text fence)."""
    start, end = output_markers(name)
    match = re.search(re.escape(start) + r"\n```text\n(.*?)```\n.*?" + re.escape(end), text, re.DOTALL)
    if match is None:
        raise ValueError(f"README.md lacks the block {start} ```text ... ``` ... {end}.")
    return match.group(1)


def readme_view(stdout: str) -> str:
    """What an output block shows of a command's standard output: every line but the trainer's log dicts."""
    return "".join(line + "\n" for line in stdout.splitlines() if not LOG_LINE.match(line))


def stable(view: str) -> str:
    """The parts of a view that do not depend on training length or library versions: the lines and their
    wording, with figures masked (N), sample texts (and the note on them) elided, and wrapped continuation lines
    joined."""
    lines: list[str] = []
    for line in view.splitlines():
        if line.startswith("    ") and lines:
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"^(  sample) \d+: .*$", r"\1 N: ...", text, flags=re.MULTILINE)
    text = re.sub(r"^  Note: .*\n", "", text, flags=re.MULTILINE)  # on the samples, like them
    return re.sub(r"[+-]?(?:\d+(?:\.\d+)?|nan)|(?<=\| )none\b", "N", text)


def run_command(command: str) -> str:
    """Standard output of `command` (a console script of this package), run as in a fresh clone."""
    program, *args = shlex.split(command)
    if program not in SCRIPTS:
        raise ValueError(f"{program!r} is not one of this package's commands: {', '.join(SCRIPTS)}.")
    with tempfile.TemporaryDirectory(prefix="readme-run-") as folder:
        for entry in ROOT.iterdir():
            if entry.name not in FRESH_EXCLUDES:
                (Path(folder) / entry.name).symlink_to(entry)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        done = subprocess.run(
            [sys.executable, "-m", SCRIPTS[program], *args], cwd=folder, env=env, capture_output=True, text=True
        )
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


CHECKS = {  # how the tests hold each block to a real run
    "demo-cpu": "the lines and their wording do not (a test checks them against a shortened run)",
    "smollm2-135m-cpu": "a test runs the same recipe end to end, shortened (tests/test_real_model.py)",
}


def render_output_block(name: str, stdout: str) -> str:
    versions = ", ".join(f"{package} {importlib.metadata.version(package)}" for package in VERSIONS)
    note = (
        f"Printed by `{OUTPUTS[name]}` in a fresh clone, TRL's training log lines left out ({versions}; "
        f"`python docs/update_readme.py --demo {name}` regenerates it). The figures and the samples shown depend "
        f"on these versions; {CHECKS[name]}."
    )
    return f"```text\n{readme_view(stdout)}```\n\n{textwrap.fill(note, 116, break_on_hyphens=False)}\n"


def replace_output_block(text: str, name: str, body: str) -> str:
    start, end = output_markers(name)
    pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.DOTALL)
    if pattern.search(text) is None:
        raise ValueError(f"README.md lacks the markers {start} ... {end}.")
    return pattern.sub(lambda _: f"{start}\n{body}{end}", text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--demo",
        nargs="*",
        metavar="NAME",
        help=f"Also regenerate the output blocks NAME (default: all of {', '.join(OUTPUTS)}) by running them.",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.demo or [] if name not in OUTPUTS]
    if unknown:
        raise SystemExit(f"No output block {unknown[0]!r}; the README has {', '.join(OUTPUTS)}.")
    page = CONFIG_PAGE.read_text(encoding="utf-8")
    config_block(page)  # raises when the markers are gone
    CONFIG_PAGE.write_text(BLOCK.sub(lambda _: f"{START}\n{fields_markdown()}{END}", page), encoding="utf-8")
    if args.demo is None:
        return
    text = README.read_text(encoding="utf-8")
    for name in args.demo or list(OUTPUTS):
        print(f"Running {OUTPUTS[name]} ...", flush=True)
        text = replace_output_block(text, name, render_output_block(name, run_command(OUTPUTS[name])))
    README.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
