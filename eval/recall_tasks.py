"""Seeded long-context recall tasks, graded by greedy exact match.

Each item is a prompt of at most, and within ~2 % of, `length_bin * context_len` tokens (the
answer tokens come after it): an intro line, a unique-sentence haystack (eval/haystack.py) with
facts ("needles") hidden in it, and a question ending in "Answer:". The answer is the span of
tokens that must follow the prompt exactly; it starts with a space so that
encode(prompt + answer) == encode(prompt) + encode(answer) for BPE tokenizers (the generator
checks this and refuses tokenizers for which it fails).

Families (the primary needle of every family sits at depth (d + 0.5) / depth_bins of the haystack):
  passkey            one number hidden in the text; "What is the pass key?"
  niah_multikey      "The special code for <key> is <value>." with distractor needles whose keys
                     look like the queried one; the answer value occurs exactly once
  multivalue         one key stated with several values (+ a similar distractor key);
                     answer: all its values in order of appearance, ", "-separated
  assoc_recall       MQAR in natural language: many "<name>'s lucky number is <v>." facts, several
                     queried; queried facts (except the primary) sit at power-law distributed
                     distances from the end; answer: values in question order, ", "-separated
  variable_tracking  chains "VAR A = 12345." "VAR B = VAR A." ... plus distractor chains;
                     answer: every variable holding the value, in order of assignment

The wording, alphabets, filler and delimiters above are the public default forms (`forms="fixed"`).
With `forms="round"` they are drawn from the seed (eval.recall_forms), so a model cannot learn the
templates instead of recall; such prompts are also fitted to exactly `length_bin * context_len`
tokens, so the evaluator can batch the items of a length bin (eval.recall).

Every item is a pure function of (seed, family, length_bin, depth_bin, index, tokenizer,
context_len, depth_bins, forms): its random stream is seeded from a sha256 of the first five, so
requesting fewer families or bins never changes the items that are generated.
`oracle_answer(item, tokenizer)` re-derives the answer from the decoded prompt and the item's
forms alone, proving it is recoverable.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

from eval import haystack
from eval.recall_forms import (  # noqa: F401  the word lists are re-exported: tests and callers read them here
    DEFAULT_FORMS, FIRST_NAMES, FORMS_KINDS, INTROS, KEY_ADJECTIVES, KEY_NOUNS, LAST_NAMES, RELATIONS, VALUE_WORDS,
    WORDING, resolve_forms)

if TYPE_CHECKING:  # annotations only: generating tasks needs neither torch nor transformers at import
    from quasar_model.tokenization import TextTokenizer

FAMILIES = ("passkey", "niah_multikey", "multivalue", "assoc_recall", "variable_tracking")
# families whose every answer part is stated exactly once in the prompt (a variable name in
# variable_tracking also appears in the next hop, "VAR B = VAR A.")
UNIQUE_ANSWER_FAMILIES = ("passkey", "niah_multikey", "multivalue", "assoc_recall")
# the default forms' answer cue and separator of multi-part answers (a round's forms may differ)
ANSWER_CUE = DEFAULT_FORMS["cue"]
JOIN = DEFAULT_FORMS["join"]


@dataclass
class TaskItem:
    family: str
    length_bin: int  # prompt length as a multiple of the competition context length
    depth_bin: int  # primary needle at (depth_bin + 0.5) / depth_bins of the haystack
    prompt_ids: list[int]
    answer_ids: list[int]  # what greedy decoding must produce right after prompt_ids
    answer_text: str  # == decode(answer_ids); starts with a space
    meta: dict = field(default_factory=dict)  # JSON-safe: wording, keys, needle positions...


def canonical_json(items: Iterable[TaskItem]) -> str:
    return json.dumps([asdict(it) for it in items], sort_keys=True, separators=(",", ":"))


def items_digest(items: Iterable[TaskItem]) -> str:
    """sha256 of the canonical JSON: lets validators check they built the same task set."""
    return hashlib.sha256(canonical_json(items).encode()).hexdigest()


def item_seed(seed: int, family: str, length_bin: int, depth_bin: int, index: int) -> int:
    key = f"recall|{seed}|{family}|{length_bin}|{depth_bin}|{index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


# ---- keys and values ---------------------------------------------------------------------------

def _number(rng: random.Random, digits: list[int]) -> str:
    lo, hi = digits
    return str(rng.randint(10 ** (lo - 1), 10 ** hi - 1))


def _code(rng: random.Random, code: dict) -> str:
    if code["alphabet"] == "0123456789abcdef":  # the default's draws, kept so fixed forms stay byte-identical
        return code["sep"].join(f"{rng.getrandbits(4 * g):0{g}x}" for g in code["groups"])
    while True:  # a code holds a digit, so it can never be a word of the filler
        v = code["sep"].join("".join(rng.choice(code["alphabet"]) for _ in range(g)) for g in code["groups"])
        if any(c.isdigit() for c in v):
            return v


def _values(rng: random.Random, kind: str, n: int, f: dict) -> list[str]:
    """n distinct values of one kind. Numbers have >= 5 digits: filler numbers have <= 4."""
    if kind == "word":
        return rng.sample(f["value_words"], n)
    out: list[str] = []
    while len(out) < n:
        v = _number(rng, f["number_digits"]) if kind == "number" else _code(rng, f["code"])
        if v not in out:
            out.append(v)
    return out


def _similar_keys(rng: random.Random, n: int, f: dict) -> tuple[str, list[str]]:
    """n distinct keys; keys[0] is the queried one and the others differ from it in one part."""
    kind = rng.choice(["words", "code", "name"])
    kf = f["key"]
    keys: list[str] = []
    if kind == "words":
        adj, noun = rng.choice(kf["adjectives"]), rng.choice(kf["nouns"])
        keys.append(f"{adj} {noun}")
        while len(keys) < n:  # keep the adjective or the noun
            k = f"{adj} {rng.choice(kf['nouns'])}" if rng.random() < 0.5 else \
                f"{rng.choice(kf['adjectives'])} {noun}"
            if k not in keys:
                keys.append(k)
    elif kind == "code":
        nd, sep = kf["code_digits"], kf["code_sep"]
        prefix = "".join(rng.choice(kf["code_alphabet"]) for _ in range(kf["code_prefix"]))
        digits = [str(rng.randint(1, 9))] + [str(rng.randint(0, 9)) for _ in range(nd - 1)]
        keys.append(f"{prefix}{sep}{''.join(digits)}")
        while len(keys) < n:  # change one digit or swap two neighbours
            d = list(digits)
            i = rng.randrange(nd)
            if rng.random() < 0.5 and i < nd - 1:
                d[i], d[i + 1] = d[i + 1], d[i]
            else:
                d[i] = str(rng.randint(1 if i == 0 else 0, 9))
            k = f"{prefix}{sep}{''.join(d)}"
            if k not in keys:
                keys.append(k)
    else:
        first, last = rng.choice(kf["first"]), rng.choice(kf["last"])
        keys.append(f"{first} {last}")
        while len(keys) < n:  # share the first or the last name
            k = f"{first} {rng.choice(kf['last'])}" if rng.random() < 0.5 else \
                f"{rng.choice(kf['first'])} {last}"
            if k not in keys:
                keys.append(k)
    return kind, keys


# ---- families: each returns the needles, the question block and the answer ------------------------

def _pick(rng: random.Random, wording: dict, *fields: str) -> list[int]:
    """One random template index per field (indices go into meta, so wording can be audited)."""
    return [rng.randrange(len(wording[f])) for f in fields]


@dataclass
class _Needle:
    text: str
    frac: float  # position in the haystack, as a fraction of its filler tokens
    role: str  # "primary", "answer" (more answer parts), "distractor", "query", "hop"
    value: str = ""


@dataclass
class _Spec:
    needles: list[_Needle]
    question: str  # text between the haystack and ANSWER_CUE
    answer_parts: list[str] | None  # None: the "primary"/"answer" needles' values, in text order
    meta: dict


def _passkey(rng, depth, target, count, f):
    w = f["wording"]["passkey"]
    v = _number(rng, f["passkey_digits"])
    ni, qi, fi = _pick(rng, w, "needles", "questions", "formats")
    needles = [_Needle(w["needles"][ni].format(v=v), depth, "primary")]
    q = f"{w['questions'][qi]} {w['formats'][fi]}"
    return _Spec(needles, q, [v], dict(wording=dict(needle=ni, question=qi, format=fi), value_type="number"))


def _niah_multikey(rng, depth, target, count, f):
    big = target >= 1024  # more needles when there is room for them
    w = f["wording"]["niah_multikey"]
    n_distractors = rng.randint(3, 6) if big else rng.randint(2, 3)
    key_type, keys = _similar_keys(rng, 1 + n_distractors, f)
    value_type = rng.choice(["number", "word", "code"])
    values = _values(rng, value_type, len(keys), f)
    ni, qi, fi = _pick(rng, w, "needles", "questions", "formats")
    needles = [_Needle(w["needles"][ni].format(k=k, v=v), depth if i == 0 else rng.random(),
                       "primary" if i == 0 else "distractor") for i, (k, v) in enumerate(zip(keys, values))]
    q = f"{w['questions'][qi].format(k=keys[0])} {w['formats'][fi]}"
    meta = dict(wording=dict(needle=ni, question=qi, format=fi), key_type=key_type, value_type=value_type,
                key=keys[0], distractor_keys=keys[1:], distractor_values=values[1:])
    return _Spec(needles, q, [values[0]], meta)


def _multivalue(rng, depth, target, count, f):
    big = target >= 1024  # more needles when there is room for them
    w = f["wording"]["multivalue"]
    n_values, n_distractor = (rng.randint(2, 4), rng.randint(1, 2)) if big else (rng.randint(2, 3), 1)
    key_type, (key, other) = _similar_keys(rng, 2, f)
    value_type = rng.choice(["number", "word", "code"])
    values = _values(rng, value_type, n_values + n_distractor, f)
    ni, qi, fi = _pick(rng, w, "needles", "questions", "formats")
    t = w["needles"][ni]
    # the first value is the primary needle (at the depth); the others land anywhere
    needles = [_Needle(t.format(k=key, v=values[0]), depth, "primary", values[0])]
    needles += [_Needle(t.format(k=key, v=v), rng.random(), "answer", v) for v in values[1:n_values]]
    needles += [_Needle(t.format(k=other, v=v), rng.random(), "distractor", v) for v in values[n_values:]]
    q = f"{w['questions'][qi].format(k=key)} {w['formats'][fi]}"
    meta = dict(wording=dict(needle=ni, question=qi, format=fi), key_type=key_type, value_type=value_type,
                key=key, distractor_keys=[other], distractor_values=values[n_values:])
    return _Spec(needles, q, None, meta)  # answer = values in order of appearance


def _assoc_recall(rng, depth, target, count, f):
    big = target >= 1024  # more queries when there is room for them
    ri = rng.randrange(len(f["relations"]))
    rel = f["relations"][ri]
    keys: list[str] = []
    while len(keys) < 40:  # distinct people; shared first or last names are fine
        k = f"{rng.choice(f['key']['first'])} {rng.choice(f['key']['last'])}"
        if k not in keys:
            keys.append(k)
    values = _values(rng, rel["value"], len(keys), f)
    forms = [rng.randrange(len(rel["statements"])) for _ in keys]
    facts = [rel["statements"][f].format(k=k, v=v) for k, v, f in zip(keys, values, forms)]
    # "many" facts, but together at most a quarter of the prompt, measured with the tokenizer
    # (a byte-level tokenizer fits far fewer than a BPE one)
    hi, used = 0, 0
    while hi < len(facts) and used + count(facts[hi]) <= target // 4:
        used += count(facts[hi])
        hi += 1
    hi = max(hi, 3)
    n_pairs = rng.randint(max(3, hi // 2), hi)
    n_queries = min(n_pairs - 1, rng.randint(3, 5) if big else 2)
    # pair 0 is the primary query, at the depth; pairs 1..n_queries-1 are queried at distances
    # from the end that are log-uniform on [1/n_pairs, 1] (density ~ 1/distance: most queries
    # are recent, some are far, as in MQAR); the rest are unqueried distractor facts anywhere
    fracs = [depth] + [1.0 - (1.0 / n_pairs) ** rng.random() for _ in range(n_queries - 1)]
    fracs += [rng.random() for _ in range(n_pairs - n_queries)]
    roles = ["primary"] + ["query"] * (n_queries - 1) + ["distractor"] * (n_pairs - n_queries)
    needles = [_Needle(facts[i], fracs[i], roles[i]) for i in range(n_pairs)]
    forms = forms[:n_pairs]
    order = list(range(n_queries))
    rng.shuffle(order)  # question order != order in the text
    aq = f["wording"]["assoc_recall"]
    (qi,), (fi,) = _pick(rng, rel, "questions"), _pick(rng, aq, "formats")
    lines = [f["assoc"]["number"].format(i=j + 1) + rel["questions"][qi].format(k=keys[i]) for j, i in enumerate(order)]
    q = f["assoc"]["header"] + "\n" + "\n".join(lines) + "\n" + aq["formats"][fi]
    meta = dict(wording=dict(relation=ri, question=qi, format=fi, statements=forms), value_type=rel["value"],
                query_keys=[keys[i] for i in order], query_fracs=[round(fracs[i], 6) for i in order],
                n_pairs=n_pairs)
    return _Spec(needles, q, [values[i] for i in order], meta)


def _variable_tracking(rng, depth, target, count, f):
    big = target >= 1024  # more needles when there is room for them
    w = f["wording"]["variable_tracking"]
    chain_len = rng.randint(3, 5) if big else rng.randint(2, 3)
    n_other = rng.randint(1, 3) if big else 1
    lengths = [chain_len] + [rng.randint(2, chain_len) for _ in range(n_other)]
    names: list[str] = []
    vf = f["var"]
    while len(names) < sum(lengths):  # a name starts with a letter: never mistaken for a value
        s = rng.choice(vf["letters"]) + "".join(rng.choice(vf["alphabet"]) for _ in range(vf["length"] - 1))
        if s not in names:
            names.append(s)
    values = _values(rng, "number", len(lengths), f)
    needles, chains = [], []
    for c, n in enumerate(lengths):
        chain = names[sum(lengths[:c]): sum(lengths[:c + 1])]
        chains.append(chain)
        # the queried chain starts at the depth and its hops follow it; distractor chains anywhere
        start = depth if c == 0 else rng.random()
        fracs = [start] + sorted(start + (1.0 - start) * rng.random() for _ in range(n - 1))
        role = "primary" if c == 0 else "distractor"
        needles.append(_Needle(vf["assign"].format(a=chain[0], v=values[c]), fracs[0], role))
        needles += [_Needle(vf["hop"].format(a=a, b=b), x, "hop" if c == 0 else "distractor")
                    for a, b, x in zip(chain, chain[1:], fracs[1:])]
    qi, fi = _pick(rng, w, "questions", "formats")
    q = f"{w['questions'][qi].format(v=values[0])} {w['formats'][fi]}"
    meta = dict(wording=dict(question=qi, format=fi), value=values[0], chain=chains[0],
                distractor_chains=chains[1:], distractor_values=values[1:])
    return _Spec(needles, q, list(chains[0]), meta)  # chain order == assignment order


_BUILDERS = dict(passkey=_passkey, niah_multikey=_niah_multikey, multivalue=_multivalue,
                 assoc_recall=_assoc_recall, variable_tracking=_variable_tracking)


# ---- assembly: haystack + needles at their depths, fitted to the token budget -------------------

def _interleave(filler: list[tuple[str, int]], needles: list[tuple[int, _Needle, int]]):
    """Units in text order. Needle i goes before the first filler sentence at which the filler
    tokens already placed reach frac * total; equal positions keep (frac, creation) order."""
    total = sum(n for _, n in filler)
    pending = sorted(needles, key=lambda t: (t[1].frac, t[0]))
    units, done, j = [], 0, 0  # units: (text, n_tokens, needle or None)
    for s, n in filler + [("", 0)]:
        while j < len(pending) and done >= pending[j][1].frac * total:
            _, nd, nt = pending[j]
            units.append((nd.text, nt, nd))
            j += 1
        if s:
            units.append((s, n, None))
            done += n
    units += [(nd.text, nt, nd) for _, nd, nt in pending[j:]]
    return units


def _continuation(tokenizer: TextTokenizer, prompt: str, prompt_ids: list[int], answer: str) -> list[int]:
    """Token ids of `answer` as they follow `prompt` inside one encoding."""
    full = tokenizer.encode(prompt + answer)
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError("tokenizer merges across the prompt/answer boundary; greedy exact match "
                         f"would be ill-defined (prompt ends {prompt[-20:]!r}, answer {answer!r})")
    return full[len(prompt_ids):]


EXACT_SPARES = 48  # spare filler sentences drawn to swap in when fitting a prompt to its exact length


def _exact_fit(rng, grammar, count, used, filler, assemble, target, built):
    """Swap filler sentences for unused ones `gap` tokens longer until the prompt is exactly `target`
    tokens, so every prompt of a length bin has one length and the evaluator can batch them
    (eval.recall). Gives up after a few swaps (the prompt then stays at most `target`)."""
    spare: dict[int, list[str]] = {}
    for _ in range(EXACT_SPARES):
        s = haystack.sentence(rng, grammar)
        if s not in used and all(s not in v for v in spare.values()):
            spare.setdefault(count(s), []).append(s)
    best = (list(filler), built)
    for _ in range(4):
        gap = target - len(built[2])
        if gap == 0:
            break
        j = next((j for j in range(len(filler) - 1, -1, -1) if spare.get(filler[j][1] + gap)), None)
        if j is None:
            break
        n = filler[j][1] + gap
        s = spare[n].pop()
        used.add(s)
        filler = filler[:j] + [(s, n)] + filler[j + 1:]
        built = assemble(filler)
        if len(built[2]) <= target:
            best = (list(filler), built)
    return best


def generate_item(seed: int, tokenizer: TextTokenizer, context_len: int, family: str, length_bin: int,
                  depth_bin: int, index: int = 0, depth_bins: int = 10, forms="fixed") -> TaskItem:
    """One item. forms: "fixed" (the public default forms), "round" (drawn from `seed`,
    eval.recall_forms) or a forms dict."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    if not 0 <= depth_bin < depth_bins:
        raise ValueError(f"depth_bin {depth_bin} outside [0, {depth_bins})")
    f = resolve_forms(forms, seed)
    rng = random.Random(item_seed(seed, family, length_bin, depth_bin, index))
    target = length_bin * context_len
    depth = (depth_bin + 0.5) / depth_bins

    def count(s: str) -> int:  # tokens of a unit inside the haystack, where it follows a space
        return len(tokenizer.encode(" " + s))

    spec = _BUILDERS[family](rng, depth, target, count, f)
    intro = rng.randrange(len(f["intros"]))
    head, tail = f["intros"][intro] + "\n\n", "\n\n" + spec.question + f["cue"]

    needles = [(i, nd, count(nd.text)) for i, nd in enumerate(spec.needles)]
    n_head, n_tail = len(tokenizer.encode(head)), len(tokenizer.encode(tail))
    budget = target - n_head - n_tail - sum(n for _, _, n in needles)
    if budget < 0.2 * target:
        raise ValueError(f"context_len {context_len} x {length_bin} is too short for {family}: "
                         f"{target - budget} tokens of instructions and needles")
    used: set[str] = set()
    filler = haystack.fill(rng, count, budget, used, grammar=f["filler"])

    def assemble(filler):
        units = _interleave(filler, needles)
        prompt = head + " ".join(u[0] for u in units) + tail
        return units, prompt, tokenizer.encode(prompt)

    # the budget adds per-sentence counts; merges at sentence joins can make the real prompt a
    # token or two longer, so trim filler from the end until it fits (usually zero iterations)
    while True:
        units, prompt, prompt_ids = assemble(filler)
        over = len(prompt_ids) - target
        if over <= 0:
            break
        if not filler:
            raise ValueError(f"cannot fit {family} into {target} tokens")
        while over > 0 and filler:
            over -= filler.pop()[1]
    if f.get("exact_length"):
        filler, (units, prompt, prompt_ids) = _exact_fit(rng, f["filler"], count, used, filler, assemble, target,
                                                         (units, prompt, prompt_ids))

    if spec.answer_parts is None:  # multivalue: values in the order their needles landed
        spec.answer_parts = [nd.value for _, _, nd in units if nd and nd.role in ("primary", "answer")]
    answer_text = " " + f["join"].join(spec.answer_parts)
    answer_ids = _continuation(tokenizer, prompt, prompt_ids, answer_text)

    # token positions are sums of unit counts: cheap, and good to a token or two. needle_depth is
    # the share of filler tokens before the primary needle, the quantity the depth bin controls
    pos, filler_seen, positions = n_head, 0, []
    for _, n, nd in units:
        if nd is None:
            filler_seen += n
        else:
            positions.append(dict(role=nd.role, token_pos=pos, text=nd.text, filler_before=filler_seen))
        pos += n
    primary = next(p for p in positions if p["role"] == "primary")
    meta = dict(spec.meta, intro=intro, target_tokens=target, depth_frac=round(depth, 6),
                needle_token_pos=primary["token_pos"],
                needle_depth=round(primary["filler_before"] / max(1, filler_seen), 6),
                needles=positions, answer_parts=list(spec.answer_parts), n_filler=len(filler))
    if f is not DEFAULT_FORMS:  # fixed-form items keep the meta they always had (their digest too)
        meta["forms"] = dict(kind="round", seed=f["seed"]) if f["kind"] == "round" else f
    return TaskItem(family, length_bin, depth_bin, prompt_ids, answer_ids, answer_text, meta)


def generate_items(seed: int, tokenizer: TextTokenizer, context_len: int,
                   families: Sequence[str] = FAMILIES, lengths: Sequence[int] = (1, 2, 4),
                   depth_bins: int = 10, items_per_cell: int = 1, forms="fixed") -> list[TaskItem]:
    """Every (family, length, depth, index) cell, in that nesting order (forms: see generate_item)."""
    return [generate_item(seed, tokenizer, context_len, f, L, d, i, depth_bins, forms)
            for f in families for L in lengths for d in range(depth_bins) for i in range(items_per_cell)]


# ---- oracle: parse the answer back out of the decoded prompt ------------------------------------

def _template_regex(template: str, key_re: str, val_re: str) -> re.Pattern:
    parts = re.split(r"(\{k\}|\{v\})", template)
    key, val = rf"(?<![\w-])(?P<k>{key_re})", rf"(?P<v>{val_re})"
    return re.compile("".join(key if p == "{k}" else val if p == "{v}" else re.escape(p) for p in parts))


def _matches(text: str, templates: list[str], group: str, f: dict) -> list[dict]:
    """Group dicts of every match of any template, in text order of `group` (deduplicated by
    that position, in case two templates match one sentence)."""
    found = {}
    for t in templates:
        for m in _template_regex(t, f["key_re"], f["val_re"]).finditer(text):
            found[m.start(group)] = m.groupdict()
    return [found[p] for p in sorted(found)]


def _assignment_regex(vf: dict) -> re.Pattern:
    """variable_tracking's two statement forms as one pattern: a = <number> | b = <a>."""
    name = f"[{vf['letters']}][{vf['alphabet']}]{{{vf['length'] - 1}}}"
    assign = re.escape(vf["assign"]).replace(r"\{a\}", "{a}").replace(r"\{v\}", "{v}")
    hop = re.escape(vf["hop"]).replace(r"\{a\}", "{a}").replace(r"\{b\}", "{b}")
    first = assign.format(a=f"(?P<a1>{name})", v=r"(?P<v>\d+)")
    second = hop.format(b=f"(?P<a2>{name})", a=f"(?P<b>{name})")
    return re.compile(rf"(?<![\w$@]){first}|(?<![\w$@]){second}")


def forms_of(item: TaskItem) -> dict:
    """The forms an item was generated with (its meta names them; none: the default forms)."""
    spec = item.meta.get("forms")
    if spec is None:
        return DEFAULT_FORMS
    if spec.get("kind") == "round" and set(spec) == {"kind", "seed"}:
        return resolve_forms("round", spec["seed"])
    return spec


def oracle_answer_text(family: str, prompt_text: str, forms: dict | None = None) -> str:
    """The answer, found by reading the prompt text only, with the forms it was written in
    (default: the public default forms)."""
    f = DEFAULT_FORMS if forms is None else forms
    _, body, question = prompt_text.split("\n\n")  # intro / haystack / question block
    if family == "passkey":
        (fact,) = _matches(body, f["wording"]["passkey"]["needles"], "v", f)
        parts = [fact["v"]]
    elif family in ("niah_multikey", "multivalue"):
        w = f["wording"][family]
        (q,) = _matches(question, w["questions"], "k", f)
        parts = [m["v"] for m in _matches(body, w["needles"], "v", f) if m["k"] == q["k"]]
        if family == "niah_multikey" and len(parts) != 1:
            raise ValueError(f"{len(parts)} needles for key {q['k']!r}")
    elif family == "assoc_recall":
        rels = f["relations"]
        queries = _matches(question, [q for r in rels for q in r["questions"]], "k", f)
        facts = {m["k"]: m["v"] for m in _matches(body, [s for r in rels for s in r["statements"]], "v", f)}
        parts = [facts[q["k"]] for q in queries]
    elif family == "variable_tracking":
        (q,) = _matches(question, f["wording"]["variable_tracking"]["questions"], "v", f)
        env: dict[str, str] = {}  # run the assignments in order
        for m in _assignment_regex(f["var"]).finditer(body):
            if m["a1"]:
                env[m["a1"]] = m["v"]
            else:
                env[m["a2"]] = env[m["b"]]
        parts = [name for name, v in env.items() if v == q["v"]]  # dicts keep assignment order
    else:
        raise ValueError(f"unknown family {family!r}")
    if not parts:
        raise ValueError(f"no {family} answer found in the prompt")
    return " " + f["join"].join(parts)


def oracle_answer(item: TaskItem, tokenizer: TextTokenizer) -> list[int]:
    """answer_ids recovered from decode(item.prompt_ids) and the item's forms alone (item.answer_*
    is never read)."""
    prompt = tokenizer.decode(item.prompt_ids)
    return _continuation(tokenizer, prompt, item.prompt_ids, oracle_answer_text(item.family, prompt, forms_of(item)))


__all__ = ["FAMILIES", "UNIQUE_ANSWER_FAMILIES", "TaskItem", "generate_item", "generate_items",
           "oracle_answer", "oracle_answer_text", "forms_of", "canonical_json", "items_digest", "item_seed"]
