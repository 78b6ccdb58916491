"""Surface forms of the recall items: wording, key and value alphabets, filler, delimiters.

A model trained on one fixed set of templates can learn the templates instead of recall: where
the needle sits is "the sentence that says 'The special code for'", the answer is "the 7-digit
number after 'is'". So a competition can draw the forms per round (`round_forms(seed)`) from a
large space: filler grammar (eval.haystack), intros, the answer cue, the separator of multi-part
answers, number lengths, code alphabets and layouts, key vocabularies and code layouts, needle,
question and format templates per family (several per round, composed from phrase x pattern
pools), assoc_recall's relations and question layout, and variable_tracking's assignment syntax
and name alphabet. The round's pools never contain the default forms' needle, question or
assignment strings, so a reader that only knows the defaults cannot parse a round's items
(tests/test_redteam_recall.py measures it).

`DEFAULT_FORMS` are the public, fixed forms every item used before (`forms="fixed"`): with them
generation is byte-identical to earlier releases, so a stored round replays.
Forms are plain JSON-safe data; the oracle (eval.recall_tasks.oracle_answer_text) parses a
prompt with the forms it was generated with.
"""
from __future__ import annotations

import functools
import hashlib
import random
import re

from eval import haystack

# ---- words for keys and values (disjoint from every filler vocabulary; tests check it) ----------

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
# extra pools a round draws from (together with the lists above)
MORE_ADJECTIVES = ["magenta", "lavender", "lilac", "umber", "sepia", "cerulean", "vermilion", "khaki",
                   "turquoise", "mauve", "fuchsia", "chartreuse", "sienna", "taupe", "ultramarine"]
MORE_NOUNS = ["pelican", "mongoose", "armadillo", "narwhal", "wombat", "okapi", "lemur", "ocelot",
              "meerkat", "axolotl", "chinchilla", "kestrel", "cormorant", "iguana", "pangolin"]
MORE_FIRST = ["Ansel", "Brigid", "Cosimo", "Delphine", "Emeric", "Fiora", "Gustav", "Hedda", "Ilse",
              "Jasper", "Katya", "Leopold", "Mirela", "Niamh", "Orla", "Pavel", "Rainer", "Saoirse",
              "Thaddeus", "Ulrike", "Viggo", "Wilma", "Yara", "Zdenek"]
MORE_LAST = ["Abernathy", "Bergstrom", "Cavendish", "Dragomir", "Eriksen", "Fairweather", "Gallagher",
             "Holmberg", "Iversen", "Jablonski", "Kaminski", "Lombardi", "Mendoza", "Nieminen",
             "Ostrowski", "Pemberton", "Radcliffe", "Strand", "Thornbury", "Uzunov"]
MORE_VALUES = ["avocado", "tamarind", "persimmon", "kumquat", "rhubarb", "marzipan", "bassoon",
               "sitar", "didgeridoo", "xylophone", "marimba", "savanna", "archipelago", "estuary",
               "quasar", "aurora", "asteroid", "cyclone", "typhoon", "fedora", "sarong", "parka",
               "calligraphy", "tapestry", "flamenco", "foxtrot", "mazurka", "turmeric", "oregon",
               "walnut", "macadamia", "toboggan", "trireme", "ziggurat", "minaret", "sphinx"]

# ---- the default forms' wording ------------------------------------------------------------------

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
        questions=["Find all variables that are assigned the value {v}.",
                   "Which variables end up holding the value {v}?",
                   "List every variable whose value is {v}."],
        formats=["Give their names in the order they were assigned, separated by commas.",
                 "Answer with the variable names in order of assignment, separated by commas."]),
    "assoc_recall": dict(
        formats=["Give the answers in the same order as the questions, separated by commas.",
                 "Answer every question in order, separating the answers with commas."]),
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

UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# the legacy oracle's generic patterns: one or two words ("KX-4821", "silver falcon"), one word
LEGACY_KEY = r"[\w-]+(?: [\w-]+)?"
LEGACY_VAL = r"[\w-]+"

DEFAULT_FORMS = dict(
    kind="fixed", filler="village", intros=INTROS, cue="\nAnswer:", join=", ",
    passkey_digits=[5, 7], number_digits=[6, 7],
    code=dict(alphabet="0123456789abcdef", groups=[8, 4], sep="-"),
    value_words=VALUE_WORDS,
    key=dict(adjectives=KEY_ADJECTIVES, nouns=KEY_NOUNS, first=FIRST_NAMES, last=LAST_NAMES,
             code_prefix=2, code_alphabet="ABCDEFGHJKLMNPRSTUVWXYZ", code_digits=4, code_sep="-"),
    wording=WORDING, relations=RELATIONS,
    assoc=dict(header="Questions:", number="{i}. "),
    var=dict(assign="VAR {a} = {v}.", hop="VAR {b} = VAR {a}.", letters=UPPER, alphabet=UPPER, length=5),
    key_re=LEGACY_KEY, val_re=LEGACY_VAL,
)

# ---- the per-round space ------------------------------------------------------------------------

_INTRO_POOL = [
    "What follows is a long text. Somewhere in it are a few facts that matter; everything else is "
    "noise. Questions about those facts come at the end.",
    "Study the document below. It mixes ordinary sentences with a handful of specific details, "
    "and you will be tested on the details.",
    "The text below is mostly filler. Hidden in it are some statements you must remember for the "
    "questions after it.",
    "Here is a record with many unimportant lines. A few lines carry information you will need "
    "to answer correctly afterwards.",
    "Go through the following material carefully. Certain facts are buried in it; the task at the "
    "end asks about them.",
    "You are given a long passage. Track the few concrete facts it contains and ignore the rest; "
    "then answer the request below it.",
    "Attention test: the document below hides some details among irrelevant sentences. Keep them "
    "in mind until the end.",
]
_CUES = ["\nA:", "\nResponse:", "\nYour answer:", "\nReply:", "\nOutput:", "\nThe answer is:",
         "\nFinal answer:"]
_JOINS = [(", ", "commas"), ("; ", "semicolons"), (" | ", "vertical bars"), (" / ", "slashes"),
          (" + ", "plus signs")]
_CODE_ALPHABETS = ["0123456789abcdef", "0123456789ABCDEF", "23456789ABCDEFGHJKMNPQRSTVWXYZ",
                   "0123456789bcdfghjkmnpqrstvwxz", "0123456789"]
_CODE_GROUPS = [[4, 4], [8, 4], [3, 3, 3], [6], [5, 3], [4, 2, 4], [2, 6], [10]]
_CODE_SEPS = ["-", "_", ""]
_DELIMS = [": ", " = ", " -> ", " => ", " is "]

_PASSKEY_NAMES = ["passcode", "access number", "unlock number", "pin", "secret number", "door code",
                  "vault number", "entry code"]
_PASSKEY_NEEDLES = ["The {name} is {v}. Remember it.", "Remember this: the {name} is {v}.",
                    "Important note: the {name} for this document is {v}.",
                    "Do not forget the {name}{delim}{v}.", "Keep this in mind, the {name} is {v}.",
                    "The {name} you will need later is {v}.", "Memo: {name}{delim}{v}.",
                    "Write this down: the {name} is {v}."]
_PASSKEY_QUESTIONS = ["What is the {name}?", "Which number is the {name}?",
                      "What {name} was mentioned in the text?", "Recall the {name}.",
                      "What was the {name} given above?", "Tell me the {name}."]
_PASSKEY_FORMATS = ["Answer with the number only.", "Reply with just the {name}.",
                    "Respond with the digits and nothing else.", "Only the number, please."]

_NIAH_NAMES = ["hidden code", "private code", "assigned tag", "identifier", "reference label",
               "secret token", "password", "marker", "registry entry", "badge"]
_NIAH_NEEDLES = ["The {name} for {k} is {v}.", "Note that the {name} assigned to {k} is {v}.",
                 "For the record, the {name} of {k} is {v}.", "Registry entry for {k} ({name}){delim}{v}.",
                 "Please keep in mind that {k} uses the {name} {v}.",
                 "It was decided that the {name} of {k} would be {v}.",
                 "Reminder, {name} of {k}{delim}{v}.", "The {name} belonging to {k} reads {v}."]
_NIAH_QUESTIONS = ["What is the {name} for {k}?", "Which {name} was given to {k}?",
                   "Tell me the {name} of {k}.", "Recall the {name} that belongs to {k}.",
                   "What {name} does {k} have?", "Look up the {name} of {k}."]
_NIAH_FORMATS = ["Answer with the {name} only.", "Reply with just the {name}.",
                 "Write the {name} and nothing else.", "Only the {name}, please."]

_MV_NAMES = [("value", "values"), ("entry", "entries"), ("item", "items"), ("tag", "tags"),
             ("record", "records"), ("label", "labels"), ("note", "notes")]
_MV_NEEDLES = ["One {sing} listed under {k} is {v}.", "Another {sing} for {k}{delim}{v}.",
               "Add {v} to the {plur} of {k}.", "The {plur} of {k} include {v}.",
               "Among the {plur} filed for {k} is {v}.", "A further {sing} of {k} reads {v}.",
               "Log a {sing} for {k}{delim}{v}."]
_MV_QUESTIONS = ["What are all the {plur} for {k}?", "List every {sing} recorded for {k}.",
                 "Which {plur} belong to {k}?", "Name all {plur} of {k}.",
                 "Give every {sing} that was filed for {k}."]
_MV_FORMATS = ["Give them in the order they appear, separated by {join_name}.",
               "List them in order of appearance, separated by {join_name}.",
               "Keep the order of the text and separate them with {join_name}."]

_REL_NAMES = dict(number=["room number", "seat number", "badge number", "ticket number", "house number"],
                  word=["chosen word", "code word", "secret word", "nickname", "motto word"],
                  code=["booking code", "parcel code", "membership code", "voucher code", "tracking code"])
_REL_STATEMENTS = ["{k}'s {rel} is {v}.", "The {rel} of {k} is {v}.",
                   "Everyone knows the {rel} of {k}{delim}{v}.",
                   "According to the files, {k} has the {rel} {v}.", "{k} was given the {rel} {v}.",
                   "As for {k}, the {rel} is {v}."]
_REL_QUESTIONS = ["What is {k}'s {rel}?", "Which {rel} belongs to {k}?", "What {rel} was given to {k}?",
                  "Name the {rel} of {k}."]
_AQ_HEADERS = ["Answer the following:", "Queries:", "Please answer:", "Questions to answer:"]
_AQ_NUMBERS = ["({i}) ", "Q{i}: ", "{i}) ", "#{i} "]
_AQ_FORMATS = ["Give the answers in the same order as the questions, separated by {join_name}.",
               "Answer every question in order, separating the answers with {join_name}.",
               "Reply in question order; put {join_name} between the answers."]

_VAR_KEYWORDS = ["LET", "SET", "let", "var", "def", "ASSIGN"]
_VAR_OPS = ["=", ":=", "<-", "is set to"]
_VAR_REFS = ["", "$", "@", "{kw} "]
_VAR_ENDS = [".", ";"]
_VAR_ALPHABETS = [(UPPER, UPPER, [3, 6]), ("abcdefghijklmnopqrstuvwxyz", "abcdefghijklmnopqrstuvwxyz", [4, 6]),
                  (UPPER, UPPER + "0123456789", [4, 6]), ("xyzwvuqpk", "xyzwvuqpk0123456789", [3, 5])]
_VAR_QUESTIONS = ["Which variables hold the value {v} in the end?", "Find every variable equal to {v}.",
                  "List the variables whose value is {v}.", "Name all variables that end up as {v}."]
_VAR_FORMATS = ["Give their names in the order they were assigned, separated by {join_name}.",
                "Answer with the names in order of assignment, separated by {join_name}.",
                "Order them by assignment and separate them with {join_name}."]


def _fill(templates: list[str], **fields) -> list[str]:
    """Substitute the round's phrase fields, leaving {k}/{v}/{a}/{b} for the item."""
    keep = {k: "{" + k + "}" for k in ("k", "v", "a", "b")}
    return [t.format(**keep, **fields) for t in templates]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


@functools.lru_cache(maxsize=64)
def _round_forms(seed: int) -> dict:
    rng = random.Random(int.from_bytes(hashlib.sha256(f"recall-forms|{seed}".encode()).digest()[:8], "big"))
    join, join_name = rng.choice(_JOINS)
    delim = rng.choice(_DELIMS)
    lo = rng.randint(5, 7)
    number_digits = [lo, lo + rng.randint(0, 2)]
    plo = rng.randint(5, 7)
    code = dict(alphabet=rng.choice(_CODE_ALPHABETS), groups=rng.choice(_CODE_GROUPS), sep=rng.choice(_CODE_SEPS))
    key = dict(adjectives=rng.sample(KEY_ADJECTIVES + MORE_ADJECTIVES, 14),
               nouns=rng.sample(KEY_NOUNS + MORE_NOUNS, 14),
               first=rng.sample(FIRST_NAMES + MORE_FIRST, 24), last=rng.sample(LAST_NAMES + MORE_LAST, 24),
               code_prefix=rng.randint(2, 3), code_alphabet=rng.choice(["ABCDEFGHJKLMNPRSTUVWXYZ", "BCDFGHKMNPRTVXZ"]),
               code_digits=rng.randint(3, 5), code_sep=rng.choice(["-", "_"]))

    def pick(pool, n):
        return rng.sample(pool, n)

    pk_name = rng.choice(_PASSKEY_NAMES)
    niah_name = rng.choice(_NIAH_NAMES)
    sing, plur = rng.choice(_MV_NAMES)
    wording = {
        "passkey": dict(needles=_fill(pick(_PASSKEY_NEEDLES, 3), name=pk_name, delim=delim),
                        questions=_fill(pick(_PASSKEY_QUESTIONS, 3), name=pk_name),
                        formats=_fill(pick(_PASSKEY_FORMATS, 2), name=pk_name)),
        "niah_multikey": dict(needles=_fill(pick(_NIAH_NEEDLES, 3), name=niah_name, delim=delim),
                              questions=_fill(pick(_NIAH_QUESTIONS, 3), name=niah_name),
                              formats=_fill(pick(_NIAH_FORMATS, 2), name=niah_name)),
        "multivalue": dict(needles=[_cap(t) for t in _fill(pick(_MV_NEEDLES, 3), sing=sing, plur=plur, delim=delim)],
                           questions=_fill(pick(_MV_QUESTIONS, 3), sing=sing, plur=plur),
                           formats=_fill(pick(_MV_FORMATS, 2), join_name=join_name)),
        "variable_tracking": dict(questions=pick(_VAR_QUESTIONS, 3),
                                  formats=_fill(pick(_VAR_FORMATS, 2), join_name=join_name)),
        "assoc_recall": dict(formats=_fill(pick(_AQ_FORMATS, 2), join_name=join_name)),
    }
    relations = [dict(value=kind, statements=_fill(pick(_REL_STATEMENTS, 3), rel=rel, delim=delim),
                      questions=_fill(pick(_REL_QUESTIONS, 2), rel=rel))
                 for kind in ("number", "word", "code") for rel in [rng.choice(_REL_NAMES[kind])]]
    kw, op, end = rng.choice(_VAR_KEYWORDS), rng.choice(_VAR_OPS), rng.choice(_VAR_ENDS)
    ref = rng.choice(_VAR_REFS).format(kw=kw)
    letters, alphabet, (nlo, nhi) = rng.choice(_VAR_ALPHABETS)
    var = dict(assign=f"{kw} {{a}} {op} {{v}}{end}", hop=f"{kw} {{b}} {op} {ref}{{a}}{end}",
               letters=letters, alphabet=alphabet, length=rng.randint(nlo, nhi))
    return dict(
        kind="round", seed=seed, filler=rng.choice(sorted(haystack.GRAMMARS)), intros=pick(_INTRO_POOL, 3),
        cue=rng.choice(_CUES), join=join, passkey_digits=[plo, plo + rng.randint(0, 2)],
        number_digits=number_digits, code=code, value_words=rng.sample(VALUE_WORDS + MORE_VALUES, 40), key=key,
        wording=wording, relations=relations,
        assoc=dict(header=rng.choice(_AQ_HEADERS), number=rng.choice(_AQ_NUMBERS)), var=var,
        key_re=_key_regex(key), val_re=r"[\w-]+",
        exact_length=True,  # every prompt of a length bin has exactly its target length: batchable
    )


def _key_regex(key: dict) -> str:
    """Exactly the three key shapes of the round: a code, a first + last name, two lowercase words."""
    code = rf"[{key['code_alphabet']}]{{{key['code_prefix']}}}{re.escape(key['code_sep'])}\d{{{key['code_digits']}}}"
    return rf"{code}|[A-Z][a-z]+ [A-Z][a-z]+|[a-z]+ [a-z]+"


def round_forms(seed: int) -> dict:
    """The surface forms of round `seed`: a pure function of the seed (a copy; safe to modify)."""
    import copy
    return copy.deepcopy(_round_forms(seed))


def resolve_forms(forms, seed: int) -> dict:
    """'fixed' (the public defaults), 'round' (drawn from the seed) or a forms dict as it is."""
    if isinstance(forms, dict):
        return forms
    if forms == "fixed":
        return DEFAULT_FORMS
    if forms == "round":
        return _round_forms(seed)
    raise ValueError(f"recall forms must be 'fixed' or 'round', got {forms!r}")


def forms_signature(forms: dict) -> str:
    """A short digest of everything in the forms, to count distinct draws."""
    import json
    blob = json.dumps({k: v for k, v in forms.items() if k != "seed"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


FORMS_KINDS = ("fixed", "round")

__all__ = ["DEFAULT_FORMS", "FORMS_KINDS", "round_forms", "resolve_forms", "forms_signature", "INTROS", "WORDING",
           "RELATIONS", "KEY_ADJECTIVES", "KEY_NOUNS", "FIRST_NAMES", "LAST_NAMES", "VALUE_WORDS"]
