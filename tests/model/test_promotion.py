"""The promotion gate against a real SQLite registry. Jobs of a sweep finish together: one may promote its model
while another is still scoring the champion it found. The gate used to promote over whatever held the alias by
then, so the last job to finish won, better or not."""

import logging

import pytest

from maskwatch import tracking

NAME = "maskwatch"


def store_with_versions(settings_factory, count: int):
    """Settings whose new SQLite store holds versions 1 to `count` of the model, none of them champion."""
    settings = settings_factory()
    tracking.configure(settings)
    client = tracking._client()
    client.create_registered_model(NAME)
    for _ in range(count):
        client.create_model_version(NAME, source=(settings.work_dir / "never-loaded").as_uri())
    return settings, client


@pytest.fixture()
def registry(settings_factory):
    """Settings whose store holds versions 1 to 3 of the model, version 1 the champion."""
    settings, client = store_with_versions(settings_factory, 3)
    tracking.promote(settings, "1")
    return settings, client


def champion_of(client) -> str:
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def macro_f1_of(scores: dict[str, float]):
    return lambda version: tracking.HeadToHead({"macro_f1": scores[version]})


def test_a_better_model_is_promoted_and_a_worse_one_is_not(registry):
    settings, client = registry
    lost = tracking.decide_promotion(settings, "2", {"macro_f1": 0.70}, macro_f1_of({"1": 0.80}))
    assert not lost.promoted and lost.champion_version == "1" and lost.champion_value == 0.80
    assert lost.compared_challenger_value == 0.70 and lost.comparison_basis == ""  # the whole test split
    won = tracking.decide_promotion(settings, "3", {"macro_f1": 0.90}, macro_f1_of({"1": 0.80}))
    assert won.promoted and "vs champion v1" in won.reason
    assert champion_of(client) == "3"
    assert client.get_model_version(NAME, "2").tags["promotion"] == lost.reason


def test_a_champion_promoted_during_the_comparison_is_compared_with_too(registry, caplog):
    """Version 3 (0.90) beats the champion it found, version 1 (0.80); while it was scoring version 1 another job
    promoted version 2 (0.95). Version 3 must then lose to version 2, not take the alias from it."""
    settings, client = registry
    scored: list[str] = []

    def champion_metrics(version: str) -> tracking.HeadToHead:
        scored.append(version)
        if version == "1":  # the other job finishes now
            tracking.promote(settings, "2")
        return tracking.HeadToHead({"macro_f1": {"1": 0.80, "2": 0.95}[version]})

    with caplog.at_level(logging.INFO, logger="maskwatch.tracking"):
        decision = tracking.decide_promotion(settings, "3", {"macro_f1": 0.90}, champion_metrics)
    assert scored == ["1", "2"]
    assert not decision.promoted and decision.champion_version == "2" and decision.champion_value == 0.95
    assert champion_of(client) == "2"
    assert "the champion changed from v1 to v2 during the comparison" in caplog.text


def test_the_first_model_becomes_champion_and_the_next_is_compared_with_it(settings_factory):
    settings, client = store_with_versions(settings_factory, 2)
    first = tracking.decide_promotion(settings, "1", {"macro_f1": 0.85}, macro_f1_of({}))
    assert first.promoted and first.reason == "no champion yet"
    second = tracking.decide_promotion(settings, "2", {"macro_f1": 0.80}, macro_f1_of({"1": 0.85}))
    assert not second.promoted and champion_of(client) == "1"


def test_a_champion_that_trained_on_test_photos_is_compared_on_the_others_or_kept(registry):
    """A champion trained on another split of the data may have learnt some of this split's test photos: scored
    on them it looks better than it is. The gate compares both models on the test photos neither trained on, and
    keeps the champion, with the reason, when that cannot be done."""
    settings, client = registry
    on_fewer = tracking.HeadToHead({"macro_f1": 0.80}, {"macro_f1": 0.85}, "on 120 of 131 test photos")
    won = tracking.decide_promotion(settings, "2", {"macro_f1": 0.70}, lambda version: on_fewer)
    assert won.promoted and champion_of(client) == "2"  # 0.85 vs 0.80 on the same faces, not 0.70 vs 0.80
    assert won.reason.startswith("macro_f1 0.8500 vs champion v1 0.8000 on 120 of 131 test photos")
    # promotion.json keeps both bases apart: the whole test split's figure and the two compared on fewer photos
    assert (won.challenger_value, won.compared_challenger_value, won.champion_value) == (0.70, 0.85, 0.80)
    assert won.to_dict()["comparison_basis"] == "on 120 of 131 test photos"

    def not_comparable(version):
        raise tracking.NotComparableError("it does not record the photos it trained on")

    kept = tracking.decide_promotion(settings, "3", {"macro_f1": 0.99}, not_comparable)
    assert not kept.promoted and champion_of(client) == "2"
    assert kept.compared_challenger_value is None and kept.comparison_basis == ""  # nothing was compared
    assert kept.reason == ("not compared with champion v2: it does not record the photos it trained on. To serve "
                           "v3 anyway: `maskwatch models promote 3`")
    assert client.get_model_version(NAME, "3").tags["promotion"] == kept.reason
