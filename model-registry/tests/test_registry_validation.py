"""Validation of a package, as a pure function of one zip: names, kinds, bombs, required files, meta.json."""

from __future__ import annotations

import io
import json
import posixpath
import re
import stat
import zipfile
from typing import IO

import pytest
from hypothesis import given
from hypothesis import strategies as st

from model_registry.requirements import requirement_problem
from model_registry.testing import GOOD, META, Entry, Files, good, make_zip
from model_registry.validation import InvalidPackage, Limits, Package, path_problem, validate_package

LIMITS = Limits()


def validate(files: Files | bytes, limits: Limits = LIMITS) -> Package:
    data = files if isinstance(files, bytes) else make_zip(files)
    return validate_package(io.BytesIO(data), limits)


def refused(files: Files | bytes, limits: Limits = LIMITS) -> InvalidPackage:
    with pytest.raises(InvalidPackage) as caught:
        validate(files, limits)
    return caught.value


def with_nul_in_name() -> bytes:
    """zipfile cannot write a NUL in a name: write a placeholder and patch both headers."""
    return make_zip(good({"evil#.py": "x = 1\n"})).replace(b"evil#.py", b"evil\x00.py")


# --------------------------------------------------------------------------- a good package


def test_a_good_package_is_valid_with_every_file_hashed() -> None:
    package = validate(GOOD)
    assert package.meta.start_commands == ["python3 app.py"]
    assert sorted(f.name for f in package.files) == sorted(GOOD)
    model = next(f for f in package.files if f.name == "model.pth")
    assert model.size_bytes == len(GOOD["model.pth"])  # type: ignore[arg-type]
    assert package.warnings == ()


def test_extraction_goes_through_the_writer_in_the_same_pass() -> None:
    written: dict[str, io.BytesIO] = {}

    class Keep(io.BytesIO):
        def close(self) -> None:  # keep the bytes readable after the validator closes the file
            pass

    def write(name: str) -> IO[bytes]:
        written[name] = Keep()
        return written[name]

    validate_package(io.BytesIO(make_zip(good({"static/index.html": "<p>hi</p>"}))), LIMITS, write)
    assert written["static/index.html"].getvalue() == b"<p>hi</p>"
    assert set(written) == {*GOOD, "static/index.html"}


def test_a_single_wrapping_folder_is_stripped_with_a_warning() -> None:
    package = validate({f"iris/{name}": content for name, content in GOOD.items()})
    assert sorted(f.name for f in package.files) == sorted(GOOD)
    assert any("'iris/'" in w and "stripped" in w for w in package.warnings)


def test_macos_metadata_is_skipped_with_a_warning() -> None:
    package = validate(good({"__MACOSX/._app.py": "junk", ".DS_Store": "junk"}))
    assert ".DS_Store" not in {f.name for f in package.files}
    assert any("macOS" in w for w in package.warnings)


def test_a_packaged_manifest_is_ignored_because_the_registry_writes_its_own() -> None:
    package = validate(good({"MANIFEST.json": "{}"}))
    assert "MANIFEST.json" not in {f.name for f in package.files}
    assert any("MANIFEST.json" in w for w in package.warnings)


def test_unknown_meta_keys_are_warnings_not_errors() -> None:
    package = validate(good({"meta.json": json.dumps({**META, "colour": "red", "resources": {"tpus": 2}})}))
    assert any("'colour'" in w for w in package.warnings)
    assert any("'resources.tpus'" in w for w in package.warnings)


def test_artifacts_named_in_meta_replace_model_pth() -> None:
    package = validate(good({
        "meta.json": json.dumps({**META, "artifacts": ["weights/", "vocab.txt"]}),
        "model.pth": None, "weights/a.bin": b"\x01", "vocab.txt": "a b c",
    }))
    assert {"weights/a.bin", "vocab.txt"} <= {f.name for f in package.files}


def test_a_compile_warning_in_app_py_is_passed_on_as_a_warning() -> None:
    package = validate(good({"app.py": "import re\nPATTERN = '\\d+'\n"}))
    assert any(w.startswith("app.py line 2") for w in package.warnings)


# --------------------------------------------------------------------------- names and kinds


@pytest.mark.parametrize(
    "name, says",
    [
        ("../evil.py", "'..'"),
        ("models/../../evil.py", "'..'"),
        ("/etc/evil.py", "absolute path"),
        ("C:/evil.py", "drive letter"),
        ("dir\\evil.py", "backslash"),
        ("%2e%2e/evil.py", "percent-encoded"),
        ("a//evil.py", "empty or '.'"),
        ("./evil.py", "empty or '.'"),
        ("evil\x07.py", "control character"),
        ("x" * 300, "too long"),
    ],
)
def test_an_unsafe_entry_name_is_refused_and_named(name: str, says: str) -> None:
    problem = refused(good({name: "x = 1\n"})).problems[0]
    assert says in problem.message
    assert problem.file is not None


def test_a_nul_byte_in_a_name_is_refused_even_though_zipfile_hides_it() -> None:
    assert "NUL byte" in refused(with_nul_in_name()).message


def test_a_symlink_entry_is_refused() -> None:
    error = refused(good({"link.py": Entry("/etc/passwd", mode=stat.S_IFLNK | 0o777)}))
    assert "'link.py': symbolic links are not allowed" in error.message


def test_a_fifo_entry_is_refused() -> None:
    assert "only regular files" in refused(good({"pipe": Entry("", mode=stat.S_IFIFO | 0o644)})).message


def test_duplicate_names_are_refused() -> None:
    error = refused([*GOOD.items(), ("app.py", "print('the other one')\n")])
    assert "'app.py': duplicate of 'app.py'" in error.message


def test_names_differing_only_in_case_are_duplicates() -> None:
    assert "'App.py': duplicate of 'app.py'" in refused(good({"App.py": "x = 1\n"})).message


def test_a_file_that_is_also_a_folder_is_refused() -> None:
    assert "both a file and a folder" in refused(good({"lib": "x", "lib/a.py": "x"})).message


def test_every_unsafe_entry_is_reported_at_once() -> None:
    error = refused(good({"../a.py": "x", "/b.py": "x"}))
    assert [p.file for p in error.problems] == ["../a.py", "/b.py"]


@given(st.text(alphabet="ab./\\%2e:C\x00", max_size=12))
def test_an_accepted_name_always_stays_inside_the_version_folder(name: str) -> None:
    if path_problem(name) is None:
        normal = posixpath.normpath(name)
        assert not normal.startswith("/") and normal.split("/")[0] not in ("..", ".")
        assert "\\" not in name and "\x00" not in name and not re.match(r"^[A-Za-z]:", name)


# --------------------------------------------------------------------------- limits


def test_not_a_zip_is_refused() -> None:
    assert refused(b"PK but not really a zip").message == "invalid package: not a zip file"


def test_too_many_entries_are_refused_before_the_directory_is_parsed() -> None:
    error = refused(good({f"data/{i}.txt": "x" for i in range(10)}), Limits(max_entries=8))
    assert "too many entries" in error.message


def test_a_package_inflating_past_the_total_limit_is_refused() -> None:
    error = refused(good({"model.pth": b"\x01" * 5000}), Limits(max_unpacked_bytes=4000))
    assert "inflates to more than 4000 bytes" in error.message


def test_a_compression_bomb_is_refused_while_it_inflates() -> None:
    error = refused(good({"model.pth": bytes(4 << 20)}))  # 4 MiB of zeros deflate to about 4 KiB
    assert "'model.pth' inflates more than 200 times" in error.message


def test_a_small_file_may_compress_well() -> None:
    validate(good({"model.pth": bytes(512 << 10)}))


def test_a_damaged_entry_is_refused() -> None:
    data = bytearray(make_zip(good({"model.pth": bytes(range(256)) * 64})))
    at = data.index(b"model.pth") + len("model.pth") + 10  # inside the compressed bytes of model.pth
    data[at:at + 8] = b"\xff" * 8
    assert "'model.pth' cannot be read" in refused(bytes(data)).message


def test_an_encrypted_entry_is_refused() -> None:
    data = bytearray(make_zip(GOOD))
    # Set the "encrypted" flag of every header (local and central) of app.py.
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (start := data.find(sig, start)) >= 0:
            data[start + flag_at] |= 0x1
            start += 4
    assert "encrypted" in refused(bytes(data)).message


# --------------------------------------------------------------------------- required files


@pytest.mark.parametrize("missing", ["meta.json", "app.py", "requirements.txt", "model.pth"])
def test_a_missing_required_file_is_named(missing: str) -> None:
    error = refused(good({missing: None}))
    assert f"missing required file: {missing}" in error.message
    assert {"file": missing, "message": f"missing required file: {missing}"} in error.details


def test_every_missing_file_is_reported_at_once() -> None:
    error = refused(good({"app.py": None, "model.pth": None}))
    assert {p.file for p in error.problems} == {"app.py", "model.pth"}


def test_a_required_file_in_the_wrong_case_gets_a_hint() -> None:
    error = refused(good({"app.py": None, "App.py": "x = 1\n"}))
    assert "missing required file: app.py (found 'App.py'" in error.message


def test_an_empty_artifact_is_refused() -> None:
    assert "artifact model.pth is empty" in refused(good({"model.pth": b""})).message


def test_an_artifact_named_in_meta_must_be_there() -> None:
    error = refused(good({"meta.json": json.dumps({**META, "artifacts": ["weights.bin"]})}))
    assert "missing required file: weights.bin" in error.message


def test_an_artifact_name_that_escapes_is_refused() -> None:
    error = refused(good({"meta.json": json.dumps({**META, "artifacts": ["../model.pth"]})}))
    assert "artifact '../model.pth'" in error.message


# --------------------------------------------------------------------------- meta.json and app.py


@pytest.mark.parametrize(
    "meta, says",
    [
        ("{not json", "meta.json is not valid JSON"),
        ("[1, 2]", "meta.json must be a JSON object"),
        ({**META, "start_commands": "python3 app.py"}, "meta.json: start_commands: Input should be a valid list"),
        ({**META, "setup_commands": []}, "meta.json: setup_commands: List should have at least 1 item"),
        ({**META, "resources": {"cpus": -1}}, "meta.json: resources.cpus: Input should be greater than 0"),
        ({**META, "resources": {"gpus": -2}}, "meta.json: resources.gpus: Input should be greater than or equal"),
        ({**META, "ports": {"http": 70000}}, "meta.json: ports.http"),
        ({"start_commands": ["x"]}, "meta.json: setup_commands: Field required"),
    ],
    ids=["not-json", "not-object", "commands-not-list", "no-commands", "negative-cpus", "negative-gpus",
         "bad-port", "missing-key"],
)
def test_a_bad_meta_json_is_refused_saying_why(meta: object, says: str) -> None:
    text = meta if isinstance(meta, str) else json.dumps(meta)
    assert says in refused(good({"meta.json": text})).message


def test_app_py_that_does_not_compile_is_refused_with_its_line() -> None:
    error = refused(good({"app.py": "import os\ndef broken(:\n"}))
    assert "app.py does not compile: invalid syntax (line 2)" in error.message


def test_app_py_is_compiled_never_run() -> None:
    validate(good({"app.py": "raise SystemExit('ran')\n"}))


# --------------------------------------------------------------------------- requirements.txt


@pytest.mark.parametrize(
    "line",
    [
        "flask", "flask>=3.0", "numpy==1.26.4", "Flask[async] >=3.0, <4", "torch~=2.3 ; python_version >= '3.10'",
        "--prefer-binary", "requests==2.32.0 --hash=sha256:abcdef",
    ],
)
def test_requirement_lines_that_are_accepted(line: str) -> None:
    assert requirement_problem(line.split(" --hash")[0]) is None


URL_LINES = [
    "pkg @ https://example.org/pkg-1.0-py3-none-any.whl", "git+https://github.com/org/repo@v1#egg=repo",
    "--index-url https://pypi.example.org/simple", "--extra-index-url=https://download.pytorch.org/whl/cpu",
    "https://example.org/pkg-1.0.tar.gz",
]


@pytest.mark.parametrize("line", URL_LINES)
def test_urls_are_refused_unless_the_registry_allows_them(line: str) -> None:
    assert "URLs are not allowed" in (requirement_problem(line) or "")
    assert requirement_problem(line, allow_urls=True) is None


def test_a_package_with_a_url_passes_when_the_limits_allow_urls() -> None:
    package = good({"requirements.txt": "pkg @ https://example.org/pkg-1.0-py3-none-any.whl\n"})
    assert "URLs are not allowed" in refused(package).message
    validate(package, Limits(allow_requirement_urls=True))


@pytest.mark.parametrize(
    "line, says",
    [
        ("-e .", "editable"),
        ("--editable git+https://x/y", "editable"),
        ("./wheels/pkg.whl", "local paths"),
        ("/opt/pkg", "local paths"),
        ("pkg-1.0-py3-none-any.whl", "local paths"),
        ("pkg @ file:///tmp/pkg", "local paths"),
        ("file:../pkg", "local paths"),
        ("-r other.txt", "another file"),
        ("--find-links ./wheels", "http(s) URL"),
        ("--user", "not supported"),
        ("this is not a requirement", "does not look like a requirement"),
    ],
)
def test_requirement_lines_that_are_refused(line: str, says: str) -> None:
    assert says in (requirement_problem(line) or "")


def test_a_bad_requirement_is_refused_with_its_line_number() -> None:
    error = refused(good({"requirements.txt": "flask\n\n# local\n-e ./src\n"}))
    assert "requirements.txt line 4: '-e ./src': editable installs" in error.message


def test_continuations_and_hashes_are_understood() -> None:
    validate(good({"requirements.txt": "flask==3.0.0 \\\n    --hash=sha256:0123 \\\n    --hash=sha256:4567\n"}))


def test_a_zip_with_every_compression_method_is_read() -> None:
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        validate(make_zip(GOOD, compression=method))


def test_a_long_list_of_problems_is_cut_short_in_the_message_but_complete_in_the_details() -> None:
    error = refused(good({f"../{i}.py": "x" for i in range(12)}))
    assert error.message.endswith("; and 2 more (see details)")
    assert len(error.details) == 12
