"""Issue 27: every user mistake gets one clear line, and no run silently overwrites or mislabels results.

One test (or more) per numbered case of the issue; the command-line ones run ``run.py`` in a subprocess, as a user
would, and check the exit status, that stderr is one line, and, for mistakes refused before the model loads, which
modules the process had imported by then (none of torch for those the config alone shows).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from harness.config import REPO_ROOT, compose_config

RUN = str(REPO_ROOT / "run.py")


def _cli(args, cwd, env=None, timeout=300, command=(RUN,)):
    """``python run.py *args`` as a user runs it (``command`` replaces ``run.py``: e.g. ``("-c", code)``)."""
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_DEBUG"}
    env.update({"WANDB_MODE": "disabled", **extra})
    return subprocess.run([sys.executable, *command, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("run.py: error: ")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


#: transformers' modelling code, loaded with a model class or the attention registry (about 5 s on 2 CPU cores)
MODELLING = ("transformers.modeling_utils", "transformers.masking_utils", "transformers.processing_utils")
#: what a mistake the config alone shows (Hydra, the schema) is refused without: torch and everything above it
TORCH = ("torch", "transformers", *MODELLING)


def _refused_before(modules, args, cwd, *needles, env=None):
    """``run.py *args`` refused with one line naming ``needles``, and none of ``modules`` imported by then.

    The process runs ``run.py`` through :func:`runpy.run_path` (as ``python run.py`` does) and prints, at exit,
    which of ``modules`` are in ``sys.modules``. Counted, not timed: a wall-clock bound depends on the machine, its
    load, and whether Python's bytecode cache is warm. Returns the error line.
    """
    argv = [RUN, *args]
    code = (f"import atexit, runpy, sys; atexit.register(lambda: print(sorted(set({modules!r}) & set(sys.modules))));"
            f"sys.argv = {argv!r}; runpy.run_path({RUN!r}, run_name='__main__')")  # fmt: skip
    p = _cli([], cwd, env=env, command=("-c", code))
    line = _one_line_error(p, *needles)
    assert p.stdout.strip().splitlines()[-1] == "[]", (args, p.stdout[-2000:])
    return line


def _message(args):
    """What ``run.py *args`` refuses with, in process: its checks before the job (overrides, then the schema).

    One test per refusal stage runs ``run.py`` itself (``_refused_before``); the other cases of a stage check the
    message here, where a case costs milliseconds instead of a Python start with Hydra (seconds).
    """
    from core.errors import UserError, one_line
    from harness.cli import check_overrides
    from harness.schema import validate

    try:
        check_overrides(args)
        validate(compose_config(list(args)))
    except UserError as exc:
        return one_line(exc)
    raise AssertionError(f"{args} was not refused")


def _assert_message(args, *needles):
    line = _message(args)
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# ---------------------------------------------------------------- 1. a limited run never replaces a fuller one
def test_limited_run_gets_its_own_directory():
    full, limited = compose_config([]), compose_config(["limit=20"])
    assert limited.output_dir == full.output_dir + "-limit20"
    assert compose_config(["limit=30", "seed=1"]).output_dir.endswith("-limit30")


def _run(task, adapter, out, **kw):
    from harness.engine import RunSettings, evaluate
    from methods.none import NoMethod

    settings = RunSettings(output_dir=out, config_hash="h0", progress=False, report=False, **kw)
    return evaluate(task, adapter, NoMethod(), settings)


def test_limited_rerun_into_a_fuller_runs_directory_is_refused(llava, pope_dir, tmp_path, make_task):
    from core.errors import UserError

    out = tmp_path / "run"
    full = _run(make_task(pope_dir, limit=3, gen_kwargs={"max_new_tokens": 2}), llava, out, batch_size=9)
    before = (out / "results.json").read_text()
    with pytest.raises(UserError, match=r"holds results over 9 samples; this run \(limit=1\) covers 3"):
        _run(make_task(pope_dir, limit=1, gen_kwargs={"max_new_tokens": 2}), llava, out, config={"limit": 1})
    assert (out / "results.json").read_text() == before, "the fuller results stay"
    grown = _run(make_task(pope_dir, limit=3, gen_kwargs={"max_new_tokens": 2}), llava, out, batch_size=9)
    assert grown["results"] == full["results"] and grown["resumed"]["generated"] == 0


def test_leaderboard_matrix_shows_n_and_the_fullest_run():
    from reports.markdown import render
    from reports.table import Entry

    def entry(n, value):
        return Entry("pope", "llava", "none", "pope: accuracy,pope_official", True, n, [0], value, 0.01,
                     is_baseline=True)  # fmt: skip

    md = render([entry(60, 0.9), entry(180, 0.8)])
    row = next(line for line in md.splitlines() if line.startswith("| none |"))
    assert "0.8000 (n=180; +1 smaller, see below)" in row and "0.9000" not in row
    assert "| llava | none | 60 |" in md and "| llava | none | 180 |" in md, "the detail rows list both"


# ---------------------------------------------------------------- 2. batch_size out of range
def test_bad_batch_size_is_one_line_before_torch(tmp_path):
    _refused_before(TORCH, ["batch_size=abc", f"output_root={tmp_path}"], tmp_path, "batch_size='abc'", "must be")
    for value in ("0", "-1", "2.5"):
        _assert_message([f"batch_size={value}"], f"batch_size={value}", "must be")


def test_run_settings_refuse_a_batch_size_below_one(tmp_path):
    from core.errors import UserError
    from harness.engine import RunSettings

    for bad in (0, -1):
        with pytest.raises(UserError, match="batch_size"):
            RunSettings(output_dir=tmp_path, config_hash="h", batch_size=bad)


# ---------------------------------------------------------------- 3. a non-UTF-8 byte in a questions file
def _pope_copy(pope_dir, tmp_path, edit):
    d = tmp_path / "pope"
    shutil.copytree(pope_dir, d)
    f = d / "shapes_pope_random.json"
    f.write_bytes(edit(f.read_bytes()))
    return d


def test_non_utf8_line_is_one_error_sample_not_a_dead_run(pope_dir, tmp_path, make_task):
    from tasks.base import SampleError

    def edit(raw):
        lines = raw.split(b"\n")
        lines[1] = lines[1].replace(b'"text": "', b'"text": "\xff\xfe ', 1)
        return b"\n".join(lines)

    d = _pope_copy(pope_dir, tmp_path, edit)
    samples = make_task(d, splits=["random"]).samples()
    bad = [s for s in samples if s.error]
    assert len(bad) == 1 and bad[0].error.startswith("not valid UTF-8") and bad[0].source.endswith(":2")
    assert len(samples) == len(pope_dir.joinpath("shapes_pope_random.json").read_text().splitlines())
    with pytest.raises(SampleError, match=r"shapes_pope_random.json:2: not valid UTF-8"):
        make_task(d, splits=["random"], strict=True).samples()


# ---------------------------------------------------------------- 4. an empty questions file
@pytest.mark.parametrize("strict", [False, True])
def test_empty_questions_file_stops_with_one_line(pope_dir, tmp_path, make_task, strict):
    from tasks.base import SampleError

    d = _pope_copy(pope_dir, tmp_path, lambda raw: b"")
    with pytest.raises(SampleError, match=r"split 'random' has no questions") as info:
        make_task(d, strict=strict).samples()
    assert "\n" not in str(info.value)


def test_empty_questions_file_from_the_command_line(pope_dir, tmp_path):
    d = _pope_copy(pope_dir, tmp_path, lambda raw: b"\n\n")
    args = [
        f"task.questions='{d}/shapes_pope_{{split}}.json'",
        f"task.image_root={d}/images",
        f"output_root={tmp_path}",
    ]
    p = _cli(args, tmp_path)
    _one_line_error(p, "split 'random' has no questions")


# ---------------------------------------------------------------- 5. unknown options: did-you-mean, fast
@pytest.mark.parametrize(
    ("arg", "needle"),
    [
        ("method=vra", "unknown method 'vra'; did you mean 'var'?"),
        ("model=lava", "unknown model 'lava'; did you mean 'llava'"),
        ("task=pop", "unknown task 'pop'; did you mean 'pope'?"),
        ("limt=3", "unknown option 'limt'; did you mean 'limit'?"),
        ("method.rhoo=0.3", "is not an option of method"),
    ],
)
def test_unknown_option_did_you_mean(arg, needle):
    args = [arg, "method=var"] if arg.startswith("method.") else [arg]
    line = _assert_message(args, needle)
    if arg.startswith("method."):
        assert "did you mean 'rho'?" in line


def test_an_unknown_option_is_one_line_before_torch(tmp_path):
    _refused_before(TORCH, ["method=vra", f"output_root={tmp_path}"], tmp_path, "did you mean 'var'?")


def test_multirun_sweep_with_an_unknown_option(tmp_path):
    _refused_before(TORCH, ["-m", "method=none,fastvv", f"output_root={tmp_path}"], tmp_path,
                    "unknown method 'fastvv'; did you mean 'fastv'")  # fmt: skip
    assert not list(tmp_path.rglob("results.json"))


def test_validation_happens_before_torch_is_imported():
    code = (
        "import sys; from harness.config import compose_config; from harness.schema import validate, ConfigError\n"
        "try:\n    validate(compose_config(['method=var', 'method.p=1.5']))\n"
        "except ConfigError as e:\n    print(e)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.splitlines() == ["method.p=1.5 must be >= 0 and <= 1", "False False"]


# ---------------------------------------------------------------- 6. model path, weights format, dtype, refusal
def test_model_mistakes_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # model.path=ckpts/... is relative to where run.py starts
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    (ckpt / "pytorch_model.bin").write_bytes(b"\0")
    (ckpt / "config.json").write_text("{}")
    (tmp_path / "ckpts" / "shapes-llava").mkdir(parents=True)
    cases = [
        ("model.path=/nonexistent/llava", "model.path='/nonexistent/llava' is not a directory"),
        # under a directory that exists here: a mistyped local path, not a hub id (minutes of download retries)
        ("model.path=ckpts/shapes-lava", "is not a directory", "did you mean 'ckpts/shapes-llava'?"),
        (f"model.path={ckpt}", "holds no *.safetensors weights (found: pytorch_model.bin)"),
        ("model.dtype=float8", "model.dtype='float8' must be 'float32' or 'bfloat16' or 'float16' or 'auto'"),
        ("model.attn_implementation=sdp", "did you mean 'sdpa'?"),
        ("model.backend=vlm", "model.backend='vlm' is no generation backend; did you mean 'vllm'?"),
        ("model.device=gpu", "model.device='gpu' is not a device: use cpu, cuda, cuda:N or auto"),
    ]
    for arg, *needles in cases:
        _assert_message([arg], *needles)
    _refused_before(TORCH, [cases[2][0], f"output_root={tmp_path}"], tmp_path, *cases[2][1:])


def test_a_device_this_torch_cannot_use_is_one_line_before_loading(tmp_path):
    """CPU-only torch here ("no CUDA device"); on a GPU machine: "only N CUDA device(s)". Before the task's data."""
    args = ["model.device=cuda:99", "task.questions=/nonexistent/questions.json", f"output_root={tmp_path}"]
    _refused_before(MODELLING, args, tmp_path, "model.device='cuda:99', but ", "CUDA device")


@pytest.mark.parametrize(
    ("arg", "needle"),
    [("method=var method.layers=[1,40]", "var: layers [40] out of range; the LM has 2 layers (0..1)"),
     ("method=vhr method.layers=[40]", "vhr: layers [40] out of range; the LM has 2 layers (0..1)"),
     ("method=carve method.layers=[0,2]", "carve: layers [2] out of range; the LM has 2 layers (0..1)"),
     ("method=fastv method.layer=40", "FastV layer K=40 must be in 1..1 (the LM has 2 layers)"),
     ("method=embedlens method.mode=inject method.entry_layer=9", "EmbedLens entry_layer 9 must be in 1..1"),
     ("method=iri method.fcct_file=FOUR", "was traced on a 4-layer LM; this one has 2: trace this checkpoint")],
)  # fmt: skip
def test_a_layer_the_model_does_not_have_is_refused_before_loading(tmp_path, arg, needle):
    """The LM's depth is read from the checkpoint's config: refused before the weights load (a planted broken
    safetensors file would fail the load, so a refusal after it would name that instead). In process, through
    run.py's own steps; ``run.py`` itself refuses this way in the modelling-import test below."""
    from core.errors import UserError, one_line
    from harness.engine import evaluate, from_config
    from harness.schema import validate

    ckpt = tmp_path / "ckpt"
    shutil.copytree(REPO_ROOT / "assets" / "shapes-llava", ckpt)
    for weights in ckpt.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    four = tmp_path / "fcct4.json"  # an FCCT calibration of a 4-layer LM
    four.write_text(json.dumps({**json.loads((ckpt / "iri_fcct.json").read_text()), "layers": 4}))
    args = [*arg.replace("FOUR", str(four)).split(), f"model.path={ckpt}", "limit=1", "progress=false",
            f"output_root={tmp_path}"]  # fmt: skip
    cfg = compose_config(args)
    validate(cfg)
    with pytest.raises(UserError) as refused:
        evaluate(*from_config(cfg))
    assert needle in one_line(refused.value)


@pytest.mark.parametrize("model", ["llava", "qwen_vl", "internvl"])
def test_a_refusal_before_loading_never_imports_the_modelling_code(tmp_path, model):
    """The checks that read the checkpoint's config (here VAR's layers) run before any family imports its model
    class or registers an attention function: counted in ``sys.modules``, not timed."""
    args = [f"model={model}", "method=var", "method.layers=[1,40]", "limit=1", f"output_root={tmp_path}"]
    _refused_before(MODELLING, args, tmp_path, "var: layers [40] out of range")


@pytest.mark.parametrize(
    ("arg", "needles"),
    [("task.questions=/data/pope_{split}.json", ["cannot read the override 'task.questions=/data/pope_{split}.json'",
                                                 "\"task.questions='/data/pope_{split}.json'\""]),
     ("output_root=/proc/no-such-dir", ["output_root='/proc/no-such-dir' cannot be created"])],
)  # fmt: skip
def test_an_unreadable_override_or_an_output_root_that_cannot_be_made_is_one_line(tmp_path, arg, needles):
    if arg.startswith("task."):  # a grammar error: Hydra's parser, before the schema
        _refused_before(TORCH, [arg], tmp_path, *needles)
    else:
        _assert_message([arg], *needles)


def test_a_checkpoint_that_cannot_be_fetched_is_one_line(tmp_path):
    """A hub id that is neither cached nor reachable (offline here) fails as one line naming model.path."""
    p = _cli(["model.path=nobody-here/no-such-model", "limit=1", f"output_root={tmp_path}"], tmp_path,
                env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    _one_line_error(p, "model.path='nobody-here/no-such-model' could not be loaded: ")


def test_a_checkpoint_that_cannot_be_fetched_fails_at_its_first_reading():
    """FastV, IRI and layer lists read the LM's depth from the config before loading. A hub id that cannot be
    fetched fails there as the one line: the load would fail the same way, after the hub client's retries (minutes
    online without the hub) a second time."""
    code = (
        "from adapters.llava import LlavaAdapter\nfrom core.errors import UserError\nfrom methods.fastv import FastV\n"
        "adapter = LlavaAdapter(name='x', path='nobody-here/no-such-model')\n"
        "try:\n    FastV().check(adapter)\nexcept UserError as e:\n    print(e)\n"
        "print(adapter.model is None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    lines = out.stdout.splitlines()
    assert lines[0].startswith("model.path='nobody-here/no-such-model' could not be loaded: ") and lines[1] == "True"


def test_a_checkpoint_of_another_family_is_one_line_before_loading(tmp_path):
    """Before, a LLaVA checkpoint under model=internvl failed deep in the processor (AttributeError). Through
    run.py once (one line, before the task's data: its questions file does not exist), then every pairing
    in process."""
    from core.errors import UserError
    from harness.config import build_adapter

    llava = str(REPO_ROOT / "assets" / "shapes-llava")
    args = ["model=qwen_vl", f"model.path={llava}", "task.questions=/nonexistent/questions.json",
            f"output_root={tmp_path}"]  # fmt: skip
    _refused_before(MODELLING, args, tmp_path, "/shapes-llava' holds a llava checkpoint (config.model_type), but the "
                    "qwen_vl adapter loads qwen2_vl, qwen2_5_vl; use model=llava with this model.path")  # fmt: skip
    cases = [
        (["model=internvl", "model.path=ASSETS/shapes-qwen2vl"], r"holds a qwen2_vl .* use model=qwen_vl"),
        (["model=llava", "model.path=ASSETS/shapes-internvl"], r"holds a internvl .* use model=internvl"),
        (["model=llava_cca", "model.path=ASSETS/shapes-qwen2vl"], r"holds a qwen2_vl .* use model=qwen_vl"),
        (
            ["model=qwen_vl", "model.variant=qwen2_5_vl"],
            r"model\.variant=qwen2_5_vl but model\.path=.* is a qwen2_vl checkpoint; leave model\.variant=auto",
        ),
    ]
    for args, pattern in cases:
        cfg = compose_config([arg.replace("ASSETS", str(REPO_ROOT / "assets")) for arg in args])
        adapter = build_adapter(cfg.model)
        with pytest.raises(UserError, match=pattern):
            adapter.check_checkpoint()
        assert adapter.model is None
    for option in ("llava", "qwen_vl", "internvl", "llava_cca", "llava_mma", "llava_144"):
        build_adapter(compose_config([f"model={option}"]).model).check_checkpoint()  # the shipped ones pass


def test_a_checkpoint_directory_without_its_config_is_refused(tmp_path):
    """Without config.json, from_pretrained builds the class's default (a 7B LLaVA here: killed for memory).
    Refused before torch by the schema, and by Adapter.load for callers of the Python API."""
    from adapters.llava import LlavaAdapter
    from core.errors import UserError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(REPO_ROOT / "assets" / "shapes-llava", ckpt)
    (ckpt / "config.json").unlink()
    _assert_message([f"model.path={ckpt}"], "model.path='", "holds no config.json: copy the one save_pretrained wrote")
    adapter = LlavaAdapter(name="x", path=str(ckpt))
    with pytest.raises(UserError, match=r"holds no config\.json"):
        adapter.load()
    assert adapter.model is None


def test_backend_without_its_package_is_one_line(tmp_path):
    """``model.backend=vllm`` where vLLM cannot be imported (``sys.modules['vllm'] = None`` makes sure of it)."""
    code = (
        f"import sys, runpy; sys.modules['vllm'] = None; sys.argv = ['run.py', 'model.backend=vllm', "
        f"'output_root={tmp_path}', 'limit=1']; runpy.run_path({RUN!r}, run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_DEBUG"} | {"WANDB_MODE": "disabled"}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    _one_line_error(p, "model.backend=vllm needs vLLM: pip install")


def test_unsupported_method_model_pair_is_one_line_and_debug_shows_the_traceback(tmp_path):
    p = _cli(["method=fastervlm", "model=qwen_vl", f"output_root={tmp_path}", "limit=1"], tmp_path)
    _one_line_error(p, "fastervlm")
    d = _cli(["method=fastervlm", "model=qwen_vl", f"output_root={tmp_path}", "limit=1", "debug=true"], tmp_path)
    assert d.returncode != 0 and "Traceback" in d.stderr and "UnsupportedError" in d.stderr


def test_debug_environment_variable_shows_the_traceback(tmp_path):
    p = _cli(["method=vra", f"output_root={tmp_path}"], tmp_path, env={"HARNESS_DEBUG": "1"})
    assert p.returncode != 0 and "Traceback" in p.stderr and "UnknownOptionError" in p.stderr


# ---------------------------------------------------------------- 7. W&B that cannot be reached
def test_wandb_init_timeout_bounds_an_unreachable_server(tmp_path):
    """An online-mode init against a closed local port: W&B's own default would wait 90 s.

    In a subprocess: W&B keeps its settings (base URL, mode) in a process-wide singleton.
    """
    from omegaconf import OmegaConf

    assert OmegaConf.load(REPO_ROOT / "conf" / "logger" / "wandb.yaml").init_timeout <= 15
    code = (
        "import sys, time, warnings; from pathlib import Path; from core.loggers import WandbLogger\n"
        "logger = WandbLogger(project='p', init_timeout=1); t0 = time.perf_counter()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always'); logger.start({'a': 1}, Path(sys.argv[1]))\n"
        "print(round(time.perf_counter() - t0, 1), logger.run is None,\n"
        "      any('W&B could not start' in str(w.message) for w in caught)); logger.finish()\n"
    )
    env = {
        **os.environ,
        "WANDB_MODE": "online",  # the setting path under test; never set by the harness itself
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # discard port: connection refused
        "WANDB_API_KEY": "a" * 40,
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
    }
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], env=env, cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    seconds, no_run, warned = p.stdout.split()
    assert (no_run, warned) == ("True", "True"), p.stderr[-2000:]
    assert float(seconds) < 45, f"wandb.init took {seconds} s with init_timeout=1"


# ---------------------------------------------------------------- 8. two runs into one output directory
def test_second_run_on_a_held_output_directory_stops_at_once(llava, pope_dir, tmp_path, make_task):
    from filelock import FileLock

    from harness.engine import OutputLockedError

    out = tmp_path / "run"
    out.mkdir()
    task = make_task(pope_dir, limit=1, gen_kwargs={"max_new_tokens": 2})
    held = FileLock(str(out / ".lock"))  # what a first run holds while it generates
    with held, pytest.raises(OutputLockedError, match="is in use by another run"):
        _run(task, llava, out)
    assert not (out / "samples_pope.jsonl").exists(), "nothing generated twice"
    res = _run(task, llava, out)
    assert res["n-samples"]["pope"]["effective"] == 3


def test_lock_of_a_killed_run_does_not_block(tmp_path):
    """An OS lock: the kernel drops it with its process, so a kill -9 leaves no stale lock."""
    code = (
        "import os, sys; from filelock import FileLock; l = FileLock(sys.argv[1]); l.acquire(); "
        "print('held', flush=True); os.kill(os.getpid(), 9)"
    )
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / ".lock")], capture_output=True, text=True)
    assert p.stdout.strip() == "held" and p.returncode == -9
    from filelock import FileLock

    with FileLock(str(tmp_path / ".lock"), timeout=0):
        pass


# ---------------------------------------------------------------- 9. a corrupt record in the middle of a samples file
def test_resume_over_a_corrupt_middle_record(llava, pope_dir, tmp_path, make_task):
    task = make_task(pope_dir, limit=2, gen_kwargs={"max_new_tokens": 2})
    clean = _run(task, llava, tmp_path / "clean", batch_size=2)
    out = tmp_path / "run"
    _run(task, llava, out, batch_size=2)
    path = out / "samples_pope.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # damaged in the middle
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"1 corrupt record line\(s\) \(line 3\) moved to"):
        res = _run(task, llava, out, batch_size=2)
    ids = [json.loads(x)["sample_id"] for x in path.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6 and res["resumed"]["generated"] == 1
    assert res["results"] == clean["results"]
    assert (out / "samples_pope.jsonl.corrupt").read_text().startswith("3\t")


# ---------------------------------------------------------------- 10. ids of invalid rows, errors grouped by reason
def test_invalid_rows_keep_their_question_id_and_errors_group_by_reason(llava, pope_dir, tmp_path, make_task):
    def edit(raw):
        rows = [json.loads(x) for x in raw.decode().splitlines()]
        del rows[1]["label"]  # invalid row, valid question_id
        rows[2]["image"], rows[3]["image"] = "gone_a.png", "gone_b.png"  # two different missing images
        return "".join(json.dumps(r) + "\n" for r in rows[:4]).encode()

    d = _pope_copy(pope_dir, tmp_path, edit)
    task = make_task(d, splits=["random"], gen_kwargs={"max_new_tokens": 2})
    qid = json.loads((d / "shapes_pope_random.json").read_text().splitlines()[1])["question_id"]
    assert next(s for s in task.samples() if s.error).sample_id == f"random/{qid}"
    res = _run(task, llava, tmp_path / "out")
    assert res["errors"]["by_reason"] == {"missing field 'label'": 1, "image not found": 2}


# ---------------------------------------------------------------- 11. data edited between a run and its resume
def test_resume_after_the_data_changed_generates_the_changed_samples_again(llava, pope_dir, tmp_path, make_task):
    """Records are keyed by sample id; one whose question or label changed since would score an old answer against
    the new sample (a silent wrong number). Those samples are generated again, and the metrics are those of a run
    on the edited data from scratch."""

    def flip_first_label(raw):
        rows = [json.loads(x) for x in raw.decode().splitlines()]
        rows[0]["label"] = "no" if rows[0]["label"] == "yes" else "yes"
        rows[1]["text"] = rows[1]["text"].replace("Is there", "Is there really")
        return "".join(json.dumps(r) + "\n" for r in rows).encode()

    d = tmp_path / "pope"
    shutil.copytree(pope_dir, d)
    task = lambda: make_task(d, splits=["random"], limit=4, gen_kwargs={"max_new_tokens": 2})  # noqa: E731
    out = tmp_path / "run"
    before = _run(task(), llava, out, batch_size=4)
    f = d / "shapes_pope_random.json"
    f.write_bytes(flip_first_label(f.read_bytes()))
    with pytest.warns(UserWarning, match=r"2 record\(s\) were made from other data .* generated again"):
        after = _run(task(), llava, out, batch_size=4)
    fresh = _run(task(), llava, tmp_path / "fresh", batch_size=4)
    assert after["resumed"]["generated"] == 2 and after["resumed"]["dropped_on_load"]["stale"] == 2
    assert after["results"] == fresh["results"] != before["results"]
    assert after["sample_set"] == fresh["sample_set"]
    records = [json.loads(x) for x in (out / "samples_pope.jsonl").read_text().splitlines()]
    assert len(records) == len({r["sample_id"] for r in records}) == 4


# ---------------------------------------------------------------- 12. a split or a subtask with no scored sample
def test_a_split_whose_every_sample_failed_leaves_the_mean_over_splits_undefined(llava, pope_dir, tmp_path, make_task):
    """POPE's headline is the mean over the splits asked for: over two of three it is not comparable with other
    runs, so it is n/a (JSON null), and the printed table and a note say so."""
    from core.results import make_table
    from harness.engine import _unscored_splits

    d = tmp_path / "pope"
    shutil.copytree(pope_dir, d)
    f = d / "shapes_pope_popular.json"
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    f.write_text("".join(json.dumps({**r, "image": "gone.png"}) + "\n" for r in rows))
    task = make_task(d, limit=2, gen_kwargs={"max_new_tokens": 2})
    res = _run(task, llava, tmp_path / "out")
    assert res["errors"]["count"] == 2 and res["n-samples"]["pope"]["effective"] == 4
    assert res["results"]["pope_popular"]["accuracy,pope_official"] is None
    assert res["results"]["pope_popular"]["sample_len"] == 0
    assert res["results"]["pope"]["accuracy,pope_official"] is None  # not the mean of random and adversarial
    assert res["results"]["pope_random"]["accuracy,pope_official"] is not None
    table = make_table(res)
    assert any("pope_popular" in line and "n/a" in line for line in table.splitlines())
    (note,) = _unscored_splits(task.samples(), [{"split": s} for s in ("random", "adversarial")])
    assert "'popular': none of its 2 samples could be scored" in note


# ---------------------------------------------------------------- 13. mistakes a task's constructor or loader finds
def _causal_with_file_names(tmp_path):
    csv = tmp_path / "causal.csv"
    csv.write_text("COCO_val2014_000000000042.jpg,a is due to b,b is due to a\n")
    return ["task=causal_pairs", f"task.data={csv}", f"task.image_root={tmp_path}"]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (lambda t: ["task.parser=pope_offical"], ["unknown yes/no parser", "did you mean 'pope_official'"]),
        (lambda t: ["task=pope", "task.splits=[random,random]"], ["splits must be non-empty and distinct"]),
        (lambda t: ["task=mme", f"task.data={t / 'nope'}"], ["MME data", "neither a folder"]),
        (lambda t: ["task=vcrbench", f"task.data={t}"], ["is a folder, not a file"]),
        (lambda t: ["task=pope", f"task.image_root={t / 'train2014'}"], ["task.image_root=", "is not a folder"]),
        (_causal_with_file_names, ["no row fits", "task.image_pattern=null"]),
    ],
    ids=["parser-typo", "duplicate-splits", "mme-missing", "vcrbench-folder", "image-root", "causal-pattern"],
)
def test_data_and_option_mistakes_found_by_a_task_are_one_line(tmp_path, args, needles):
    p = _cli([*args(tmp_path), f"output_root={tmp_path / 'out'}", "progress=false"], cwd=tmp_path)
    _one_line_error(p, *needles)
    assert not any((tmp_path / "out").rglob("samples_*.jsonl")), "refused before any sample was generated"
