"""Seeded English-like filler text for long-context recall prompts.

Recall tasks hide a few facts ("needles") in a long irrelevant text. Repeating one filler line
(the classic "The grass is green. The sky is blue." haystack) lets a model compress the context
into "same line again" and makes the needle trivially salient, so every sentence here is drawn
from templates x word lists and kept unique within a haystack.

The vocabulary is deliberately narrow (village life) and contains no digits runs of 5+, no
people's names and none of the words used for keys/values in recall_tasks.py, so a needle's
answer can never appear by accident in the filler. Tests check that these lists stay disjoint.
"""

import random
from typing import Callable

SUBJECTS = [
    "the old fisherman", "a young teacher", "the baker", "the mayor", "a traveling merchant",
    "the shepherd", "my grandmother", "the ferry captain", "a quiet student", "the blacksmith",
    "the librarian", "a tired nurse", "the gardener", "the carpenter", "an elderly poet",
    "the postman", "the innkeeper", "a curious child", "the village council", "the night watchman",
    "the weaver", "a local farmer", "the schoolmaster", "the painter", "the miller",
    "a wandering monk", "the harbor master", "the cook", "the potter", "the tailor", "the doctor",
    "a group of hikers", "the twins", "the museum guide", "the stationmaster", "the beekeeper",
    "the lighthouse keeper", "the river pilot", "the clockmaker", "my uncle", "the new neighbor",
    "a retired soldier", "the choir", "the butcher", "a shy apprentice",
]
VERBS = [  # transitive, past tense
    "repaired", "painted", "carried", "sold", "bought", "cleaned", "described", "found",
    "borrowed", "delivered", "measured", "counted", "wrapped", "opened", "mended", "photographed",
    "studied", "packed", "polished", "planted", "watered", "inspected", "carved", "collected",
    "lost", "returned", "moved", "stacked", "sorted", "weighed", "admired", "ignored", "guarded",
    "sketched", "shared", "loaded", "unloaded", "fixed", "washed", "painted over", "dragged",
]
OBJECTS = [
    "the wooden fence", "a basket of apples", "the old bridge", "several letters", "the broken cart",
    "a pile of firewood", "the kitchen window", "a map of the valley", "the church bell",
    "a bag of flour", "the fishing nets", "a pair of boots", "the garden gate", "an old photograph",
    "the stone wall", "a stack of books", "the blue door", "a jar of honey", "the market stall",
    "a bundle of reeds", "the rowing boat", "a wool blanket", "the iron kettle", "the notice board",
    "a crate of pears", "the barn roof", "a loaf of bread", "the well bucket", "a clay pot",
    "the town clock", "the ledger", "a sack of grain", "the chimney", "a roll of canvas",
    "the wheelbarrow", "the weather vane", "a leather saddle", "the greenhouse", "a bowl of soup",
    "the school piano", "a box of nails", "the hay wagon", "a torn sail", "the copper pot",
]
PLACES = [
    "near the river", "by the harbor", "behind the mill", "at the market", "on the hill",
    "in the square", "beside the school", "under the old oak", "at the edge of the forest",
    "inside the barn", "along the coast road", "by the well", "across the valley",
    "outside the inn", "in the courtyard", "at the train station", "near the lighthouse",
    "in the orchard", "on the village green", "behind the chapel", "down by the docks",
]
TIMES = [
    "early in the morning", "after the storm", "before sunrise", "during the festival",
    "last winter", "in the spring", "on a rainy afternoon", "late at night", "after lunch",
    "at dawn", "in the autumn", "on market day", "the next evening", "before the harvest",
    "during the long summer", "every Sunday", "at noon", "the week before the wedding",
]
INTRANSITIVE = [
    "waited", "laughed", "rested", "sang quietly", "walked slowly", "argued", "worked all day",
    "slept", "paused", "smiled", "wandered", "hurried", "listened carefully", "stayed",
    "complained", "whistled", "danced", "hesitated", "sighed", "kept watch",
]
ADJECTIVES = [
    "muddy", "quiet", "crowded", "cold", "bright", "peaceful", "noisy", "damp", "warm", "windy",
    "dusty", "fragrant", "empty", "busy", "calm", "foggy", "cheerful", "gloomy", "colorful",
    "narrow", "slippery", "silent",
]
SCENES = [
    "the road", "the square", "the harbor", "the kitchen", "the orchard", "the school yard",
    "the bakery", "the meadow", "the bridge", "the hall", "the sky", "the lake", "the attic",
    "the market", "the valley", "the forest path",
]
PLURALS = [
    "sheep", "boats", "visitors", "chairs", "barrels", "geese", "houses", "trees", "carts",
    "children", "workers", "windows", "candles", "fences", "bottles", "bicycles", "stalls",
    "pigeons", "loaves", "baskets", "cows",
]
REASONS = [
    "because the roads were flooded", "since nobody else could", "as the weather turned",
    "to prepare for winter", "for the first time in years", "without saying a word",
    "while the others watched", "as usual", "with great care", "in a hurry",
    "for reasons nobody understood", "before anyone noticed",
]

# {S} subject, {S2} second subject, {V} verb, {O} object, {P} place, {T} time, {I} intransitive,
# {A}/{A2} adjectives, {C} scene, {N} count, {Y} year, {D} small number, {L} plural, {R} reason.
# Several short templates let the filler top up a budget to within a few tokens.
TEMPLATES = [
    "{S} {V} {O} {P}.", "{T}, {S} {V} {O}.", "{S} {I} {P} {T}.", "{S} {V} {O} {R}.",
    "There were {N} {L} {P} {T}.", "{C} was {A} {T}.", "{T}, {C} seemed {A} and {A2}.",
    "Nobody remembers why {S} {V} {O}.", "{S} said that {C} was {A}.", "In {Y}, {S} {V} {O} {P}.",
    "{S} and {S2} {V} {O} together.", "It took {D} days before {S} {V} {O}.",
    "Some said {S} had {V} {O} {R}.", "{S} {I}.", "{C} was {A}.", "{S} {V} {O}.",
    "{S} counted {N} {L}.", "{T}, {S} {I}.",
]


def _capitalize(s: str) -> str:
    return s[0].upper() + s[1:]


def sentence(rng: random.Random) -> str:
    """One random filler sentence (not necessarily unique)."""
    s1, s2 = rng.sample(SUBJECTS, 2)
    a1, a2 = rng.sample(ADJECTIVES, 2)
    fields = dict(
        S=s1, S2=s2, V=rng.choice(VERBS), O=rng.choice(OBJECTS), P=rng.choice(PLACES),
        T=rng.choice(TIMES), I=rng.choice(INTRANSITIVE), A=a1, A2=a2, C=rng.choice(SCENES),
        N=rng.randint(2, 999), Y=rng.randint(1700, 1999), D=rng.randint(2, 30),
        L=rng.choice(PLURALS), R=rng.choice(REASONS),
    )
    return _capitalize(rng.choice(TEMPLATES).format(**fields))


def vocabulary() -> set[str]:
    """Every lower-cased word the filler can produce (for disjointness checks)."""
    lists = SUBJECTS + VERBS + OBJECTS + PLACES + TIMES + INTRANSITIVE + ADJECTIVES + SCENES
    lists += PLURALS + REASONS + [t.replace("{", " ").replace("}", " ") for t in TEMPLATES]
    return {w.strip(".,").lower() for phrase in lists for w in phrase.split()}


def fill(rng: random.Random, count_tokens: Callable[[str], int], budget: int,
         used: set[str] | None = None, max_misses: int = 80) -> list[tuple[str, int]]:
    """Unique sentences whose token counts sum to at most `budget`, and close to it.

    count_tokens(s) is the cost of s as it sits in the haystack (callers pass ' ' + s through the
    tokenizer), so each sentence is tokenised once instead of re-tokenising the growing text.
    Sentences are accepted greedily; once they start overflowing we keep drawing (short templates
    exist) until `max_misses` draws in a row did not fit, which lands within a few tokens.
    """
    used = set() if used is None else used
    out, left, misses = [], budget, 0
    while left > 0 and misses < max_misses:
        s = sentence(rng)
        if s in used:  # duplicates are rare; just draw again
            misses += 1
            continue
        n = count_tokens(s)
        if n > left:
            misses += 1
            continue
        used.add(s)
        out.append((s, n))
        left -= n
        misses = 0
    return out
