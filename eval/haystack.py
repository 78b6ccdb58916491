"""Seeded English-like filler text for long-context recall prompts.

Recall tasks hide a few facts ("needles") in a long irrelevant text. Repeating one filler line
(the classic "The grass is green. The sky is blue." haystack) lets a model compress the context
into "same line again" and makes the needle trivially salient, so every sentence here is drawn
from templates x word lists and kept unique within a haystack.

There are several grammars (`GRAMMARS`: village life, a workshop, a sea voyage, an observatory
log), each with its own word lists over the same slots; a round's surface forms
(eval.recall_forms) pick one, so the filler's topic and vocabulary are not a constant a model
could learn to skip. `village` is the public default. Every vocabulary is deliberately narrow and
contains no digit runs of 5+, no people's names and none of the words used for keys/values in
eval.recall_forms, so a needle's answer can never appear by accident in the filler. Tests check
that these lists stay disjoint.
"""

import random
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Grammar:
    subjects: list[str]
    verbs: list[str]
    objects: list[str]
    places: list[str]
    times: list[str]
    intransitive: list[str]
    adjectives: list[str]
    scenes: list[str]
    plurals: list[str]
    reasons: list[str]
    templates: list[str]


# the other grammars share the sentence shapes; their own templates carry their own wording
_SHARED_TEMPLATES = ["{S} {V} {O} {P}.", "{T}, {S} {V} {O}.", "{S} {I} {P}.", "{S} {V} {O} {R}.",
                     "{S} {I}.", "{S} {V} {O}.", "{C} was {A}.", "{S} counted {N} {L}.",
                     "{T}, {S} {I}.", "{S} and {S2} {V} {O}.", "{C} was {A} {T}."]
VILLAGE = Grammar(SUBJECTS, VERBS, OBJECTS, PLACES, TIMES, INTRANSITIVE, ADJECTIVES, SCENES, PLURALS, REASONS,
                  TEMPLATES)
WORKSHOP = Grammar(
    subjects=["the foreman", "an engineer", "the welder", "the night shift", "a trainee", "the inspector",
              "the machinist", "the supervisor", "the crane operator", "the storekeeper", "a technician",
              "the electrician", "the plumber", "the quality team", "the driver", "the cleaner",
              "the draughtsman", "a contractor", "the safety officer", "the apprentices"],
    verbs=["calibrated", "assembled", "dismantled", "tightened", "oiled", "tested", "replaced", "adjusted",
           "labelled", "stored", "checked", "ground", "welded", "drilled", "sanded", "bolted", "cut",
           "rewired", "unpacked", "sealed"],
    objects=["the lathe", "a gearbox", "the conveyor belt", "several pipes", "the main valve", "a steel beam",
             "the control panel", "a spare motor", "the loading ramp", "the drill press", "a pallet of bricks",
             "the boiler", "the fuse box", "a coil of wire", "the forklift", "the workbench", "a toolbox",
             "the ventilation duct", "the pressure gauge", "a drum of oil"],
    places=["in the workshop", "on the factory floor", "in the storeroom", "by the loading dock",
            "near the furnace", "in hall two", "behind the warehouse", "at the assembly line", "in the basement",
            "under the gantry", "beside the generator", "on the mezzanine"],
    times=["before the shift change", "during the night shift", "after the inspection", "on monday",
           "at the end of the week", "before the audit", "during the break", "after the power cut",
           "first thing in the morning", "late on friday", "after the delivery"],
    intransitive=["clocked in", "took a break", "worked overtime", "waited for parts", "filled in forms",
                  "went home early", "stood by", "kept going", "checked the schedule", "reported sick"],
    adjectives=["noisy", "greasy", "hot", "dim", "cramped", "tidy", "cluttered", "draughty", "loud",
                "spotless", "humid", "freezing"],
    scenes=["the workshop", "the storeroom", "the canteen", "the yard", "the office", "the loading bay",
            "the changing room", "the stairwell"],
    plurals=["bolts", "crates", "pallets", "gloves", "helmets", "ladders", "hammers", "spanners", "drums",
             "fuses", "tyres", "screws"],
    reasons=["because the order was late", "to meet the deadline", "after a complaint", "as instructed",
             "for the annual check", "without any fuss", "to save time", "on advice"],
    templates=_SHARED_TEMPLATES + ["The log lists {N} {L} {P}.", "{T}, {C} felt {A} and {A2}.",
                                   "According to the report, {S} {V} {O}.", "{S} noted that {C} was {A}.",
                                   "It took {D} hours before {S} {V} {O}."])
VOYAGE = Grammar(
    subjects=["the captain", "the first mate", "the navigator", "a deckhand", "the cook", "the bosun",
              "the lookout", "the purser", "the crew", "a passenger", "the helmsman", "the radio officer",
              "the cabin boy", "the quartermaster", "the harbour pilot", "the surgeon", "the stoker",
              "the sailmaker"],
    verbs=["hoisted", "lowered", "secured", "coiled", "scrubbed", "patched", "inspected", "stowed", "hauled",
           "untangled", "tarred", "signalled", "sounded", "lashed", "rigged", "emptied"],
    objects=["the mainsail", "the anchor chain", "the lifeboat", "a barrel of water", "the rudder",
             "the deck", "a length of rope", "the hatch", "the compass", "the signal lamp", "the cargo nets",
             "the galley stove", "a spare oar", "the foremast", "the bilge pump", "the charts"],
    places=["on deck", "below deck", "in the hold", "at the stern", "near the bow", "in the galley",
            "by the rail", "on the bridge", "up in the rigging", "beside the capstan"],
    times=["at first light", "during the squall", "after the watch changed", "before the tide turned",
           "in the calm", "at dusk", "on the third day", "during the night watch", "as the wind rose",
           "after supper"],
    intransitive=["kept the watch", "rested below", "sang a shanty", "stayed at the wheel", "grumbled",
                  "slept in a hammock", "watched the horizon", "held on tight", "waited for orders"],
    adjectives=["rough", "calm", "grey", "salty", "misty", "stormy", "still", "choppy", "wet", "bleak"],
    scenes=["the sea", "the deck", "the horizon", "the hold", "the galley", "the cabin", "the bay", "the shore"],
    plurals=["gulls", "waves", "ropes", "sacks", "lanterns", "buckets", "planks", "sails", "oars", "crates"],
    reasons=["because the wind changed", "as the captain ordered", "to keep the ship dry",
             "before the storm arrived", "with cold hands", "in silence", "as the log required"],
    templates=_SHARED_TEMPLATES + ["The log records {N} {L} {P}.", "{T}, {C} looked {A} and {A2}.",
                                   "Nobody aboard knew why {S} {V} {O}.", "{S} wrote that {C} was {A}.",
                                   "It was {D} days before {S} {V} {O}."])
OBSERVATORY = Grammar(
    subjects=["the astronomer", "the duty observer", "a graduate student", "the director", "the technician",
              "the visiting professor", "the archivist", "the night assistant", "the engineer on call",
              "the survey team", "the telescope operator", "a volunteer"],
    verbs=["aligned", "focused", "cooled", "logged", "photographed", "cleaned", "recalibrated", "archived",
           "measured", "plotted", "rotated", "covered", "uncovered", "examined"],
    objects=["the main mirror", "the dome", "a spectrograph", "the star charts", "the finder scope",
             "the cooling unit", "a box of plates", "the clock drive", "the eyepiece", "the weather station",
             "the logbook", "the filter wheel", "the tracking motor"],
    places=["in the dome", "at the control desk", "in the plate archive", "on the catwalk", "in the library",
            "near the coude room", "by the entrance", "on the roof"],
    times=["after midnight", "before dawn", "during twilight", "while the sky cleared", "on a cloudy night",
           "after the rain", "before the moon rose", "in the small hours", "at the start of the run"],
    intransitive=["waited for clear skies", "drank coffee", "took notes", "dozed off", "checked the humidity",
                  "stayed up late", "went to bed", "wrote a memo"],
    adjectives=["dark", "clear", "cloudy", "chilly", "silent", "hazy", "steady", "humid", "starry", "dim"],
    scenes=["the sky", "the dome", "the control room", "the archive", "the valley below", "the ridge"],
    plurals=["plates", "frames", "exposures", "clouds", "notes", "readings", "cables", "lenses"],
    reasons=["to reduce the noise", "as planned", "because the seeing was poor", "for the survey",
             "after a long delay", "out of habit"],
    templates=_SHARED_TEMPLATES + ["The night log shows {N} {L} {P}.", "{T}, {C} stayed {A} and {A2}.",
                                   "It is unclear why {S} {V} {O}.", "{S} remarked that {C} was {A}.",
                                   "It took {D} nights before {S} {V} {O}."])
GRAMMARS = {"village": VILLAGE, "workshop": WORKSHOP, "voyage": VOYAGE, "observatory": OBSERVATORY}


def _capitalize(s: str) -> str:
    return s[0].upper() + s[1:]


def sentence(rng: random.Random, grammar: str = "village") -> str:
    """One random filler sentence (not necessarily unique)."""
    g = GRAMMARS[grammar]
    s1, s2 = rng.sample(g.subjects, 2)
    a1, a2 = rng.sample(g.adjectives, 2)
    fields = dict(
        S=s1, S2=s2, V=rng.choice(g.verbs), O=rng.choice(g.objects), P=rng.choice(g.places),
        T=rng.choice(g.times), I=rng.choice(g.intransitive), A=a1, A2=a2, C=rng.choice(g.scenes),
        N=rng.randint(2, 999), Y=rng.randint(1700, 1999), D=rng.randint(2, 30),
        L=rng.choice(g.plurals), R=rng.choice(g.reasons),
    )
    return _capitalize(rng.choice(g.templates).format(**fields))


def vocabulary(grammar: str | None = None) -> set[str]:
    """Every lower-cased word a grammar (default: any of them) can produce, for disjointness checks."""
    out: set[str] = set()
    for name, g in GRAMMARS.items():
        if grammar not in (None, name):
            continue
        lists = g.subjects + g.verbs + g.objects + g.places + g.times + g.intransitive + g.adjectives
        lists += g.scenes + g.plurals + g.reasons + [t.replace("{", " ").replace("}", " ") for t in g.templates]
        out |= {w.strip(".,").lower() for phrase in lists for w in phrase.split()}
    return out


def fill(rng: random.Random, count_tokens: Callable[[str], int], budget: int,
         used: set[str] | None = None, max_misses: int = 80, grammar: str = "village") -> list[tuple[str, int]]:
    """Unique sentences whose token counts sum to at most `budget`, and close to it.

    count_tokens(s) is the cost of s as it sits in the haystack (callers pass ' ' + s through the
    tokenizer), so each sentence is tokenised once instead of re-tokenising the growing text.
    Sentences are accepted greedily; once they start overflowing we keep drawing (short templates
    exist) until `max_misses` draws in a row did not fit, which lands within a few tokens.
    """
    used = set() if used is None else used
    out, left, misses = [], budget, 0
    while left > 0 and misses < max_misses:
        s = sentence(rng, grammar)
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
