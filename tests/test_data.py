from pathlib import Path

import numpy as np
import pytest
import torch

from gradwise.config import DataConfig
from gradwise.data import build_data
from gradwise.data import mnist1d
from gradwise.data.mnist1d import cache_dir
from gradwise.errors import DataError


def test_mnist1d_standard_split_is_deterministic_and_cached(monkeypatch):
    first = build_data(DataConfig())
    assert len(first.train) == 4000 and len(first.test) == 1000
    assert first.input_shape == (40,) and first.num_classes == 10 and first.task == "classification"
    cached = Path(first.info["cache"])
    assert cached.parent == cache_dir(DataConfig()) and cached.is_file()

    def no_generation(*args):
        raise AssertionError("the cached file should have been read")

    monkeypatch.setattr(mnist1d, "generate", no_generation)
    again = build_data(DataConfig())
    for a, b in zip(first.train.tensors + first.test.tensors, again.train.tensors + again.test.tensors):
        assert torch.equal(a, b)
    # every class appears in both splits
    assert set(first.train.tensors[1].tolist()) == set(range(10)) == set(first.test.tensors[1].tolist())


def test_mnist1d_cache_matches_a_fresh_generation(tmp_path):
    cached = build_data(DataConfig(num_samples=300, cache_dir=str(tmp_path)))
    fresh = mnist1d.generate(300, 0.8, 42)
    assert np.array_equal(cached.train.tensors[0].numpy(), fresh["x"].astype(np.float32))
    assert np.array_equal(cached.test.tensors[1].numpy(), fresh["y_test"])


def test_mnist1d_generation_leaves_global_rng_alone(tmp_path):
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    build_data(DataConfig(num_samples=200, cache_dir=str(tmp_path)))
    assert np.random.rand() == expected


def test_mnist1d_sample_count_is_configurable(tmp_path):
    data = build_data(DataConfig(num_samples=1000, train_split=0.9, cache_dir=str(tmp_path)))
    assert len(data.train) == 900 and len(data.test) == 100


def test_digits():
    data = build_data(DataConfig(name="digits"))
    assert len(data.train) + len(data.test) == 1797
    assert data.input_shape == (64,) and data.num_classes == 10
    x = data.train.tensors[0]
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_text_windows_are_shifted_by_one(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 50)
    (tmp_path / "b.py").write_text("print('x')\n" * 50)
    data = build_data(DataConfig(name="text", path=str(tmp_path), test_fraction=0.25), context=16)
    assert data.task == "language_model"
    vocab = data.info["vocab"]
    assert data.num_classes == len(vocab) == len(set("hello world, print('x')\n"))
    x, y = data.train.tensors
    assert x.shape[1] == 16 and x.dtype == torch.int64
    assert torch.equal(x[0, 1:], y[0, :-1])
    assert torch.equal(x[1, 0], y[0, -1])  # windows tile the text without gaps
    decoded = "".join(vocab[i] for i in x[0].tolist())
    assert decoded == ("hello world, " * 2)[:16]


def test_text_default_corpus_is_the_stdlib():
    data = build_data(DataConfig(name="text", max_chars=20_000), context=32)
    assert data.info["chars"] == 20_000 and data.info["files"] > 100
    text = "".join(data.info["vocab"][i] for i in data.train.tensors[0].flatten().tolist())
    assert "def " in text and "import " in text
    assert len(data.train) == (16_000 - 1) // 32  # 80% of 20,000 characters trains


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_with_and_without_test_split(tmp_path):
    x = np.random.rand(50, 3, 4).astype(np.float32)
    y = np.arange(50) % 5
    data = build_data(DataConfig(name="npz", path=_npz(tmp_path / "a.npz", x=x, y=y), test_fraction=0.2))
    assert len(data.train) == 40 and len(data.test) == 10 and data.input_shape == (3, 4) and data.num_classes == 5
    data = build_data(DataConfig(name="npz", path=_npz(tmp_path / "b.npz", x=x, y=y, x_test=x[:7], y_test=y[:7])))
    assert len(data.train) == 50 and len(data.test) == 7


def test_csv_with_header_and_label_column(tmp_path):
    path = tmp_path / "d.csv"
    rows = ["label,f1,f2"] + [f"{i % 3},{i * 0.5},{-i}" for i in range(30)]
    path.write_text("\n".join(rows) + "\n")
    data = build_data(DataConfig(name="csv", path=str(path), label_column=0, test_fraction=0.1))
    assert len(data.train) == 27 and len(data.test) == 3 and data.input_shape == (2,) and data.num_classes == 3
    x, y = data.train.tensors
    for xi, yi in zip(x, y):  # features stay attached to their label
        i = int(round(float(xi[0]) * 2))
        assert int(yi) == i % 3 and float(xi[1]) == -i


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda d: DataConfig(name="npz", path=str(d / "nope.npz")), "does not exist"),
        (lambda d: DataConfig(name="csv"), "needs data.path"),
        (lambda d: DataConfig(name="npz", path=_npz(d / "k.npz", x=np.zeros((4, 2)))), "lacks array(s) ['y']"),
        (lambda d: DataConfig(name="npz", path=_npz(d / "n.npz", x=np.zeros((4, 2)), y=np.zeros(3))),
         "4 inputs but 3 labels"),
        (lambda d: DataConfig(name="npz", path=_npz(d / "f.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 0.5, 1]))),
         "non-negative integers"),
        (lambda d: DataConfig(name="text", path=str(d / "missing-dir")), "does not exist"),
    ],
)
def test_bad_data_files_give_one_line_errors(tmp_path, setup, fragment):
    with pytest.raises(DataError) as err:
        build_data(setup(tmp_path))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_malformed_files(tmp_path):
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="not a readable .npz"):
        build_data(DataConfig(name="npz", path=str(garbage)))
    ragged = tmp_path / "r.csv"
    ragged.write_text("1,2,0\n3,4\n")
    with pytest.raises(DataError, match="row 2 has 2 columns, expected 3"):
        build_data(DataConfig(name="csv", path=str(ragged)))
    words = tmp_path / "w.csv"
    words.write_text("a,b,label\n1,2,0\n3,x,1\n")
    with pytest.raises(DataError, match="row 2 has a non-numeric value"):
        build_data(DataConfig(name="csv", path=str(words)))
    bad_col = tmp_path / "c.csv"
    bad_col.write_text("1,2,0\n3,4,1\n")
    with pytest.raises(DataError, match="label_column=5 is out of range"):
        build_data(DataConfig(name="csv", path=str(bad_col), label_column=5))
