"""Who may see what: merchant ids, Authorization headers and the per-topic visibility rules."""

from __future__ import annotations

import os
import typing

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import Config, ConfigError, TopicExportConfig, default_topic_rules, load_config, parse_config, shipped_defaults
from proxy.policy import VisibilityPolicy, merchant_id_for, token_from_authorization

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWN_TOKEN = "ddObEKSew8sIa9aZvJrdSs78K5zVIuCvYaXlu0Rs8KBjUlJQ5B3W4AeOGetYZ6U7"
KNOWN_ID = "YWKtz6tuqjA6hfYSSZ2Uf+9jmi0PrzlWNKQfoRv1oew="
ME, RIVAL, OTHER = "me=", "rival=", "other="

merchants = st.sampled_from([ME, RIVAL, OTHER])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10))


def test_merchant_id_is_base64_of_the_sha256_of_the_token() -> None:
    assert merchant_id_for(KNOWN_TOKEN) == KNOWN_ID


@pytest.mark.parametrize("header", [f"Token {KNOWN_TOKEN}", f"Bearer {KNOWN_TOKEN}", KNOWN_TOKEN,
                                    f"token  {KNOWN_TOKEN} ", f"  {KNOWN_TOKEN}"])
def test_authorization_accepts_token_bearer_and_bare_forms(header: str) -> None:
    assert token_from_authorization(header) == KNOWN_TOKEN


@pytest.mark.parametrize("header", [None, "", "   ", "Token", "Token   ", "Bearer", "Basic dXNlcjpwYXNz",
                                    "Token a b"])
def test_blank_or_foreign_authorization_has_no_token(header: str | None) -> None:
    assert token_from_authorization(header) is None


def test_default_rules_are_the_ones_config_yaml_documents() -> None:
    documented = load_config(os.path.join(REPO, "config.yaml"), required=True).export.topics
    assert documented == default_topic_rules()


def test_shipped_config_yaml_and_the_built_in_defaults_agree_on_every_key() -> None:
    documented = load_config(os.path.join(REPO, "config.yaml"), required=True)
    documented.source = Config().source
    assert documented == Config()


def test_optional_fields_written_with_the_union_operator_are_validated() -> None:
    with pytest.raises(ConfigError, match="export.topics.t.columns"):
        parse_config({"export": {"topics": {"t": {"columns": "not-a-list"}}}})
    with pytest.raises(ConfigError, match="kafka_url"):
        parse_config({"kafka_url": 42})


def test_config_without_export_topics_gets_the_default_rules() -> None:
    policy = VisibilityPolicy(parse_config({}).export.topics)
    assert policy.exportable_topics() == list(shipped_defaults()["export"]["topics"])
    assert policy.is_exportable("buyOffer")
    assert not policy.is_exportable("producer")


def test_configured_rules_replace_the_defaults() -> None:
    config = parse_config({"export": {"topics": {"orders": {"policy": "public"}}}})
    policy = VisibilityPolicy(config.export.topics)
    assert policy.exportable_topics() == ["orders"]
    assert not policy.is_exportable("buyOffer")


def test_default_rules_are_a_fresh_copy_each_time() -> None:
    rules = default_topic_rules()
    rules["addOffer"].drop_columns.clear()
    assert default_topic_rules()["addOffer"].drop_columns == ["signature"]


def test_topic_without_rules_shows_nothing() -> None:
    policy = VisibilityPolicy(default_topic_rules())
    sale = {"merchant_id": ME, "product_id": 1, "quantity": 3}
    assert not policy.is_exportable("producer")
    assert list(policy.visible_rows("producer", sale, ME)) == []
    assert policy.visible_message("producer", sale, ME) is None


def test_merchant_sees_its_own_sale_but_never_a_competitors() -> None:
    policy = VisibilityPolicy(default_topic_rules())
    mine = {"offer_id": 1, "merchant_id": ME, "price": 3.5}
    theirs = {"offer_id": 2, "merchant_id": RIVAL, "price": 3.5}
    assert list(policy.visible_rows("buyOffer", mine, ME)) == [mine]
    assert list(policy.visible_rows("buyOffer", theirs, ME)) == []


def test_statistics_without_an_owner_are_hidden_under_owner_policy() -> None:
    policy = VisibilityPolicy(default_topic_rules())
    assert list(policy.visible_rows("profit", {"profit": 1.0, "timestamp": "t"}, ME)) == []
    assert list(policy.visible_rows("profit", {"merchant_id": None, "profit": 1.0}, ME)) == []


def test_anonymous_reader_sees_only_public_and_unowned_rows() -> None:
    policy = VisibilityPolicy(default_topic_rules())
    assert not policy.is_visible("buyOffer", {"merchant_id": ME}, None)
    assert policy.is_visible("updates", {"note": "x"}, None)
    assert policy.is_visible("marketSituation", {"offers": []}, None)


def test_owner_or_unowned_shows_own_and_unowned_rows() -> None:
    policy = VisibilityPolicy(default_topic_rules())
    assert policy.is_visible("updates", {"merchant_id": ME, "x": 1}, ME)
    assert policy.is_visible("updates", {"x": 1}, ME)
    assert not policy.is_visible("updates", {"merchant_id": RIVAL, "x": 1}, ME)


def test_add_offer_signature_is_never_visible() -> None:
    policy = VisibilityPolicy(default_topic_rules())
    offer = {"offer_id": 1, "merchant_id": ME, "signature": "c2VjcmV0", "price": 2.0}
    rows = list(policy.visible_rows("addOffer", offer, ME))
    assert rows == [{"offer_id": 1, "merchant_id": ME, "price": 2.0}]
    assert "signature" not in policy.columns("addOffer")
    assert "signature" not in policy.visible_message("addOffer", offer, ME)


def test_market_situation_is_one_row_per_offer_with_the_snapshot_fields() -> None:
    policy = VisibilityPolicy(default_topic_rules())
    snapshot = {"timestamp": "2018-03-16T10:00:37.917Z", "trigger": "addOffer", "merchant_id": RIVAL,
                "product_id": 1, "offers": [{"offer_id": 2, "merchant_id": OTHER, "price": 22.75},
                                            {"offer_id": 3, "merchant_id": ME, "price": 20.0}]}
    rows = list(policy.visible_rows("marketSituation", snapshot, ME))
    assert rows == [
        {"timestamp": "2018-03-16T10:00:37.917Z", "triggering_merchant_id": RIVAL, "trigger": "addOffer",
         "offer_id": 2, "merchant_id": OTHER, "price": 22.75},
        {"timestamp": "2018-03-16T10:00:37.917Z", "triggering_merchant_id": RIVAL, "trigger": "addOffer",
         "offer_id": 3, "merchant_id": ME, "price": 20.0},
    ]
    # Unflattened (the all-topics export), the snapshot stays one message.
    assert policy.visible_message("marketSituation", snapshot, ME) == snapshot


def test_market_situation_without_offers_has_no_rows() -> None:
    policy = VisibilityPolicy(default_topic_rules())
    assert list(policy.visible_rows("marketSituation", {"timestamp": "t", "offers": []}, ME)) == []
    assert list(policy.visible_rows("marketSituation", {"timestamp": "t"}, ME)) == []


def test_dropped_columns_leave_the_declared_columns_and_flattened_items() -> None:
    rules = {"offers": TopicExportConfig(policy="public", columns=["a", "secret"], drop_columns=["secret"],
                                         flatten="items", parent_fields={"at": "timestamp"})}
    policy = VisibilityPolicy(rules)
    message = {"timestamp": "t", "secret": "s", "items": [{"a": 1, "secret": "s"}]}
    assert policy.columns("offers") == ["a"]
    assert list(policy.visible_rows("offers", message, ME)) == [{"at": "t", "a": 1}]
    assert policy.visible_message("offers", message, ME) == {"timestamp": "t", "items": [{"a": 1}]}


def test_topic_without_declared_columns_infers_them() -> None:
    assert VisibilityPolicy(default_topic_rules()).columns("updates") is None


def test_non_object_messages_are_never_visible() -> None:
    policy = VisibilityPolicy(default_topic_rules())
    for message in ([1, 2], "text", 3, None):
        assert list(policy.visible_rows("marketSituation", typing.cast(dict, message), ME)) == []


owned_message = st.fixed_dictionaries({"merchant_id": merchants, "signature": st.text(max_size=5)},
                                      optional={"price": scalars, "amount": scalars})
maybe_owned_message = st.fixed_dictionaries({}, optional={"merchant_id": merchants, "note": scalars})


@given(owned_message, merchants)
def test_owner_rows_always_belong_to_the_requester(message: dict, merchant: str) -> None:
    policy = VisibilityPolicy(default_topic_rules())
    for topic in ("buyOffer", "addOffer", "updateOffer", "profit", "inventory_level"):
        rows = list(policy.visible_rows(topic, message, merchant))
        assert len(rows) == (1 if message["merchant_id"] == merchant else 0)
        assert all(row["merchant_id"] == merchant for row in rows)
        if topic == "addOffer":
            assert all("signature" not in row for row in rows)


@given(maybe_owned_message, merchants)
def test_owner_or_unowned_rows_are_the_requesters_or_nobodys(message: dict, merchant: str) -> None:
    rows = list(VisibilityPolicy(default_topic_rules()).visible_rows("updates", message, merchant))
    expected_visible = message.get("merchant_id") in (None, merchant)
    assert rows == ([message] if expected_visible else [])


@given(st.lists(st.fixed_dictionaries({"offer_id": st.integers(), "merchant_id": merchants}), max_size=5),
       merchants, merchants)
def test_every_offer_of_every_snapshot_is_public(offers: list, trigger: str, merchant: str) -> None:
    snapshot = {"timestamp": "t", "trigger": "updateOffer", "merchant_id": trigger, "offers": offers}
    rows = list(VisibilityPolicy(default_topic_rules()).visible_rows("marketSituation", snapshot, merchant))
    assert [row["offer_id"] for row in rows] == [offer["offer_id"] for offer in offers]
    assert all(row["triggering_merchant_id"] == trigger and row["timestamp"] == "t" for row in rows)


def test_default_rules_yaml_lists_only_known_policies() -> None:
    # A typo in the defaults would slip past config validation, which sees only config files.
    config = parse_config({"export": {"topics": yaml.safe_load(yaml.safe_dump(shipped_defaults()["export"]["topics"]))}})
    assert set(config.export.topics) == set(shipped_defaults()["export"]["topics"])


any_message = st.fixed_dictionaries({}, optional={"merchant_id": st.one_of(merchants, scalars), "signature": st.text(max_size=5),
                                                  "price": scalars, "offers": st.lists(st.one_of(
                                                      scalars, st.fixed_dictionaries({}, optional={
                                                          "merchant_id": merchants, "signature": st.text(max_size=5),
                                                          "price": scalars})), max_size=3)})


@given(any_message, st.one_of(st.none(), merchants))
def test_the_exports_row_and_view_functions_never_show_a_competitors_private_data(message: dict,
                                                                                 merchant: str | None) -> None:
    """The functions built once per export say what the policies say, per record (oracle: the rules as written)."""
    rules = default_topic_rules()
    policy = VisibilityPolicy(rules)
    for topic in [*rules, "producer"]:
        rule = rules.get(topic)
        owner = message.get("merchant_id")
        visible = rule is not None and (rule.policy == "public"
                                        or (rule.policy == "owner_or_unowned" and owner is None)
                                        or (merchant is not None and owner == merchant))
        rows = list(policy.rows_function(topic, merchant)(dict(message)))
        view = policy.view_function(topic, merchant)(dict(message))
        assert (view is not None) == visible
        if not visible:
            assert rows == []
            continue
        for shown in (view, *rows):
            assert not set(rule.drop_columns) & set(shown)
        if rule.policy != "public":
            assert all(row.get("merchant_id") in (None, merchant) for row in rows)
        if rule.flatten:
            offers = message.get("offers")
            assert len(rows) == (sum(isinstance(offer, dict) for offer in offers) if isinstance(offers, list) else 0)
            assert all(not set(rule.drop_columns) & set(offer) for offer in view.get("offers") or []
                       if isinstance(offer, dict))
        else:
            assert rows == [view]


def test_an_anonymous_reader_gets_no_rows_of_an_owner_topic_even_of_unowned_messages() -> None:
    policy = VisibilityPolicy(default_topic_rules())
    assert list(policy.rows_function("buyOffer", None)({"price": 1.0})) == []
    assert list(policy.rows_function("buyOffer", None)({"merchant_id": None, "price": 1.0})) == []
    assert policy.view_function("profit", None)({"merchant_id": None}) is None


def test_an_unknown_policy_shows_nothing() -> None:
    policy = VisibilityPolicy({"t": TopicExportConfig(policy="owners")})
    assert list(policy.rows_function("t", ME)({"merchant_id": ME})) == []
    assert policy.view_function("t", ME)({"merchant_id": ME}) is None
