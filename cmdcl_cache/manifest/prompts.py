"""Label texts for the text tower: readable names, prompt templates, CLIP-style prompt ensembles.

Readable names (`readable_label`):
- CamelCase keys (COIN tasks) are split into lower-case words, acronyms kept:
  `ChangeCarTire` -> "change car tire", `ReplaceCDDriveWithSSD` -> "replace CD drive with SSD".
- snake_case keys (Breakfast actions) become words: `stir_tea` -> "stir tea" (an underscore is a space).
- Any other word is kept as written: `iPhone`, `C++`, `T-shirt`, `3D_printer` -> "3D printer",
  `crème_brûlée` -> "crème brûlée" (so two different names never become one text by losing characters).
- Anything that already reads as text (COIN step names such as "remove the tire") is kept as is.
- Breakfast's `SIL` ("silence") is named "background" by its manifest builder (our mapping, not the
  dataset's): the closest thing a text tower knows.

Templates come in named sets (`TEMPLATE_SETS`, CLIP-style ensembles in the spirit of CLIP's ImageNet and
Kinetics prompts and ActionCLIP's video prompts; the CMDCL paper does not list its prompts), one per kind of
label name:

- `actions` (the default): verb phrases, "change car tire", "stir tea" -> "a video of a person stir tea."
- `things`: noun phrases without an article, "cartoon rabbit", "vehicles" -> "a video of the cartoon rabbit."
- `generic`: any phrase, read as a title, "cartoon rabbit", "stir tea", "a red circle sliding"
  -> "a video titled cartoon rabbit."; what `manifest build --dataset folder` writes unless told otherwise.

`choose_templates` picks them, first match wins: `--prompts` (a set name, or a file of templates: one per
line, each with one "{}", blank lines and "#" comments skipped; `./actions` means a file named actions),
then the manifest's labels.json `prompts` (a set name), then `actions`.
"""

from __future__ import annotations

import re
from pathlib import Path

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "actions": (
        "a video of a person {}.",
        "a photo of a person {}.",
        "a video of {}.",
        "a photo of {}.",
        "a person is {}.",
        "a clip of someone {}.",
        "a close-up video of {}.",
        "a frame from a video of {}.",
    ),
    "things": (
        "a video of the {}.",
        "a photo of the {}.",
        "a video showing the {}.",
        "a clip of the {}.",
        "a close-up video of the {}.",
        "a frame from a video of the {}.",
        "a blurry photo of the {}.",
        "a video with the {} in it.",
    ),
    "generic": (
        "a video titled {}.",
        "a clip titled {}.",
        "a photo titled {}.",
        "a video labelled {}.",
        "a frame of a video titled {}.",
        "a short film titled {}.",
        "video: {}.",
        "{}.",
    ),
}
DEFAULT_TEMPLATE_SET = "actions"
DEFAULT_TEMPLATES = TEMPLATE_SETS[DEFAULT_TEMPLATE_SET]

# A run of capitals followed by a capitalised word splits before that word's capital ("CDDrive" ->
# "CD", "Drive"); otherwise words are capitalised words, acronyms, lower-case runs or digits.
# Digits stay with the acronym before them ("RJ45", "USB3").
_WORDS = re.compile(r"[A-Z]+[0-9]+|[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


class PromptError(ValueError):
    """A prompt template file is malformed; the message names the file and line."""


def readable_label(key: str) -> str:
    """Human text for a label key or name (see the module docstring for the rules)."""
    key = key.strip()
    if " " in key:
        return key  # already text (COIN step names)
    parts = [part for part in key.split("_") if part]   # snake_case: an underscore is a space; "-" is kept
    return " ".join(_readable_part(part) for part in parts) or key


def _readable_part(part: str) -> str:
    """A CamelCase identifier ("ChangeCarTire", "ReplaceCDDriveWithSSD") becomes lower-case words with its
    acronyms kept; anything else ("iPhone", "C++", "T-shirt", "3D", "café", "RJ45") is kept as written."""
    if not re.fullmatch(r"[A-Z][A-Za-z0-9]*", part) or part.isupper():
        return part
    words = _WORDS.findall(part)
    return " ".join(w if len(w) > 1 and w.isupper() and not w.isdigit() else w.lower() for w in words)


def load_templates(path: str | Path) -> list[str]:
    """Prompt templates from a file: one per line, each containing "{}" exactly once."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise PromptError(f"{path}: cannot read prompt templates ({err.strerror})") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise PromptError(f"{path}:{line}: not UTF-8 text (byte {err.object[err.start]:#04x}); save the "
                          "prompt templates as UTF-8") from None
    templates = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        count = text.count("{}")
        if count != 1:
            raise PromptError(f"{path}:{number}: template {text!r} must contain '{{}}' exactly once "
                              f"(found {count}); it marks where the label text goes")
        try:
            text.format("x")
        except (IndexError, KeyError, ValueError) as err:
            raise PromptError(f"{path}:{number}: template {text!r} has other braces ({err}); "
                              "write literal braces as '{{' and '}}'") from None
        templates.append(text)
    if not templates:
        raise PromptError(f"{path}: no prompt templates (one per line, each with '{{}}')")
    return templates


PROMPTS_HELP = ("Prompt templates for texts.h5: a set (actions: verb phrases, things: noun phrases, generic: any "
                "phrase) or a file with one template a line ({} marks the label); default: the manifest's "
                "labels.json `prompts`, else actions.")


def choose_templates(prompts: str | Path | None = None, manifest=None) -> list[str]:
    """The prompt templates to use: `prompts` (a set name or a templates file) when given, else the
    manifest's `prompts` set, else the default set. A string that is exactly a set name means the set."""
    if prompts is not None:
        if str(prompts) in TEMPLATE_SETS and isinstance(prompts, str):
            return list(TEMPLATE_SETS[prompts])
        if not Path(prompts).exists() and "/" not in str(prompts):
            raise PromptError(f"--prompts {str(prompts)!r}: neither a template set "
                              f"({', '.join(TEMPLATE_SETS)}) nor a file")
        return load_templates(prompts)
    name = getattr(manifest, "prompts", None) or DEFAULT_TEMPLATE_SET
    if name not in TEMPLATE_SETS:
        raise PromptError(f"unknown prompt template set {name!r}; choose one of {', '.join(TEMPLATE_SETS)}")
    return list(TEMPLATE_SETS[name])
