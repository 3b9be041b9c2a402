import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_dataset

from hf_iterheads.data import build_dataset, load_task_dataset, split_sizes
from hf_iterheads.dataset_builder import write_dataset_folder
from hf_iterheads.tokenizer import Layout, build_tokenizer
from tests.conftest import lay_into_hub_cache

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "dataset_scripts" / "build_datasets.py"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "iter-tasks"
    write_dataset_folder(out, ["parity", "polynomial", "s3_product"], n_len=6, per_length=40, seed=3)
    return out


def test_exact_counts_and_disjoint_splits():
    for task in ("parity", "polynomial", "cumsum", "s3_product", "binary_copy"):
        dsd = build_dataset(task, n_len=7, per_length=50, seed=1)
        for length in range(1, 8):
            n_train, n_test = split_sizes(task, length, 50)
            rows = {s: [tuple(r) for r, L in zip(dsd[s]["inputs"], dsd[s]["length"]) if L == length] for s in dsd}
            assert (len(rows["train"]), len(rows["test"])) == (n_train, n_test)
            assert len(set(rows["train"])) == n_train and len(set(rows["test"])) == n_test  # no duplicates
            assert not set(rows["train"]) & set(rows["test"])  # train and test never share an input
    # parity at L = 3 has 8 distinct inputs: all used, split 4/4; at L = 7 (128 distinct) the full 50/50
    assert split_sizes("parity", 3, 50) == (4, 4) and split_sizes("parity", 7, 50) == (50, 50)
    assert split_sizes("polynomial", 1, 1024) == (5, 5)


def test_columns_are_consistent():
    dsd = build_dataset("polynomial", n_len=5, per_length=20, seed=0)
    row = dsd["test"][30]
    assert row["task"] == "polynomial" and len(row["inputs"]) == len(row["states"]) == row["length"]
    assert row["answer"] == row["states"][-1]
    s = [row["inputs"][0]]
    for x in row["inputs"][1:]:
        s.append((s[-1] * x + 1) % 11)
    assert row["states"] == s
    assert row["text"] == " ".join(["<polynomial>", *map(str, row["inputs"]), "<eoi>", *map(str, s), "<eos>"])


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.parquet"))}


def test_same_seed_same_parquet_bytes(tmp_path, folder):
    write_dataset_folder(tmp_path / "again", ["parity", "polynomial", "s3_product"], n_len=6, per_length=40, seed=3)
    write_dataset_folder(tmp_path / "other", ["parity", "polynomial", "s3_product"], n_len=6, per_length=40, seed=4)
    assert digest(folder) == digest(tmp_path / "again")
    assert digest(folder) != digest(tmp_path / "other")
    assert (folder / "README.md").read_text() == (tmp_path / "again" / "README.md").read_text()


def test_folder_loads_with_load_dataset(folder):
    dsd = load_dataset(str(folder), "parity")
    assert set(dsd) == {"train", "test"}
    assert dsd["train"].num_rows == sum(split_sizes("parity", L, 40)[0] for L in range(1, 7))
    assert load_dataset(str(folder), "s3_product")["test"][0]["task"] == "s3_product"


def test_dataset_card(folder):
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(folder / "README.md")
    configs = {c["config_name"]: c for c in card.data.configs}
    assert set(configs) == {"parity", "polynomial", "s3_product"} and configs["polynomial"].get("default")
    assert configs["parity"]["data_files"][0] == {"split": "train", "path": "parity/train-*"}
    infos = {i["config_name"]: i for i in card.data.dataset_info}
    assert [s["name"] for s in infos["parity"]["splits"]] == ["train", "test"]
    text = card.text
    assert "s_1 = x_1" in text and "never share an input sequence" in text and "L=3: 4/4" in text


def test_load_by_repo_id_from_the_hub_cache_offline(folder, hub_cache):
    lay_into_hub_cache(folder, "acme/iter-tasks", hub_cache, repo_type="dataset")
    code = (
        "from hf_iterheads.data import load_task_dataset\n"
        "d = load_task_dataset('acme/iter-tasks', 'parity')\n"
        "print(d['test'].num_rows, d['test'][0]['task'])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    n_test = sum(split_sizes("parity", L, 40)[1] for L in range(1, 7))
    assert out.stdout.split() == [str(n_test), "parity"]


def test_unknown_repo_offline_is_one_clear_error(hub_cache):
    from hf_iterheads import IterHeadsError

    with pytest.raises(IterHeadsError, match="HF_HUB_OFFLINE"):
        load_task_dataset("acme/does-not-exist", "parity")


def test_batches_mask_everything_up_to_eoi_and_the_padding():
    import numpy as np

    from hf_iterheads.training.data import assemble

    tok = build_tokenizer()
    layout = Layout(tok, "parity")
    groups = [(layout, np.array([[1, 0]]), np.array([[1, 1]])), (layout, np.array([[0, 1, 1, 0]]), np.array([[0, 1, 0, 0]]))]
    padded = assemble(groups, layout.pad_id)
    assert padded["input_ids"].shape == (2, 11) and padded["attention_mask"][0].sum() == 7
    assert (padded["labels"][0, :4] == -100).all() and (padded["labels"][0, 7:] == -100).all()
    assert padded["labels"][0, 4:7].tolist() == [1, 1, tok.eos_token_id]  # s_1, s_2, EoS
    assert padded["labels"][1, 6:11].tolist() == padded["input_ids"][1, 6:11].tolist()


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "fibonacci"], "unknown task"),
        (["--n-len", "0"], "at least 1"),
        (["--per-length", "0"], "at least 1"),
        (["--tasks", "cumsum_mod1"], "modulus must be"),
    ],
)
def test_script_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = run_script("--output-dir", str(out), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_script_refuses_a_non_empty_output_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_script("--output-dir", str(out), "--tasks", "parity", "--n-len", "3", "--per-length", "4")
    assert result.returncode == 2 and "not empty" in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    refused = run_script("--output-dir", str(out), "--tasks", "parity", "--n-len", "3", "--per-length", "4", "--overwrite")
    assert refused.returncode == 2 and "refusing to --overwrite" in refused.stderr, refused.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # --overwrite replaces only what a build wrote
    (out / "keep.txt").unlink()
    for tasks in ("parity", "binary_copy"):  # the second build replaces the first one's folder
        ok = run_script("--output-dir", str(out), "--tasks", tasks, "--n-len", "3", "--per-length", "4", "--overwrite")
        assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in out.iterdir()) == [".hf-iterheads-output.json", "README.md", "binary_copy"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
