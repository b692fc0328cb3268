"""Per-deployment NFS exports: the file the agent writes (pure), and (marker `vm`: root, nfs-ganesha and libnfs's
nfs-cat, a few seconds) ganesha serving each folder to its one client only, added and removed while it runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from agent.nfsdev import DevNfsServer, port_open
from agent.runtimes.vmexports import Export, VmExports, ganesha_exports, pseudo_path


def test_each_export_is_read_only_to_its_one_client() -> None:
    text = ganesha_exports([Export(1001, Path("/store/m/v2"), "/miaas/d-1/app", "192.168.121.57"),
                            Export(1002, Path("/wheels/abc-cp311"), "/miaas/d-1/wheels", "192.168.121.57")])
    assert text.count("EXPORT {") == 2
    assert 'Path = "/store/m/v2";' in text and 'Pseudo = "/miaas/d-1/app";' in text
    assert text.count("CLIENT { Clients = 192.168.121.57; Access_Type = RO; }") == 2
    assert text.count("Access_Type = None;") == 2 and text.count("Squash = root_squash;") == 2
    assert "RW" not in text and "/24" not in text


@pytest.mark.parametrize("client", ["192.168.121.0/24", "*", "192.168.121.5; Access_Type = RW"])
def test_a_client_is_one_address(client: str) -> None:
    with pytest.raises(ValueError):
        ganesha_exports([Export(1001, Path("/x"), "/miaas/d/app", client)])


@pytest.mark.parametrize("deployment_id", ["../x", "a/b", "", "a b"])
def test_a_pseudo_path_is_made_of_a_valid_deployment_id(deployment_id: str) -> None:
    with pytest.raises(ValueError):
        pseudo_path(deployment_id, "app")


def test_exports_are_added_removed_and_written_whole_with_ids_never_reused(tmp_path: Path) -> None:
    reloads: list[str] = []
    exports = VmExports(tmp_path / "nfs" / "vm-exports.conf", reload=lambda: reloads.append("hup"))
    a = exports.add("d-1", "192.168.121.57", {"app": tmp_path / "v1", "wheels": tmp_path / "w"})
    b = exports.add("d-2", "192.168.121.58", {"app": tmp_path / "v2"})
    exports.remove("d-1")
    c = exports.add("d-3", "192.168.121.59", {"app": tmp_path / "v3"})
    text = (tmp_path / "nfs" / "vm-exports.conf").read_text()
    assert "/miaas/d-1/" not in text and "/miaas/d-2/app" in text and "/miaas/d-3/app" in text
    ids = [a["app"].export_id, a["wheels"].export_id, b["app"].export_id, c["app"].export_id]
    assert len(set(ids)) == 4 and min(ids) >= 1000
    assert reloads == ["hup"] * 4
    exports.remove("d-unknown")  # nothing held: no reload
    assert len(reloads) == 4
    assert oct((tmp_path / "nfs" / "vm-exports.conf").stat().st_mode & 0o777) == "0o644"


def test_restored_exports_keep_their_ids_and_new_ones_come_after(tmp_path: Path) -> None:
    exports = VmExports(tmp_path / "vm-exports.conf")
    exports.restore("d-1", [Export(1500, tmp_path, "/miaas/d-1/app", "192.168.121.57")])
    exports.sync()
    new = exports.add("d-2", "192.168.121.58", {"app": tmp_path})
    assert new["app"].export_id == 1501
    assert exports.held("d-1")[0].export_id == 1500


def nfs_cat(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nfs-cat", f"nfs://127.0.0.1{url}?version=4"], capture_output=True, text=True, timeout=30)


@pytest.mark.vm
def test_ganesha_serves_each_deployment_only_its_own_folder(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("ganesha.nfsd") or not shutil.which("nfs-cat"):
        pytest.skip("needs root, nfs-ganesha and libnfs-utils (nfs-cat)")
    if port_open(2049):
        pytest.skip("an NFS server already listens on port 2049 here")
    ours, theirs = tmp_path / "store" / "m1" / "v1", tmp_path / "store" / "m2" / "v1"
    for folder, text in ((ours, "ours"), (theirs, "theirs")):
        folder.mkdir(parents=True)
        (folder / "model.txt").write_text(text)
    for path in [tmp_path, *tmp_path.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    include = tmp_path / "nfs" / "vm-exports.conf"
    # libnfs speaks NFSv4.0 only: this server also accepts 4.0 (the VMs mount 4.1)
    with DevNfsServer({}, tmp_path / "nfs", include=include, minor_versions=(0, 1, 2)) as server:
        exports = VmExports(include, reload=lambda: os.kill(int(server.pid_file.read_text()), 1))

        def eventually(url: str, wanted: bool) -> subprocess.CompletedProcess[str]:
            deadline = time.monotonic() + 20
            while True:
                result = nfs_cat(url)
                if (result.returncode == 0) == wanted or time.monotonic() > deadline:
                    return result
                time.sleep(0.3)

        # given this host (127.0.0.1) as the VM of d-ours, and another VM's deployment d-theirs
        exports.add("d-ours", "127.0.0.1", {"app": ours})
        exports.add("d-theirs", "192.168.121.250", {"app": theirs})

        # then this client reads its own version folder, and not the other's, nor the store root
        assert eventually("/miaas/d-ours/app/model.txt", True).stdout == "ours"
        assert nfs_cat("/miaas/d-theirs/app/model.txt").returncode != 0
        assert nfs_cat("/miaas/d-ours/app/../../d-theirs/app/model.txt").returncode != 0
        assert nfs_cat("/models/m2/v1/model.txt").returncode != 0

        # and once its deployment is gone, its export is gone too
        exports.remove("d-ours")
        assert eventually("/miaas/d-ours/app/model.txt", False).returncode != 0, server.log_tail()
