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

Every item is a pure function of (seed, family, length_bin, depth_bin, index, tokenizer,
context_len, depth_bins): its random stream is seeded from a sha256 of the first five, so
requesting fewer families or bins never changes the items that are generated.
`oracle_answer(item, tokenizer)` re-derives the answer from the decoded prompt alone, proving it
is recoverable.
"""

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from eval import haystack
from eval.tokenizer import TextTokenizer

FAMILIES = ("passkey", "niah_multikey", "multivalue", "assoc_recall", "variable_tracking")
# families whose every answer part is stated exactly once in the prompt (a variable name in
# variable_tracking also appears in the next hop, "VAR B = VAR A.")
UNIQUE_ANSWER_FAMILIES = ("passkey", "niah_multikey", "multivalue", "assoc_recall")
ANSWER_CUE = "\nAnswer:"
JOIN = ", "  # separator of multi-part answers


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


# ---- words for keys and values (disjoint from the filler vocabulary; tests check it) ----------

KEY_ADJECTIVES = ["silver", "golden", "crimson", "azure", "ivory", "scarlet", "emerald", "violet",
                  "indigo", "bronze", "jade", "onyx", "coral", "cobalt", "amber", "ochre", "teal",
                  "maroon", "pearl", "russet"]
KEY_NOUNS = ["falcon", "heron", "otter", "lynx", "badger", "raven", "panther", "walrus", "gecko",
             "marmot", "ibis", "jackal", "puffin", "condor", "osprey", "weasel", "bison", "tapir",
             "ermine", "hornet"]
FIRST_NAMES = ["Alma", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ingrid",
               "Jonas", "Kiran", "Lena", "Marco", "Nadia", "Oscar", "Priya", "Quentin", "Rosa",
               "Stefan", "Tamsin", "Umar", "Vera", "Wendell", "Xenia", "Yusuf", "Zora", "Anika",
               "Bastian", "Celine", "Dario", "Esme", "Felix", "Gideon", "Hana", "Ivo", "Juno"]
LAST_NAMES = ["Reyes", "Novak", "Lindqvist", "Okafor", "Moreau", "Tanaka", "Brennan", "Castillo",
              "Petrov", "Haddad", "Kowalski", "Fischer", "Adeyemi", "Larsen", "Romano", "Schultz",
              "Nakamura", "Dubois", "Varga", "Sorensen", "Quinlan", "Ortega", "Halloran", "Weiss",
              "Bianchi", "Horvat", "Jansen", "Keller", "Lindgren", "Pereira", "Silva", "Vasquez"]
VALUE_WORDS = ["mango", "papaya", "saffron", "nutmeg", "cardamom", "lychee", "quince", "apricot",
               "fennel", "oregano", "violin", "cello", "oboe", "banjo", "harp", "tuba", "ukulele",
               "accordion", "clarinet", "mandolin", "glacier", "canyon", "tundra", "lagoon",
               "volcano", "prairie", "geyser", "fjord", "atoll", "mesa", "comet", "nebula",
               "pulsar", "meteor", "galaxy", "eclipse", "zenith", "tornado", "blizzard", "monsoon",
               "kimono", "sombrero", "poncho", "beret", "tuxedo", "moccasin", "origami", "mosaic",
               "fresco", "sonnet", "ballad", "haiku", "limerick", "tango", "waltz", "polka",
               "rumba", "samba", "vanilla", "cinnamon", "paprika", "wasabi", "pistachio",
               "cashew", "hazelnut", "pecan", "zeppelin", "gondola", "kayak", "catamaran",
               "rickshaw", "pyramid", "obelisk", "pagoda", "igloo"]

# ---- wording; every list is sampled per item so phrasing is not a constant cue -----------------

INTROS = [
    "Below is a long document. A few important facts are hidden inside it among unrelated "
    "sentences. Read it carefully; you will be asked about them at the end.",
    "The following text contains some pieces of information mixed into ordinary filler. "
    "Memorize them and answer the question that follows the text.",
    "Read the passage below. Most of it is irrelevant, but it hides details you will need at "
    "the end.",
]
# needles: {k} key, {v} value. questions: {k} key (or {v} for variable tracking).
WORDING = {
    "passkey": dict(
        needles=["The pass key is {v}. Remember it.", "Remember this: the secret pass key is {v}.",
                 "Important note: the pass key for this document is {v}."],
        questions=["What is the pass key?", "What is the secret pass key mentioned in the text?",
                   "Which number is the pass key?"],
        formats=["Answer with the number only.", "Reply with just the pass key.",
                 "Respond with the number and nothing else."]),
    "niah_multikey": dict(
        needles=["The special code for {k} is {v}.",
                 "Note that the secret code assigned to {k} is {v}.",
                 "For the record, the access code of {k} is {v}."],
        questions=["What is the special code for {k}?", "Which code was assigned to {k}?",
                   "What code belongs to {k}?"],
        formats=["Answer with the code only.", "Reply with just the code.",
                 "Respond with the code and nothing else."]),
    "multivalue": dict(
        needles=["One of the special values for {k} is {v}.", "A value recorded for {k} is {v}.",
                 "Among the values listed for {k} is {v}."],
        questions=["What are all the special values for {k}?",
                   "Which values were recorded for {k}?", "List every value given for {k}."],
        formats=["Give them in the order they appear in the text, separated by commas.",
                 "List all of them in order of appearance, separated by commas."]),
    "variable_tracking": dict(
        needles=["VAR {k} = {v}."],  # hop: "VAR {k} = VAR {src}." (fixed: it is the task)
        questions=["Find all variables that are assigned the value {v}.",
                   "Which variables end up holding the value {v}?",
                   "List every variable whose value is {v}."],
        formats=["Give their names in the order they were assigned, separated by commas.",
                 "Answer with the variable names in order of assignment, separated by commas."]),
}
# MQAR relations: one per item; each fact picks one of the statement forms
RELATIONS = [
    dict(value="number",
         statements=["{k}'s lucky number is {v}.", "The lucky number of {k} is {v}.",
                     "{k} always says that {v} is a lucky number."],
         questions=["What is {k}'s lucky number?", "Which lucky number belongs to {k}?"]),
    dict(value="word",
         statements=["{k}'s favourite word is {v}.", "The favourite word of {k} is {v}.",
                     "Asked for a favourite word, {k} chose {v}."],
         questions=["What is {k}'s favourite word?", "Which word did {k} pick as a favourite?"]),
    dict(value="code",
         statements=["{k}'s locker code is {v}.", "The locker code of {k} is {v}.",
                     "{k} keeps the locker code {v}."],
         questions=["What is {k}'s locker code?", "Which locker code belongs to {k}?"]),
]
WORDING["assoc_recall"] = dict(
    formats=["Give the answers in the same order as the questions, separated by commas.",
             "Answer every question in order, separating the answers with commas."])


# ---- keys and values ---------------------------------------------------------------------------

def _values(rng: random.Random, kind: str, n: int) -> list[str]:
    """n distinct values of one kind. Numbers have >= 6 digits: filler numbers have <= 4."""
    if kind == "word":
        return rng.sample(VALUE_WORDS, n)
    out: list[str] = []
    while len(out) < n:
        if kind == "number":
            v = str(rng.randint(100_000, 9_999_999))
        else:  # uuid-like code
            v = f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}"
        if v not in out:
            out.append(v)
    return out


def _similar_keys(rng: random.Random, n: int) -> tuple[str, list[str]]:
    """n distinct keys; keys[0] is the queried one and the others differ from it in one part."""
    kind = rng.choice(["words", "code", "name"])
    keys: list[str] = []
    if kind == "words":
        adj, noun = rng.choice(KEY_ADJECTIVES), rng.choice(KEY_NOUNS)
        keys.append(f"{adj} {noun}")
        while len(keys) < n:  # keep the adjective or the noun
            k = f"{adj} {rng.choice(KEY_NOUNS)}" if rng.random() < 0.5 else \
                f"{rng.choice(KEY_ADJECTIVES)} {noun}"
            if k not in keys:
                keys.append(k)
    elif kind == "code":
        prefix = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2))
        digits = [str(rng.randint(1, 9))] + [str(rng.randint(0, 9)) for _ in range(3)]
        keys.append(f"{prefix}-{''.join(digits)}")
        while len(keys) < n:  # change one digit or swap two neighbours
            d = list(digits)
            i = rng.randrange(4)
            if rng.random() < 0.5 and i < 3:
                d[i], d[i + 1] = d[i + 1], d[i]
            else:
                d[i] = str(rng.randint(1 if i == 0 else 0, 9))
            k = f"{prefix}-{''.join(d)}"
            if k not in keys:
                keys.append(k)
    else:
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        keys.append(f"{first} {last}")
        while len(keys) < n:  # share the first or the last name
            k = f"{first} {rng.choice(LAST_NAMES)}" if rng.random() < 0.5 else \
                f"{rng.choice(FIRST_NAMES)} {last}"
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


def _passkey(rng, depth, target, count):
    w = WORDING["passkey"]
    v = str(rng.randint(10_000, 9_999_999))  # 5-7 digits
    ni, qi, fi = _pick(rng, w, "needles", "questions", "formats")
    needles = [_Needle(w["needles"][ni].format(v=v), depth, "primary")]
    q = f"{w['questions'][qi]} {w['formats'][fi]}"
    return _Spec(needles, q, [v], dict(wording=dict(needle=ni, question=qi, format=fi), value_type="number"))


def _niah_multikey(rng, depth, target, count):
    big = target >= 1024  # more needles when there is room for them
    w = WORDING["niah_multikey"]
    n_distractors = rng.randint(3, 6) if big else rng.randint(2, 3)
    key_type, keys = _similar_keys(rng, 1 + n_distractors)
    value_type = rng.choice(["number", "word", "code"])
    values = _values(rng, value_type, len(keys))
    ni, qi, fi = _pick(rng, w, "needles", "questions", "formats")
    needles = [_Needle(w["needles"][ni].format(k=k, v=v), depth if i == 0 else rng.random(),
                       "primary" if i == 0 else "distractor") for i, (k, v) in enumerate(zip(keys, values))]
    q = f"{w['questions'][qi].format(k=keys[0])} {w['formats'][fi]}"
    meta = dict(wording=dict(needle=ni, question=qi, format=fi), key_type=key_type, value_type=value_type,
                key=keys[0], distractor_keys=keys[1:], distractor_values=values[1:])
    return _Spec(needles, q, [values[0]], meta)


def _multivalue(rng, depth, target, count):
    big = target >= 1024  # more needles when there is room for them
    w = WORDING["multivalue"]
    n_values, n_distractor = (rng.randint(2, 4), rng.randint(1, 2)) if big else (rng.randint(2, 3), 1)
    key_type, (key, other) = _similar_keys(rng, 2)
    value_type = rng.choice(["number", "word", "code"])
    values = _values(rng, value_type, n_values + n_distractor)
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


def _assoc_recall(rng, depth, target, count):
    big = target >= 1024  # more queries when there is room for them
    ri = rng.randrange(len(RELATIONS))
    rel = RELATIONS[ri]
    keys: list[str] = []
    while len(keys) < 40:  # distinct people; shared first or last names are fine
        k = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        if k not in keys:
            keys.append(k)
    values = _values(rng, rel["value"], len(keys))
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
    (qi,), (fi,) = _pick(rng, rel, "questions"), _pick(rng, WORDING["assoc_recall"], "formats")
    lines = [f"{j + 1}. {rel['questions'][qi].format(k=keys[i])}" for j, i in enumerate(order)]
    q = "Questions:\n" + "\n".join(lines) + "\n" + WORDING["assoc_recall"]["formats"][fi]
    meta = dict(wording=dict(relation=ri, question=qi, format=fi, statements=forms), value_type=rel["value"],
                query_keys=[keys[i] for i in order], query_fracs=[round(fracs[i], 6) for i in order],
                n_pairs=n_pairs)
    return _Spec(needles, q, [values[i] for i in order], meta)


def _variable_tracking(rng, depth, target, count):
    big = target >= 1024  # more needles when there is room for them
    w = WORDING["variable_tracking"]
    chain_len = rng.randint(3, 5) if big else rng.randint(2, 3)
    n_other = rng.randint(1, 3) if big else 1
    lengths = [chain_len] + [rng.randint(2, chain_len) for _ in range(n_other)]
    names: list[str] = []
    while len(names) < sum(lengths):
        s = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if s not in names:
            names.append(s)
    values = _values(rng, "number", len(lengths))
    needles, chains = [], []
    for c, n in enumerate(lengths):
        chain = names[sum(lengths[:c]): sum(lengths[:c + 1])]
        chains.append(chain)
        # the queried chain starts at the depth and its hops follow it; distractor chains anywhere
        start = depth if c == 0 else rng.random()
        fracs = [start] + sorted(start + (1.0 - start) * rng.random() for _ in range(n - 1))
        role = "primary" if c == 0 else "distractor"
        needles.append(_Needle(f"VAR {chain[0]} = {values[c]}.", fracs[0], role))
        needles += [_Needle(f"VAR {b} = VAR {a}.", x, "hop" if c == 0 else "distractor")
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


def generate_item(seed: int, tokenizer: TextTokenizer, context_len: int, family: str, length_bin: int,
                  depth_bin: int, index: int = 0, depth_bins: int = 10) -> TaskItem:
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    if not 0 <= depth_bin < depth_bins:
        raise ValueError(f"depth_bin {depth_bin} outside [0, {depth_bins})")
    rng = random.Random(item_seed(seed, family, length_bin, depth_bin, index))
    target = length_bin * context_len
    depth = (depth_bin + 0.5) / depth_bins

    def count(s: str) -> int:  # tokens of a unit inside the haystack, where it follows a space
        return len(tokenizer.encode(" " + s))

    spec = _BUILDERS[family](rng, depth, target, count)
    intro = rng.randrange(len(INTROS))
    head, tail = INTROS[intro] + "\n\n", "\n\n" + spec.question + ANSWER_CUE

    needles = [(i, nd, count(nd.text)) for i, nd in enumerate(spec.needles)]
    n_head, n_tail = len(tokenizer.encode(head)), len(tokenizer.encode(tail))
    budget = target - n_head - n_tail - sum(n for _, _, n in needles)
    if budget < 0.2 * target:
        raise ValueError(f"context_len {context_len} x {length_bin} is too short for {family}: "
                         f"{target - budget} tokens of instructions and needles")
    filler = haystack.fill(rng, count, budget)

    # the budget adds per-sentence counts; merges at sentence joins can make the real prompt a
    # token or two longer, so trim filler from the end until it fits (usually zero iterations)
    while True:
        units = _interleave(filler, needles)
        prompt = head + " ".join(u[0] for u in units) + tail
        prompt_ids = tokenizer.encode(prompt)
        over = len(prompt_ids) - target
        if over <= 0:
            break
        if not filler:
            raise ValueError(f"cannot fit {family} into {target} tokens")
        while over > 0 and filler:
            over -= filler.pop()[1]

    if spec.answer_parts is None:  # multivalue: values in the order their needles landed
        spec.answer_parts = [nd.value for _, _, nd in units if nd and nd.role in ("primary", "answer")]
    answer_text = " " + JOIN.join(spec.answer_parts)
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
    return TaskItem(family, length_bin, depth_bin, prompt_ids, answer_ids, answer_text, meta)


def generate_items(seed: int, tokenizer: TextTokenizer, context_len: int,
                   families: Sequence[str] = FAMILIES, lengths: Sequence[int] = (1, 2, 4),
                   depth_bins: int = 10, items_per_cell: int = 1) -> list[TaskItem]:
    """Every (family, length, depth, index) cell, in that nesting order."""
    return [generate_item(seed, tokenizer, context_len, f, L, d, i, depth_bins)
            for f in families for L in lengths for d in range(depth_bins) for i in range(items_per_cell)]


# ---- oracle: parse the answer back out of the decoded prompt ------------------------------------

_KEY = r"(?<![\w-])(?P<k>[\w-]+(?: [\w-]+)?)"  # one or two words: "KX-4821", "silver falcon"
_VAL = r"(?P<v>[\w-]+)"


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{k\}|\{v\})", template)
    return re.compile("".join(_KEY if p == "{k}" else _VAL if p == "{v}" else re.escape(p) for p in parts))


def _matches(text: str, templates: list[str], group: str) -> list[dict]:
    """Group dicts of every match of any template, in text order of `group` (deduplicated by
    that position, in case two templates match one sentence)."""
    found = {}
    for t in templates:
        for m in _template_regex(t).finditer(text):
            found[m.start(group)] = m.groupdict()
    return [found[p] for p in sorted(found)]


def oracle_answer_text(family: str, prompt_text: str) -> str:
    """The answer, found by reading the prompt text only."""
    _, body, question = prompt_text.split("\n\n")  # intro / haystack / question block
    if family == "passkey":
        (fact,) = _matches(body, WORDING["passkey"]["needles"], "v")
        parts = [fact["v"]]
    elif family in ("niah_multikey", "multivalue"):
        w = WORDING[family]
        (q,) = _matches(question, w["questions"], "k")
        parts = [f["v"] for f in _matches(body, w["needles"], "v") if f["k"] == q["k"]]
        if family == "niah_multikey" and len(parts) != 1:
            raise ValueError(f"{len(parts)} needles for key {q['k']!r}")
    elif family == "assoc_recall":
        queries = _matches(question, [q for r in RELATIONS for q in r["questions"]], "k")
        facts = {f["k"]: f["v"] for f in _matches(body, [s for r in RELATIONS for s in r["statements"]], "v")}
        parts = [facts[q["k"]] for q in queries]
    elif family == "variable_tracking":
        (q,) = _matches(question, WORDING["variable_tracking"]["questions"], "v")
        env: dict[str, str] = {}  # run the assignments in order
        for m in re.finditer(r"VAR (?P<a>[A-Z]+) = (?:VAR (?P<b>[A-Z]+)|(?P<v>\d+))\.", body):
            env[m["a"]] = env[m["b"]] if m["b"] else m["v"]
        parts = [name for name, v in env.items() if v == q["v"]]  # dicts keep assignment order
    else:
        raise ValueError(f"unknown family {family!r}")
    return " " + JOIN.join(parts)


def oracle_answer(item: TaskItem, tokenizer: TextTokenizer) -> list[int]:
    """answer_ids recovered from decode(item.prompt_ids) alone (item.answer_* is never read)."""
    prompt = tokenizer.decode(item.prompt_ids)
    return _continuation(tokenizer, prompt, item.prompt_ids, oracle_answer_text(item.family, prompt))


__all__ = ["FAMILIES", "UNIQUE_ANSWER_FAMILIES", "TaskItem", "generate_item", "generate_items",
           "oracle_answer", "oracle_answer_text", "canonical_json", "items_digest", "item_seed"]
