"""A job's variables at submit: names that are names, values without NUL, a line break in a
value allowed (a container gets such a value on its command line, not in its env file), the
same rule for a fallback spec and for the command line's ``--env``/``--env-file``."""

from __future__ import annotations

import pytest

from jobmesh.contract.messages.v1 import ContainerRuntime, FallbackSpec, JobSpec, ProcessRuntime, RetryPolicy
from jobmesh.contract.validation import env_name_problem, validate_spec
from jobmesh.errors import InvalidSpec


@pytest.mark.parametrize("name", ["A", "_", "a_b", "PATH", "X1", "JOBMESH_SECRET_DB"])
def test_plain_names_are_names(name: str) -> None:
    assert env_name_problem(name) == ""


@pytest.mark.parametrize("name", ["", "1X", "A=B", "A\nB", "A\n", "A\r", "A B", "A\x00", "A.B", "A-B", "É"])
def test_anything_else_is_not(name: str) -> None:
    assert "is not a variable name" in env_name_problem(name)


@pytest.mark.parametrize("kind", ["process", "container"])
def test_validate_spec_names_the_variable_of_either_runtime(kind: str) -> None:
    env = {"GOOD": "1", "X\nJOBMESH_SECRET_DB": "1"}
    runtime = ProcessRuntime(argv=["x"], env=env) if kind == "process" else ContainerRuntime(image="i", env=env)
    with pytest.raises(InvalidSpec) as caught:
        validate_spec(JobSpec(runtime=runtime), "jobs[0].spec")
    assert caught.value.field == "jobs[0].spec.runtime.env['X\\nJOBMESH_SECRET_DB']"


def test_a_nul_in_a_value_is_refused_even_when_the_caller_said_no_string_holds_one() -> None:
    with pytest.raises(InvalidSpec) as caught:
        validate_spec(JobSpec(runtime=ProcessRuntime(argv=["x"], env={"A": "x\x00"})), may_hold_nul=False)
    assert caught.value.field == "spec.runtime.env['A']" and "NUL" in str(caught.value)


def test_a_fallback_spec_gets_the_same_rule_under_its_own_path() -> None:
    fallback = FallbackSpec(runtime=ContainerRuntime(image="i", env={"A=B": "1"}))
    spec = JobSpec(runtime=ProcessRuntime(argv=["x"]), retry=RetryPolicy(max_attempts=2, fallback=fallback))
    with pytest.raises(InvalidSpec) as caught:
        validate_spec(spec)
    assert caught.value.field == "spec.retry.fallback.runtime.env['A=B']"


def test_a_line_break_in_a_value_is_a_value_for_a_process_but_not_for_a_container() -> None:
    validate_spec(JobSpec(runtime=ProcessRuntime(argv=["x"], env={"CERT": "a\r\nb"})))
    # An engine's env file cannot carry it, and its command line is anyone's to read.
    with pytest.raises(InvalidSpec) as caught:
        validate_spec(JobSpec(runtime=ContainerRuntime(image="i", env={"CERT": "line one\nline two"})))
    assert caught.value.field == "spec.runtime.env['CERT']"


def test_an_inline_stdin_is_limited_in_utf8_bytes_not_characters() -> None:
    # 40000 characters pass the contract's max_length (characters) but are 80000 bytes.
    wide = JobSpec(runtime=ProcessRuntime(argv=["cat"]), stdin="é" * 40_000)
    with pytest.raises(InvalidSpec) as caught:
        validate_spec(wide, "jobs[0].spec")
    assert caught.value.field == "jobs[0].spec.stdin"
    assert "80000 bytes (UTF-8) exceed the inline limit of 65536 bytes" in str(caught.value)
    validate_spec(JobSpec(runtime=ProcessRuntime(argv=["cat"]), stdin="é" * 32_768))  # 64 KiB exactly
    validate_spec(JobSpec(runtime=ProcessRuntime(argv=["cat"]), stdin="y" * 65_536))
