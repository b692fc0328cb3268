"""When another service is missing, down or confused, the page still renders with a sentence, not a traceback."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask, jsonify
from werkzeug.wrappers import Response

from miaas.serve import Server

PAGES = {
    "/models": "model registry",
    "/models/m-iris": "model registry",
    "/deployments": "controller",
    "/agents": "controller",
}


def _csrf(html: str) -> str:
    return html.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]


def _browse(app: Flask, settings: Any) -> Any:
    """A browser logged in as the admin."""
    client = app.test_client()
    password = settings.admin_password.get_secret_value()
    token = _csrf(client.get("/login").text)
    client.post("/login", data={"username": "admin", "password": password, "csrf_token": token})
    return client


def _assert_friendly(page: Any, service: str) -> None:
    assert page.status_code == 502
    assert f"The {service} cannot be reached right now. Try again in a moment." in page.text
    assert "Traceback" not in page.text
    assert "127.0.0.1" not in page.text  # internal addresses stay in the log
    assert 'href="/models"' in page.text  # the layout is there, with its navigation


@pytest.mark.parametrize(("path", "service"), PAGES.items())
def test_a_backend_that_does_not_answer_gives_a_friendly_page(
    make_portal: Callable[..., Flask], dead_url: str, settings: Any, path: str, service: str
) -> None:
    client = _browse(make_portal(lambda name: dead_url), settings)
    _assert_friendly(client.get(path), service)


@pytest.mark.parametrize(("path", "service"), PAGES.items())
def test_without_a_service_registry_pages_still_render(
    make_portal: Callable[..., Flask], settings: Any, path: str, service: str
) -> None:
    client = _browse(make_portal(None), settings)
    _assert_friendly(client.get(path), service)


def test_a_service_registry_that_does_not_answer_gives_a_friendly_page(
    make_portal: Callable[..., Flask], dead_url: str, settings: Any
) -> None:
    client = _browse(make_portal(None, service_registry_url=dead_url), settings)
    _assert_friendly(client.get("/models"), "model registry")


def test_a_backend_answering_nonsense_or_failing_gives_a_friendly_page(
    make_portal: Callable[..., Flask], serve: Callable[[Flask], Server], settings: Any
) -> None:
    odd = Flask("odd")

    @odd.get("/registry/models")
    def models() -> Response:
        return jsonify({"models": [{"name": 3}]})

    @odd.get("/controller/deployments")
    def deployments() -> tuple[str, int]:
        return "<html>proxy error</html>", 500

    url = serve(odd).url
    client = _browse(make_portal(lambda name: url), settings)
    page = client.get("/models")
    assert page.status_code == 502
    assert "The model registry gave an answer the portal does not understand." in page.text
    _assert_friendly(client.get("/deployments"), "controller")


def test_a_failed_deploy_or_upload_is_a_message_not_a_crash(
    make_portal: Callable[..., Flask], dead_url: str, settings: Any
) -> None:
    client = _browse(make_portal(lambda name: dead_url), settings)
    token = _csrf(client.get("/upload").text)
    upload = client.post("/upload", data={"model_name": "iris", "csrf_token": token,
                                          "file": (io.BytesIO(b"PK\x05\x06" + bytes(18)), "iris.zip")})
    assert upload.status_code == 502
    assert "The model registry cannot be reached right now." in upload.text
    assert 'value="iris"' in upload.text
    deploy = client.post("/models/m-iris/deploy", data={"version": "1", "csrf_token": token})
    assert deploy.headers["Location"] == "/models/m-iris"
    page = client.get("/models/m-iris").text
    assert "The controller cannot be reached right now." in page
    assert "Traceback" not in page
