"""Per-track identity voting and attribute smoothing."""

from __future__ import annotations

import pytest

from streamer.config import RecognitionSettings
from streamer.match.voting import Announcement, AttributeSmoother, IdentityVoter
from streamer.types import Attributes, Emotion, Gender


def feed(voter: IdentityVoter, track_id: int, votes: list[tuple[str | None, float]]) -> list[Announcement | None]:
    return [voter.add(track_id, name, score) for name, score in votes]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_votes": 0}, "min_votes"),
        ({"vote_share": 0.5}, "vote_share"),
        ({"vote_share": 1.01}, "vote_share"),
        ({"max_tracks": 0}, "max_tracks"),
    ],
)
def test_voter_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IdentityVoter(**kwargs)


def test_voter_from_settings():
    voter = IdentityVoter.from_settings(RecognitionSettings(min_votes=3, vote_share=0.75))
    assert (voter.min_votes, voter.vote_share) == (3, 0.75)


def test_voter_announces_once_when_confident():
    voter = IdentityVoter(min_votes=2, vote_share=0.6)
    results = feed(voter, 7, [("alice", 0.8), ("alice", 0.6), ("alice", 0.9), ("bob", 0.7)])
    assert results[0] is None  # one vote is not enough
    first = results[1]
    expected = Announcement(track_id=7, name="alice", score=pytest.approx(0.7), votes={"alice": 2}, unknown_votes=0)
    assert first == expected
    assert first.total_votes == 2
    assert results[2:] == [None, None]  # same winner (3 of 4 = 75 %): no repeat


def test_voter_reannounces_only_when_the_confident_winner_changes():
    voter = IdentityVoter(min_votes=2, vote_share=0.6)
    results = feed(voter, 1, [("alice", 0.8), ("alice", 0.8), ("bob", 0.5), ("bob", 0.6), ("bob", 0.7), ("bob", 0.8)])
    assert [r.name if r else None for r in results] == [None, "alice", None, None, "bob", None]
    # alice 2 / bob 2 is a tie: not confident, nothing said; bob 3 of 5 = 60 % wins.
    change = results[4]
    assert change.score == pytest.approx(0.6)  # mean of bob's votes only
    assert change.votes == {"alice": 2, "bob": 3}
    assert change.unknown_votes == 0


def test_voter_handles_unknown_as_a_candidate():
    voter = IdentityVoter(min_votes=2, vote_share=0.6)
    results = feed(voter, 3, [(None, 0.2), (None, 0.4), ("carol", 0.9), ("carol", 0.9), ("carol", 0.9)])
    unknown = results[1]
    assert unknown is not None and unknown.name is None
    assert unknown.score == pytest.approx(0.3)
    assert unknown.votes == {} and unknown.unknown_votes == 2
    assert results[2:4] == [None, None]
    named = results[4]
    assert named.name == "carol" and named.votes == {"carol": 3} and named.unknown_votes == 2
    assert named.total_votes == 5


def test_voter_needs_min_votes_and_share():
    voter = IdentityVoter(min_votes=3, vote_share=0.7)
    results = feed(voter, 1, [("a", 1.0), ("a", 1.0), ("b", 1.0), ("a", 1.0), ("a", 1.0)])
    # 2/2 lacks votes; 2/3 lacks share; 3/4 = 75 % is enough.
    assert [r.name if r else None for r in results] == [None, None, None, "a", None]
    single = IdentityVoter(min_votes=1, vote_share=1.0)
    assert single.add(9, "x", 0.5).name == "x"
    assert single.add(9, "y", 0.5) is None  # 50 % < 100 %


def test_voter_tracks_are_independent_and_forgotten():
    voter = IdentityVoter(min_votes=2, vote_share=0.6)
    voter.add(1, "alice", 0.9)
    voter.add(2, "bob", 0.9)
    assert voter.add(1, "alice", 0.9).name == "alice"
    assert voter.add(2, "bob", 0.9).name == "bob"
    assert len(voter) == 2
    voter.forget(1)
    voter.forget(12345)  # unknown ids are fine: a track may end before any recognition
    assert len(voter) == 1
    assert voter.add(1, "alice", 0.9) is None  # starts over
    voter.reset()
    assert len(voter) == 0


def test_voter_memory_is_capped_even_without_forget():
    voter = IdentityVoter(min_votes=1, max_tracks=3)
    for track_id in range(10):
        voter.add(track_id, "x", 0.5)
    assert len(voter) == 3
    with pytest.raises(ValueError, match="finite"):
        voter.add(1, "x", float("nan"))


def emotion(**scores: float) -> Emotion:
    full = {label: 0.0 for label in Emotion.LABELS} | scores
    return Emotion(label=max(full, key=full.__getitem__), scores=full)


ALWAYS = {"min_gender_confidence": 0.0, "min_emotion_confidence": 0.0, "min_emotion_readings": 1}  # never abstain


def test_smoother_averages_age_gender_and_emotion():
    smoother = AttributeSmoother(**ALWAYS)
    first = smoother.add(4, Attributes(age=20.0, gender=Gender("man", 0.8), emotion=emotion(happy=0.6, neutral=0.4)))
    assert first.age == 20.0
    assert first.gender == Gender("man", pytest.approx(0.8))
    assert first.emotion.label == "happy"

    second = smoother.add(4, Attributes(age=30.0, gender=Gender("woman", 0.9), emotion=emotion(sad=0.9, neutral=0.1)))
    assert second.age == pytest.approx(25.0)
    # P(man) = (0.8 + 0.1) / 2 = 0.45, so woman with 0.55.
    assert second.gender.label == "woman"
    assert second.gender.probability == pytest.approx(0.55)
    assert second.emotion.scores["happy"] == pytest.approx(0.3)
    assert second.emotion.scores["sad"] == pytest.approx(0.45)
    assert second.emotion.scores["neutral"] == pytest.approx(0.25)
    assert second.emotion.label == "sad"
    assert sum(second.emotion.scores.values()) == pytest.approx(1.0)


def test_smoother_fields_are_independent_and_none_until_seen():
    smoother = AttributeSmoother(**ALWAYS)
    only_age = smoother.add(1, Attributes(age=40.0))
    assert only_age == Attributes(age=40.0, gender=None, emotion=None)
    with_gender = smoother.add(1, Attributes(gender=Gender("woman", 0.7)))
    assert with_gender.age == 40.0  # an observation without age does not dilute the mean
    assert with_gender.gender.label == "woman" and with_gender.gender.probability == pytest.approx(0.7)
    assert smoother.add(2, Attributes()) == Attributes()
    assert len(smoother) == 2
    smoother.forget(1)
    assert smoother.add(1, Attributes(age=10.0)).age == 10.0


def test_smoother_rejects_unknown_gender_label_and_caps_memory():
    smoother = AttributeSmoother(max_tracks=2)
    with pytest.raises(ValueError, match="gender label"):
        smoother.add(1, Attributes(gender=Gender("other", 0.9)))
    assert len(smoother) == 0  # nothing recorded for a rejected observation
    for track_id in range(5):
        smoother.add(track_id, Attributes(age=1.0))
    assert len(smoother) == 2
    smoother.reset()
    assert len(smoother) == 0


def test_smoother_weights_observations():
    smoother = AttributeSmoother(**ALWAYS)
    smoother.add(1, Attributes(age=20.0, gender=Gender("man", 0.9), emotion=emotion(angry=0.8, happy=0.2)), weight=0.1)
    got = smoother.add(1, Attributes(age=40.0, gender=Gender("woman", 0.9), emotion=emotion(happy=0.9, angry=0.1)), 0.9)
    assert got.age == pytest.approx((0.1 * 20 + 0.9 * 40) / 1.0)
    # P(man) = 0.1 * 0.9 + 0.9 * 0.1 = 0.18
    assert got.gender == Gender("woman", pytest.approx(0.82))
    assert got.emotion.label == "happy" and got.emotion.scores["happy"] == pytest.approx(0.83)
    # the default weight is 1.0: the call without it is the plain mean
    plain = AttributeSmoother(**ALWAYS)
    plain.add(2, Attributes(age=20.0))
    assert plain.add(2, Attributes(age=40.0)).age == pytest.approx(30.0)
    # weight 0 adds nothing; a track seen only with weight 0 has no estimate yet
    assert plain.add(2, Attributes(age=100.0), weight=0.0).age == pytest.approx(30.0)
    assert plain.add(3, Attributes(age=50.0), weight=0).age is None
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight"):
            plain.add(2, Attributes(age=1.0), weight=bad)


def test_smoother_abstains_on_the_smoothed_value():
    smoother = AttributeSmoother(min_gender_confidence=0.7, min_emotion_confidence=0.5, min_emotion_readings=1)
    first = smoother.add(1, Attributes(gender=Gender("woman", 0.9), emotion=emotion(happy=0.9, sad=0.1)))
    assert first.gender == Gender("woman", pytest.approx(0.9)) and first.emotion.label == "happy"
    # a second, contradicting view: P(man) = (0.1 + 0.8) / 2 = 0.45 -> woman 0.55 < 0.7: withheld;
    # happy (0.9 + 0.1) / 2 = 0.5 still reaches 0.5
    second = smoother.add(1, Attributes(gender=Gender("man", 0.8), emotion=emotion(sad=0.9, happy=0.1)))
    assert second.gender is None and second.emotion.label == "happy"
    third = smoother.add(1, Attributes(gender=Gender("man", 0.99), emotion=emotion(angry=1.0)))
    assert third.emotion is None  # happy 1/3, sad 1/3, angry 1/3
    assert third.gender is None  # P(man) = (0.1 + 0.8 + 0.99) / 3 = 0.63
    assert third.as_dict()["gender"] is None and third.as_dict()["emotion"] is None
    assert AttributeSmoother().min_gender_confidence == 0.7  # the settings' defaults
    with pytest.raises(ValueError, match="min_emotion_confidence"):
        AttributeSmoother(min_emotion_confidence=-0.1)


def test_a_tracks_emotion_waits_for_its_second_reading():
    smoother = AttributeSmoother(min_emotion_confidence=0.5)
    first = smoother.add(1, Attributes(age=30.0, gender=Gender("woman", 0.9), emotion=emotion(angry=0.6, happy=0.4)))
    assert first.emotion is None and first.age == 30.0 and first.gender.label == "woman", "age, gender at once"
    assert smoother.add(1, Attributes(emotion=emotion(angry=0.1, happy=0.9)), weight=0.0).emotion is None
    second = smoother.add(1, Attributes(emotion=emotion(angry=0.1, happy=0.9)))
    assert second.emotion.label == "happy" and second.emotion.scores["happy"] == pytest.approx(0.65)
    single = AttributeSmoother(min_emotion_confidence=0.5, min_emotion_readings=1)
    assert single.add(1, Attributes(emotion=emotion(angry=0.9, happy=0.1))).emotion.label == "angry"
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="min_emotion_readings"):
            AttributeSmoother(min_emotion_readings=bad)


def test_smoother_from_settings():
    from streamer.config import AttributeSettings

    smoother = AttributeSmoother.from_settings(AttributeSettings(min_gender_confidence=0.9, min_emotion_confidence=0.0))
    assert smoother.min_gender_confidence == 0.9 and smoother.min_emotion_confidence == 0.0
    assert smoother.add(1, Attributes(gender=Gender("man", 0.85))).gender is None
