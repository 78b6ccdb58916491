"""The evaluation stack: the library versions a score depends on.

Two validators scoring the same submission on the same seed must get the same numbers, or their
weights disagree for no reason a miner can act on. Kernels (torch, triton, fla), the teacher's
modelling code and the tokenizers (transformers, tokenizers), the bootstrap's RNG (numpy) and the
held-out sampling (datasets) all move scores between releases. A competition file pins the exact
versions in `eval_stack`; a validator compares what it has installed before it scores anything
(`check_stack`) and records its versions with every round.

Versions compare by their public part: torch 2.13.0+cpu and 2.13.0+cu130 are the same release
built for different devices (which device a validator uses is its own business).
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Mapping

# the packages whose release changes evaluation numbers (distribution names, as pip spells them)
NUMERIC_PACKAGES = ("torch", "triton", "flash-linear-attention", "fla-core", "transformers", "tokenizers",
                    "numpy", "datasets")
ABSENT = "absent"


class StackMismatch(ValueError):
    pass


def public_version(version: str) -> str:
    return version.split("+", 1)[0]


def read_lock(path: str | Path) -> dict[str, str]:
    """requirements.lock (pip's name==version lines, # comments) -> {normalised name: version}."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def installed_versions(packages=NUMERIC_PACKAGES) -> dict[str, str]:
    """{package: installed public version, or "absent"}."""
    found = {}
    for name in packages:
        try:
            found[name] = public_version(metadata.version(name))
        except metadata.PackageNotFoundError:
            found[name] = ABSENT
    return found


def stack_mismatches(pinned: Mapping[str, str], installed: Mapping[str, str] | None = None) -> list[str]:
    """One line per pinned package whose installed version differs, e.g.
    'transformers 5.23.0 (the competition pins 5.24.0)'."""
    installed = installed_versions(tuple(pinned)) if installed is None else installed
    return [f"{name} {installed.get(name, ABSENT)} (the competition pins {want})"
            for name, want in sorted(pinned.items()) if installed.get(name, ABSENT) != public_version(want)]


def check_stack(pinned: Mapping[str, str], *, allow_mismatch: bool = False) -> dict:
    """What a round records about the stack it ran on; raises StackMismatch when the installed
    versions differ from `pinned` and the operator did not allow it.

    {"installed": {package: version}, "pinned": bool, "mismatch": [line, ...], "mismatch_allowed": bool}
    """
    installed = installed_versions(tuple(dict.fromkeys((*NUMERIC_PACKAGES, *pinned))))
    mismatch = stack_mismatches(pinned, installed)
    if mismatch and not allow_mismatch:
        raise StackMismatch(
            "this machine's evaluation stack differs from the competition's eval_stack: " + "; ".join(mismatch)
            + ". Install the tested stack (pip install torch==2.13.0 -c requirements.lock -e .) or pass "
            "--allow-stack-mismatch (recorded with every round; your scores may disagree with other validators')")
    return {"installed": installed, "pinned": bool(pinned), "mismatch": mismatch, "mismatch_allowed": bool(mismatch)}
