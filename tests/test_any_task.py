"""Any iterative task: import strings ``module:attr`` from every command, plug-ins, checks when a task is made,
and training defaults that follow from what a task is, not from its name."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hf_iterheads import task_plugins
from hf_iterheads.cli import main
from hf_iterheads.errors import IterHeadsError
from hf_iterheads.tasks import BUILTIN_TASKS, IterativeTask, get_task, register_task, source_of, task_ref
from hf_iterheads.training.config import FAST, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--n-len", "5", "--per-length", "24", "--batch-size", "16", "--warmup-steps", "2",
        "--eval-per-length", "8", "--log-every", "2", "--report-to", "none", "--threads", "1"]
MODULE = """
from hf_iterheads import IterativeTask
affine5 = IterativeTask("affine5", inputs=range(5), states=range(5), step=lambda s, x: (2 * s + x) % 5)
not_a_task = 42
parity_again = IterativeTask("parity", inputs=(0, 1), states=(0, 1), step=lambda s, x: s ^ x)
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> Path:
    """A folder holding ``mytasks.py``, made the current directory (as a user runs the CLI from their project)."""
    name = f"mytasks_{tmp_path.name.replace('-', '_')}"  # one module name per test: sys.modules keeps imports
    (tmp_path / f"{name}.py").write_text(MODULE.replace("affine5", f"affine5_{tmp_path.name.replace('-', '_')}"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / f"{name}.py"


def _ref(module: Path, attr: str = "affine5") -> str:
    return f"{module.stem}:{attr}_{module.parent.name.replace('-', '_')}" if attr == "affine5" else f"{module.stem}:{attr}"


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The console script in a fresh process (as a new shell would run it)."""
    return subprocess.run([sys.executable, "-m", "hf_iterheads.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=600)


# --- import strings -------------------------------------------------------------------------------------------


def test_an_import_string_finds_the_task_and_remembers_where_it_came_from(user_module):
    ref = _ref(user_module)
    task = get_task(ref)
    assert task.name == ref.split(":")[1] and get_task(task.name) is task
    assert source_of(task.name) == ref and task_ref(task.name) == ref and task_ref("parity") == "parity"


@pytest.mark.parametrize("ref, message", [
    ("no_such_module_xyz:task", "no module named 'no_such_module_xyz'"),
    ("{mod}:missing", "has no attribute 'missing'"),
    ("{mod}:not_a_task", "is a int, not an IterativeTask"),
    ("{mod}:parity_again", "a built-in task's name"),
    ("{mod}:", "write an import string"),
    ("1bad:x", "write an import string"),
])
def test_each_way_an_import_string_can_fail_has_its_own_line(user_module, ref, message):
    with pytest.raises(IterHeadsError, match=re.escape(message)):
        get_task(ref.format(mod=user_module.stem))


def test_a_module_that_raises_on_import_is_one_error(tmp_path, monkeypatch):
    (tmp_path / "broken_tasks_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IterHeadsError, match="importing 'broken_tasks_mod' raised RuntimeError: boom at import"):
        get_task("broken_tasks_mod:x")


# --- checks when a task is made -------------------------------------------------------------------------------


def _flaky():
    calls = iter(range(10**6))
    return lambda s, x: (s + x + next(calls) % 2) % 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(step=lambda s, x: [][len(s)]), "its step function <lambda> raised IndexError: list index out of range on ("),
    (dict(step=lambda s, x: s + x), "returned 3 on (2, 1), which is not one of its states"),
    (dict(step=_flaky()), "not deterministic"),
    (dict(step=lambda s, x: float(1)), "must return integers of the shape"),
    (dict(inputs=()), "inputs must be distinct non-negative integers"),
    (dict(inputs=(0, 1, 1)), "inputs must be distinct non-negative integers"),
    (dict(states=(0,), step=lambda s, x: s * 0), "needs at least two"),
    (dict(first=lambda x: x + 10), "its first function returned 10 on (0)"),
    (dict(inputs=range(5000), states=range(5000)), "over the limit of 4095"),
])
def test_a_broken_task_fails_when_it_is_made_not_mid_training(kwargs, message):
    spec = dict(name="broken", inputs=(0, 1), states=(0, 1, 2), step=lambda s, x: (s + x) % 3) | kwargs
    with pytest.raises(IterHeadsError, match=re.escape(message)):
        IterativeTask(**spec)


def test_register_task_refuses_a_builtin_name_and_non_tasks():
    with pytest.raises(IterHeadsError, match="built-in task's"):
        register_task(IterativeTask("parity", (0, 1), (0, 1), step=lambda s, x: s))
    with pytest.raises(IterHeadsError, match="needs an IterativeTask"):
        register_task("parity")  # type: ignore[arg-type]
    with pytest.raises(IterHeadsError, match="between 2 and 4096"):
        get_task("cumsum_mod99999999999")


# --- defaults from what the task is ----------------------------------------------------------------------------

# Each built-in's auto defaults: (offsets, restart at, below, max restarts, length weights, max steps, curriculum).
BUILTIN_DEFAULTS = {
    "binary_copy": (True, 1000, 0.4, 5, "uniform", 12000, "binary_copy:0.5:3000,cumsum:0.3:0"),
    "parity": (True, 3000, 0.22, 1, "linear", 12000, "binary_copy:0.5:3000,cumsum:0.3:0"),
    "polynomial": (True, 3000, 0.4, 2, "linear", 12000, "binary_copy:0.5:3000,cumsum:0.3:0"),
    "cumsum": (True, 3000, 0.4, 1, "uniform", 9000, "binary_copy:0.5:3000"),
    "s3_product": (True, 3000, 0.4, 1, "uniform", 9000, "binary_copy:0.5:3000"),
}


def _defaults(task) -> tuple:
    c = replace(FAST, tasks=[task])
    return (c.position_offsets, c.restart_at, c.restart_below, c.max_restarts, c.length_weights, c.max_steps,
            c.curriculum)


@pytest.mark.parametrize("name", list(BUILTIN_DEFAULTS))
def test_builtins_keep_the_defaults_their_seed_sweeps_measured(name):
    assert _defaults(name) == BUILTIN_DEFAULTS[name]


def test_a_renamed_builtin_gets_the_builtins_defaults():
    """The defaults follow the step table: the same task under another name trains the same way."""
    for task in BUILTIN_TASKS:
        twin = register_task(IterativeTask(f"twin_of_{task.name}", task.inputs, task.states, step=task.step,
                                           first=task.first), overwrite=True)
        assert _defaults(twin.name) == BUILTIN_DEFAULTS[task.name]


def test_a_task_that_ignores_its_input_somewhere_or_has_a_large_table_gets_its_defaults_from_that():
    """Defaults read off the step table: a state that ignores x_t brings cumsum rows and lengths in proportion to
    L; more than 256 (state, input) pairs, one attempt with the whole (12,000-step) budget; offsets always."""
    reset = register_task(IterativeTask("reset_mod13", range(1, 13), range(13), step=lambda s, x: (s * x + 1) % 13),
                          overwrite=True)  # state 0 ignores x_t; 13 x 12 = 156 pairs
    big = register_task(IterativeTask("shift_mod29", range(29), range(29), step=lambda s, x: (3 * s + x) % 29),
                        overwrite=True)  # x_t recoverable everywhere; 29 x 29 = 841 pairs
    assert _defaults(reset.name) == (True, 3000, 0.4, 2, "linear", 12000, "binary_copy:0.5:3000,cumsum:0.3:0")
    assert _defaults(big.name) == (True, 0, 0.4, 0, "uniform", 12000, "binary_copy:0.5:3000")
    mixed = replace(FAST, tasks=["cumsum", big.name])
    assert (mixed.restart_at, mixed.max_restarts, mixed.curriculum) == (0, 0, "binary_copy:0.5:3000")
    judged = replace(FAST, tasks=[big.name], restart_at=3000)  # a check asked for: it may restart
    assert judged.max_restarts == 2


def test_training_holds_no_list_of_task_names():
    names = "|".join(t.name for t in BUILTIN_TASKS)
    pattern = re.compile(rf"[(\[{{,]\s*[\"'](?:{names})[\"']\s*[,)\]}}]")  # a name as an item of a tuple/list/set
    for path in (ROOT / "hf_iterheads" / "training").glob("*.py"):
        hits = [line for line in path.read_text().splitlines() if pattern.search(line)]
        assert not hits, f"{path.name}: {hits}"


def test_properties_of_the_builtins():
    props = {t.name: t.properties for t in BUILTIN_TASKS}
    assert not props["binary_copy"].reads_state and props["parity"].reads_state
    assert not props["polynomial"].input_recoverable and props["s3_product"].input_recoverable
    assert props["parity"].order_free and props["cumsum"].order_free and not props["s3_product"].order_free
    assert props["parity"].few_inputs(16) and not props["polynomial"].few_inputs(16)


# --- every command ---------------------------------------------------------------------------------------------


def test_train_resume_eval_detect_and_plot_find_the_task_in_a_fresh_process(user_module):
    ref, folder = _ref(user_module), user_module.parent
    name = ref.split(":")[1]
    run = folder / "run"
    done = cli("train", "--task", ref, "--output-dir", str(run), "--max-steps", "6", "--eval-every", "3",
               "--checkpoint-every", "3", *TINY, cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    stored = json.loads((run / "run_config.json").read_text())
    assert stored["tasks"] == [name] and stored["task_sources"] == {name: ref}
    assert json.loads((run / "config.json").read_text())["iterheads"]["task_sources"] == {name: ref}
    assert ref in (run / "README.md").read_text()  # the model card names the import string
    resumed = cli("train", "--resume", "--output-dir", str(run), "--max-steps", "8", cwd=folder)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    evaluated = cli("eval", str(run), "--task", name, "--lengths", "4-5", "--output", str(folder / "eval.json"), cwd=folder)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert name in (folder / "eval.json").read_text()
    detected = cli("detect", str(run), "--task", name, "--n", "8", "--lengths", "2-5", "--output-dir", str(folder / "det"), cwd=folder)
    assert detected.returncode == 0, detected.stderr[-2000:]
    assert json.loads((folder / "det" / "scores.json").read_text())["task"] == name
    # the other commands, in this process (the fresh-process route is proven above)
    assert main(["plot", str(run), "--output-dir", str(folder / "plots")]) == 0  # the run's own task by default
    assert (folder / "plots" / "attention_maps.png").is_file()
    assert main(["scan", str(run), "--tasks", ref, "--n", "4", "--lengths", "2-5", "--output-dir", str(folder / "atlas")]) == 0
    assert name in (folder / "atlas" / "summary.md").read_text()


def test_reproduce_takes_more_tasks_by_import_string(user_module, capsys):
    from hf_iterheads.paper.reproduce import SMOKE, plan

    ref = _ref(user_module)
    name = ref.split(":")[1]
    jobs = {j.name: j for j in plan(SMOKE, (ref,))}
    assert {f"{name}-cot-2L", f"{name}-cot-2L-seed1", f"{name}-nocot-2L", f"{name}-cot-1L"} <= set(jobs)
    assert jobs[f"{name}-cot-2L"].train_args[:2] == ["--task", ref] and jobs[f"{name}-cot-2L"].detect_tasks == (name,)
    assert main(["reproduce", "--smoke", "--output-dir", str(user_module.parent / "r"), "--tasks", "parity"]) == 2
    assert "named twice" in capsys.readouterr().err


def test_a_mixture_and_a_curriculum_helper_take_import_strings(user_module, tmp_path):
    ref = _ref(user_module)
    out = tmp_path / "mix"
    assert main(["train", "--task", f"parity,{ref}", "--curriculum", f"{ref}:0.3:2", "--output-dir", str(out),
                 "--max-steps", "2", "--eval-every", "2", *TINY]) == 0
    cfg = TrainConfig.load(out / "run_config.json")
    assert cfg.tasks == ["parity", ref.split(":")[1]] and cfg.helpers[0].task == ref.split(":")[1]


def test_build_datasets_and_the_dataset_script_take_import_strings(user_module, tmp_path):
    ref, name = _ref(user_module), _ref(user_module).split(":")[1]
    assert main(["build-datasets", "--output-dir", str(tmp_path / "ds"), "--tasks", ref, "--n-len", "4",
                 "--per-length", "8"]) == 0
    assert (tmp_path / "ds" / name).is_dir()
    script = subprocess.run([sys.executable, str(ROOT / "dataset_scripts" / "build_datasets.py"), "--output-dir",
                             str(tmp_path / "ds2"), "--tasks", ref, "--n-len", "4", "--per-length", "8"],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert script.returncode == 0, script.stderr[-2000:]
    assert (tmp_path / "ds2" / name).is_dir()


def test_unknown_import_strings_are_one_line_from_the_cli(user_module, tmp_path, capsys):
    for argv in (["train", "--task", "nope_mod_q:x", "--output-dir", str(tmp_path / "o")],
                 ["build-datasets", "--output-dir", str(tmp_path / "d"), "--tasks", f"{user_module.stem}:missing"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("no module named" in err or "no attribute" in err), err
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


# --- plug-ins -----------------------------------------------------------------------------------------------------


def _install_plugin(site: Path, entries: dict[str, str], module: str) -> None:
    """A distribution as pip leaves it: a module plus ``*.dist-info`` with its entry points, on ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "iterheads_plugin_demo.py").write_text(module)
    info = site / "iterheads_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: iterheads-plugin-demo\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[hf_iterheads.tasks]\n{lines}\n")


PLUGIN = textwrap.dedent("""
    from hf_iterheads import IterativeTask
    shift3 = IterativeTask("shift3", inputs=range(3), states=range(3), step=lambda s, x: (s + 2 * x) % 3)
    fake_parity = IterativeTask("parity", inputs=(0, 1), states=(0, 1), step=lambda s, x: s)
""")


@pytest.fixture
def plugin_site(tmp_path, monkeypatch) -> Path:
    site = tmp_path / "site"
    _install_plugin(site, {"shift3": "iterheads_plugin_demo:shift3", "parity": "iterheads_plugin_demo:fake_parity"},
                    PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(task_plugins, "_PLUGINS", None)
    yield site
    task_plugins._PLUGINS = None


def test_an_installed_plugins_tasks_are_usable_by_name_and_cannot_replace_a_builtin(plugin_site):
    task = get_task("shift3")
    assert task.name == "shift3" and task.properties.input_recoverable
    assert get_task("parity") is BUILTIN_TASKS[1]
    tasks, problems = task_plugins.available_tasks()
    assert "shift3" in [t.name for t in tasks] and "a built-in task has that name" in problems["parity"]


def test_the_tasks_command_lists_plugins_and_their_defaults(plugin_site, tmp_path):
    done = cli("tasks", cwd=tmp_path, env={"PYTHONPATH": f"{plugin_site}{os.pathsep}{ROOT}"})
    assert done.returncode == 0, done.stderr
    assert re.search(r"^shift3\b.*plug-in", done.stdout, re.M), done.stdout
    assert re.search(r"^polynomial\b", done.stdout, re.M) and "ignored" in done.stdout + done.stderr


def test_tasks_json_gives_each_tasks_properties(capsys):
    assert main(["tasks", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["polynomial"]["properties"]["input_recoverable"] is False
    assert rows["cumsum"]["defaults"]["max_steps"] == 9000 and rows["parity"]["defaults"]["length_weights"] == "linear"


def test_the_step_table_is_what_the_step_says():
    task = get_task("polynomial")
    s, x = np.meshgrid(task.states, task.inputs, indexing="ij")
    assert np.array_equal(task._table, (s * x + 1) % 11)
