"""Deterministic generator of self-made English text for the embedded default model (arx-tiny).

No download is possible where arx is built and tested, so the training text is written here:
short children's stories from a small grammar (characters, places, objects, problems, dialogue,
morals), plus a little variety (lists, counting and sums, simple facts, tiny Python functions).
Everything comes from the tables in this file and a seeded ``random.Random``, so the same seed
gives byte-identical text on every machine and the corpus need not be committed.

    python scripts/make_corpus.py --seed 0 --mb 8 -o /tmp/train.txt   # documents split by blank lines
    python scripts/make_corpus.py --fixtures models/arx-tiny            # calib.txt + eval.txt

Seeds: TRAIN_SEED for training, EVAL_SEED for the held-out split, CALIB_SEED for calibration
samples. Different seeds give different documents drawn from the same grammar.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

TRAIN_SEED, EVAL_SEED, CALIB_SEED = 1234, 5678, 9012

GIRLS = ["Lily", "Mia", "Anna", "Zoe", "Ella", "Lucy", "Sara", "Emma", "Rosa", "Nina",
         "Amy", "Kate", "Maya", "Ruby", "Ivy", "Grace", "Hana", "Lena", "Tia", "Jane"]
BOYS = ["Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Tim", "Finn", "Noah", "Omar",
        "Luke", "Ravi", "Alex", "Dan", "Owen", "Kai", "Theo", "Jake", "Eli", "Ken"]
PET_NAMES = ["Pip", "Bella", "Spot", "Fluffy", "Coco", "Bubbles", "Sunny", "Tiny", "Patch",
             "Rusty", "Daisy", "Pepper", "Biscuit", "Muffin", "Ziggy", "Oscar"]
ANIMALS = ["rabbit", "fox", "bear", "cat", "dog", "owl", "mouse", "duck", "frog", "turtle",
           "bird", "squirrel", "lion", "pig", "horse", "puppy", "kitten", "hedgehog", "goat",
           "cow", "elephant", "monkey", "penguin", "deer"]
PLACES = ["park", "forest", "garden", "beach", "farm", "village", "school", "kitchen",
          "river", "hill", "library", "market", "lake", "meadow", "zoo", "playground",
          "backyard", "field", "pond", "town", "castle", "bakery"]
OBJECTS = ["ball", "kite", "box", "book", "hat", "cake", "apple", "boat", "key", "flower",
           "drum", "toy car", "balloon", "shell", "map", "lamp", "blanket", "cookie", "stone",
           "bell", "cup", "sock", "pencil", "feather", "rope", "basket", "doll", "truck",
           "shovel", "bucket", "scarf", "umbrella", "leaf", "star", "ring", "picture"]
ADJS = ["big", "small", "shiny", "old", "new", "red", "blue", "green", "yellow", "soft",
        "pretty", "tiny", "funny", "round", "bright", "little", "purple", "warm", "heavy",
        "strange", "golden", "colorful"]
CHAR_ADJS = ["little", "kind", "happy", "brave", "small", "curious", "shy", "silly",
             "clever", "friendly", "gentle", "busy", "young", "quiet"]
FEELINGS = ["happy", "sad", "scared", "excited", "proud", "curious", "tired", "surprised",
            "worried", "glad", "lonely", "angry"]
ACTIVITIES = ["play outside", "read books", "draw pictures", "sing songs", "run fast",
              "dance", "climb trees", "swim in the lake", "build towers", "look at the stars",
              "bake cookies", "help in the garden", "play with the ball", "jump in puddles",
              "watch the birds", "tell stories", "pick flowers", "ride a bike"]
MORALS = ["sharing is caring", "it is good to help your friends",
          "being kind makes everyone happy", "it is okay to ask for help",
          "you should always tell the truth", "trying again is better than giving up",
          "friends are the best treasure", "it is good to be patient",
          "listening to others is important", "small things can make a big difference",
          "working together makes hard things easy", "it is good to say sorry",
          "being brave does not mean you are never scared"]
OPENINGS = ["Once upon a time", "Once upon a time", "Once upon a time", "Long ago",
            "One day", "One sunny morning", "On a rainy day", "One cold winter night",
            "Many years ago", "One bright afternoon"]
WEATHER = ["The sun was shining.", "The sky was blue and clear.", "It was a windy day.",
           "Soft rain was falling.", "Snow covered the ground.", "The air was warm.",
           "Big white clouds moved in the sky."]
FRUITS = [("apple", "apples"), ("orange", "oranges"), ("cookie", "cookies"),
          ("egg", "eggs"), ("pear", "pears"), ("candy", "candies"), ("flower", "flowers"),
          ("block", "blocks"), ("shell", "shells"), ("book", "books"), ("ball", "balls"),
          ("grape", "grapes"), ("cupcake", "cupcakes"), ("stone", "stones")]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                "nine", "ten", "eleven", "twelve"]
FACTS = ["The sun is hot.", "The sky is blue.", "Fish live in water.", "Birds can fly.",
         "Cows give milk.", "Snow is cold and white.", "Bees make honey.",
         "Trees have green leaves.", "A week has seven days.", "Dogs like to run.",
         "The moon comes out at night.", "Plants need water to grow.", "Ice is frozen water.",
         "A cat says meow.", "A dog says woof.", "Frogs can jump far.",
         "Apples grow on trees.", "Rain helps the flowers grow.", "Owls sleep in the day.",
         "Ducks like to swim in the pond.", "A year has twelve months."]


# The preposition each place takes ("on the hill", "at the beach", "in the forest").
PLACE_PREP = {"hill": "on", "beach": "at", "farm": "on", "river": "by", "lake": "by",
              "school": "at", "market": "at", "zoo": "at", "playground": "at",
              "pond": "by", "bakery": "at", "library": "at", "field": "in"}
LATER = ["One day", "One morning", "Later that day", "After lunch", "The next day",
         "One afternoon"]


def at(place: str) -> str:
    return f"{PLACE_PREP.get(place, 'in')} the {place}"


def a_an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


class Character:
    """A story character with the pronouns the grammar needs."""

    def __init__(self, rng: random.Random):
        kind = rng.random()
        female = rng.random() < 0.5
        if kind < 0.5:  # a child
            self.name = rng.choice(GIRLS if female else BOYS)
            noun = "girl" if female else "boy"
        else:  # an animal with a pet name
            self.name = rng.choice(PET_NAMES)
            noun = rng.choice(ANIMALS)
        self.noun = noun
        self.intro = f"{a_an(rng.choice(CHAR_ADJS) + ' ' + noun)} named {self.name}"
        self.he, self.him, self.his, self.hers = (
            ("she", "her", "her", "hers") if female else ("he", "him", "his", "his"))


def opening(rng: random.Random, hero: Character, place: str) -> list[str]:
    start = rng.choice(OPENINGS)
    form = rng.randrange(3)
    if form == 0:
        first = f"{start}, there was {hero.intro}."
    elif form == 1:
        first = f"{start}, in {a_an(rng.choice(ADJS) + ' ' + place)}, there lived {hero.intro}."
    else:
        first = f"{start}, {hero.intro} went to the {place}."
    more = [f"{cap(hero.he)} loved to {rng.choice(ACTIVITIES)}.",
            f"{cap(hero.he)} had {a_an(rng.choice(ADJS) + ' ' + rng.choice(OBJECTS))} "
            f"that {hero.he} liked very much.",
            f"{cap(hero.he)} lived in a little house near the {rng.choice(PLACES)}.",
            rng.choice(WEATHER)]
    rng.shuffle(more)
    return [first] + more[: rng.randrange(1, 3)]


def problem(rng: random.Random, hero: Character, obj: str, place: str) -> tuple[list[str], str]:
    """Returns the sentences that set up a problem and a key naming how it is solved."""
    form, when = rng.randrange(4), rng.choice(LATER)
    if form == 0:
        return ([f"{when}, {hero.name} saw {a_an(obj)} stuck in a tall tree.",
                 f"{hero.name} wanted the {obj}, but the tree was too high."], "tree")
    if form == 1:
        return ([f"{when}, {hero.name} could not find {hero.his} {obj}.",
                 f"{cap(hero.he)} looked under the bed and behind the door, "
                 f"but the {obj} was not there."], "lost")
    if form == 2:
        return ([f"{when}, {hero.name} went to the {place} to {rng.choice(ACTIVITIES)}.",
                 f"But it started to rain, and {hero.name} felt {rng.choice(FEELINGS)}."],
                "rain")
    return ([f"{when}, {hero.name} found {a_an(rng.choice(ADJS) + ' ' + obj)} "
             f"{at(place)}.",
             f"{cap(hero.he)} wanted to keep it, but it was not {hero.hers}."], "found")


def dialogue(rng: random.Random, hero: Character, friend: Character, key: str,
             obj: str) -> list[str]:
    ask = {"tree": f'"Can you help me get my {obj}?" asked {hero.name}.',
           "lost": f'"Have you seen my {obj}?" asked {hero.name}.',
           "rain": f'"What can we do now?" asked {hero.name}.',
           "found": f'"Do you know whose {obj} this is?" asked {hero.name}.'}[key]
    answer = rng.choice([f'"Yes, I will help you," said {friend.name}.',
                         f'"Of course," said {friend.name} with a smile.',
                         f'"Let us look together," said {friend.name}.',
                         f'"Do not worry," said {friend.name}. "I have an idea."'])
    return [f"Then {hero.name} met {friend.intro}.", ask, answer]


def resolution(rng: random.Random, hero: Character, friend: Character, key: str,
               obj: str, place: str) -> list[str]:
    if key == "tree":
        how = rng.choice([f"{friend.name} held the ladder and {hero.name} climbed up.",
                          f"{friend.name} shook the tree, and the {obj} fell down."])
        return [how, f"{hero.name} got {hero.his} {obj} back."]
    if key == "lost":
        spot = rng.choice(["in the garden", "under the table", "in a box",
                           "behind the sofa", f"at the {place}"])
        return [f"They looked everywhere. At last, {friend.name} found the {obj} {spot}.",
                f'"Thank you!" said {hero.name}.']
    if key == "rain":
        game = rng.choice(["played a game inside", "built a fort with blankets",
                           "read a book together", "drew a big picture of a rainbow"])
        return [f"So they went home and {game}.",
                "Soon the rain stopped, and a rainbow came out."]
    return [f"They asked everyone {at(place)}.",
            f"At last they met an old {rng.choice(ANIMALS)} who said, "
            f'"That is my {obj}! Thank you for bringing it back."']


def story(rng: random.Random) -> str:
    hero, friend = Character(rng), Character(rng)
    while friend.name == hero.name:
        friend = Character(rng)
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    parts = opening(rng, hero, place)
    setup, key = problem(rng, hero, obj, place)
    parts += setup + dialogue(rng, hero, friend, key, obj)
    parts += resolution(rng, hero, friend, key, obj, place)
    feeling = rng.choice(["happy", "glad", "proud", "thankful"])
    parts.append(rng.choice([f"{hero.name} and {friend.name} were very {feeling}.",
                             f"{hero.name} felt {feeling} and gave {friend.name} a big hug.",
                             f"From that day on, {hero.name} and {friend.name} were "
                             "best friends."]))
    if rng.random() < 0.6:
        parts.append(f"{hero.name} learned that {rng.choice(MORALS)}.")
    parts.append(rng.choice(["The end.", "", ""]))
    return " ".join(p for p in parts if p)

FEARS = [("swim in the deep lake", "the water looked so deep"),
         ("climb the big hill", "the hill was very tall"),
         ("sing in front of the class", "everyone would look at " + "{him}"),
         ("ride a bike", "{he} was afraid to fall"),
         ("go into the dark cave", "it was dark and quiet inside"),
         ("jump over the little stream", "the water was cold and fast"),
         ("sleep without the lamp on", "the room was very dark")]
HELPERS = ["mom", "dad", "grandma", "grandpa", "big sister", "big brother", "teacher"]


def brave_story(rng: random.Random) -> str:
    """A second plot: a fear, some encouragement, a try that works."""
    hero, helper = Character(rng), rng.choice(HELPERS)
    goal, reason = rng.choice(FEARS)
    reason = reason.format(he=hero.he, him=hero.him)
    parts = [f"{rng.choice(OPENINGS)}, there was {hero.intro}.",
             f"{hero.name} wanted to {goal}, but {hero.he} was {rng.choice(['scared', 'afraid', 'worried'])}.",
             f"{cap(hero.he)} thought that {reason}.",
             f'{hero.name} went to {hero.his} {helper} and said, "I want to {goal}, but I am scared."',
             f'{cap(hero.his)} {helper} {rng.choice(["smiled", "gave " + hero.him + " a hug", "sat down next to " + hero.him])} '
             f'and said, "{rng.choice(["It is okay to be scared. You can try one small step at a time.", "I believe in you. Let us try together.", "Everyone is scared sometimes. Take a deep breath."])}"',
             f"So {hero.name} took a deep breath and tried.",
             rng.choice([f"At first it was hard, but {hero.he} did not give up.",
                         f"It was not as bad as {hero.he} thought.",
                         f"{cap(hero.he)} tried again and again."]),
             f"At last, {hero.name} was able to {goal}!",
             f'"I did it!" {hero.he} shouted. {cap(hero.he)} felt very {rng.choice(["proud", "happy", "brave"])}.']
    if rng.random() < 0.5:
        parts.append(f"{hero.name} learned that {rng.choice(MORALS)}.")
    return " ".join(parts)


def sharing_story(rng: random.Random) -> str:
    """A third plot: one has a treat, the other has none, they share."""
    hero, friend = Character(rng), Character(rng)
    one, many = rng.choice(FRUITS)
    n = rng.randrange(2, 11, 2)
    place = rng.choice(PLACES)
    parts = [f"{rng.choice(OPENINGS)}, {hero.intro} and {friend.intro} "
             f"went to play {at(place)}.",
             f"{hero.name} had {NUMBER_WORDS[n]} {many} in {hero.his} bag.",
             f"{friend.name} had no {many}, and {friend.he} looked {rng.choice(['sad', 'hungry', 'lonely'])}.",
             f'"Why are you {rng.choice(["sad", "quiet"])}?" asked {hero.name}.',
             f'"I forgot my snack at home," said {friend.name}.',
             f"{hero.name} thought for a moment. Then {hero.he} gave "
             f"{NUMBER_WORDS[n // 2]} {one if n // 2 == 1 else many} to {friend.name}.",
             f'"Now we both have {NUMBER_WORDS[n // 2]}," said {hero.name}.',
             f"{friend.name} smiled and said, \"Thank you! You are a good friend.\"",
             f"They ate the {many} together and played until the sun went down."]
    if rng.random() < 0.7:
        parts.append(f"{hero.name} learned that {rng.choice(['sharing is caring', 'sharing makes friends happy', 'it feels good to share'])}.")
    return " ".join(parts)


def counting(rng: random.Random) -> str:
    hero, friend = Character(rng), Character(rng)
    one, many = rng.choice(FRUITS)
    n = rng.randrange(3, 13)
    m = rng.randrange(1, n)
    has = lambda k: f"{NUMBER_WORDS[k]} {one if k == 1 else many}"  # noqa: E731
    if rng.random() < 0.5:
        return (f"{hero.name} had {has(n)}. {cap(hero.he)} gave {has(m)} to {friend.name}. "
                f"Now {hero.name} has {has(n - m)}. {n} - {m} = {n - m}.")
    k = rng.randrange(1, 13 - n) if n < 12 else 0
    return (f"{hero.name} had {has(n)}. {friend.name} gave {hero.him} {has(k)} more. "
            f"Now {hero.name} has {has(n + k)}. {n} + {k} = {n + k}.")


def arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randrange(3, 7)):
        a, b = rng.randrange(0, 20), rng.randrange(0, 20)
        op = rng.choice(["plus", "times", "minus"])
        if op == "plus":
            lines.append(f"What is {a} plus {b}? It is {a + b}.")
        elif op == "times":
            a, b = a % 10, b % 10
            lines.append(f"What is {a} times {b}? It is {a * b}.")
        else:
            a, b = max(a, b), min(a, b)
            lines.append(f"What is {a} minus {b}? It is {a - b}.")
    return " ".join(lines)


def shopping_list(rng: random.Random) -> str:
    hero = Character(rng)
    items = rng.sample([many for _, many in FRUITS] + ["milk", "bread", "cheese", "rice",
                                                       "butter", "honey", "tea", "jam"], 4)
    place = rng.choice(["market", "shop", "bakery", "farm"])
    if rng.random() < 0.5:
        return (f"{hero.name} made a list of things to buy at the {place}: "
                f"{items[0]}, {items[1]}, {items[2]}, and {items[3]}. "
                f"{cap(hero.he)} put the list in {hero.his} pocket and went to the {place}.")
    numbered = " ".join(f"{i + 1}. {x}" for i, x in enumerate(items))
    return f"Things to buy at the {place}: {numbered}. Do not forget the {items[0]}!"


def facts(rng: random.Random) -> str:
    return " ".join(rng.sample(FACTS, rng.randrange(3, 6)))


CODE = [
    ("add", ["a", "b"], "return {0} + {1}", "Return the sum of two numbers."),
    ("subtract", ["a", "b"], "return {0} - {1}", "Return the difference of two numbers."),
    ("multiply", ["x", "y"], "return {0} * {1}", "Return the product of two numbers."),
    ("square", ["n"], "return {0} * {0}", "Return n times n."),
    ("is_even", ["n"], "return {0} % 2 == 0", "Check if a number is even."),
    ("biggest", ["a", "b"], "if {0} > {1}:\n        return {0}\n    return {1}",
     "Return the bigger number."),
    ("greet", ["name"], 'return "Hello, " + {0} + "!"', "Say hello to someone."),
    ("total", ["numbers"], "result = 0\n    for n in {0}:\n        result = result + n\n"
     "    return result", "Add up a list of numbers."),
    ("count_apples", ["basket"], 'return {0}.count("apple")', "Count the apples."),
]


def python_function(rng: random.Random) -> str:
    """A tiny Python function and a call; the only documents with newlines."""
    name, params, body, doc = rng.choice(CODE)
    code = f"def {name}({', '.join(params)}):\n"
    if rng.random() < 0.5:
        code += f'    """{doc}"""\n'
    code += "    " + body.format(*params) + "\n"
    if len(params) == 2 and name not in ("greet",):
        a, b = rng.randrange(1, 10), rng.randrange(1, 10)
        code += f"\n\nprint({name}({a}, {b}))"
    elif name == "greet":
        code += f'\n\nprint(greet("{rng.choice(GIRLS + BOYS)}"))'
    return code


# Weights of each document kind: stories dominate so the model is a storyteller first.
KINDS = [(story, 0.50), (brave_story, 0.16), (sharing_story, 0.12), (counting, 0.06), (arithmetic, 0.03), (shopping_list, 0.04),
         (facts, 0.04), (python_function, 0.05)]


def documents(seed: int, n_chars: int, one_line: bool = False) -> list[str]:
    """Documents drawn from the grammar until their total length reaches ``n_chars``.

    ``one_line`` skips multi-line documents (code), for one-sample-per-line fixtures.
    """
    rng = random.Random(seed)
    makers, weights = zip(*KINDS)
    docs, total = [], 0
    while total < n_chars:
        doc = rng.choices(makers, weights)[0](rng)
        if one_line and "\n" in doc:
            continue
        docs.append(doc)
        total += len(doc) + 2
    return docs


def write_fixtures(out_dir: Path, calib_lines: int = 400, eval_lines: int = 200) -> None:
    """calib.txt (calibration samples) and eval.txt (held-out), one sample per line."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, seed, lines in (("calib.txt", CALIB_SEED, calib_lines),
                              ("eval.txt", EVAL_SEED, eval_lines)):
        docs = documents(seed, 1000 * lines, one_line=True)[:lines]
        (out_dir / name).write_text("\n".join(docs) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=TRAIN_SEED)
    ap.add_argument("--mb", type=float, default=8.0, help="size of the text in MB")
    ap.add_argument("-o", "--out", type=Path, help="write documents, separated by blank lines")
    ap.add_argument("--fixtures", type=Path, help="write calib.txt and eval.txt to this folder")
    args = ap.parse_args()
    if args.fixtures:
        write_fixtures(args.fixtures)
        print(f"wrote {args.fixtures}/calib.txt and {args.fixtures}/eval.txt")
    if args.out:
        docs = documents(args.seed, int(args.mb * 1e6))
        args.out.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        print(f"wrote {len(docs)} documents, {args.out.stat().st_size / 1e6:.1f} MB to {args.out}")
    if not (args.out or args.fixtures):
        for doc in documents(args.seed, 3000):
            print(doc, end="\n\n")


if __name__ == "__main__":
    main()
