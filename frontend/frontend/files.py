"""The files of a version: a tree, a viewer with highlighting, and the editor that saves a new version."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, abort, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from frontend.backends import Backends, FileContent
from frontend.highlight import highlight
from frontend.models import by_file, check_id
from frontend.notices import notify, notify_failure
from frontend.security import require_change_rights, username
from miaas.errors import MiaasError
from miaas.schemas import ManifestFile, VersionFiles

EDITABLE = ("meta.json", "app.py", "requirements.txt", "webapp.py")
MAX_EDIT_CHARS = 1 << 20  # the registry's limit per file
MAX_PATH = 512
Page = str | tuple[str, int]


@dataclass
class Folder:
    """A folder of the tree: its sub-folders and files, each sorted by name."""

    name: str
    path: str
    folders: list[Folder] = field(default_factory=list)
    files: list[ManifestFile] = field(default_factory=list)


def tree_of(files: list[ManifestFile]) -> Folder:
    """The manifest's flat paths as a tree of folders."""
    root = Folder("", "")
    index: dict[str, Folder] = {"": root}
    for f in sorted(files, key=lambda f: f.path):
        parts = f.path.split("/")
        parent = root
        for depth in range(1, len(parts)):
            key = "/".join(parts[:depth])
            if key not in index:
                index[key] = Folder(parts[depth - 1], key)
                parent.folders.append(index[key])
            parent = index[key]
        parent.files.append(f)
    return root


@dataclass
class EditedFile:
    """One file on the edit page: what it holds, and what the registry said about it."""

    path: str
    text: str
    sha256: str  # of the text as stored; "" for a file the version does not have yet
    problems: list[str] = field(default_factory=list)

    @property
    def exists(self) -> bool:
        return bool(self.sha256)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _check_path(path: str) -> str:
    if not path or len(path) > MAX_PATH or path.startswith("/") or "\\" in path or "\x00" in path:
        abort(404)
    return path


def build_files(backends: Backends) -> Blueprint:
    bp = Blueprint("files", __name__)

    def listing(model_id: str, version: int) -> tuple[VersionFiles | None, int]:
        try:
            return backends.list_files(username(), model_id, version), 200
        except MiaasError as exc:
            return None, notify_failure(exc)

    @bp.get("/models/<model_id>/versions/<int:version>/files")
    def files(model_id: str, version: int) -> Page:
        """The tree of a version's files."""
        check_id(model_id)
        found, status = listing(model_id, version)
        return render_template("files.html", model_id=model_id, version=version, found=found,
                               tree=tree_of(found.files) if found else None, current=None, content=None,
                               highlighted=None, editable=EDITABLE), status

    @bp.get("/models/<model_id>/versions/<int:version>/files/<path:path>")
    def file(model_id: str, version: int, path: str) -> Page:
        """One file, highlighted, next to the tree."""
        check_id(model_id)
        _check_path(path)
        found, status = listing(model_id, version)
        content: FileContent | None = None
        if found is not None:
            try:
                content = backends.read_file(username(), model_id, version, path)
            except MiaasError as exc:
                status = notify_failure(exc)
        highlighted = highlight(path, content.text) if content is not None and content.text is not None else None
        return render_template("files.html", model_id=model_id, version=version, found=found,
                               tree=tree_of(found.files) if found else None, current=path, content=content,
                               highlighted=highlighted, editable=EDITABLE), status

    def load(model_id: str, version: int, extra: str | None) -> list[EditedFile]:
        """The files the editor offers: the four of a package (present or not) and `extra` if asked for."""
        listed = backends.list_files(username(), model_id, version)
        present = {f.path for f in listed.files}
        wanted = list(EDITABLE)
        if extra and extra not in wanted and extra in present:
            wanted.append(extra)
        out = []
        for path in wanted:
            if path in present:
                content = backends.read_file(username(), model_id, version, path)
                if content.text is None or content.truncated:
                    continue  # not text, or too large to edit here
                out.append(EditedFile(path, content.text, _sha(content.text)))
            else:
                out.append(EditedFile(path, "", ""))
        return out

    @bp.get("/models/<model_id>/versions/<int:version>/edit")
    def edit_form(model_id: str, version: int) -> Page:
        """The text files of a version in editors; saving makes a new version."""
        check_id(model_id)
        require_change_rights()
        extra = request.args.get("file")
        try:
            edited = load(model_id, version, _check_path(extra) if extra else None)
        except MiaasError as exc:
            status = notify_failure(exc)
            return render_template("edit.html", model_id=model_id, version=version, files=[], general=[]), status
        return render_template("edit.html", model_id=model_id, version=version, files=edited, general=[])

    @bp.post("/models/<model_id>/versions/<int:version>/edit")
    def edit(model_id: str, version: int) -> Page | Response:
        """Send the changed files to the registry, which validates them and stores a new version (the old one
        stays as it was); its refusals are shown next to the files they concern."""
        check_id(model_id)
        user = require_change_rights()
        edited: list[EditedFile] = []
        for i in range(len(EDITABLE) + 1):
            path = request.form.get(f"path-{i}")
            if path is None:
                break
            text = request.form.get(f"text-{i}", "").replace("\r\n", "\n")
            edited.append(EditedFile(_check_path(path), text, request.form.get(f"sha-{i}", "")))
        changes = {f.path: f.text for f in edited if (f.exists and _sha(f.text) != f.sha256)
                   or (not f.exists and f.text.strip())}
        too_long = [f for f in edited if len(f.text) > MAX_EDIT_CHARS]
        if too_long:
            for f in too_long:
                f.problems.append(f"longer than {MAX_EDIT_CHARS:,} characters")
            return render_template("edit.html", model_id=model_id, version=version, files=edited, general=[]), 400
        if not changes:
            notify("info", "Nothing changed: no new version was made.")
            return render_template("edit.html", model_id=model_id, version=version, files=edited, general=[])
        try:
            result = backends.edit(user.username, model_id, version, changes)
        except MiaasError as exc:
            general = _attach(edited, exc.details)
            notify("error", f"{exc.message.rstrip('.')}. Version {version} is unchanged.")
            status = exc.status if 400 <= exc.status < 600 else 502
            return render_template("edit.html", model_id=model_id, version=version, files=edited,
                                   general=general), status
        m = result.model
        notify("success", f"Saved {', '.join(sorted(changes))} as version {m.version} of {m.name}; "
                          f"version {version} is unchanged.", result.warnings)
        return redirect(url_for("models.model", model_id=m.model_id), 303)

    return bp


def _attach(edited: list[EditedFile], details: Any) -> list[tuple[str, list[str]]]:
    """Put each problem next to its file; returns those about no file on the page."""
    by_path = {f.path: f for f in edited}
    general = []
    for where, messages in by_file(details):
        if where in by_path:
            by_path[where].problems.extend(messages)
        else:
            general.append((where, messages))
    return general
