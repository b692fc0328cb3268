"""GET /registry/models pages and searches: `q` (part of a name or id), `offset`, `limit`, and `total`."""
# mypy: disable-error-code="index"
# (werkzeug types TestResponse.json as Any | None; these tests index it freely)

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient

from model_registry.testing import GOOD, Upload


def names(answer: Any) -> list[str]:
    return [m["name"] for m in answer["models"]]


def test_without_a_query_every_model_is_listed_as_before(upload: Upload, client: FlaskClient) -> None:
    for name in ("b-model", "a-model"):
        assert upload(GOOD, name=name).status_code == 201
    answer = client.get("/registry/models").json
    assert answer is not None and names(answer) == ["a-model", "b-model"]
    assert "total" not in answer  # the old contract, unchanged


def test_limit_and_offset_page_through_the_models_by_name(upload: Upload, client: FlaskClient) -> None:
    for name in ("e", "a", "d", "c", "b"):
        upload(GOOD, name=name)
    first = client.get("/registry/models", query_string={"limit": 2}).json
    second = client.get("/registry/models", query_string={"limit": 2, "offset": 2}).json
    last = client.get("/registry/models", query_string={"limit": 2, "offset": 4}).json
    assert (names(first), names(second), names(last)) == (["a", "b"], ["c", "d"], ["e"])
    assert first["total"] == second["total"] == last["total"] == 5


def test_q_matches_part_of_a_name_or_an_id_in_any_case(upload: Upload, client: FlaskClient) -> None:
    iris = upload(GOOD, name="iris-small").json["model"]
    upload(GOOD, name="iris-large")
    upload(GOOD, name="mnist")
    assert names(client.get("/registry/models", query_string={"q": "IRIS"}).json) == ["iris-large", "iris-small"]
    by_id = client.get("/registry/models", query_string={"q": iris["model_id"][2:10]}).json
    assert names(by_id) == ["iris-small"] and by_id["total"] == 1
    none = client.get("/registry/models", query_string={"q": "resnet", "limit": 10}).json
    assert none == {"models": [], "total": 0}


def test_like_wildcards_in_q_are_plain_characters(upload: Upload, client: FlaskClient) -> None:
    upload(GOOD, name="a_b")
    upload(GOOD, name="axb")
    assert names(client.get("/registry/models", query_string={"q": "a_b"}).json) == ["a_b"]
    assert client.get("/registry/models", query_string={"q": "%"}).json["total"] == 0


def test_a_page_lists_the_versions_of_its_models(upload: Upload, client: FlaskClient) -> None:
    upload(GOOD, name="a")
    upload(GOOD, name="a")
    upload(GOOD, name="b")
    [a] = client.get("/registry/models", query_string={"limit": 1}).json["models"]
    assert (a["name"], a["versions"], a["latest_version"]) == ("a", [1, 2], 2)


def test_bad_paging_parameters_are_a_400(client: FlaskClient) -> None:
    for query in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"q": "x" * 129}, {"limit": "many"}):
        answer = client.get("/registry/models", query_string=query)
        assert answer.status_code == 400, query
        assert answer.json["error"]["code"] == "validation_error"
