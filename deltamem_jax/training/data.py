"""Seeded personal-memory episodes: a user tells facts across turns, then asks about one.

Every episode is a pure function of (seed, split, index), so a run resumes at any data
position and two processes agree on every episode. The `train` and `eval` splits use
disjoint values (names, cities, numbers, …) and disjoint phrasings, so held-out recall
cannot come from memorized training strings.

Relation kinds (21): own name, mother, father, sister, brother, partner, best friend,
dog and cat names, home city, birthplace, job, employer, favourite food, colour and
band, birthday, dentist appointment, door code, locker number, car. Each can be stated
in 6 ways and asked in 4 (split 4+2 / 3+1 between train and eval). An episode holds 1–6
facts with chit-chat turns between them; some facts are later updated (the later value
is the answer), and some questions ask about something never mentioned (the answer says
so).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools

import numpy as np

SPLITS = ("train", "eval")

# -- values ------------------------------------------------------------------------------

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "st", "sh", "ch"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ia"]
_CODAS = ["", "", "n", "r", "l", "s", "x", "th", "m"]
_FIRST_NAMES = """Ada Alma Amir Anya Arlo Asha Axel Bea Boris Cato Cleo Dara Dev Dina Eli Emil Enzo Esme Ezra Fern
Finn Gia Greta Hana Hugo Ida Igor Iris Ivo Jada Joel Juno Kai Kira Lars Lea Leon Lina Luca Mae Mara Milo Mina Nadia
Nico Nina Noor Odin Olga Omar Otto Pia Quinn Ravi Rhea Rosa Rufus Sami Sara Sven Tara Teo Tova Uma Vera Viggo Wren
Yara Yuri Zane Zara Zeno Ansel Bodil Calla Dorian Elio Freya Gideon Hollis Ingrid Jonas Keiko Lorcan Marek Nell
Orla Piet Rosalind Soren Thea Ulric Vesna Willa Xavi Yusuf Zelda Agnes Bruno Celine Dmitri Elke Fabian Giulia
Henrik Imogen Jasper Klara Lionel Magnus Nadine Oskar Paloma Rainer Selma Tobias Ulla Valentin Wanda""".split()
_PET_NAMES = """Biscuit Pepper Mochi Waffles Noodle Pickles Tofu Nugget Maple Ziggy Bingo Sprout Pretzel Muffin Olive
Juniper Clover Peanut Rocket Pixel Dumpling Marble Toffee Bramble Cinder Echo Fudge Gizmo Hopper Jellybean Kiwi Lentil
Mango Nimbus Oreo Paprika Quokka Rascal Sesame Tango Umber Velvet Whiskers Yodel Zucchini Acorn Button Cricket Domino
Ember Fable Gumdrop Hazel Inky Jasper Kernel Lolly Mustard Nacho Onyx Pudding Radish Saffron Truffle""".split()
_CITIES = """Lisbon Oslo Krakow Porto Valencia Ghent Tallinn Riga Vilnius Bergen Aarhus Graz Salzburg Bologna Turin Seville
Malaga Bilbao Lyon Nantes Lille Bordeaux Utrecht Leiden Bremen Leipzig Dresden Hanover Zagreb Split Ljubljana Brno
Gdansk Poznan Wroclaw Tampere Turku Uppsala Malmo Cork Galway Leeds Bristol Glasgow Cardiff Halifax Quebec Calgary
Denver Austin Portland Boise Tucson Omaha Savannah Raleigh Memphis Tulsa Wichita Fresno Osaka Kyoto Nagoya Busan Hanoi
Cebu Perth Hobart Adelaide Auckland Dunedin Nairobi Accra Dakar Tunis Fez Izmir Tbilisi Yerevan Almaty Tashkent
Pune Mysore Kochi Jaipur Cusco Quito Medellin Rosario Valparaiso Recife Curitiba Montevideo Asuncion""".split()
_JOBS = """nurse baker carpenter pilot librarian plumber architect jeweller chemist firefighter teacher electrician
veterinarian translator photographer journalist accountant gardener locksmith paramedic tailor butcher florist
surveyor geologist pharmacist welder beekeeper cartographer glassblower sommelier potter bookbinder stonemason
violinist zookeeper ferryman lifeguard blacksmith animator""".split()
_FOODS = """lasagna sushi paella ramen tacos curry falafel pierogi risotto goulash dumplings pancakes moussaka burritos
gnocchi pho kimchi couscous ravioli tiramisu baklava empanadas gazpacho fondue pretzels waffles churros shakshuka
bibimbap quesadillas""".split()
_COLOURS = """red blue green yellow purple orange pink teal maroon turquoise lavender crimson beige olive navy amber
indigo coral magenta silver""".split()
_MONTHS = "January February March April May June July August September October November December".split()
_WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_CAR_MAKES = "Toyota Volvo Fiat Honda Skoda Subaru Mazda Renault Peugeot Kia Tesla Saab".split()
_COMPANY_TAILS = ["Labs", "Systems", "Foods", "Logistics", "Studios", "Works", "Analytics", "Energy", "Textiles", "Robotics"]


def _made_up(rng: np.random.Generator, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return "".join(parts).capitalize()


def _in_split(value: str, split: str, eval_share: int = 4) -> bool:
    """Values are assigned to splits by a stable hash: 1 in `eval_share` goes to eval."""
    h = int(hashlib.sha256(value.lower().encode()).hexdigest()[:8], 16)
    return (h % eval_share == 0) == (split == "eval")


def _pool(values: list[str], split: str) -> list[str]:
    return [v for v in values if _in_split(v, split)]


def _draw(rng: np.random.Generator, split: str, make) -> str:
    """A generated value that belongs to `split` (rejection by the split hash)."""
    while True:
        v = make(rng)
        if _in_split(v, split):
            return v


@dataclasses.dataclass(frozen=True)
class Relation:
    """A kind of fact: how its value is drawn, stated and asked about."""

    kind: str
    noun: str  # "sister's name": used as "my {noun}" / "your {noun}"
    value: callable  # (rng, split) -> str
    statements: tuple[str, ...]  # first 4 train, last 2 eval; {v} = value
    questions: tuple[str, ...]  # first 3 train, last 1 eval

    def phrasings(self, split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if split == "train":
            return self.statements[:4], self.questions[:3]
        return self.statements[4:], self.questions[3:]


def _from(values):
    return lambda rng, split: str(rng.choice(_pool(values, split)))


def _name(rng, split):
    if rng.random() < 0.5:
        return str(rng.choice(_pool(_FIRST_NAMES, split)))
    return _draw(rng, split, lambda r: _made_up(r, int(r.integers(2, 4))))


def _pet(rng, split):
    if rng.random() < 0.5:
        return str(rng.choice(_pool(_PET_NAMES, split)))
    return _draw(rng, split, lambda r: _made_up(r, 2))


def _company(rng, split):
    return _draw(rng, split, lambda r: f"{_made_up(r, 2)} {r.choice(_COMPANY_TAILS)}")


def _date(rng, split):
    return _draw(rng, split, lambda r: f"{r.choice(_MONTHS)} {int(r.integers(1, 29))}")


def _appointment(rng, split):
    return _draw(rng, split, lambda r: f"{r.choice(_WEEKDAYS)} at {int(r.integers(1, 12))} pm")


def _digits(n):
    return lambda rng, split: _draw(rng, split, lambda r: "".join(str(d) for d in r.integers(0, 10, n)))


def _car(rng, split):
    colours, makes = _pool(_COLOURS, split), _pool(_CAR_MAKES, split)  # no eval colour in a training car
    return _draw(rng, split, lambda r: f"a {r.choice(colours)} {r.choice(makes)}")


def _band(rng, split):
    return _draw(rng, split, lambda r: f"The {_made_up(r, 2)}s")


def _named(noun: str, subject: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Statements and questions for a relation whose value is a name."""
    return (
        (f"My {subject} is called {{v}}.", f"My {noun} is {{v}}.", f"You should know that my {subject}'s name is {{v}}.",
         f"I have a {subject} named {{v}}.", f"Oh, and {{v}} is the name of my {subject}.", f"Let me tell you about my {subject}, {{v}}."),
        (f"What is my {noun}?", f"What's my {subject} called?", f"Do you remember my {noun}?", f"Remind me, who is my {subject}?"),
    )


def _plain(noun: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Statements and questions for a relation stated as "my {noun} is {v}"."""
    return (
        (f"My {noun} is {{v}}.", f"By the way, my {noun} is {{v}}.", f"Just so you know, my {noun} is {{v}}.",
         f"Please remember that my {noun} is {{v}}.", f"For the record, my {noun} is {{v}}.", f"Note this down: my {noun} is {{v}}."),
        (f"What is my {noun}?", f"Do you remember my {noun}?", f"Can you tell me my {noun}?", f"Remind me, what's my {noun}?"),
    )


RELATIONS: tuple[Relation, ...] = (
    Relation("own_name", "name", _name,
             ("My name is {v}.", "I'm {v}, nice to meet you.", "Call me {v}, that's my name.", "Hi, {v} here.",
              "People know me as {v}.", "Let me introduce myself: I am {v}."),
             ("What is my name?", "Do you remember my name?", "Who am I?", "Remind me, what am I called?")),
    Relation("mother", "mother's name", _name, *_named("mother's name", "mother")),
    Relation("father", "father's name", _name, *_named("father's name", "father")),
    Relation("sister", "sister's name", _name, *_named("sister's name", "sister")),
    Relation("brother", "brother's name", _name, *_named("brother's name", "brother")),
    Relation("partner", "partner's name", _name, *_named("partner's name", "partner")),
    Relation("friend", "best friend's name", _name, *_named("best friend's name", "best friend")),
    Relation("dog", "dog's name", _pet, *_named("dog's name", "dog")),
    Relation("cat", "cat's name", _pet, *_named("cat's name", "cat")),
    Relation("home_city", "home city", _from(_CITIES),
             ("I live in {v}.", "My home is in {v}.", "These days I live in {v}.", "My apartment is in {v}.",
              "Home for me is {v}.", "I'm based in {v} now."),
             ("Where do I live?", "What city do I live in?", "What is my home city?", "Remind me, where is my home?")),
    Relation("birthplace", "birthplace", _from(_CITIES),
             ("I was born in {v}.", "My birthplace is {v}.", "I grew up in {v}, where I was born.", "{v} is where I was born.",
              "I'm originally from {v}.", "My hometown, where I was born, is {v}."),
             ("Where was I born?", "What is my birthplace?", "Which city was I born in?", "Remind me, where am I from originally?")),
    Relation("job", "job", _from(_JOBS),
             ("I work as a {v}.", "My job is {v}.", "I'm a {v} by profession.", "For a living I work as a {v}.",
              "My profession is {v}.", "I earn my living as a {v}."),
             ("What is my job?", "What do I do for a living?", "What is my profession?", "Remind me, what's my job?")),
    Relation("employer", "employer", _company, *_plain("employer")),
    Relation("food", "favourite food", _from(_FOODS), *_plain("favourite food")),
    Relation("colour", "favourite colour", _from(_COLOURS), *_plain("favourite colour")),
    Relation("band", "favourite band", _band, *_plain("favourite band")),
    Relation("birthday", "birthday", _date,
             ("My birthday is {v}.", "I was born on {v}.", "I celebrate my birthday on {v}.", "{v} is my birthday.",
              "Every year on {v} I have my birthday.", "My birthday falls on {v}."),
             ("When is my birthday?", "What date is my birthday?", "Do you remember my birthday?", "Remind me, when do I celebrate my birthday?")),
    Relation("appointment", "dentist appointment", _appointment, *_plain("dentist appointment")),
    Relation("door_code", "door code", _digits(4), *_plain("door code")),
    Relation("locker", "locker number", _digits(3), *_plain("locker number")),
    Relation("car", "car", _car,
             ("I drive {v}.", "My car is {v}.", "I own {v}.", "I bought {v} last year.", "These days I drive {v}.", "The car I have is {v}."),
             ("What car do I drive?", "What is my car?", "What kind of car do I own?", "Remind me, what car do I have?")),
)

UPDATES = ("Actually, that changed: {s}", "Update: {s}", "Correction, things are different now. {s}")
NEVER_SAID = "You haven't told me your {noun}."
ANSWER = "Your {noun} is {v}."

CHITCHAT = (
    "I went for a long walk this morning and the weather was lovely.",
    "Do you have any tips for sleeping better?",
    "I'm thinking about learning to play the guitar.",
    "Work was busy today, lots of meetings.",
    "I watched a documentary about octopuses last night.",
    "What's a good way to start running?",
    "I just finished a really long book.",
    "My neighbours are renovating and it's quite noisy.",
    "I tried a new recipe for dinner yesterday.",
    "It rained all weekend, so I stayed in.",
    "I'm planning a trip somewhere warm this winter.",
    "Could you suggest a board game for four people?",
    "I've been drinking too much coffee lately.",
    "The train was late again this morning.",
    "I started a small herb garden on my balcony.",
    "How do I keep houseplants alive?",
    "I need to clean out my garage this weekend.",
    "We had a picnic in the park on Sunday.",
    "I can never decide what to watch in the evening.",
    "I'm trying to learn a few words of Japanese.",
    "My laptop has been really slow this week.",
    "I signed up for a pottery class.",
    "What should I bring to a dinner party?",
    "I spent the afternoon fixing my bike.",
)


@dataclasses.dataclass(frozen=True)
class Episode:
    """User turns (each written as `Session.remember` writes it), then one question."""

    turns: tuple[str, ...]
    question: str
    answer: str
    value: str  # what a correct reply must contain ("" for a never-mentioned question)
    relation: str
    num_facts: int
    turns_ago: int  # turns after the asked fact's last statement (0 = the last turn); −1 if never said
    updated: bool  # the asked fact was restated with a new value
    never_said: bool


def max_facts_for(relations: tuple[str, ...], never_said_rate: float) -> int:
    """The most facts one episode can state from `relations` (() = all kinds): every kind,
    less one when never-said questions need a kind the episode did not state."""
    return (len(set(relations)) or len(RELATIONS)) - (never_said_rate > 0)


@dataclasses.dataclass(frozen=True)
class EpisodeConfig:
    min_facts: int = 1
    max_facts: int = 6
    max_chitchat: int = 2  # chit-chat turns added between facts
    update_rate: float = 0.15  # chance that the asked fact was updated later
    never_said_rate: float = 0.1  # chance that the question is about something never said
    relations: tuple[str, ...] = ()  # relation kinds to draw from (a curriculum); () = all

    def __post_init__(self):
        object.__setattr__(self, "relations", tuple(self.relations))  # from JSON: a list
        unknown = sorted(set(self.relations) - {r.kind for r in RELATIONS})
        if unknown:
            raise ValueError(f"unknown relation kinds {unknown}; known: {[r.kind for r in RELATIONS]}")
        n = max_facts_for(self.relations, self.never_said_rate)
        if not 1 <= self.min_facts <= self.max_facts <= n:
            what = "relation kinds − 1, for never-said questions" if self.never_said_rate > 0 else "relation kinds"
            raise ValueError(f"need 1 ≤ min_facts ≤ max_facts ≤ {n} ({what}), got {self.min_facts}, {self.max_facts}")

    @property
    def pool(self) -> tuple[Relation, ...]:
        return tuple(r for r in RELATIONS if r.kind in self.relations) if self.relations else RELATIONS

    @property
    def max_turns(self) -> int:
        return self.max_facts + (self.update_rate > 0) + self.max_chitchat  # facts, an update, chit-chat


def make_episode(seed: int, split: str, index: int, config: EpisodeConfig = EpisodeConfig()) -> Episode:
    """Episode `index` of `split` for `seed` (deterministic)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    n = int(rng.integers(config.min_facts, config.max_facts + 1))
    pool = config.pool
    kinds = rng.permutation(len(pool))[: n + 1]  # the last one is never said
    rels = [pool[i] for i in kinds[:n]]
    values = [r.value(rng, split) for r in rels]
    said = [str(rng.choice(r.phrasings(split)[0])).format(v=v) for r, v in zip(rels, values)]
    turns = list(said)
    # chit-chat turns inserted at random places
    for _ in range(int(rng.integers(0, config.max_chitchat + 1))):
        turns.insert(int(rng.integers(0, len(turns) + 1)), str(rng.choice(CHITCHAT)))
    never_said = rng.random() < config.never_said_rate
    asked = int(rng.integers(n))
    rel, value = rels[asked], values[asked]
    updated = False
    if not never_said and rng.random() < config.update_rate:
        new = value
        while new == value:
            new = rel.value(rng, split)
        statement = str(rng.choice(rel.phrasings(split)[0])).format(v=new)
        at = int(rng.integers(turns.index(said[asked]) + 1, len(turns) + 1))
        turns.insert(at, str(rng.choice(UPDATES)).format(s=statement))
        value, updated, last = new, True, at
    else:
        last = turns.index(said[asked])
    if never_said:
        rel = pool[kinds[n]]
        question = str(rng.choice(rel.phrasings(split)[1]))
        return Episode(tuple(turns), question, NEVER_SAID.format(noun=rel.noun), "", rel.kind, n, -1, False, True)
    question = str(rng.choice(rel.phrasings(split)[1]))
    return Episode(
        turns=tuple(turns), question=question, answer=ANSWER.format(noun=rel.noun, v=value), value=value,
        relation=rel.kind, num_facts=n, turns_ago=len(turns) - 1 - last, updated=updated, never_said=False,
    )


def parse_relations(spec: str) -> tuple[str, ...]:
    """A `--relations` flag ("door_code,locker") → relation kinds; "" = all (checked by `EpisodeConfig`)."""
    return tuple(x.strip() for x in spec.split(",") if x.strip())


def episodes(seed: int, split: str, start: int, count: int, config: EpisodeConfig = EpisodeConfig()) -> list[Episode]:
    return [make_episode(seed, split, i, config) for i in range(start, start + count)]


def split_values(split: str) -> set[str]:
    """Every fixed-pool value of `split` (for the disjointness test; generated values are
    split by the same hash)."""
    pools = [_FIRST_NAMES, _PET_NAMES, _CITIES, _JOBS, _FOODS, _COLOURS, _CAR_MAKES]
    return set(itertools.chain.from_iterable(_pool(p, split) for p in pools))


__all__ = ["CHITCHAT", "Episode", "EpisodeConfig", "RELATIONS", "SPLITS", "episodes", "make_episode", "max_facts_for", "parse_relations", "split_values"]
