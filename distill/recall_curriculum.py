"""Procedural long-context recall documents: the miner's curriculum for the validator's recall axis.

A distilled student only imitates the teacher on ordinary text, where looking something up many
tokens back is rare; it never learns to fetch a value stated once, far away. These documents make
that the whole task: facts hidden in filler, a question, a cue, and the answer span, which is the
only place the loss is taken (ground-truth cross-entropy; no teacher covers this text).

Families (each draws its surface form per document: key and value alphabets and lengths,
connectors, question phrasing, cue, list separator):

    passkey      one labelled secret in the filler; the question names the label
    multikey     many "key <connector> value" facts with look-alike keys; one key is asked
    multivalue   one key stated several times; all its values, in order
    mqar         many key/value pairs, several asked in a shuffled order (associative recall)
    vartrack     assignment chains "a := 123", "b := a"; every name holding the value
    copy         a span of the text repeated after the cue
    induction    random tokens (or, digit_share of the time, random digits) in which a random segment
                 of up to a third of the document occurs twice; the second occurrence is the target
                 (pure induction-head practice, no language at all)

This generator shares nothing with the validator's (eval/recall_tasks.py, eval/haystack.py), and
must not: filler is the training corpus's own text or log-book sentences, keys and values are
pseudo-words and codes, and the phrasings are this file's own. What a student learns here is
"find the key, copy what followed it", which transfers to any template; a student trained on the
validator's own templates would learn the templates.

Documents are built at the token level (filler is a slice of a pre-tokenised stream; each fact and
the question are tokenised on their own), so a document costs a few small encode() calls. The
answer is tokenised as " " + answer after a prompt that ends in the cue, as greedy decoding meets
it. Every document is a pure function of its seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

FAMILIES = ("passkey", "multikey", "multivalue", "mqar", "vartrack", "copy", "induction")

# ---- surface forms ------------------------------------------------------------------------------

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gl", "h", "k", "kr", "l", "m", "n", "p", "pl", "r", "s",
           "st", "t", "tr", "v", "z", "sh", "ch", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "s", "k", "l", "x", "m"]
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"

LABELS = ["secret number", "vault combination", "access token", "door pin", "hidden digits", "unlock code",
          "safe number", "launch sequence", "recovery phrase", "ticket number", "serial", "magic number"]
PASSKEY_FACTS = ["The {k} is {v}.", "Keep in mind: the {k} is {v}.", "(The {k} is {v}; do not forget it.)",
                 "Note to self -- {k}: {v}.", "Whoever asks, the {k} is {v}."]
# some questions echo the fact's own words ("... is"): the answer is what followed the fact, not
# what follows the same words in the question (a student that copies after the last "is" fails them)
PASSKEY_QUESTIONS = ["What is the {k}?", "Recall the {k}.", "Which value was given as the {k}?",
                     "Tell me the {k} mentioned above.", "The {k} was stated earlier. What was it?",
                     "So the {k} is what, exactly?", "What is the {k} that was mentioned?",
                     "Somebody said the {k} is something. What is it?"]
CONNECTORS = ["{k}: {v}.", "{k} = {v}.", "{k} -> {v}.", "The value of {k} is {v}.", "{k} maps to {v}.",
              "[{k}] {v}.", "Entry {k} holds {v}.", "{k} is paired with {v}.", "Record {k} says {v}.",
              "{k} => {v}."]
KEY_QUESTIONS = ["What does {k} hold?", "Look up {k}.", "Which value goes with {k}?", "What was paired with {k}?",
                 "Find the entry for {k}.", "{k} = ?", "Give the value of {k}."]
MULTI_QUESTIONS = ["List every value given for {k}{how}.", "All values of {k}{how}?",
                   "Which values were recorded under {k}{how}?"]
SEPARATORS = [(", ", " separated by commas"), ("; ", " separated by semicolons"), (" | ", " separated by bars"),
              (", ", ""), (" ", " separated by spaces")]
ASSIGN = [("{a} := {v}.", "{a} := {b}."), ("let {a} = {v}.", "let {a} = {b}."), ("{a} <- {v}.", "{a} <- {b}."),
          ("set {a} to {v}.", "set {a} to {b}."), ("{a} = {v};", "{a} = {b};")]
TRACK_QUESTIONS = ["Which names end up holding {v}{how}?", "Every variable equal to {v}{how}?",
                   "Name all variables whose value is {v}{how}."]
COPY_PROMPTS = ["Repeat this line exactly: {s}", "Copy: {s}", "Say it back word for word: {s}",
                "Echo the following. {s}"]
# how to answer, after the question half the time: its words ("number", "code", "digits") are also
# label words, so a student must learn that the instruction is not where the key was stated
INSTRUCTIONS = ["Give the value alone.", "Just the number, please.", "Write only the code, no other words.",
                "Copy it exactly as written, nothing more.", "One value, digits and letters as they were.",
                "No explanation: the value only.", "Type the exact characters of the secret.",
                "Keep it short: the code or number itself."]
CUES = ["\nAnswer:", "\nA:", "\nReply:", "\nResult:", "\nOutput:", " =>", "\nResponse:", "\nThe answer is",
        "\n>>", "\nAnswer (exactly):"]
INTROS = ["", "Log file follows.", "Some facts are buried in the notes below.", "Read everything; questions come last.",
          "Transcript:", "Memorise the key facts in this document."]
# log-book sentences: filler from another domain than the validator's (and than the corpus)
_LOG_SUBJ = ["the probe", "engineering", "the night crew", "sensor array four", "the quartermaster", "the rover",
             "a drone", "the comms officer", "deck three", "the reactor team", "the medic", "cargo bay"]
_LOG_VERB = ["reported", "logged", "recalibrated", "ignored", "flagged", "rerouted", "inspected", "archived",
             "replaced", "tested", "vented", "scanned"]
_LOG_OBJ = ["a pressure drop", "the coolant loop", "minor drift", "the hull seams", "a faint signal", "the spare filters",
            "the docking clamps", "routine telemetry", "the water reclaimer", "a dust plume", "the star charts"]
_LOG_TAIL = ["during shift change", "without incident", "after the burn", "at local noon", "twice",
             "before the storm passed", "as ordered", "again", "near the airlock", "on schedule"]


def _pseudo(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(lo, hi)))


def _number(rng: random.Random) -> str:
    n = rng.randint(3, 8)
    return str(rng.randint(10 ** (n - 1), 10 ** n - 1))


def _code(rng: random.Random) -> str:
    sep = rng.choice(["", "-", "_", "/", "."])
    a = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(1, 3)))
    return a + sep + str(rng.randint(10, 99999))


def _value(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return _number(rng)
    if kind == "code":
        return _code(rng)
    return _pseudo(rng, 2, 3)


def _key(rng: random.Random, kind: str) -> str:
    if kind == "word":
        return _pseudo(rng, 2, 3)
    if kind == "pair":
        return f"{_pseudo(rng, 1, 2)} {_pseudo(rng, 2, 2)}"
    if kind == "name":
        return f"{_pseudo(rng, 1, 2).capitalize()} {_pseudo(rng, 2, 2).capitalize()}"
    return _code(rng)


def _keys(rng: random.Random, n: int) -> list[str]:
    """n distinct keys of one kind; look-alikes (a shared part) to make lookup by content necessary."""
    kind = rng.choice(["word", "pair", "name", "code"])
    keys: list[str] = []
    while len(keys) < n:
        k = _key(rng, kind)
        if keys and kind in ("pair", "name") and rng.random() < 0.5:
            k = keys[0].split(" ")[0] + " " + k.split(" ")[1]     # shares the first part with the asked key
        if k not in keys:
            keys.append(k)
    return keys


def log_sentence(rng: random.Random) -> str:
    return (f"{rng.choice(_LOG_SUBJ).capitalize()} {rng.choice(_LOG_VERB)} {rng.choice(_LOG_OBJ)} "
            f"{rng.choice(_LOG_TAIL)}.")


# ---- one document ---------------------------------------------------------------------------------

@dataclass
class Doc:
    ids: list[int]
    targets: list[tuple[int, int]]    # [start, end) token ranges that are the answer (loss on them)


@dataclass
class _Spec:
    facts: list[str]        # in the order they are placed (front to back)
    question: str
    answer: str


def _passkey(rng, length):
    # labels of made-up words too: a student that only knows LABELS' head nouns misses a label it
    # has never seen, whose tokens are arbitrary word pieces
    r = rng.random()
    k = rng.choice(LABELS) if r < 0.4 else f"{_pseudo(rng, 2, 2)} code" if r < 0.6 else \
        f"{_pseudo(rng, 1, 2)} {_pseudo(rng, 1, 2)}"
    v = _value(rng, rng.choice(["number", "number", "code", "word"]))
    return _Spec([rng.choice(PASSKEY_FACTS).format(k=k, v=v)], rng.choice(PASSKEY_QUESTIONS).format(k=k), v)


def _kv_facts(rng, n):
    """n look-alike keys, a value each (one kind), and their facts: one connector per document, or mixed."""
    keys = _keys(rng, n)
    kind = rng.choice(["number", "code", "word"])
    values = [_value(rng, kind) for _ in keys]
    form = rng.choice(CONNECTORS) if rng.random() < 0.7 else None
    return keys, values, [(form or rng.choice(CONNECTORS)).format(k=k, v=v) for k, v in zip(keys, values)]


def _multikey(rng, length):
    n = rng.randint(2, max(2, min(8, length // 32)))
    keys, values, facts = _kv_facts(rng, n)
    rng.shuffle(order := list(range(n)))
    asked = rng.randrange(n)
    return _Spec([facts[i] for i in order], rng.choice(KEY_QUESTIONS).format(k=keys[asked]), values[asked])


def _multivalue(rng, length):
    key, other = _keys(rng, 2)
    kind = rng.choice(["number", "code", "word"])
    n = rng.randint(2, 4)
    values = [_value(rng, kind) for _ in range(n + 1)]
    form = rng.choice(CONNECTORS)
    facts = [(form.format(k=key, v=v), v) for v in values[:n]] + [(form.format(k=other, v=values[n]), None)]
    rng.shuffle(facts)
    sep, how = rng.choice(SEPARATORS)
    mine = [v for _, v in facts if v is not None]       # the asked key's values, in text order
    return _Spec([f for f, _ in facts], rng.choice(MULTI_QUESTIONS).format(k=key, how=how), sep.join(mine))


def _mqar(rng, length):
    n = rng.randint(2, max(2, min(12, length // 24)))
    keys, values, facts = _kv_facts(rng, n)
    asked = rng.sample(range(n), rng.randint(1, min(3, n)))
    sep, how = rng.choice(SEPARATORS[:3])
    lines = " ".join(f"({j + 1}) {keys[i]}?" for j, i in enumerate(asked))
    q = f"Look up these keys{how}: {lines}"
    return _Spec(facts, q, sep.join(values[i] for i in asked))


def _vartrack(rng, length):
    first, hop = rng.choice(ASSIGN)
    chains, names = [], set()
    for c in range(rng.randint(1, 3)):
        chain = []
        while len(chain) < rng.randint(2, 4):
            a = rng.choice([_pseudo(rng, 1, 1), "".join(rng.choice("xyzwuvpq") for _ in range(rng.randint(1, 3)))])
            if a not in names:
                names.add(a)
                chain.append(a)
        chains.append((chain, _number(rng)))
    facts = []
    for chain, v in chains:
        facts.append([first.format(a=chain[0], v=v)] + [hop.format(a=b, b=a) for a, b in zip(chain, chain[1:])])
    # interleave the chains, each in its own order
    placed, idx = [], [0] * len(facts)
    while any(i < len(f) for i, f in zip(idx, facts)):
        c = rng.choice([c for c, f in enumerate(facts) if idx[c] < len(f)])
        placed.append(facts[c][idx[c]])
        idx[c] += 1
    sep, how = rng.choice(SEPARATORS[:3])
    chain, v = chains[0]
    return _Spec(placed, rng.choice(TRACK_QUESTIONS).format(v=v, how=how), sep.join(chain))


_BUILDERS = dict(passkey=_passkey, multikey=_multikey, multivalue=_multivalue, mqar=_mqar, vartrack=_vartrack)


def filler_units(tokenizer, texts: Sequence[str], max_units: int = 20000) -> list[list[int]]:
    """Texts -> consecutive sentence-sized token lists (each tokenised with its leading space), the
    pieces facts are slotted between."""
    units: list[list[int]] = []
    for text in texts:
        for line in text.split("\n"):
            for piece in line.replace(". ", ".\0").split("\0"):
                piece = piece.strip()
                if piece:
                    units.append(list(tokenizer.encode(" " + piece, add_special_tokens=False))[:48])
                if len(units) >= max_units:
                    return units
    return units


def units_from_ids(cache, eos_id: int | None, max_sequences: int = 256, size: int = 24) -> list[list[int]]:
    """Filler from a teacher cache's own token sequences (the miner's training text), in `size`-token
    pieces, end-of-text tokens dropped."""
    units = []
    for i in range(min(len(cache), max_sequences)):
        ids = [t for t in cache[i].input_ids.tolist() if t != eos_id]
        units += [ids[a:a + size] for a in range(0, len(ids), size) if ids[a:a + size]]
    return units


class DocMaker:
    """Recall documents for one tokenizer. `units`: filler sentences as token lists, in text order
    (`filler_units` of the training corpus); without them all filler is log-book sentences.
    `families` may repeat a family to weight it; `digit_share`: the share of induction documents drawn
    from the ten digits alone (a digit string repeats its digits, so copying one takes more than one
    token of context: the skill a long numeric answer needs)."""

    def __init__(self, tokenizer, units: Sequence[list[int]] = (), *, families: Sequence[str] = FAMILIES,
                 digit_share: float = 0.5):
        unknown = [f for f in families if f not in FAMILIES]
        if unknown or not families:
            raise ValueError(f"recall families {list(families)}: choose from {list(FAMILIES)}")
        self.tok, self.families, self.units = tokenizer, list(families), list(units)
        self.vocab = int(len(tokenizer))
        self.eos = tokenizer.eos_token_id
        self._memo: dict[str, list[int]] = {}
        self.digits = [self.enc(d)[0] for d in "0123456789"]
        if not 0.0 <= digit_share <= 1.0:
            raise ValueError(f"digit_share {digit_share}: must be in [0, 1]")
        self.digit_share = digit_share

    def enc(self, text: str) -> list[int]:
        ids = self._memo.get(text)
        if ids is None:
            ids = list(self.tok.encode(text, add_special_tokens=False))
            if len(self._memo) < 4096:
                self._memo[text] = ids
        return ids

    def _filler(self, rng: random.Random, n: int) -> list[list[int]]:
        """Sentences (token lists) totalling exactly n tokens: a run of the corpus, or log-book lines."""
        out, have = [], 0
        corpus = bool(self.units) and rng.random() < 0.6
        i = rng.randrange(len(self.units)) if corpus else 0
        while have < n:
            if corpus:
                u = self.units[i % len(self.units)]
                i += 1
            else:
                u = self.enc(" " + log_sentence(rng))
            u = u[:n - have]
            out.append(u)
            have += len(u)
        return out

    def make(self, rng: random.Random, length: int, family: str | None = None) -> Doc:
        """One document of about `length` tokens (never more)."""
        family = family or rng.choice(self.families)
        if family == "induction":
            return self._induction(rng, length)
        if family == "copy":
            return self._copy(rng, length)
        spec = _BUILDERS[family](rng, length)
        intro = rng.choice(INTROS)
        head = self.enc(intro + "\n") if intro else []
        facts = [self.enc(" " + f) for f in spec.facts]
        how = " " + rng.choice(INSTRUCTIONS) if rng.random() < 0.5 else ""
        tail = self.enc("\n" + spec.question + how + rng.choice(CUES))
        answer = self.enc(" " + spec.answer)
        budget = length - len(head) - len(tail) - len(answer) - sum(map(len, facts))
        if budget < 0:      # too many facts for this length
            return self._copy(rng, length)
        # facts between filler sentences, at random depths, in their order
        filler = self._filler(rng, budget)
        slots = sorted(rng.randint(0, len(filler)) for _ in facts)
        ids = list(head)
        for j, unit in enumerate(filler + [[]]):
            while slots and slots[0] == j:
                slots.pop(0)
                ids += facts.pop(0)
            ids += unit
        ids += tail
        return Doc(ids + answer, [(len(ids), len(ids) + len(answer))])

    def _copy(self, rng: random.Random, length: int) -> Doc:
        n = rng.randint(4, 16)
        span = sum(self._filler(rng, n), []) if rng.random() < 0.5 else self.enc(" " + " ".join(
            _value(rng, rng.choice(["word", "number", "code"])) for _ in range(rng.randint(2, 5))))[:16]
        prompt = rng.choice(COPY_PROMPTS).split("{s}")
        head = self.enc(prompt[0].rstrip())
        cue = self.enc(rng.choice(CUES))
        pre = sum(self._filler(rng, max(0, length - len(head) - 2 * len(span) - len(cue) - 1) // 2), [])
        ids = pre + self.enc("\n") + head + span + cue
        return Doc((ids + span)[:length], [(len(ids), min(length, len(ids) + len(span)))])

    def _induction(self, rng: random.Random, length: int) -> Doc:
        """Random tokens; a random segment recurs later: after its first token, the rest is copyable."""
        if rng.random() < self.digit_share:     # a digit string: one token of context is ambiguous
            seq = [rng.choice(self.digits) for _ in range(length)]
        else:
            seq = [t for t in (rng.randrange(self.vocab) for _ in range(length + 8)) if t != self.eos][:length]
        if length < 16:
            return Doc(seq, [])
        n = rng.randint(3, max(3, length // 3))
        a = rng.randrange(0, length // 2 - n)
        b = rng.randrange(a + n, length - n)
        seq[b:b + n] = seq[a:a + n]
        return Doc(seq, [(b + 1, b + n)])


# ---- rows -------------------------------------------------------------------------------------------

def pack_docs(maker: DocMaker, rng: random.Random, seq_len: int, length: int, pad_id: int = 0) -> dict:
    """One row of seq_len tokens: documents of length in [length/2, length] side by side, position ids
    restarting per document (as the teacher-cache rows), labels only on answer tokens."""
    import torch  # here: distill.config imports this module, and reading a config must not load torch

    from .losses import IGNORE_INDEX

    ids, pos, lab = [], [], []
    while len(ids) < seq_len:
        left = seq_len - len(ids)
        want = rng.randint(max(16, length // 2), max(16, length))
        if left < max(16, length // 4):
            n = left                                     # too short for a document: padding
            ids += [pad_id] * n
            pos += list(range(n))
            lab += [IGNORE_INDEX] * n
            break
        doc = maker.make(rng, min(want, left))
        d = doc.ids[:left]
        labels = [IGNORE_INDEX] * len(d)
        for s, e in doc.targets:
            for t in range(max(s, 1), min(e, len(d))):
                labels[t - 1] = d[t]                     # position t-1 predicts answer token t
        ids += d
        pos += list(range(len(d)))
        lab += labels
    return dict(input_ids=torch.tensor(ids[:seq_len]), position_ids=torch.tensor(pos[:seq_len]),
                labels=torch.tensor(lab[:seq_len]))


def curriculum_length(step: int, total_steps: int, min_len: int, max_len: int, ramp: float) -> int:
    """Document length at `step`: min_len, growing linearly to max_len over the first `ramp` of training
    (geometric mean would spend too long at short lengths for a few hundred steps), then max_len."""
    if ramp <= 0 or max_len <= min_len:
        return max_len
    t = min(1.0, step / max(1.0, ramp * total_steps))
    return int(round(min_len + t * (max_len - min_len)))


def recall_batch(maker: DocMaker, *, rows: int, seq_len: int, length: int, seed: int, step: int,
                 rank: int = 0, world_size: int = 1, pad_id: int = 0) -> dict:
    """This rank's rows (rank::world_size) of the step's global recall batch; a function of (seed, step)
    only, so a resumed run sees the same documents."""
    import torch

    packed = []
    for r in range(rank, rows, world_size):
        rng = random.Random(f"recall-curriculum|{seed}|{step}|{r}")
        packed.append(pack_docs(maker, rng, seq_len, length, pad_id))
    return {k: torch.stack([p[k] for p in packed]) for k in packed[0]}


__all__ = ["FAMILIES", "Doc", "DocMaker", "pack_docs", "recall_batch", "curriculum_length", "log_sentence"]
