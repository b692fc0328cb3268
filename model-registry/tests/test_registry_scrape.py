"""The model registry's /metrics: uploads counted by result (published, or the refusal's code), and the entries in
its quarantine."""

from __future__ import annotations

from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from miaas.testing import Pki
from model_registry.testing import GOOD, Upload, good

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(app: Flask, pki: Pki) -> Samples:
    resp = pki.client(app, "admin").get("/metrics")
    assert resp.status_code == 200, resp.json
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def uploads(samples: Samples) -> dict[str, float]:
    return {dict(labels)["result"]: v for (name, labels), v in samples.items()
            if name == "miaas_registry_uploads_total"}


def test_uploads_are_counted_by_result(app: Flask, pki: Pki, client: FlaskClient, upload: Upload) -> None:
    # given a registry that has taken no upload
    assert uploads(scrape(app, pki)) == {}
    # when two good zips are uploaded, a broken one, one that is not a zip, and one unsigned
    assert upload(GOOD).status_code == 201
    assert upload(GOOD, name="other").status_code == 201
    broken = upload(good({"app.py": None}))
    assert broken.status_code == 400
    not_a_zip = upload(b"this is not a zip")
    assert not_a_zip.status_code == 400
    unsigned = pki.client(app, None).post("/registry/upload-and-validate", data={"model_name": "x"})
    assert unsigned.status_code == 401
    # then each is counted under its result: published, or the code the caller was answered
    counted = uploads(scrape(app, pki))
    assert counted.pop("published") == 2
    assert counted.pop("unauthenticated") == 1
    refusals = {broken.json["error"]["code"], not_a_zip.json["error"]["code"]}
    assert set(counted) == refusals and sum(counted.values()) == 2, counted
    # and the quarantine is shown, empty
    assert scrape(app, pki)[("miaas_registry_quarantined_files", frozenset())] == 0
