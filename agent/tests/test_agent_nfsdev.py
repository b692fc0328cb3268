"""The development NFS server's configuration: read-only NFSv4 exports, root squashed, for the VM networks only."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.nfsdev import ganesha_config


def test_each_folder_is_exported_read_only_and_root_squashed(tmp_path: Path) -> None:
    text = ganesha_config({"/models": tmp_path / "store", "/wheels": tmp_path / "wheels"}, tmp_path / "nfs")
    assert text.count("EXPORT {") == 2
    assert f'Path = "{tmp_path / "store"}";' in text and 'Pseudo = "/models";' in text
    assert f'Path = "{tmp_path / "wheels"}";' in text and 'Pseudo = "/wheels";' in text
    assert text.count("Squash = root_squash;") == 2
    assert text.count("Access_Type = None;") == 2  # nobody but the listed clients, and they read only
    assert text.count("CLIENT { Clients = 192.168.121.0/24, 192.168.122.0/24, 127.0.0.1; Access_Type = RO; }") == 2
    assert "Protocols = 4;" in text and "Graceless = true;" in text
    assert "RW" not in text


@pytest.mark.parametrize("pseudo", ["models", "/a b", '/x"; Access_Type = RW; #'])
def test_a_bad_pseudo_path_is_refused(tmp_path: Path, pseudo: str) -> None:
    with pytest.raises(ValueError):
        ganesha_config({pseudo: tmp_path}, tmp_path)


def test_the_agents_per_deployment_exports_are_included_and_nothing_else_by_default(tmp_path: Path) -> None:
    text = ganesha_config({}, tmp_path / "nfs", include=tmp_path / "nfs" / "vm-exports.conf")
    assert "EXPORT {" not in text  # no store root, no wheelhouse root: only what the agent exports per deployment
    assert text.rstrip().endswith(f'%include "{tmp_path / "nfs" / "vm-exports.conf"}"')
