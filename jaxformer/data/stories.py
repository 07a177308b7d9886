"""The built-in `stories` corpus: children's stories from a seeded probabilistic grammar.

Stories introduce a hero (a child or an animal, with a name and a gender) and
then tell one of five plots: a lost toy, a new friend, an animal rescue, a trip,
a quarrel over sharing. Later sentences refer back to what earlier ones set up
(the hero's name and pronouns, the toy that was lost, the place that was
visited, the friend's name), so predicting them needs long-range attention.

Every random choice goes through one `choose(table)` function and is rendered
where it is made: a sentence is a template whose fields are chosen the first
time they are rendered and reused afterwards. The same story code therefore
samples (random choices, summing log-probs), enumerates a small grammar (every
branch in turn) and parses a text back into its choices (tests).

The grammar is unambiguous: a story's text determines its choices, so
-log p(story) is the story's exact information content. What keeps it so: the
options of a table render to different strings; an optional sentence never
starts like what can follow it; names tell the gender (the name lists are
disjoint) and a second character never shares the hero's name; a trip's
places differ from an outing's (their sentences open alike); nothing is
chosen that is not rendered.
`derivations` checks it by parsing a text back into every choice sequence that
tells it (the tests do this for sampled stories).

Texts are plain ASCII, and never need "an" (no option after "a" starts with a
vowel), so nothing is post-processed: the text is exactly what was emitted.
"""

import bisect
import functools
import itertools
import math
import multiprocessing
import string
from typing import NamedTuple

import numpy as np

GRAMMARS = ("default", "tiny")
CHUNK = 1000                  # stories per independently seeded chunk
_ENUMERATE_MAX = 100_000


class _Choice(NamedTuple):
  name: str
  values: tuple         # the options, all different
  cum: tuple            # inner boundaries of the options' probability intervals in [0, 1)
  logps: tuple          # log p(option), nats


def _choice(name: str, values, weights) -> _Choice:
  assert len(set(values)) == len(values) > 0 and min(weights) > 0, name
  total = float(sum(weights))
  probs = [w / total for w in weights]
  return _Choice(name, tuple(values), tuple(itertools.accumulate(probs))[:-1],
                tuple(math.log(p) for p in probs))


@functools.lru_cache(maxsize=None)
def _uniform(name: str, options: tuple) -> _Choice:
  """A uniform choice, for picks from what is left (spots, names, sights)."""
  return _choice(name, options, (1,) * len(options))


# --- The grammar's data. A tuple is a uniform choice, a dict maps options to weights.
# An optional sentence is a template table whose first option is "" (say nothing).

_GIRLS = ("Lily", "Mia", "Emma", "Sara", "Lucy", "Anna", "Zoe", "Ella", "Ruby", "Amy", "Jane",
          "Kate", "Molly", "Sophie", "Nora", "Rosa", "Ivy", "Grace", "Hannah", "Chloe", "Bella",
          "Clara", "Nina", "Lola")
_BOYS = ("Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Jake", "Luke", "Noah",
         "Oscar", "Henry", "Theo", "Adam", "Milo", "Owen", "Eli", "Ryan", "Dan", "Joe", "Alex",
         "Hugo", "Ned")
_SPECIES = ("cat", "dog", "bunny", "bear", "fox", "duck", "mouse", "frog", "bird", "pig", "puppy",
            "kitten", "lion", "monkey", "turtle", "lamb")

_SPEC = {
    # The hero: "a little girl named Lily".
    "kind": {"human": 3, "animal": 2},
    "gender": ("girl", "boy"),
    "name_girl": _GIRLS,
    "name_boy": _BOYS,
    "species": _SPECIES,
    "adj": {"": 8, "little ": 4, "happy ": 1, "kind ": 1, "brave ": 1, "curious ": 1, "shy ": 1,
            "small ": 1, "funny ": 1, "clever ": 1, "gentle ": 1, "silly ": 1},
    "home": ("in a small house", "near a big forest", "in a quiet town", "on a farm", "by the sea",
             "in a little village"),
    "intro": {"Once upon a time, there was a {adj}{noun} named {name}.": 2,
              "Once upon a time, a {adj}{noun} named {name} lived {home}.": 1,
              "There was once a {adj}{noun} named {name}.": 3,
              "{name} was a {adj}{noun} who lived {home}.": 1,
              "Once there was a {adj}{noun} called {name}.": 2,
              "{name} was a {adj}{noun}.": 4},
    "trait": {"": 12, "{He} loved to {activity}.": 1, "{He} liked to {activity}.": 1,
              "Every day, {he} liked to {activity}.": 1},
    "activity": ("play outside", "sing songs", "draw pictures", "run and jump", "read books",
                 "dance", "climb trees", "look at the stars", "splash in puddles",
                 "build with blocks"),
    "when": ("One day", "One morning", "One afternoon", "One sunny day", "One windy day",
             "One Saturday"),
    "plot": {"lost": 3, "friend": 3, "rescue": 2, "trip": 2, "share": 2},

    # A second character: the friend, helper or sibling ("f" pronouns).
    "fkind": {"human": 3, "animal": 2},
    "fgender": ("girl", "boy"),
    "fspecies": _SPECIES,
    "fadj": {"": 4, "little ": 2, "small ": 1, "shy ": 1, "friendly ": 1},

    # Plot "lost": a toy is lost at a place, searched for in spots, and found.
    "color": ("red", "blue", "green", "yellow", "pink", "purple", "brown", "silver", "black",
              "white"),
    "obj": ("ball", "kite", "teddy bear", "doll", "toy car", "toy boat", "drum", "robot",
            "toy train", "wagon", "puppet", "toy plane", "music box"),
    "place": ("park", "beach", "garden", "forest", "playground", "meadow", "field", "hill"),
    "have": ("{He} had a {color} {obj}.",
             "{name} had a {color} {obj} that {he} loved.",
             "{His} favorite toy was a {color} {obj}.",
             "{name} loved {his} {color} {obj}."),
    "go": ("{when}, {name} took the {obj} to the {place}.",
           "{when}, {he} went to the {place} with {his} {obj}.",
           "{when}, {name} played with it at the {place}."),
    "lose": ("Then the {obj} was gone!",
             "But then {name} lost the {obj}.",
             "Suddenly, the wind took the {obj} away!",
             "Soon, {he} could not find the {obj}."),
    "sad": {"": 6, "{name} was sad.": 1, "{He} started to cry.": 1},
    "helper": {"none": 3, "friend": 2},
    "helper_human": ("Then {his} friend {friend} came by.",
                     "{His} friend {friend} came to help."),
    "helper_animal": ("Then a {fadj}{fnoun} named {friend} came by.",
                      "A {fadj}{fnoun} named {friend} came to help."),
    "n_search": {0: 5, 1: 4, 2: 1},
    # Only the values: spots are drawn without replacement.
    "spot": ("under a big tree", "behind a bush", "in the tall grass", "near the pond",
             "under a rock", "behind the fence", "by the old bench"),
    "look": ("{who} looked {spot}, but it was not there.",
             "{who} looked {spot}. No {obj}!",
             "{who} searched {spot}, but found nothing."),
    "finder_is": ("hero", "friend"),
    "find": ("At last, {finder} found the {color} {obj} {spot}!",
             "Then {finder} saw something {color} {spot}. It was the {obj}!",
             "Finally, {finder} found it {spot}!",
             "{finder} found the {obj} {spot}!"),
    "happy_alone": {"": 3, "{name} was so happy.": 1, "{name} hugged the {obj} and smiled.": 1},
    "happy_together": {"": 1, '{name} hugged {friend} and said, "Thank you!"': 1,
                       '"Thank you, {friend}!" said {name}.': 1},
    "moral": {"": 8, "From then on, {name} took good care of the {obj}.": 1,
              "{He} never took the {obj} to the {place} again.": 1},

    # Plot "friend": the hero meets someone at a place and they play.
    "family": ("mom", "dad", "grandma", "grandpa"),
    "outing": {"{when}, {name} went to the {place}.": 2,
               "{when}, {name} went to the {place} with {his} {family}.": 1,
               "{when}, {name} and {his} {family} went to the {place}.": 1},
    "doing": ("sitting all alone", "looking sad", "playing with a stick", "standing under a tree",
              "singing a happy song", "eating a snack", "flying a kite"),
    "meet": ("There, {he} saw a {fadj}{fnoun} {doing}.",
             "{He} saw a {fadj}{fnoun} {doing}.",
             "{He} met a {fadj}{fnoun} who was {doing}."),
    "greet": {"": 3, '{name} said, "Do you want to play?"': 1, '"Hello!" said {name}.': 1,
              '{name} waved and said, "Hi!"': 1},
    "reply": ('"I am {friend}," said the {fnoun}.',
              "{fHis} name was {friend}.",
              'The {fnoun} smiled. "My name is {friend}."'),
    "n_games": {1: 4, 2: 1},
    "game": ("tag", "hide and seek", "catch", "on the swings", "in the sand", "jump rope",
             "ball"),
    "event": {"": 6, "Then it started to rain, so they ran home.": 1,
              "Then {friend} fell and hurt {fhis} knee. {name} helped {fhim} up.": 1,
              "{name} gave {friend} half of {his} apple.": 1},
    "friend_end": ("Now {name} and {friend} were best friends.",
                   "{name} was happy to have a new friend.",
                   "After that, they met at the {place} every day.",
                   '"Can we play again tomorrow?" asked {friend}.'),

    # Plot "rescue": the hero helps an animal in trouble.
    "wplace": ("park", "forest", "garden", "meadow", "woods"),
    "walk": ("{when}, {name} was walking in the {wplace}.",
             "{when}, {name} went for a walk in the {wplace}."),
    "hear": {"": 4, "{He} heard a small sound.": 1, "Suddenly, {he} heard a cry.": 1},
    "pet": ("bird", "kitten", "puppy", "duckling", "bunny", "turtle", "squirrel"),
    "padj": {"": 2, "little ": 1, "small ": 1, "tiny ": 1},
    "trouble": ("stuck up in a tree", "with a hurt leg", "that could not find its mom",
                "caught in a bush"),
    "see": ("{He} saw a {padj}{pet} {trouble}.", "There was a {padj}{pet} {trouble}."),
    "comfort": {"": 4, '"Oh no!" said {name}.': 1,
                '{name} said, "Do not be scared, little {pet}."': 1},
    "help:stuck up in a tree": ("{name} climbed up and carried the {pet} down.",
                                "{He} helped the {pet} climb down."),
    "help:with a hurt leg": ("{name} wrapped its leg in a soft cloth.",
                             "{He} gave the {pet} some water and let it rest."),
    "help:that could not find its mom": ("{name} found its mom by the pond.",
                                         "{He} helped the {pet} find its way home."),
    "help:caught in a bush": ("{name} pulled the branches apart and set it free.",
                              "{He} slowly helped the {pet} get out."),
    "thanks": {"": 2, "The {pet} was happy.": 1, '"Thank you, {name}!" said the {pet}.': 1},
    "after": {"": 4, "After that, the {pet} came to visit {name} every day.": 1,
              "The {pet} and {name} became friends.": 1},
    "rescue_end": ("{name} felt proud.", "It was a good day for {name}.",
                   "{name} smiled all the way home."),

    # Plot "trip": the hero goes somewhere with family and sees things.
    "tplace": ("zoo", "farm", "lake", "aquarium"),  # no overlap with "place": see "outing"
    "trip": ("{when}, {name} and {his} {family} went to the {tplace}.",
             "{when}, {name} went to the {tplace} with {his} {family}."),
    "excited": {"": 3, "{name} was very excited.": 1, "{He} could not wait.": 1},
    "n_sights": {1: 2, 2: 3, 3: 2},
    "saw": ("They saw ", "At the {tplace}, they saw ", "First, they saw "),
    "sight:zoo": ("lions", "monkeys", "elephants", "giraffes", "penguins", "zebras"),
    "sight:farm": ("cows", "pigs", "sheep", "horses", "chickens", "goats"),
    "sight:lake": ("ducks", "fish", "frogs", "swans", "turtles", "little boats"),
    "sight:aquarium": ("sharks", "jellyfish", "seals", "starfish", "sea turtles", "octopuses"),
    "favorite": {"": 1, "{name} liked the {fav} best.": 1, "The {fav} were {his} favorite.": 1},
    "treat": {"": 3, "Then they ate ice cream.": 1, "Then they had a picnic.": 1,
              "{name} got a balloon.": 1},
    "trip_end": ("That night, {name} dreamed about the {first}.",
                 "{name} could not wait to go back to the {tplace}.",
                 "{name} told everyone about the {first}.",
                 "It was the best day ever."),

    # Plot "share": the hero will not share a new toy with a sibling, then does.
    "age": ("little", "big"),
    "sibling": ("{name} had a {age} {rel} named {friend}.",
                "{name} lived with {his} {age} {rel}, {friend}."),
    "gift": ("{when}, {name} got a new {color} {obj}.",
             "{when}, Grandma gave {name} a {color} {obj}."),
    "want": ("{friend} wanted it too.", '{friend} asked, "Can I play?"'),
    "refuse": ('"No! It is mine!" said {name}.', '{name} held the {obj} tight and said, "No!"'),
    "cry": {"": 3, "{friend} started to cry.": 1, "{friend} walked away, sad.": 1},
    "realize": {"": 3, "Then {name} felt bad.": 1, 'Mom said, "It is nice to share."': 1,
                "{name} saw how sad {fhe} was.": 1},
    "give": ("{name} gave the {obj} to {friend}.",
             "{name} said sorry, and they took turns.",
             '"We can play together," said {name}.'),
    "share_end": {"": 2, "They had so much fun together.": 1,
                  "{name} learned that sharing is good.": 1},
}

# The tiny grammar: the "lost" plot with a few two-way choices (and uneven
# weights); every other table keeps only its first option.
_TINY = {
    "gender": ("girl", "boy"), "name_girl": ("Lily",), "name_boy": ("Tom",),
    "adj": ("", "little "), "color": ("red", "blue"), "n_search": (1, 2),
    "spot": ("under a big tree", "behind a bush", "in the tall grass"),
}


def _tables(spec: dict, keep: dict | None = None) -> dict:
  tables = {}
  for name, options in spec.items():
    weights = options if isinstance(options, dict) else dict.fromkeys(options, 1)
    assert len(weights) == len(options), f"duplicate options in {name}"
    if keep is not None:
      weights = {v: weights[v] for v in keep.get(name, list(weights)[:1])}
    tables[name] = _choice(name, tuple(weights), tuple(weights.values()))
  return tables


_GRAMMAR_TABLES = {"default": _tables(_SPEC), "tiny": _tables(_SPEC, _TINY)}

_PRONOUNS = {"girl": {"He": "She", "he": "she", "His": "Her", "his": "her", "him": "her"},
             "boy": {"He": "He", "he": "he", "His": "His", "his": "his", "him": "him"}}


# --- The story code, shared by sampling, enumeration and parsing.

class _Story(dict):
  """A story being told: its fields (each chosen when first rendered) and its text."""
  __slots__ = ("tables", "choose", "out")

  def __init__(self, tables: dict, choose):
    super().__init__()
    self.tables, self.choose, self.out = tables, choose, []

  def __missing__(self, key):
    resolve = _RESOLVERS.get(key)
    if resolve is None:
      value = self[key] = self.choose(self.tables[key])
      return value
    resolve(self)
    return self[key]

  def pick(self, name):
    return self.choose(self.tables[name])


def _draw(s: _Story, name: str, pool: list):
  """Removes and returns a uniformly chosen item of pool (sampling without replacement)."""
  item = s.choose(_uniform(name, tuple(pool)))
  pool.remove(item)
  return item


# Fields that are not a plain pick from the table of the same name. A character's
# kind, gender, species and name are each chosen when first needed for the text,
# which also lets a parse reject wrong guesses early.

def _noun(s: _Story):
  s["noun"] = s["gender"] if s.pick("kind") == "human" else s.pick("species")


def _fnoun(s: _Story):
  s["fnoun"] = s["fgender"] if s["fkind"] == "human" else s.pick("fspecies")


def _name(s: _Story):
  s["name"] = s.pick("name_" + s["gender"])


def _friend_name(s: _Story):
  # Never the hero's name: names are how the text tells characters apart.
  names = [n for n in s.tables["name_" + s["fgender"]].values if n != s["name"]]
  s["friend"] = _draw(s, "fname", names)


def _relation(s: _Story):
  s["rel"] = "sister" if s["fgender"] == "girl" else "brother"


def _pronouns(s: _Story):
  s.update(_PRONOUNS[s["gender"]])


def _friend_pronouns(s: _Story):
  s.update({"f" + k: v for k, v in _PRONOUNS[s["fgender"]].items()})


_RESOLVERS = {
    "noun": _noun, "name": _name, "fnoun": _fnoun, "friend": _friend_name, "rel": _relation,
    **dict.fromkeys(_PRONOUNS["girl"], _pronouns),
    **{"f" + k: _friend_pronouns for k in _PRONOUNS["girl"]},
}


@functools.lru_cache(maxsize=None)
def _parts(template: str) -> tuple:
  return tuple((literal, field) for literal, field, _, _ in string.Formatter().parse(template))


def _say(s: _Story, template: str):
  """Appends a sentence, choosing its new fields in text order as they are reached."""
  out = s.out
  if out:
    out.append(" ")
  for literal, field in _parts(template):
    if literal:
      out.append(literal)
    if field is not None:
      out.append(s[field])


def _tell(s: _Story, name: str):
  template = s.pick(name)
  if template:
    _say(s, template)


def _lost(s: _Story):
  for name in ("have", "go", "lose", "sad"):
    _tell(s, name)
  helper = s.pick("helper") == "friend"
  if helper:
    _tell(s, "helper_" + s["fkind"])
  s["who"] = "They" if helper else s["He"]
  spots = list(s.tables["spot"].values)
  for _ in range(s.pick("n_search")):
    s["spot"] = _draw(s, "spot", spots)
    _tell(s, "look")
  s["spot"] = _draw(s, "spot", spots)
  s["finder"] = s["friend"] if helper and s.pick("finder_is") == "friend" else s["name"]
  _tell(s, "find")
  _tell(s, "happy_together" if helper else "happy_alone")
  _tell(s, "moral")


def _friendship(s: _Story):
  _tell(s, "outing")
  for name in ("meet", "greet", "reply"):
    _tell(s, name)
  games = list(s.tables["game"].values)
  n = s.pick("n_games")
  templates = ("They played {game}.",) if n == 1 else ("First, they played {game}.",
                                                       "Then they played {game}.")
  for template in templates:
    s["game"] = _draw(s, "game", games)
    _say(s, template)
  _tell(s, "event")
  _tell(s, "friend_end")


def _rescue(s: _Story):
  for name in ("walk", "hear", "see", "comfort"):
    _tell(s, name)
  _tell(s, "help:" + s["trouble"])
  for name in ("thanks", "after", "rescue_end"):
    _tell(s, name)


def _trip(s: _Story):
  _tell(s, "trip")
  _tell(s, "excited")
  sights = list(s.tables["sight:" + s["tplace"]].values)
  n = s.pick("n_sights")
  _tell(s, "saw")
  seen = []
  for i in range(n):
    if i:
      s.out.append(", " if i < n - 1 else " and ")
    seen.append(_draw(s, "sight", sights))
    s.out.append(seen[-1])
  s.out.append(".")
  s["first"] = seen[0]
  # The favorite is drawn only when its sentence is said: no unrendered choices.
  template = s.pick("favorite")
  if template:
    s["fav"] = s.choose(_uniform("fav", tuple(seen)))
    _say(s, template)
  _tell(s, "treat")
  _tell(s, "trip_end")


def _share(s: _Story):
  s["fkind"] = "human"
  for name in ("sibling", "gift", "want", "refuse", "cry", "realize", "give", "share_end"):
    _tell(s, name)


_PLOTS = {"lost": _lost, "friend": _friendship, "rescue": _rescue, "trip": _trip, "share": _share}


def _story(s: _Story):
  _tell(s, "intro")
  _tell(s, "trait")
  _PLOTS[s.pick("plot")](s)


def _grammar(grammar: str) -> dict:
  if grammar not in _GRAMMAR_TABLES:
    raise ValueError(f"unknown story grammar {grammar!r}; valid grammars: {', '.join(GRAMMARS)}.")
  return _GRAMMAR_TABLES[grammar]


# --- Sampling.

def _chunk_seed(seed: int, chunk: int) -> np.random.SeedSequence:
  return np.random.SeedSequence((seed, chunk))


def _sample_chunk(job) -> tuple[list[str], list[float], list[tuple] | None]:
  grammar, seed, chunk, count, record = job
  tables = _grammar(grammar)
  rng = np.random.Generator(np.random.PCG64(_chunk_seed(seed, chunk)))
  # Uniforms drawn in bulk: a numpy call per choice would cost more than the choice.
  draws = itertools.chain.from_iterable(iter(lambda: rng.random(4096).tolist(), None))
  texts, logps, choices = [], [], [] if record else None
  logp, picks = 0.0, []

  def choose(t: _Choice):
    nonlocal logp
    if not t.cum:
      return t.values[0]
    i = bisect.bisect_right(t.cum, next(draws))
    logp += t.logps[i]
    if record:
      picks.append((t.name, t.values[i]))
    return t.values[i]

  for _ in range(count):
    logp, picks = 0.0, []
    s = _Story(tables, choose)
    _story(s)
    texts.append("".join(s.out))
    logps.append(logp)
    if record:
      choices.append(tuple(picks))
  return texts, logps, choices


def _generate(num_stories: int, seed: int, grammar: str, record: bool, num_workers: int):
  _grammar(grammar)
  if num_stories < 0 or seed < 0:
    raise ValueError(f"num_stories and seed must be >= 0, got {num_stories} and {seed}.")
  jobs = [(grammar, seed, c, min(CHUNK, num_stories - c * CHUNK), record)
          for c in range(-(-num_stories // CHUNK))]
  num_workers = max(1, min(num_workers, len(jobs)))
  if num_workers == 1:
    results = [_sample_chunk(job) for job in jobs]
  else:
    # spawn, not fork: forking a process that runs JAX's threads can deadlock.
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
      results = pool.map(_sample_chunk, jobs, chunksize=1)
  texts = [t for r in results for t in r[0]]
  logps = np.array([x for r in results for x in r[1]], dtype=np.float64)
  choices = [c for r in results for c in r[2]] if record else None
  return texts, logps, choices


def generate_stories(num_stories: int, seed: int, grammar: str = "default", *,
                     num_workers: int = 1) -> tuple[list[str], np.ndarray]:
  """Returns (texts, logps): the stories' texts and log p(story) in nats (float64, <= 0).

  Texts carry no end-of-text marker and no leading or trailing whitespace.

  Stories come in chunks of CHUNK, each seeded by (seed, chunk index), so the
  output depends only on (num_stories, seed, grammar), never on num_workers.
  One process makes about 10 MB of text a second; num_workers > 1 spawns
  processes, which pays off only for large corpora on machines with free cores
  (a script that uses it needs an `if __name__ == "__main__":` guard).
  """
  texts, logps, _ = _generate(num_stories, seed, grammar, False, num_workers)
  return texts, logps


def generate_stories_with_choices(num_stories: int, seed: int, grammar: str = "default", *,
                                  num_workers: int = 1
                                  ) -> tuple[list[str], np.ndarray, list[tuple]]:
  """Same, plus each story's choices: a tuple of (choice point name, option chosen).

  Choices with a single option (probability 1) are left out.
  """
  return _generate(num_stories, seed, grammar, True, num_workers)


# --- Enumeration and parsing: replay the story code along a given prefix of choices.

class _Branch(Exception):
  """The replay reached a choice beyond its prefix."""

  def __init__(self, num_options: int):
    super().__init__(num_options)
    self.num_options = num_options


def _replay(tables: dict, prefix: list[int], target: str | None = None):
  """Tells the story whose first choices are `prefix` (option indices).

  Without `target`, each further choice takes option 0. With it, the first further
  choice raises _Branch(number of options), or _Branch(0) if the text told so far
  is not a prefix of `target`. Returns (text, logp, indices, option counts, choices).
  """
  indices, counts, picks, logp = [], [], [], 0.0

  def choose(t: _Choice):
    nonlocal logp
    if not t.cum:
      return t.values[0]
    k = len(indices)
    if k < len(prefix):
      i = prefix[k]
    elif target is None:
      i = 0
    elif not target.startswith("".join(s.out)):
      raise _Branch(0)
    else:
      raise _Branch(len(t.values))
    indices.append(i)
    counts.append(len(t.values))
    picks.append((t.name, t.values[i]))
    logp += t.logps[i]
    return t.values[i]

  s = _Story(tables, choose)
  _story(s)
  return "".join(s.out), logp, indices, counts, tuple(picks)


def enumerate_stories(grammar: str = "tiny") -> list[tuple[str, float]]:
  """Every story the (finite) grammar can produce, with its log-probability.

  Raises ValueError for grammars that are too large to enumerate (all but "tiny").
  """
  tables = _grammar(grammar)
  if grammar != "tiny":
    raise ValueError(f"story grammar {grammar!r} has far too many stories to enumerate; "
                     "only 'tiny' can be enumerated.")
  stories, prefix = [], []
  while True:  # depth-first, each leaf one replay
    text, logp, indices, counts, _ = _replay(tables, prefix)
    stories.append((text, logp))
    if len(stories) > _ENUMERATE_MAX:
      raise ValueError(f"story grammar {grammar!r} has more than {_ENUMERATE_MAX} stories.")
    k = len(indices) - 1
    while k >= 0 and indices[k] + 1 == counts[k]:
      k -= 1
    if k < 0:
      return stories
    prefix = indices[:k] + [indices[k] + 1]


def derivations(text: str, grammar: str = "default", limit: int = 2) -> list[tuple]:
  """The choice sequences (as in generate_stories_with_choices) whose story is `text`.

  A search over the grammar pruned by the text; at most `limit` are returned. An
  unambiguous grammar gives exactly one for every story it can produce.
  """
  tables = _grammar(grammar)
  found, stack = [], [[]]
  while stack and len(found) < limit:
    prefix = stack.pop()
    try:
      story, _, _, _, picks = _replay(tables, prefix, text)
    except _Branch as b:
      stack.extend(prefix + [i] for i in reversed(range(b.num_options)))
      continue
    if story == text:
      found.append(picks)
  return found
