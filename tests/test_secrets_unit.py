"""Secrets and masking: where a secret's value comes from, how a job gets it, and that it
never shows in what the job says (jobmesh.executor.secrets, jobmesh.executor.masking)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from jobmesh.executor.masking import MASK, MIN_SECRET_LENGTH, Masker
from jobmesh.executor.secrets import (
    SecretMissing,
    SecretSource,
    remove_secret_files,
    secret_env,
    write_secret_files,
)

JOB_UID = 65534
JOB_GID = 65534


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "node-secrets"
    directory.mkdir()
    (directory / "db-password").write_text("hunter2-db\n")
    (directory / "api_token").write_text("tok-1234")  # no trailing newline
    (directory / "two-lines").write_text("line one\nline two\n\n")
    return directory


# --- SecretSource -------------------------------------------------------------------------


def test_directory_secret_loses_one_trailing_newline_only(secrets_dir: Path) -> None:
    source = SecretSource(secrets_dir, "JOBMESH_SECRET_", {})
    assert source.resolve(["db-password", "api_token", "two-lines"]) == {
        "db-password": "hunter2-db",
        "api_token": "tok-1234",
        "two-lines": "line one\nline two\n",
    }


def test_crlf_file_loses_its_crlf(tmp_path: Path) -> None:
    (tmp_path / "WIN").write_bytes(b"from-windows\r\n")
    assert SecretSource(tmp_path, "", {}).resolve(["WIN"]) == {"WIN": "from-windows"}


def test_file_comes_before_variable_and_variable_fills_in(secrets_dir: Path) -> None:
    environ = {"JOBMESH_SECRET_api_token": "from-env", "JOBMESH_SECRET_ONLY_ENV": "env-value"}
    source = SecretSource(secrets_dir, "JOBMESH_SECRET_", environ)
    assert source.resolve(["api_token", "ONLY_ENV"]) == {"api_token": "tok-1234", "ONLY_ENV": "env-value"}


def test_env_form_without_directory() -> None:
    source = SecretSource(None, "MY_", {"MY_KEY": "v4lue", "KEY": "not-this"})
    assert source.resolve(["KEY"]) == {"KEY": "v4lue"}


def test_missing_secrets_are_all_named_without_any_value(secrets_dir: Path) -> None:
    source = SecretSource(secrets_dir, "JOBMESH_SECRET_", {"JOBMESH_SECRET_present": "s3cr3t-value"})
    with pytest.raises(SecretMissing) as caught:
        source.resolve(["present", "db-password", "nope", "also_nope"])
    error = caught.value
    assert error.code == "secret_missing"
    assert error.names == ("nope", "also_nope")
    message = str(error)
    assert "nope, also_nope" in message
    assert str(secrets_dir) in message and "JOBMESH_SECRETS_DIR" in message
    assert "JOBMESH_SECRET_<NAME>" in message
    assert "s3cr3t-value" not in message and "hunter2-db" not in message


def test_no_source_configured_says_so() -> None:
    with pytest.raises(SecretMissing, match="JOBMESH_SECRETS_DIR is not set"):
        SecretSource(None, "", {"X": "y"}).resolve(["X"])


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", ".hidden", "..", "", "-leading", "x" * 129, "nul\x00"])
def test_a_name_that_is_not_a_plain_file_name_is_refused(secrets_dir: Path, name: str) -> None:
    (secrets_dir.parent / "passwd").write_text("outside")
    source = SecretSource(secrets_dir, "JOBMESH_SECRET_", {f"JOBMESH_SECRET_{name}": "env-value"})
    with pytest.raises(SecretMissing, match="refused") as caught:
        source.resolve([name])
    assert caught.value.names == (name,)
    assert "env-value" not in str(caught.value)


def test_a_link_out_of_the_secrets_dir_or_a_directory_is_unreadable(secrets_dir: Path) -> None:
    outside = secrets_dir.parent / "outside"
    outside.write_text("outside-value")
    (secrets_dir / "LINK").symlink_to(outside)
    (secrets_dir / "DANGLING").symlink_to(secrets_dir / "gone")
    (secrets_dir / "ADIR").mkdir()
    source = SecretSource(secrets_dir, "JOBMESH_SECRET_", {"JOBMESH_SECRET_LINK": "env-fallback"})
    with pytest.raises(SecretMissing) as caught:
        source.resolve(["LINK", "ADIR", "DANGLING"])
    assert set(caught.value.names) == {"LINK", "ADIR", "DANGLING"}
    message = str(caught.value)
    assert f"LINK ({secrets_dir}/LINK links out of {secrets_dir})" in message
    assert f"ADIR ({secrets_dir}/ADIR is not a regular file)" in message
    assert "DANGLING" in message and "dangling link" in message
    assert "outside-value" not in message and "env-fallback" not in message


def test_kubernetes_style_links_inside_the_secrets_dir_are_followed(tmp_path: Path) -> None:
    mounted = tmp_path / "mounted"
    (mounted / "..2024_01_01").mkdir(parents=True)
    (mounted / "..2024_01_01/token").write_text("k8s-token-value")
    (mounted / "..data").symlink_to("..2024_01_01")
    (mounted / "token").symlink_to("..data/token")
    assert SecretSource(mounted, "", {}).resolve(["token"]) == {"token": "k8s-token-value"}


def test_a_fifo_does_not_hang_the_executor(secrets_dir: Path) -> None:
    os.mkfifo(secrets_dir / "PIPE")
    with pytest.raises(SecretMissing, match=r"PIPE .*not a regular file"):
        SecretSource(secrets_dir, "", {}).resolve(["PIPE"])


def test_a_binary_secret_round_trips_to_the_job_byte_for_byte(tmp_path: Path) -> None:
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    raw = bytes(range(256))
    (source_dir / "BLOB").write_bytes(raw)
    values = SecretSource(source_dir, "", {}).resolve(["BLOB"])
    written = write_secret_files(values, tmp_path / "job", JOB_UID, JOB_GID)
    assert (written / "BLOB").read_bytes() == raw


# --- write_secret_files / secret_env --------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root (tests run as root here and in CI)")
def test_secret_files_are_private_to_the_jobs_uid(tmp_path: Path) -> None:
    directory = write_secret_files({"A_KEY": "value-a", "b-key": "value-b"}, tmp_path / "secrets", JOB_UID, JOB_GID)
    assert directory == tmp_path / "secrets"
    info = os.stat(directory)
    assert stat.S_IMODE(info.st_mode) == 0o500
    assert (info.st_uid, info.st_gid) == (JOB_UID, JOB_GID)
    assert sorted(os.listdir(directory)) == ["A_KEY", "b-key"]
    for name, value in (("A_KEY", "value-a"), ("b-key", "value-b")):
        info = os.stat(directory / name)
        assert stat.S_IMODE(info.st_mode) == 0o400
        assert (info.st_uid, info.st_gid) == (JOB_UID, JOB_GID)
        assert (directory / name).read_text() == value
    remove_secret_files(directory)
    assert not directory.exists()


def test_the_job_user_reads_its_secret_and_others_cannot() -> None:
    if os.geteuid() != 0:
        pytest.skip("switching users needs root (tests run as root here and in CI)")
    # Not under pytest's tmp_path: its root-only parents would lock every other user out.
    base = Path(tempfile.mkdtemp(prefix="jobmesh-secrets-test-"))
    try:
        base.chmod(0o755)
        directory = write_secret_files({"TOKEN": "job-only-value"}, base / "secrets", JOB_UID, JOB_GID)

        def read_as(uid: int) -> subprocess.CompletedProcess[str]:
            argv = ["cat", str(directory / "TOKEN")]
            return subprocess.run(argv, user=uid, group=uid, capture_output=True, text=True, check=False)

        assert read_as(JOB_UID).stdout == "job-only-value"
        other = read_as(4242)  # another job's uid
        assert other.returncode != 0 and "Permission denied" in other.stderr
        remove_secret_files(directory)
        assert not directory.exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_write_secret_files_refuses_an_existing_directory_and_bad_names(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        write_secret_files({"A": "aaaa"}, tmp_path / "taken", None, None)
    with pytest.raises(SecretMissing, match="refused"):
        write_secret_files({"../A": "aaaa"}, tmp_path / "fresh", None, None)
    assert not (tmp_path / "fresh").exists()


def test_remove_secret_files_of_a_missing_directory_is_fine(tmp_path: Path) -> None:
    remove_secret_files(tmp_path / "never-made")


def test_secret_env_names_are_upper_case_with_underscores() -> None:
    assert secret_env({"db-password": "p", "API_TOKEN": "t", "mixed-Case_1": "m"}) == {
        "DB_PASSWORD": "p",
        "API_TOKEN": "t",
        "MIXED_CASE_1": "m",
    }


def test_secret_env_refuses_two_names_that_become_one_variable() -> None:
    with pytest.raises(SecretMissing, match="db-pass and DB_PASS would both be the variable DB_PASS") as caught:
        secret_env({"db-pass": "one-value", "DB_PASS": "two-value"})
    assert caught.value.names == ("db-pass", "DB_PASS")
    assert "one-value" not in str(caught.value) and "two-value" not in str(caught.value)


# --- Masker -------------------------------------------------------------------------------


def test_without_secrets_every_line_comes_back_as_it_was() -> None:
    masker = Masker({})
    line = "nothing to hide here " * 10
    assert masker.active is False
    assert masker.mask(line) is line
    assert masker.mask_bytes(line.encode()) == line.encode()


def test_a_line_without_a_secret_is_returned_itself() -> None:
    masker = Masker({"TOKEN": "s3cr3t-token"})
    line = "an ordinary line of output"
    assert masker.mask(line) is line
    data = line.encode()
    assert masker.mask_bytes(data) is data


def test_every_occurrence_of_every_secret_is_masked() -> None:
    masker = Masker({"A": "alpha-secret", "B": "beta-secret"})
    assert masker.mask("a=alpha-secret b=beta-secret again alpha-secret.") == "a=*** b=*** again ***."
    assert masker.mask("alpha-secretbeta-secret") == MASK  # adjacent occurrences are one run


def test_a_mapping_is_masked_by_its_values_never_its_names() -> None:
    masker = Masker({"PASSWORD": "pa55word"})
    assert masker.mask("PASSWORD=pa55word") == "PASSWORD=***"


def test_longest_first_when_one_secret_contains_another() -> None:
    masker = Masker(["abcd", "abcdefgh"])
    assert masker.mask("x abcdefgh y abcd z") == "x *** y *** z"


def test_overlapping_secrets_leave_no_part_of_either() -> None:
    masker = Masker(["abcdef", "defghi"])
    assert masker.mask("[abcdefghi]") == "[***]"  # a plain substitution would leave "ghi"
    chained = Masker(["1234", "3456", "5678"])
    assert chained.mask("-12345678-") == "-***-"
    assert chained.mask_bytes(b"-12345678-") == b"-***-"


def test_regex_characters_in_a_secret_are_literal() -> None:
    masker = Masker(["a.b*c+(d)|e"])
    assert masker.mask("x a.b*c+(d)|e y") == "x *** y"
    assert masker.mask("aXbbbc+(d)|e") == "aXbbbc+(d)|e"


def test_values_shorter_than_the_minimum_are_not_masked_and_named() -> None:
    assert MIN_SECRET_LENGTH == 4
    masker = Masker({"SHORT": "abc", "LONG": "long-one", "EMPTY": ""})
    assert masker.unmasked == ("SHORT",)
    assert masker.mask("abc long-one") == "abc ***"
    assert Masker(["abc"]).active is False


def test_a_multi_line_secret_is_masked_line_by_line_and_whole() -> None:
    key = "-----BEGIN KEY-----\r\nMIIEvQIBADANBg\nkqhkiG9w0BAQEF\n-----END KEY-----"
    masker = Masker({"KEY": key})
    for line in key.split("\n"):
        assert masker.mask(f"> {line.rstrip()}") == "> ***"
    assert masker.mask(f"before\n{key}\nafter") == "before\n***\nafter"


def test_a_tail_cut_inside_a_secret_loses_the_rest_of_it() -> None:
    masker = Masker({"T": "0123456789abcdef"})
    assert masker.mask_tail("9abcdef and then 0123456789abcdef\n") == "*** and then ***\n"
    assert masker.mask_tail("ef short suffix") == "ef short suffix"  # under the minimum: not a secret's end
    assert masker.mask_tail("plain tail") == "plain tail"


def test_bytes_masking_finds_non_ascii_and_binary_secrets() -> None:
    masker = Masker({"U": "pässwörd", "B": b"\xff\xfe-raw".decode("utf-8", "surrogateescape")})
    assert masker.mask_bytes("x pässwörd y".encode()) == b"x *** y"
    assert masker.mask_bytes(b"\x00\xff\xfe-raw\x00") == b"\x00***\x00"


def test_mask_file_rewrites_a_result_in_place(tmp_path: Path) -> None:
    masker = Masker({"T": "result-secret"})
    result = tmp_path / "result.json"
    result.write_bytes(b'{"token": "result-secret", "n": 1}')
    assert masker.mask_file(result) is True
    assert result.read_bytes() == b'{"token": "***", "n": 1}'
    assert masker.mask_file(result) is False  # nothing left to mask
    assert masker.mask_file(tmp_path / "missing") is False


def test_mask_file_never_follows_a_link_the_job_made(tmp_path: Path) -> None:
    masker = Masker({"T": "result-secret"})
    outside = tmp_path / "executor-file"
    outside.write_text("result-secret lives here")
    link = tmp_path / "result"
    link.symlink_to(outside)
    assert masker.mask_file(link) is False
    assert outside.read_text() == "result-secret lives here"


async def test_a_secret_a_real_process_echoes_reaches_the_sink_as_stars() -> None:
    values = SecretSource(None, "JOBMESH_SECRET_", {"JOBMESH_SECRET_db": "pw-9f8e7d"}).resolve(["db"])
    masker = Masker(values)
    seen: list[tuple[str, str]] = []

    async def publish(stream: str, line: str) -> None:
        seen.append((stream, line))

    sink = masker.sink(publish)
    script = 'echo "connecting with $DB"; echo "partial: ${DB%7d}"; echo "$DB$DB" >&2'
    process = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        script,
        env={**secret_env(values), "PATH": os.environ["PATH"]},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    for stream, data in (("stdout", out), ("stderr", err)):
        for line in data.decode().splitlines():
            await sink(stream, line)
    assert process.returncode == 0
    assert seen == [
        ("stdout", "connecting with ***"),
        ("stdout", "partial: pw-9f8e"),  # not the whole value: a part is not masked (documented)
        ("stderr", "***"),
    ]
    assert masker.sink(publish) is not publish
    assert Masker({}).sink(publish) is publish


# --- the executor's environment ---------------------------------------------------------------


def test_the_source_keeps_the_secret_variables_and_takes_them_out_of_a_mutable_environment() -> None:
    environ = {"JOBMESH_SECRET_DB": "pw-9f8e7d", "JOBMESH_SECRET_API": "tok-5", "PATH": "/usr/bin", "OTHER": "x"}
    source = SecretSource(None, "JOBMESH_SECRET_", environ)
    assert environ == {"PATH": "/usr/bin", "OTHER": "x"}  # nothing the executor starts can inherit them
    assert source.resolve(["DB", "API"]) == {"DB": "pw-9f8e7d", "API": "tok-5"}
    environ["JOBMESH_SECRET_LATE"] = "set-after"  # a snapshot: later changes do not count
    with pytest.raises(SecretMissing):
        source.resolve(["LATE"])


def test_a_read_only_environment_is_only_read_and_no_prefix_takes_nothing() -> None:
    from types import MappingProxyType

    frozen = MappingProxyType({"JOBMESH_SECRET_DB": "pw-9f8e7d"})
    assert SecretSource(None, "JOBMESH_SECRET_", frozen).resolve(["DB"]) == {"DB": "pw-9f8e7d"}
    assert dict(frozen) == {"JOBMESH_SECRET_DB": "pw-9f8e7d"}
    environ = {"JOBMESH_SECRET_DB": "pw-9f8e7d"}
    SecretSource(None, "", environ)
    assert environ == {"JOBMESH_SECRET_DB": "pw-9f8e7d"}  # variables off: left alone


def test_with_os_environ_a_child_started_afterwards_does_not_inherit_the_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JM_TEST_SECRET_DB", "pw-9f8e7d")
    monkeypatch.setenv("JM_TEST_PLAIN", "plain")
    source = SecretSource(None, "JM_TEST_SECRET_", os.environ)
    assert "JM_TEST_SECRET_DB" not in os.environ
    # A child without env= gets the process's environment: the variable is unset there too.
    child = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
    assert "JM_TEST_SECRET_DB" not in child and "pw-9f8e7d" not in child and "JM_TEST_PLAIN=plain" in child
    assert source.resolve(["DB"]) == {"DB": "pw-9f8e7d"}
