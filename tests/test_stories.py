"""The built-in story grammar: determinism, exact log-probs, one derivation per text."""

import collections
import functools
import math
import re
import string

import numpy as np
import pytest

from jaxformer.data import stories

N_DEFAULT = 20_000


@functools.cache
def _default_sample():
  return stories.generate_stories_with_choices(N_DEFAULT, 1234)


@functools.cache
def _tiny_enumeration():
  return dict(stories.enumerate_stories("tiny"))


def test_same_seed_same_stories_and_different_seed_different_stories():
  texts, logps = stories.generate_stories(300, 7)
  texts2, logps2 = stories.generate_stories(300, 7)
  assert texts == texts2 and np.array_equal(logps, logps2)
  texts3, logps3 = stories.generate_stories(300, 8)
  assert sum(a != b for a, b in zip(texts, texts3)) > 290
  assert not np.array_equal(logps, logps3)


def test_output_depends_only_on_seed_and_index():
  texts, logps = stories.generate_stories(2 * stories.CHUNK + 500, 3)
  # Fewer stories: a prefix of the same list (chunks are seeded by (seed, chunk index)).
  head, head_logps = stories.generate_stories(stories.CHUNK + 10, 3)
  assert head == texts[:len(head)] and np.array_equal(head_logps, logps[:len(head)])
  # Recording choices does not change what is drawn.
  texts_c, logps_c, _ = stories.generate_stories_with_choices(len(texts), 3)
  assert texts_c == texts and np.array_equal(logps_c, logps)


def test_output_does_not_depend_on_number_of_workers():
  n = 2 * stories.CHUNK + 300
  texts, logps = stories.generate_stories(n, 11, num_workers=1)
  texts2, logps2 = stories.generate_stories(n, 11, num_workers=2)
  assert texts == texts2 and np.array_equal(logps, logps2)


def test_unknown_grammar_names_the_valid_ones():
  for call in (lambda: stories.generate_stories(3, 0, "huge"),
               lambda: stories.generate_stories_with_choices(3, 0, "huge"),
               lambda: stories.enumerate_stories("huge")):
    with pytest.raises(ValueError, match="default, tiny"):
      call()


def test_default_grammar_is_too_large_to_enumerate():
  with pytest.raises(ValueError, match="enumerate"):
    stories.enumerate_stories("default")


def test_returned_types_and_empty_request():
  texts, logps = stories.generate_stories(5, 0)
  assert isinstance(texts, list) and all(isinstance(t, str) for t in texts)
  assert logps.dtype == np.float64 and logps.shape == (5,)
  texts, logps = stories.generate_stories(0, 0)
  assert texts == [] and logps.shape == (0,)


# --- The tiny grammar: exhaustive checks.

def test_tiny_probabilities_sum_to_one_over_distinct_texts():
  enumerated = stories.enumerate_stories("tiny")
  texts = [t for t, _ in enumerated]
  assert 50 <= len(texts) <= 1000
  assert len(set(texts)) == len(texts)  # no text has two derivations
  assert math.fsum(math.exp(lp) for _, lp in enumerated) == pytest.approx(1.0, abs=1e-9)
  # Uneven weights: not every story is equally likely.
  assert len({round(lp, 9) for _, lp in enumerated}) > 1


def test_tiny_sampled_logps_equal_enumerated_logps():
  table = _tiny_enumeration()
  texts, logps = stories.generate_stories(2000, 5, "tiny")
  for text, logp in zip(texts, logps):
    assert text in table
    assert logp == pytest.approx(table[text], abs=1e-12)


def test_tiny_empirical_frequencies_match_probabilities():
  table = _tiny_enumeration()
  n = 40_000
  texts, _ = stories.generate_stories(n, 2024, "tiny")
  counts = collections.Counter(texts)
  assert set(counts) <= set(table)
  expected = {t: n * math.exp(lp) for t, lp in table.items()}
  assert min(expected.values()) > 50  # chi-square's normal approximation holds
  chi2 = sum((counts[t] - e) ** 2 / e for t, e in expected.items())
  dof = len(table) - 1
  # Tolerance: the statistic is ~ chi2(dof), mean dof, sd sqrt(2 dof); allow 5 sd.
  assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)
  total_variation = 0.5 * sum(abs(counts[t] / n - math.exp(lp)) for t, lp in table.items())
  assert total_variation < 0.03


def test_tiny_sampled_duplicates_share_their_choices():
  texts, _, choices = stories.generate_stories_with_choices(5000, 9, "tiny")
  first = {}
  for text, c in zip(texts, choices):
    assert first.setdefault(text, c) == c
  assert len(first) < len(texts)  # duplicates happened, so the check had teeth


# --- The default grammar: unambiguity, references, alphabet, lengths.

def test_default_equal_texts_have_equal_choices():
  texts, _, choices = _default_sample()
  first = {}
  for text, c in zip(texts, choices):
    assert first.setdefault(text, c) == c


def test_default_texts_parse_back_to_exactly_their_choices():
  # A search over all choice sequences that could produce each text finds only one.
  texts, _, choices = stories.generate_stories_with_choices(120, 77)
  for text, c in zip(texts, choices):
    assert stories.derivations(text) == [c], text


def test_derivations_rejects_texts_outside_the_grammar():
  texts, _ = stories.generate_stories(3, 1)
  assert stories.derivations(texts[0] + " The end.") == []
  assert stories.derivations(texts[1].replace(".", "!", 1)) == []


def test_logps_are_finite_and_nonpositive():
  _, logps, choices = _default_sample()
  assert np.all(np.isfinite(logps)) and np.all(logps <= 0)
  # Every recorded choice had more than one option, so it cost probability.
  assert np.all(logps < 0)
  assert all(len(c) >= 5 for c in choices)


def test_alphabet_is_small_plain_ascii():
  texts, _, _ = _default_sample()
  alphabet = set("".join(texts))
  assert alphabet <= set(string.ascii_letters + string.digits + string.punctuation + " \n")
  assert len(alphabet) + 1 <= 64  # with the end-of-text token, fits a 64-id char vocabulary
  for text in texts:
    assert text == text.strip() and "  " not in text
    assert text[0].isupper() and text[-1] in '.!?"'


def test_articles_and_capitals():
  texts, _, _ = _default_sample()
  for text in texts[:5000]:
    assert not re.search(r"\b[Aa] [aeiouAEIOU]", text), text  # never "a apple"
    # A new sentence follows end punctuation and a space, not a closing quote: '"No!" said'.
    for sentence_start in re.findall(r'[.!?] +"?(\w)', text):
      assert sentence_start.isupper(), text


def test_story_lengths():
  texts, _, _ = _default_sample()
  lengths = np.array([len(t) for t in texts])
  assert 200 <= np.median(lengths) <= 256  # most stories fit a 256-char context
  assert np.mean((lengths >= 150) & (lengths <= 500)) > 0.98
  assert lengths.min() >= 60


def test_hero_name_recurs():
  texts, _, choices = _default_sample()
  recurs = 0
  for text, c in zip(texts, choices):
    picks = dict(c)
    name = picks.get("name_girl") or picks.get("name_boy")
    assert name and re.search(rf"\b{name}\b", text)
    recurs += len(re.findall(rf"\b{name}\b", text)) >= 2
  assert recurs / len(texts) > 0.95


def test_pronouns_agree_with_gender():
  texts, _, choices = _default_sample()
  checked = {"girl": 0, "boy": 0}
  used = {"girl": 0, "boy": 0}
  for text, c in zip(texts, choices):
    picks = dict(c)
    gender = picks["gender"]
    if picks.get("fgender", gender) != gender:
      continue  # a second character of the other gender: both pronoun sets are right
    wrong = r"\b(he|him|his|He|His)\b" if gender == "girl" else r"\b(she|her|She|Her)\b"
    right = r"\b(she|her|She|Her)\b" if gender == "girl" else r"\b(he|him|his|He|His)\b"
    assert not re.search(wrong, text), text
    checked[gender] += 1
    used[gender] += bool(re.search(right, text))
  for g in checked:
    assert checked[g] > 0.3 * len(texts)
    assert used[g] > 0.6 * checked[g]


def test_things_set_up_early_come_back_later():
  texts, _, choices = _default_sample()
  plots = collections.Counter()
  for text, c in zip(texts, choices):
    picks = dict(c)
    plots[picks["plot"]] += 1
    if picks["plot"] == "lost":
      # The toy is named before it is lost; each spot is searched once; the find
      # sentence names the one spot not searched yet.
      assert len(re.findall(rf"\b{picks['obj']}\b", text)) >= 2, text
      spots = [v for k, v in c if k == "spot"]
      assert len(set(spots)) == len(spots) and all(text.count(sp) == 1 for sp in spots)
      assert re.search(rf"(found (the {picks['obj']}|the {picks['color']} {picks['obj']}|it) |"
                       rf"saw something {picks['color']} ){re.escape(spots[-1])}", text), text
    if "fname" in picks:  # a second named character, never named like the hero
      assert picks["fname"] not in (picks.get("name_girl"), picks.get("name_boy"))
      assert re.search(rf"\b{picks['fname']}\b", text), text
    if picks["plot"] == "trip":
      sights = [v for k, v in c if k == "sight"] or [None]
      if picks.get("favorite") or "dreamed about" in text or "told everyone" in text:
        # What is remembered later is one of the sights seen earlier.
        tail = text[text.index(".", text.index(" saw ")) + 1:]
        assert any(sight in tail for sight in sights if sight), text
  assert set(plots) == {"lost", "friend", "rescue", "trip", "share"}
  assert min(plots.values()) > 0.1 * len(texts)
