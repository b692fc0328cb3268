"""Rules for requirements.txt: every line must look like a requirement; editable installs and local paths are refused,
URLs too unless the registry allows them.

A deliberately small subset of pip's format (PEP 508 requirements, URLs, a few index options, --hash), checked with
regular expressions: nothing here installs or resolves anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_EXTRAS = rf"(?:\s*\[\s*(?:{_NAME}(?:\s*,\s*{_NAME})*)?\s*\])?"
_SPEC = r"(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+"
_SPECS = rf"(?:\s*\(?\s*{_SPEC}(?:\s*,\s*{_SPEC})*\s*\)?)?"
_AT_URL = r"(?:\s*@\s*(?P<url>\S+))"
REQUIREMENT_RE = re.compile(rf"^{_NAME}{_EXTRAS}(?:{_AT_URL}|{_SPECS})(?:\s*;\s*\S.*)?$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HASH_RE = re.compile(r"\s--hash[=\s]\S+")
_ARCHIVES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")
_URL_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links"}
_FLAG_OPTIONS = {"--pre", "--prefer-binary", "--only-binary", "--no-binary", "--trusted-host", "--no-index"}
_FILE_OPTIONS = {"-r", "--requirement", "-c", "--constraint"}


URLS_OFF = ("URLs are not allowed (MODEL_REGISTRY_ALLOW_REQUIREMENT_URLS is off on this registry): "
            "name the package and its version, to be installed from the package index")


def requirement_problem(line: str, *, allow_urls: bool = False) -> str | None:
    """Why one logical line of requirements.txt (comments and --hash options removed) is refused, or None.

    URLs (direct references, VCS links, other indexes) are refused unless `allow_urls`: they let a package pull
    code from anywhere at install time, past any mirror or wheelhouse the cluster controls.
    """
    if line.startswith(("-e", "--editable")):
        return "editable installs (-e) are not allowed"
    if line.startswith("-"):
        option, value = _split_option(line)
        if option in _FILE_OPTIONS:
            return f"{option} refers to another file; list the requirements here"
        if option in _URL_OPTIONS:
            if not re.match(r"^https?://", value):
                return f"{option} needs an http(s) URL, not a local path"
            return None if allow_urls else URLS_OFF
        if option in _FLAG_OPTIONS:
            return None
        return f"option {option} is not supported"
    if _is_local(line):
        return "local paths are not allowed (publish the package or give an https URL)"
    if _SCHEME_RE.match(line):
        return None if allow_urls else URLS_OFF
    match = REQUIREMENT_RE.match(line)
    if match is None:
        return "does not look like a requirement (name, extras, version specifiers, markers)"
    if match.group("url") and not allow_urls:
        return URLS_OFF
    return None


def _split_option(line: str) -> tuple[str, str]:
    """('--index-url', 'https://...') from '--index-url=https://...', '-i https://...' or '-ihttps://...'."""
    match = re.match(r"^(--[A-Za-z][A-Za-z-]*|-[A-Za-z])\s*=?\s*(.*)$", line)
    return (match.group(1), match.group(2).strip()) if match else (line, "")


def _is_local(line: str) -> bool:
    target = line
    if "@" in line and not _SCHEME_RE.match(line):
        target = line.split("@", 1)[1].strip().split(";", 1)[0].strip()
    if _SCHEME_RE.match(target) or target.lower().startswith("file:"):
        return target.lower().startswith("file:")
    spec = target.split(";", 1)[0].strip()
    return (
        spec.startswith((".", "/", "~", "\\"))
        or "/" in spec
        or "\\" in spec
        or spec.lower().endswith(_ARCHIVES)
    )


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, line) with continuations joined, comments and --hash options removed."""
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full, pending = pending + line, ""
        full = _bare(full)
        if full:
            yield start, full
    if _bare(pending):
        yield start, _bare(pending)


def _bare(line: str) -> str:
    return _HASH_RE.sub("", " " + re.sub(r"(^|\s)#.*$", "", line)).strip()
