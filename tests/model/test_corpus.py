"""The training corpus: file order, the train/validation split, the default corpus."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from carousel.model import data
from carousel.model.data import is_validation, list_files, load_corpus
from model_helpers import write_corpus


def test_default_corpus_is_the_stdlib_in_a_fixed_order():
    files, description = list_files(None)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert str(root) in description
    assert len(files) > 500
    assert files == sorted(files)
    assert list_files(None)[0] == files  # the same list every time
    assert root / "os.py" in files and root / "json" / "decoder.py" in files
    for f in files:
        parts = f.relative_to(root).parts  # raises if a file lies outside the stdlib
        assert f.suffix == ".py"
        assert "site-packages" not in parts and "dist-packages" not in parts, f


def test_default_corpus_leaves_out_installed_packages(tmp_path, monkeypatch):
    """pyenv keeps site-packages inside the stdlib folder: it must not enter the corpus."""
    root = tmp_path / "lib" / "python3.11"
    for rel in ["os.py", "json/decoder.py", "site-packages/numpy/core.py",
                "site-packages/top.py", "dist-packages/other.py", "README.txt"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x = 1\n")
    monkeypatch.setattr(data, "default_corpus_root", lambda: root)
    files, _ = list_files(None)
    assert files == [root / "json" / "decoder.py", root / "os.py"]


def test_default_split_never_shares_a_file_and_holds_out_about_a_tenth():
    files, _ = list_files(None)
    val = [f for f in files if is_validation(f)]
    train = [f for f in files if not is_validation(f)]
    assert set(val).isdisjoint(train) and len(val) + len(train) == len(files)
    assert 0.05 <= len(val) / len(files) <= 0.15


def test_split_depends_on_the_file_not_on_where_python_is_installed():
    names = [Path(f"pkg{n % 7}/module_{n}.py") for n in range(300)]
    for name in names:
        assert is_validation(Path("/usr/lib/python3.11") / name) == is_validation(
            Path("/home/me/.pyenv/versions/3.11.7/lib/python3.11") / name
        )
    assert any(is_validation(n) for n in names) and not all(is_validation(n) for n in names)


def test_folder_corpus_is_split_by_whole_files_in_order(tmp_path):
    folder = write_corpus(tmp_path / "corpus", files=40, lines=3)
    (folder / "image.png").write_bytes(b"\x89PNG not text")  # not a text suffix: skipped
    corpus = load_corpus([folder])
    train, val = corpus.train.tobytes().decode(), corpus.val.tobytes().decode()
    assert corpus.files == 40 and "PNG" not in train + val
    marks = [f"# file {n:03d}\n" for n in range(40)]
    in_train = [m for m in marks if m in train]
    in_val = [m for m in marks if m in val]
    assert sorted(in_train + in_val) == marks  # every file in exactly one split
    assert not set(in_train) & set(in_val)
    assert in_val and in_train
    assert sorted(in_train, key=train.index) == in_train  # files concatenated in name order
    for n in range(40):
        text = (folder / f"doc_{n:03d}.txt").read_text()
        assert text in (val if marks[n] in in_val else train)  # whole files, never cut


def test_one_file_corpus_validates_on_its_tail(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(bytes(range(32, 127)) * 10)
    corpus = load_corpus([path], val_fraction=0.1)
    whole = path.read_bytes()
    assert corpus.train.tobytes() + corpus.val.tobytes() == whole
    assert len(corpus.val) == len(whole) - int(len(whole) * 0.9)


def test_missing_corpus_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus path not found"):
        load_corpus([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_corpus([tmp_path / "empty"])
