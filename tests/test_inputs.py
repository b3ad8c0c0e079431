"""A job's input files and stdin object (jobmesh.executor.inputs), fetched from a real
nats-server's object store jm_uploads, and copied from node paths under the allowed roots."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import nats
import pytest

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import InputFile
from jobmesh.executor.inputs import InputFileError, fetch_stdin, materialize, parse_allowed_roots
from jobmesh.runtime.provisioning import provision

pytestmark = pytest.mark.integration

JOB_UID = 65534
JOB_GID = 65534
AS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
async def uploads(nats_server):
    """The provisioned jm_uploads store of the module's nats-server."""
    conn = await nats.connect(nats_server.url)
    js = conn.jetstream()
    await provision(js)
    yield await js.object_store(subjects.OBJ_UPLOADS)
    await conn.close()


async def upload(store, data: bytes) -> str:
    """Put ``data`` into the store as the client does: under its sha256. Returns the name."""
    name = subjects.upload_key(hashlib.sha256(data).hexdigest())
    await store.put(name, data)
    return name


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    directory = tmp_path / "work"
    directory.mkdir()
    return directory


def owner_of(path: Path) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_uid, info.st_gid


# --- uploads ------------------------------------------------------------------------------


async def test_uploads_land_at_their_paths_with_their_modes_and_the_jobs_owner(uploads, workdir: Path) -> None:
    script = b"#!/bin/sh\necho hello\n"
    data = os.urandom(300_000)  # several chunks of the object store
    files = [
        InputFile(path="run.sh", object=await upload(uploads, script), size=len(script), mode=0o755),
        InputFile(path="data/in/blob.bin", object=await upload(uploads, data), size=len(data)),
        InputFile(path="./empty.txt", object=await upload(uploads, b""), size=0, mode=0o600),
    ]
    await materialize(files, workdir, uploads, [], JOB_UID, JOB_GID)
    assert (workdir / "run.sh").read_bytes() == script
    assert stat.S_IMODE(os.stat(workdir / "run.sh").st_mode) == 0o755
    assert (workdir / "data/in/blob.bin").read_bytes() == data
    assert stat.S_IMODE(os.stat(workdir / "data/in/blob.bin").st_mode) == 0o644
    assert (workdir / "empty.txt").read_bytes() == b""
    assert stat.S_IMODE(os.stat(workdir / "empty.txt").st_mode) == 0o600
    if AS_ROOT:
        for path in ("run.sh", "data", "data/in", "data/in/blob.bin", "empty.txt"):
            assert owner_of(workdir / path) == (JOB_UID, JOB_GID), path


class WatchingStore:
    """The real store, recording who owns what is in the working directory at each fetch."""

    def __init__(self, store, workdir: Path) -> None:
        self._store = store
        self._workdir = workdir
        self.owners_seen: set[int] = set()

    async def get(self, name: str, writeinto=None):
        for dirpath, dirnames, filenames in os.walk(self._workdir):
            for entry in (*dirnames, *filenames):
                self.owners_seen.add(os.lstat(os.path.join(dirpath, entry)).st_uid)
        return await self._store.get(name, writeinto=writeinto)


@pytest.mark.skipif(not AS_ROOT and not os.environ.get("CI"), reason="only root hands files to another uid")
async def test_nothing_is_the_jobs_until_every_file_is_in_place(uploads, workdir: Path) -> None:
    """A directory the job's uid owned while root still wrote into it could have an entry
    swapped for a link to anywhere, which root would then write through."""
    name = await upload(uploads, b"content")
    files = [InputFile(path=f"d{i}/sub/f.txt", object=name, size=7) for i in range(3)]
    store = WatchingStore(uploads, workdir)
    await materialize(files, workdir, store, [], JOB_UID, JOB_GID)
    assert store.owners_seen == {0}  # d0/ and d0/sub/ were there at the later fetches, root's
    for path in ("d0", "d0/sub", "d2/sub/f.txt"):
        assert owner_of(workdir / path) == (JOB_UID, JOB_GID), path


async def test_the_same_upload_can_land_twice_at_two_paths(uploads, workdir: Path) -> None:
    name = await upload(uploads, b"shared content")
    files = [InputFile(path=p, object=name, size=14) for p in ("a.txt", "b/a.txt")]
    await materialize(files, workdir, uploads, [], None, None)
    assert (workdir / "a.txt").read_text() == (workdir / "b/a.txt").read_text() == "shared content"


async def test_a_size_other_than_the_specs_fails_naming_the_file(uploads, workdir: Path) -> None:
    name = await upload(uploads, b"0123456789")
    with pytest.raises(InputFileError) as caught:
        await materialize([InputFile(path="x.txt", object=name, size=4)], workdir, uploads, [], None, None)
    assert caught.value.code == "input_file_failed"
    assert caught.value.path == "x.txt" and caught.value.transient is False
    assert "input file 'x.txt'" in str(caught.value) and "10 bytes in the store, the spec says 4" in str(caught.value)
    assert not (workdir / "x.txt").exists()  # nothing half-fetched is left


async def test_content_that_does_not_match_its_sha256_name_is_refused(uploads, workdir: Path) -> None:
    wrong = subjects.upload_key(hashlib.sha256(b"what the name promises").hexdigest())
    await uploads.put(wrong, b"something else")
    with pytest.raises(InputFileError, match=r"does not match its sha256 name") as caught:
        await materialize([InputFile(path="in.txt", object=wrong, size=14)], workdir, uploads, [], None, None)
    assert caught.value.path == "in.txt"
    assert not (workdir / "in.txt").exists()


async def test_a_missing_upload_says_it_is_not_in_the_store(uploads, workdir: Path) -> None:
    absent = subjects.upload_key("0" * 64)
    with pytest.raises(InputFileError, match=r"'gone.csv' \(upload sha256/0{64}\): not in jm_uploads"):
        await materialize([InputFile(path="gone.csv", object=absent, size=1)], workdir, uploads, [], None, None)
    assert not (workdir / "gone.csv").exists()


@pytest.mark.parametrize("name", ["results/abc", "sha256/ABC", "sha256/" + "a" * 63, "sha256/../x"])
async def test_an_object_name_that_is_not_an_upload_name_is_refused(uploads, workdir: Path, name: str) -> None:
    with pytest.raises(InputFileError, match=r"not an upload name"):
        await materialize([InputFile(path="f", object=name, size=1)], workdir, uploads, [], None, None)


async def test_a_closed_connection_is_a_transient_failure(nats_server, workdir: Path) -> None:
    conn = await nats.connect(nats_server.url)
    js = conn.jetstream()
    await provision(js)
    store = await js.object_store(subjects.OBJ_UPLOADS)
    name = await upload(store, b"fetched after the close")
    await conn.close()
    with pytest.raises(InputFileError, match=r"fetch from jm_uploads failed") as caught:
        await materialize([InputFile(path="late.txt", object=name, size=23)], workdir, store, [], None, None)
    assert caught.value.transient is True


async def test_without_a_store_an_upload_fails_clearly(workdir: Path) -> None:
    name = subjects.upload_key("1" * 64)
    with pytest.raises(InputFileError, match=r"this executor has no upload store"):
        await materialize([InputFile(path="f", object=name, size=1)], workdir, None, [], None, None)


async def test_a_file_needs_exactly_one_source(uploads, workdir: Path) -> None:
    both = InputFile(path="f", object=subjects.upload_key("2" * 64), node_path="/etc/hostname")
    for file in (both, InputFile(path="f")):
        with pytest.raises(InputFileError, match=r"exactly one of object and node_path"):
            await materialize([file], workdir, uploads, [Path("/etc")], None, None)


# --- confinement to the working directory ---------------------------------------------------


@pytest.mark.parametrize("path", ["../escape.txt", "a/../../escape.txt", "/tmp/escape.txt", "..", ".", "a/.."])
async def test_a_path_out_of_the_working_directory_is_refused(uploads, workdir: Path, path: str) -> None:
    name = await upload(uploads, b"escape")
    with pytest.raises(InputFileError, match=r"inside the working directory|relative to the working directory"):
        await materialize([InputFile(path=path, object=name, size=6)], workdir, uploads, [], None, None)
    assert not (workdir.parent / "escape.txt").exists()
    assert os.listdir(workdir) == []


async def test_a_symbolic_link_inside_the_working_directory_is_never_followed(uploads, workdir: Path) -> None:
    outside = workdir.parent / "outside"
    outside.mkdir()
    (workdir / "link").symlink_to(outside)
    (workdir / "file-link").symlink_to(outside / "target.txt")
    name = await upload(uploads, b"must stay in")
    with pytest.raises(InputFileError, match=r"link is a symbolic link"):
        await materialize([InputFile(path="link/x.txt", object=name, size=12)], workdir, uploads, [], None, None)
    with pytest.raises(InputFileError, match=r"exists already"):
        await materialize([InputFile(path="file-link", object=name, size=12)], workdir, uploads, [], None, None)
    assert os.listdir(outside) == []


async def test_two_files_at_one_path_are_refused(uploads, workdir: Path) -> None:
    name = await upload(uploads, b"twice")
    files = [InputFile(path="same.txt", object=name, size=5)] * 2
    with pytest.raises(InputFileError, match=r"'same.txt'.*exists already"):
        await materialize(files, workdir, uploads, [], None, None)


async def test_a_file_in_the_way_of_a_directory_is_refused(uploads, workdir: Path) -> None:
    name = await upload(uploads, b"blocker")
    files = [InputFile(path="a", object=name, size=7), InputFile(path="a/b", object=name, size=7)]
    with pytest.raises(InputFileError, match=r"'a/b'.*is not a directory"):
        await materialize(files, workdir, uploads, [], None, None)


# --- node paths ---------------------------------------------------------------------------


@pytest.fixture
def node_tree(tmp_path: Path) -> Path:
    """An allowed root holding a dataset directory, and a secret file outside any root."""
    root = tmp_path / "datasets"
    (root / "mnist/train").mkdir(parents=True)
    (root / "mnist/train/part-0.csv").write_text("1,2,3\n")
    (root / "mnist/README").write_text("readme\n")
    (root / "mnist/tool.sh").write_text("#!/bin/sh\n")
    (root / "mnist/tool.sh").chmod(0o750)
    (root / "mnist/latest").symlink_to(root / "mnist/train/part-0.csv")  # a link that stays inside
    (tmp_path / "private").mkdir()
    (tmp_path / "private/key").write_text("node-private")
    return root


async def test_a_node_file_is_copied_with_the_specs_mode(node_tree: Path, workdir: Path) -> None:
    file = InputFile(path="in/readme.txt", node_path=str(node_tree / "mnist/README"), mode=0o640)
    await materialize([file], workdir, None, [node_tree], JOB_UID, JOB_GID)
    assert (workdir / "in/readme.txt").read_text() == "readme\n"
    assert stat.S_IMODE(os.stat(workdir / "in/readme.txt").st_mode) == 0o640
    if AS_ROOT:
        assert owner_of(workdir / "in/readme.txt") == (JOB_UID, JOB_GID)


async def test_a_node_directory_is_copied_as_plain_files_keeping_their_modes(node_tree: Path, workdir: Path) -> None:
    file = InputFile(path="mnist", node_path=str(node_tree / "mnist"))
    await materialize([file], workdir, None, [node_tree], JOB_UID, JOB_GID)
    copied = workdir / "mnist"
    assert sorted(str(p.relative_to(copied)) for p in copied.rglob("*")) == [
        "README",
        "latest",
        "tool.sh",
        "train",
        "train/part-0.csv",
    ]
    assert not (copied / "latest").is_symlink()  # the link's target is copied, never the link
    assert (copied / "latest").read_text() == "1,2,3\n"
    assert stat.S_IMODE(os.stat(copied / "tool.sh").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(copied / "train").st_mode) == 0o755
    if AS_ROOT:
        for path in [copied, *copied.rglob("*")]:
            assert owner_of(path) == (JOB_UID, JOB_GID), path


async def test_a_node_path_outside_the_allowed_roots_is_refused_naming_it(node_tree: Path, workdir: Path) -> None:
    secret = node_tree.parent / "private/key"
    with pytest.raises(InputFileError) as caught:
        await materialize([InputFile(path="k", node_path=str(secret))], workdir, None, [node_tree], None, None)
    message = str(caught.value)
    assert str(secret) in message and f"is not under JOBMESH_ALLOWED_INPUT_PATHS={node_tree}" in message
    assert not (workdir / "k").exists()


async def test_a_node_path_that_climbs_out_with_dots_is_refused(node_tree: Path, workdir: Path) -> None:
    sneaky = f"{node_tree}/../private/key"
    with pytest.raises(InputFileError, match=r"resolves to .*/private/key.* is not under JOBMESH_ALLOWED_INPUT_PATHS"):
        await materialize([InputFile(path="k", node_path=sneaky)], workdir, None, [node_tree], None, None)


async def test_a_link_under_a_root_pointing_out_of_it_is_refused(node_tree: Path, workdir: Path) -> None:
    (node_tree / "escape").symlink_to(node_tree.parent / "private/key")
    with pytest.raises(InputFileError, match=r"resolves to .*private/key.* is not under"):
        await materialize(
            [InputFile(path="k", node_path=str(node_tree / "escape"))], workdir, None, [node_tree], None, None
        )
    (node_tree / "mnist/escape").symlink_to(node_tree.parent / "private")
    with pytest.raises(InputFileError, match=r"mnist/escape links to .*private, which is not under"):
        await materialize(
            [InputFile(path="m", node_path=str(node_tree / "mnist"))], workdir, None, [node_tree], None, None
        )
    assert not any(p.name == "key" for p in workdir.rglob("*"))


async def test_a_root_that_is_itself_a_link_allows_what_is_under_its_target(node_tree: Path, workdir: Path) -> None:
    alias = node_tree.parent / "alias"
    alias.symlink_to(node_tree)
    file = InputFile(path="r", node_path=str(alias / "mnist/README"))
    await materialize([file], workdir, None, [alias], None, None)
    assert (workdir / "r").read_text() == "readme\n"


async def test_a_root_is_not_a_prefix_match(node_tree: Path, workdir: Path) -> None:
    sibling = node_tree.parent / "datasets-private"
    sibling.mkdir()
    (sibling / "x").write_text("x")
    with pytest.raises(InputFileError, match=r"is not under"):
        await materialize([InputFile(path="x", node_path=str(sibling / "x"))], workdir, None, [node_tree], None, None)


async def test_a_directory_link_loop_is_refused(node_tree: Path, workdir: Path) -> None:
    (node_tree / "mnist/train/up").symlink_to(node_tree / "mnist")
    with pytest.raises(InputFileError, match=r"links back to .*mnist \(a loop\)"):
        await materialize(
            [InputFile(path="m", node_path=str(node_tree / "mnist"))], workdir, None, [node_tree], None, None
        )


async def test_special_files_are_refused(node_tree: Path, workdir: Path) -> None:
    os.mkfifo(node_tree / "fifo")
    with pytest.raises(InputFileError, match=r"not a regular file or directory"):
        await materialize(
            [InputFile(path="f", node_path=str(node_tree / "fifo"))], workdir, None, [node_tree], None, None
        )


async def test_no_allowed_roots_means_no_node_paths(node_tree: Path, workdir: Path) -> None:
    file = InputFile(path="r", node_path=str(node_tree / "mnist/README"))
    with pytest.raises(InputFileError, match=r"allows no node paths \(JOBMESH_ALLOWED_INPUT_PATHS is empty\)"):
        await materialize([file], workdir, None, [], None, None)


async def test_a_missing_or_relative_node_path_is_refused(node_tree: Path, workdir: Path) -> None:
    with pytest.raises(InputFileError, match=r"No such file or directory"):
        await materialize(
            [InputFile(path="m", node_path=str(node_tree / "absent"))], workdir, None, [node_tree], None, None
        )
    with pytest.raises(InputFileError, match=r"must be absolute"):
        await materialize([InputFile(path="m", node_path="datasets/x")], workdir, None, [node_tree], None, None)


def test_allowed_roots_setting_is_parsed_and_checked() -> None:
    assert parse_allowed_roots("") == ()
    assert parse_allowed_roots(" /data , /mnt/shared,") == (Path("/data"), Path("/mnt/shared"))
    with pytest.raises(ValueError, match=r"JOBMESH_ALLOWED_INPUT_PATHS: 'data' is not an absolute path"):
        parse_allowed_roots("/ok,data")


# --- stdin objects ------------------------------------------------------------------------


async def test_a_stdin_object_is_fetched_into_a_private_file(uploads, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    dest = await fetch_stdin(await upload(uploads, data), uploads, tmp_path / "stdin")
    assert dest == tmp_path / "stdin"
    assert dest.read_bytes() == data
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600


async def test_a_stdin_object_that_does_not_match_its_name_leaves_no_file(uploads, tmp_path: Path) -> None:
    wrong = subjects.upload_key(hashlib.sha256(b"promised stdin").hexdigest())
    await uploads.put(wrong, b"other stdin")
    with pytest.raises(InputFileError, match=r"stdin object .*does not match its sha256 name") as caught:
        await fetch_stdin(wrong, uploads, tmp_path / "stdin")
    assert caught.value.path == ""
    assert not (tmp_path / "stdin").exists()


async def test_a_missing_stdin_object_or_an_existing_dest_fails_clearly(uploads, tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match=r"not in jm_uploads"):
        await fetch_stdin(subjects.upload_key("3" * 64), uploads, tmp_path / "stdin")
    (tmp_path / "taken").write_text("")
    with pytest.raises(InputFileError, match=r"cannot create .*taken: File exists"):
        await fetch_stdin(await upload(uploads, b"x"), uploads, tmp_path / "taken")
