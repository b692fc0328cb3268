"""Every POST needs the session's CSRF token; without it nothing reaches another service."""

from __future__ import annotations

import io
from typing import Any

import pytest

POSTS = [
    ("/models/m-iris/deploy", {"version": "1"}),
    ("/deployments/d1/stop", {}),
    ("/upload", {"model_name": "iris"}),
    ("/logout", {}),
]


@pytest.mark.parametrize(("path", "form"), POSTS)
@pytest.mark.parametrize("token", [None, "forged-token-from-another-site"])
def test_a_post_without_the_right_token_is_refused_and_sends_nothing(
    admin: Any, registry: Any, controller: Any, path: str, form: dict[str, Any], token: str | None
) -> None:
    registry.add_model("iris")
    controller.add_deployment("d1", "running", url="http://agent-1:7001")
    registry.received.clear()
    data = dict(form)
    if path == "/upload":
        data["file"] = (io.BytesIO(b"PK\x05\x06" + bytes(18)), "iris.zip")
    if token is not None:
        data["csrf_token"] = token
    answer = admin.client.post(path, data=data)
    assert answer.status_code == 400
    assert "CSRF token missing or invalid" in answer.text
    assert registry.received == []
    assert controller.received == []
    assert admin.get("/models").status_code == 200  # still logged in: the forged logout did nothing


def test_login_needs_the_token_too(browser: Any) -> None:
    answer = browser.client.post("/login", data={"username": "admin", "password": browser.admin_password})
    assert answer.status_code == 400
    assert browser.get("/models").status_code == 302


def test_a_token_from_before_login_is_not_valid_after_it(browser: Any, controller: Any) -> None:
    before = browser.csrf("/login")
    browser.login()
    answer = browser.client.post("/deployments/d1/stop", data={"csrf_token": before})
    assert answer.status_code == 400
    assert controller.received == []
