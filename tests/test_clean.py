import pytest

from koala_lib.data.clean import Deduplicator, KeywordFilter, LanguageFilter, normalize_query, split_long
from koala_lib.data.schema import Record, Reject, Turn, dialogue


def rec(pairs, rid="r1"):
    return Record(rid, "sharegpt", dialogue(pairs))


def test_keyword_filter_is_case_insensitive_on_every_turn():
    keep = KeywordFilter(["openai", "chat-gpt"])
    assert keep(rec([("hi", "hello")])).id == "r1"
    with pytest.raises(Reject) as err:
        keep(rec([("hi", "hello"), ("Do you work for OpenAI?", "no")]))
    assert err.value.reason == "keyword" and "openai" in err.value.detail


def test_normalized_query_ignores_case_space_and_punctuation():
    assert normalize_query("  What is  Python?? ") == normalize_query("what is python")
    assert normalize_query("ＡＢＣ") == "abc"  # NFKC


def test_dedup_first_user_turn_keeps_the_first():
    dedup = Deduplicator("first_user")
    dedup(rec([("What is Python?", "a")], "a"))
    with pytest.raises(Reject, match="same query as a"):
        dedup(rec([("what is python", "b"), ("more", "c")], "b"))


def test_dedup_all_user_turns_only_rejects_whole_matches():
    dedup = Deduplicator("all_user")
    dedup(rec([("q", "a"), ("q2", "a2")], "a"))
    assert dedup(rec([("q", "b"), ("other", "b2")], "b")).id == "b"
    with pytest.raises(Reject):
        dedup(rec([("Q", "x"), ("q2!", "y")], "c"))
    assert Deduplicator("none")(rec([("q", "a"), ("q2", "a2")], "a")).id == "a"


def test_language_filter_offline():
    keep = LanguageFilter("en")
    assert keep(rec([("How do I sort a list in Python?", "Use the sorted function, which returns a new list.")])).id == "r1"
    with pytest.raises(Reject) as err:
        keep(rec([("Comment puis-je trier une liste en Python ?", "Utilisez la fonction sorted, qui renvoie une nouvelle liste.")]))
    assert err.value.reason == "non_english" and "fr" in err.value.detail
    assert LanguageFilter(None)(rec([("Hola", "Hola")])).id == "r1"


def test_split_long_cuts_at_exchange_boundaries():
    r = rec([("q1", "a" * 40), ("q2", "b" * 40), ("q3", "c" * 40)], "x")
    parts = split_long(r, 90)
    assert [p.id for p in parts] == ["x#p0", "x#p1"]
    assert [len(p.turns) for p in parts] == [4, 2]
    assert tuple(t for p in parts for t in p.turns) == r.turns  # nothing lost, order kept
    assert parts[1].meta == {"part": 1, "parts": 2}
    assert split_long(r, 10_000) == [r]


def test_split_long_drops_an_oversized_exchange_visibly_or_rejects():
    r = rec([("q1", "a" * 200), ("q2", "b")], "x")
    (part,) = split_long(r, 50)
    assert part.turns == (Turn("user", "q2"), Turn("assistant", "b"))
    assert part.meta["dropped_exchanges"] == 1
    with pytest.raises(Reject) as err:
        split_long(rec([("q", "a" * 200)]), 50)
    assert err.value.reason == "too_long"


def test_dedup_rejects_a_repeated_row_with_the_same_id():
    dedup = Deduplicator("first_user")
    dedup(rec([("What is Python?", "a")], "same"))
    with pytest.raises(Reject):
        dedup(rec([("What is Python?", "a")], "same"))
