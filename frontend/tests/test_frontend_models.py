"""Models: search and paging through the registry, aliases, deleting a version, deploying with a priority."""

from __future__ import annotations

import re
from typing import Any

from flask import Flask

from conftest import T0
from frontend.store import Role


def rows(html: str) -> list[str]:
    return re.findall(r'<td><a href="/models/(m-[^"]+)">', html)


def test_the_models_page_asks_the_registry_for_one_page(admin: Any, registry: Any) -> None:
    # given 120 models
    for i in range(120):
        registry.add_model(f"model-{i:03d}")
    # when the first page is shown, then 50 models are listed with a link to the next page
    page = admin.get("/models").text
    assert len(rows(page)) == 50 and rows(page)[0] == "m-model-000"
    assert "120 models, 1–50 shown." in page
    assert 'rel="next" href="?page=2"' in page and 'rel="prev"' not in page
    [call] = registry.received
    assert call.path == "/registry/models"
    # when the third page is shown, then the last 20 are
    registry.received.clear()
    last = admin.get("/models?page=3").text
    assert rows(last) == [f"m-model-{i:03d}" for i in range(100, 120)]
    assert 'rel="prev" href="?page=2"' in last and 'rel="next"' not in last


def test_search_goes_to_the_registry_and_keeps_the_query_in_the_paging(admin: Any, registry: Any) -> None:
    for i in range(60):
        registry.add_model(f"iris-{i:02d}")
    registry.add_model("mnist")
    page = admin.get("/models?q=IRIS").text
    assert "60 models matching “IRIS”, 1–50 shown." in page
    assert "m-mnist" not in page
    assert 'href="?q=IRIS&amp;page=2"' in page
    assert 'value="IRIS"' in page


def test_an_empty_search_says_so(admin: Any, registry: Any) -> None:
    registry.add_model("iris")
    assert "No model matches “resnet”." in admin.get("/models?q=resnet").text


def test_a_registry_that_does_not_page_is_paged_by_the_portal(admin: Any, registry: Any) -> None:
    registry.pages = False
    for i in range(55):
        registry.add_model(f"m{i:02d}")
    page = admin.get("/models?page=2").text
    assert rows(page) == [f"m-m{i:02d}" for i in range(50, 55)]
    assert "55 models, 51–55 shown." in page


def test_deploy_sends_the_chosen_priority(admin: Any, registry: Any, controller: Any) -> None:
    registry.add_model("iris")
    page = admin.get("/models/m-iris").text
    assert '<option value="high">high</option>' in page and '<option value="normal" selected>' in page
    answer = admin.post("/models/m-iris/deploy", {"version": "1", "priority": "high"}, page="/models/m-iris")
    assert answer.status_code == 303
    assert controller.received[-1].json == {"model_id": "m-iris", "version": 1, "priority": "high"}


def test_aliases_are_set_deployed_and_removed(admin: Any, registry: Any, controller: Any) -> None:
    registry.add_model("iris", versions=2)
    # when an alias is set, then the registry is asked and the page shows it
    answer = admin.post("/models/m-iris/aliases", {"alias": "production", "version": "1"}, page="/models/m-iris")
    assert answer.status_code == 303
    assert registry.aliases == {"m-iris": {"production": 1}}
    page = admin.get("/models/m-iris").text
    assert "production now points at version 1." in page
    assert '<span class="badge badge-alias">production</span> → v1' in page
    # when the alias is deployed, then the controller gets the alias, not a number
    admin.post("/models/m-iris/deploy", {"alias": "production", "priority": "low"}, page="/models/m-iris")
    assert controller.received[-1].json == {"model_id": "m-iris", "alias": "production", "priority": "low"}
    # when it is removed, then it is gone
    admin.post("/models/m-iris/aliases/production/delete", page="/models/m-iris")
    assert registry.aliases == {"m-iris": {}}


def test_a_bad_alias_is_refused_before_the_registry(admin: Any, registry: Any) -> None:
    registry.add_model("iris")
    registry.received.clear()
    admin.post("/models/m-iris/aliases", {"alias": "Prod uction", "version": "1"}, page="/models/m-iris")
    assert "An alias is a lower-case name" in admin.get("/models/m-iris").text
    assert not [c for c in registry.received if "/aliases/" in c.path]


def test_deleting_an_aliased_version_shows_the_registry_refusal(admin: Any, registry: Any) -> None:
    registry.add_model("iris", versions=2)
    registry.aliases["m-iris"] = {"production": 2}
    admin.post("/models/m-iris/versions/2/delete", page="/models/m-iris")
    assert "version 2 has aliases" in admin.get("/models/m-iris").text
    admin.post("/models/m-iris/versions/1/delete", page="/models/m-iris")
    page = admin.get("/models/m-iris").text
    assert "Version 1 is deleted." in page
    assert [v.version for v in registry.versions["m-iris"]] == [2]


def test_a_viewer_sees_no_buttons_and_cannot_change_anything(portal: Flask, browser: Any, registry: Any,
                                                             controller: Any) -> None:
    registry.add_model("iris")
    portal.extensions["frontend.store"].create_user("vera", "viewer password 123", Role.VIEWER, T0)
    browser.login("vera", "viewer password 123")
    page = browser.get("/models/m-iris").text
    for absent in ("Deploy</button>", "Set the alias", "Delete</button>", ">Edit</a>", "Upload a new version"):
        assert absent not in page
    assert ">Files</a>" in page
    for path, form in (("/models/m-iris/aliases", {"alias": "prod", "version": "1"}),
                       ("/models/m-iris/versions/1/delete", {}), ("/models/m-iris/deploy", {"version": "1"})):
        assert browser.post(path, form, page="/models").status_code == 403
    assert controller.received == []
    assert not [c for c in registry.received if "/aliases/" in c.path or "/versions/" in c.path]
