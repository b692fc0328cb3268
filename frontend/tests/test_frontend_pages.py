"""Models, deploy, deployments and agents pages, against fakes of the registry and the controller."""

from __future__ import annotations

import re
from typing import Any

from miaas.client import ServiceClient
from miaas.testing import Pki


def test_the_models_page_lists_the_registry_models(admin: Any, registry: Any) -> None:
    registry.add_model("iris", versions=3)
    registry.add_model("mnist")
    page = admin.get("/models")
    assert page.status_code == 200
    assert '<a href="/models/m-iris">iris</a>' in page.text
    assert "<code>m-mnist</code>" in page.text
    assert "v3" in page.text
    [call] = registry.received
    assert (call.path, call.user) == ("/registry/models", "admin")
    assert (call.signer.role, call.signer.subject) == ("frontend", "frontend")  # signed by the portal itself


def test_the_model_page_shows_each_version_with_a_deploy_button(admin: Any, registry: Any) -> None:
    registry.add_model("iris", versions=2, description="Iris classifier")
    page = admin.get("/models/m-iris")
    assert page.status_code == 200
    assert "Iris classifier v1" in page.text and "Iris classifier v2" in page.text
    assert 'aria-label="Deploy iris version 1"' in page.text
    assert 'aria-label="Deploy iris version 2"' in page.text
    forms = re.findall(r'<form method="post" action="([^"]+)".*?</form>', page.text, re.S)
    assert forms and all('name="csrf_token"' in f for f in re.findall(r"<form.*?</form>", page.text, re.S))
    assert forms.count("/models/m-iris/deploy") == 2


def test_an_unknown_model_shows_the_registry_message(admin: Any) -> None:
    page = admin.get("/models/m-nothing")
    assert page.status_code == 404
    assert "model &#39;m-nothing&#39; does not exist" in page.text


def test_deploy_posts_the_version_to_the_controller_and_goes_to_deployments(admin: Any, registry: Any,
                                                                           controller: Any) -> None:
    registry.add_model("iris", versions=2)
    answer = admin.post("/models/m-iris/deploy", {"version": "2"}, page="/models/m-iris")
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/deployments/d1"
    [call] = controller.received
    assert (call.path, call.json, call.user) == ("/controller/deploy", {"model_id": "m-iris", "version": 2}, "admin")
    page = admin.get("/deployments/d1").text
    assert "Deploying iris version 2 (deployment d1)." in page


def test_a_refused_deploy_is_shown_on_the_model_page(admin: Any, registry: Any, controller: Any) -> None:
    registry.add_model("iris")
    answer = admin.post("/models/m-iris/deploy", {"version": "x"}, page="/models/m-iris")
    assert answer.headers["Location"] == "/models/m-iris"
    assert "Choose a version to deploy." in admin.get("/models/m-iris").text
    assert controller.received == []


def test_deployments_show_links_reasons_and_stop_buttons(admin: Any, controller: Any) -> None:
    controller.add_deployment("d-run", "running", agent_id="agent-1", url="http://agent-1:7001")
    controller.add_deployment("d-bad", "failed", reason="pip install failed")
    controller.add_deployment("d-old", "stopped", url="http://agent-1:7002")
    controller.add_deployment("d-evil", "running", url="javascript:alert(1)")
    page = admin.get("/deployments")
    assert page.status_code == 200
    html = page.text
    assert '<meta http-equiv="refresh" content="5">' in html
    assert '<a href="http://agent-1:7001" rel="noopener noreferrer">http://agent-1:7001</a>' in html
    assert 'href="http://agent-1:7002"' not in html  # a stopped deployment's URL is no link
    assert 'href="javascript:' not in html
    assert "pip install failed" in html
    assert 'action="/deployments/d-run/stop"' in html
    assert 'action="/deployments/d-evil/stop"' in html
    assert 'action="/deployments/d-bad/stop"' not in html
    assert 'action="/deployments/d-old/stop"' not in html


def test_stop_posts_the_deployment_to_the_controller(admin: Any, controller: Any) -> None:
    controller.add_deployment("d-run", "running", url="http://agent-1:7001")
    answer = admin.post("/deployments/d-run/stop", page="/deployments")
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/deployments"
    stops = [c for c in controller.received if c.path == "/controller/stop"]
    assert [c.json for c in stops] == [{"deployment_id": "d-run"}]
    page = admin.get("/deployments").text
    assert "Stopping deployment d-run of iris version 1." in page
    assert "status-stopping" in page


def test_the_agents_page_shows_load_and_deployments(admin: Any, controller: Any) -> None:
    controller.add_agent("agent-1", cpu=42.4, mem=61.0, deployments=2)
    page = admin.get("/agents")
    assert page.status_code == 200
    assert "<code>agent-1</code>" in page.text
    for cell in ("<span>42%</span>", "<span>61%</span>", "<td>48.0</td>", "<td>2</td>", "4 CPUs · 8.0 GiB"):
        assert cell in page.text


def test_pages_carry_security_headers(admin: Any) -> None:
    page = admin.get("/models")
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Cache-Control"] == "no-store"


def test_the_portal_finds_the_services_through_the_service_registry(
    make_portal: Any, serve: Any, registry: Any, controller: Any, pki: Pki, settings: Any
) -> None:
    from service_registry.app import create_app as create_service_registry
    from service_registry.settings import ServiceRegistrySettings

    phone_book = serve(create_service_registry(ServiceRegistrySettings(**pki.settings("service-registry")))).url
    for name, fake in (("model-registry", registry), ("controller", controller)):
        url = serve(fake.app()).url
        service = ServiceClient(phone_book, pki.credential(name), timeout=5)  # each registers itself
        assert service.post("/register", json={"name": name, "url": url})["instance_id"]
    registry.add_model("iris")
    controller.add_agent("agent-1", cpu=10, mem=20)
    client = make_portal(None, service_registry_url=phone_book).test_client()
    token = client.get("/login").text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    client.post("/login", data={"username": "admin", "csrf_token": token,
                                "password": settings.admin_password.get_secret_value()})
    assert '<a href="/models/m-iris">iris</a>' in client.get("/models").text
    assert "<code>agent-1</code>" in client.get("/agents").text
