"""The files of a version: the tree, the viewer, and the editor that saves a new version through the registry."""

from __future__ import annotations

import re
from typing import Any

from flask import Flask

from conftest import PACKAGE_FILES, T0
from frontend.files import tree_of
from frontend.store import Role
from miaas.schemas import ManifestFile


def manifest(*paths: str) -> list[ManifestFile]:
    return [ManifestFile(path=p, sha256="0" * 64, size_bytes=1) for p in paths]


def test_the_tree_nests_folders_and_sorts_names() -> None:
    root = tree_of(manifest("z.py", "data/b.txt", "a.py", "data/deep/c.bin", "data/a.txt"))
    assert [f.path for f in root.files] == ["a.py", "z.py"]
    [data] = root.folders
    assert (data.name, [f.path for f in data.files]) == ("data", ["data/a.txt", "data/b.txt"])
    assert [(d.name, d.path) for d in data.folders] == [("deep", "data/deep")]


def test_the_files_page_shows_the_tree_of_the_version(admin: Any, registry: Any) -> None:
    registry.add_model("iris")
    page = admin.get("/models/m-iris/versions/1/files")
    assert page.status_code == 200
    for path in ("app.py", "meta.json", "model.pth", "requirements.txt", "data/labels.txt"):
        assert f'href="/models/m-iris/versions/1/files/{path}"' in page.text
    assert "<summary>data/</summary>" in page.text


def test_a_text_file_is_shown_highlighted_with_line_numbers(admin: Any, registry: Any) -> None:
    registry.add_model("iris")
    page = admin.get("/models/m-iris/versions/1/files/app.py")
    assert page.status_code == 200
    assert '<span class="kn">import</span>' in page.text
    assert 'href="#L-3"' in page.text
    assert 'aria-current="page">app.py</a>' in page.text
    assert 'href="/models/m-iris/versions/1/edit?file=app.py"' in page.text


def test_a_binary_file_is_not_shown(admin: Any, registry: Any) -> None:
    registry.add_model("iris")
    page = admin.get("/models/m-iris/versions/1/files/model.pth")
    assert "A binary file (16 bytes): not shown." in page.text
    assert "binary weights" not in page.text


def test_a_file_the_version_does_not_have_is_the_registry_404(admin: Any, registry: Any) -> None:
    registry.add_model("iris")
    page = admin.get("/models/m-iris/versions/1/files/nothing.py")
    assert page.status_code == 404
    assert "no file &#39;nothing.py&#39;" in page.text


def test_the_editor_offers_the_four_package_files(admin: Any, registry: Any) -> None:
    registry.add_model("iris")
    page = admin.get("/models/m-iris/versions/1/edit").text
    paths = re.findall(r'name="path-\d" value="([^"]+)"', page)
    assert paths == ["meta.json", "app.py", "requirements.txt", "webapp.py"]
    assert "webapp.py</code> <span class=\"badge\">new</span>" in page
    assert "print(&#39;serving on&#39;, os.environ.get(&#39;PORT&#39;))" in page
    other = admin.get("/models/m-iris/versions/1/edit?file=data/labels.txt").text
    assert re.findall(r'name="path-\d" value="([^"]+)"', other)[-1] == "data/labels.txt"


def edit_form(admin: Any, changes: dict[str, str]) -> dict[str, str]:
    """The editor's form as the browser would send it, with some files changed (text areas send CRLF)."""
    page = admin.get("/models/m-iris/versions/1/edit").text
    form: dict[str, str] = {}
    for i, path in re.findall(r'name="path-(\d)" value="([^"]+)"', page):
        form[f"path-{i}"] = path
        form[f"sha-{i}"] = re.search(rf'name="sha-{i}" value="([^"]*)"', page).group(1)  # type: ignore[union-attr]
        original = PACKAGE_FILES.get(path, b"").decode()
        form[f"text-{i}"] = changes.get(path, original).replace("\n", "\r\n")
    return form


def test_saving_sends_only_the_changed_files_and_makes_a_new_version(admin: Any, registry: Any) -> None:
    registry.add_model("iris")
    form = edit_form(admin, {"requirements.txt": "flask>=3.0\nnumpy\n"})
    answer = admin.post("/models/m-iris/versions/1/edit", form, page="/models/m-iris/versions/1/edit")
    assert answer.status_code == 303 and answer.headers["Location"] == "/models/m-iris"
    [edit] = [c for c in registry.received if c.path.endswith("/edit")]
    assert edit.json == {"files": {"requirements.txt": "flask>=3.0\nnumpy\n"}}  # CRLF back to LF, nothing else
    assert edit.user == "admin"
    page = admin.get("/models/m-iris").text
    assert "Saved requirements.txt as version 2 of iris; version 1 is unchanged." in page
    assert registry.files[("m-iris", 1)]["requirements.txt"] == PACKAGE_FILES["requirements.txt"]
    assert registry.files[("m-iris", 2)]["requirements.txt"] == b"flask>=3.0\nnumpy\n"


def test_a_new_file_is_added_only_when_it_has_text(admin: Any, registry: Any) -> None:
    registry.add_model("iris")
    form = edit_form(admin, {"webapp.py": "print('web')\n"})
    admin.post("/models/m-iris/versions/1/edit", form, page="/models/m-iris/versions/1/edit")
    [edit] = [c for c in registry.received if c.path.endswith("/edit")]
    assert edit.json == {"files": {"webapp.py": "print('web')\n"}}


def test_a_refusal_is_shown_next_to_its_file_and_the_text_is_kept(admin: Any, registry: Any) -> None:
    registry.add_model("iris")
    form = edit_form(admin, {"app.py": "def broken(:\n"})
    answer = admin.post("/models/m-iris/versions/1/edit", form, page="/models/m-iris/versions/1/edit")
    assert answer.status_code == 400
    html = answer.text
    assert "the package is not valid. Version 1 is unchanged." in html
    problems = re.search(r'<ul class="field-problems" id="problems-1" role="alert">(.*?)</ul>', html, re.S)
    assert problems and "does not compile: invalid syntax (line 1)" in problems.group(1)
    assert 'aria-invalid="true" aria-describedby="problems-1"' in html
    assert "def broken(:" in html
    assert [v.version for v in registry.versions["m-iris"]] == [1]


def test_nothing_changed_makes_no_version(admin: Any, registry: Any) -> None:
    registry.add_model("iris")
    answer = admin.post("/models/m-iris/versions/1/edit", edit_form(admin, {}), page="/models/m-iris/versions/1/edit")
    assert answer.status_code == 200
    assert "Nothing changed: no new version was made." in answer.text
    assert not [c for c in registry.received if c.path.endswith("/edit")]


def test_a_viewer_may_read_files_but_not_edit(portal: Flask, browser: Any, registry: Any) -> None:
    registry.add_model("iris")
    portal.extensions["frontend.store"].create_user("vera", "viewer password 123", Role.VIEWER, T0)
    browser.login("vera", "viewer password 123")
    assert browser.get("/models/m-iris/versions/1/files/app.py").status_code == 200
    assert "Edit" not in browser.get("/models/m-iris/versions/1/files/app.py").text.split("<main", 1)[1]
    assert browser.get("/models/m-iris/versions/1/edit").status_code == 403
    refused = browser.post("/models/m-iris/versions/1/edit", {"path-0": "app.py", "sha-0": "", "text-0": "x"},
                           page="/models")
    assert refused.status_code == 403
    assert not [c for c in registry.received if c.path.endswith("/edit")]


def test_the_editor_refuses_a_form_without_its_token(admin: Any, registry: Any) -> None:
    registry.add_model("iris")
    answer = admin.client.post("/models/m-iris/versions/1/edit", data={"path-0": "app.py", "text-0": "x = 1\n"})
    assert answer.status_code == 400 and "CSRF token missing or invalid" in answer.text
    assert not [c for c in registry.received if c.path.endswith("/edit")]
