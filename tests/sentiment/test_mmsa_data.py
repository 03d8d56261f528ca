"""MMSA data layer: the three layouts round-trip through pickle and .npz, pickles need trust."""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from app.__main__ import main as app_main
from app.data import MMSADataset, convert_mmsa, feature_dims, feature_statistics, load_mmsa, make_synthetic_mmsa
from app.data.mmsa import MMSA_MODALITIES, save_mmsa_npz, write_synthetic_mmsa
from tests.data.helpers import errors_of_call_on_pipe

SPLITS = {"train": 12, "valid": 6, "test": 5}


def _check_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for split in a:
        assert sorted(a[split]) == sorted(b[split])
        for key, value in a[split].items():
            np.testing.assert_array_equal(value, b[split][key], err_msg=f"{split}/{key}")


@pytest.mark.parametrize("layout", ["utterance", "aligned", "unaligned"])
def test_layout_round_trip_pickle_and_npz(layout, tmp_path):
    raw = make_synthetic_mmsa(SPLITS, layout=layout, dims=(6, 5, 4), seq_len=7, seed=3)
    pkl = tmp_path / "f.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(raw, f)
    loaded = load_mmsa(pkl, trust_pickle=True)
    npz = convert_mmsa(pkl, tmp_path / "f.npz")
    _check_same(loaded, load_mmsa(npz))  # the .npz needs no trust
    assert feature_dims(loaded) == [6, 5, 4]
    length = 1 if layout == "utterance" else 7
    for split, n in SPLITS.items():
        s = loaded[split]
        assert s["text"].shape == (n, length, 6) and s["text"].dtype == np.float32
        np.testing.assert_array_equal(s["id"], raw[split]["id"])
        np.testing.assert_allclose(s["regression_labels"], raw[split]["regression_labels"])
        for m in MMSA_MODALITIES:
            expected = raw[split][f"{m}_lengths"] if layout == "unaligned" else np.full(n, length)
            np.testing.assert_array_equal(s[f"{m}_lengths"], expected)
    if layout == "unaligned":
        assert len({int(v) for v in loaded["train"]["audio_lengths"]}) > 1

    ds = MMSADataset(npz, split="valid")
    sample = ds[2]
    assert sample["case"] == raw["valid"]["id"][2]
    assert sample["label"].dtype == torch.float32 and sample["label"].shape == (1,)
    assert sample["modality_mask"].dtype == torch.bool and sample["modality_mask"].tolist() == [True] * 3
    assert sample["image"]["vision"].shape == (length, 4)
    assert int(sample["image"]["audio_lengths"]) == int(loaded["valid"]["audio_lengths"][2])
    batch = default_collate([ds[i] for i in range(4)])
    assert batch["image"]["text"].shape == (4, length, 6) and batch["label"].shape == (4, 1)
    assert batch["modality_mask"].shape == (4, 3) and len(batch["case"]) == 4


def test_pickle_is_refused_without_trust_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"train": Payload()}, f)
    for trust in (False, "false", "0"):
        with pytest.raises(ValueError, match="unpickling runs") as err:
            load_mmsa(path, trust_pickle=trust)
        assert "convert-mmsa" in str(err.value) and "--trust_pickle true" in str(err.value)
        with pytest.raises(ValueError, match="unpickling runs"):
            MMSADataset(path, split="train", trust_pickle=trust)
    assert not marker.exists()
    for typo in ("ture", "yes", None):  # a typo must not mean "trust"
        with pytest.raises(ValueError, match="--trust_pickle must be true or false"):
            load_mmsa(path, trust_pickle=typo)
    assert not marker.exists()


def test_an_npz_entry_of_python_objects_is_refused_naming_the_file_and_never_unpickled(tmp_path):
    """numpy stores an array of Python objects as a pickle inside the .npz. It was refused (allow_pickle=False),
    but with numpy's own error, which names neither the file nor the fix, in a traceback."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    good = write_synthetic_mmsa(tmp_path / "good.npz")
    with np.load(good) as npz:
        entries = {key: npz[key] for key in npz.files}
    entries["train/id"] = np.array([Payload()] * len(entries["train/id"]), dtype=object)
    path = tmp_path / "objects.npz"
    np.savez(path, **entries)
    with pytest.raises(ValueError) as err:
        load_mmsa(path)
    assert str(err.value).startswith(f"{path}: entry 'train/id' is an array of Python objects, which loads only by "
                                     "unpickling") and "python -m app convert-mmsa" in str(err.value)
    assert not marker.exists()


def test_an_npz_array_claiming_more_than_its_entry_holds_is_refused_before_the_memory_is_taken(tmp_path,
                                                                                               monkeypatch):
    """numpy allocates what an array's header claims before reading it: an entry of a few kilobytes claiming
    80 GB of features ended in a MemoryError traceback; a consistent entry of compressed zeros (a zip bomb)
    took the memory. Both are decided from the .npy headers before any array is read."""
    import zipfile

    good = write_synthetic_mmsa(tmp_path / "good.npz")
    liar = tmp_path / "liar.npz"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(liar, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "train/audio.npy":
                arr = np.load(io.BytesIO(data))
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(arr.dtype),
                                                              "fortran_order": False, "shape": (2000000, 1, 10000)})
                data = header.getvalue() + arr.tobytes()
            zout.writestr(info.filename, data)
    with pytest.raises(ValueError) as err:
        load_mmsa(liar)
    assert str(err.value).startswith(f"{liar}: entry 'train/audio' claims (2000000, 1, 10000) float32 values "
                                     "(80000000000 bytes), but holds ")
    monkeypatch.setattr("app.data.cache.available_memory", lambda: 1000)
    data = load_mmsa(good)  # splits are read when first used: the memory is checked then, split by split
    with pytest.raises(ValueError, match=r"good\.npz: split 'train' takes 0\.0 GiB, more than the 0\.0 GiB of "
                                         r"memory left: run on a machine"):
        data["train"]
    assert data.loaded() == []


def test_convert_to_an_unwritable_output_is_one_error_line(tmp_path, capsys, monkeypatch):
    """An output that is a folder, or a folder that cannot be written, ends in one line naming the output
    (exit 2), not an IsADirectoryError traceback or a message naming the temporary file."""
    pkl = write_synthetic_mmsa(tmp_path / "s.pkl", splits={"train": 4, "valid": 3})
    (tmp_path / "out.npz").mkdir()
    assert app_main(["convert-mmsa", str(pkl), str(tmp_path / "out.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Output {tmp_path / 'out.npz'} is a folder") and err.count("\n") == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    import app.data.mmsa as mmsa

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".x.npz.1.tmp"))

    monkeypatch.setattr(mmsa, "atomic_write", refuse)
    assert app_main(["convert-mmsa", str(pkl), str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Cannot write {tmp_path / 'x.npz'} (Permission denied)") and ".tmp" not in err


def test_convert_checks_its_output_before_reading_the_pickle(tmp_path, capsys, monkeypatch):
    """A read-only output (a MOSEI pickle takes minutes to load) was refused only after the pickle had been read,
    and '~' the shell left unexpanded ('~/mosi.npz' quoted) wrote the file into a folder named '~' here."""
    import app.data.mmsa as mmsa

    pkl = write_synthetic_mmsa(tmp_path / "s.pkl", splits={"train": 4, "valid": 3})
    reads = []
    monkeypatch.setattr(mmsa, "load_mmsa", lambda *a, **k: reads.append(a) or pytest.fail("the pickle was read"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert app_main(["convert-mmsa", str(pkl), "~/mosi.npz"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: Output ~/mosi.npz: '~' is not expanded here (the shell expands it only unquoted and not "
                   f"after '='): give {tmp_path / 'home' / 'mosi.npz'} instead of a folder named '~' in {tmp_path}.\n")
    if sys.platform.startswith("linux"):  # /proc takes no new files, whoever runs the test (root included)
        assert app_main(["convert-mmsa", str(pkl), "/proc/mosi.npz"]) == 2
        assert capsys.readouterr().err.startswith("error: Output /proc/mosi.npz: cannot write in /proc")
    assert not reads and sorted(p.name for p in tmp_path.iterdir()) == ["s.pkl"]


def test_convert_reports_the_sizes_without_reading_its_output_back(tmp_path, capsys, monkeypatch):
    # reading the whole .npz back, only to print its sizes, took a quarter of a MOSEI-sized conversion's time
    import app.data.mmsa as mmsa

    pkl = write_synthetic_mmsa(tmp_path / "s.pkl", splits={"train": 4, "valid": 3}, dims=(5, 3, 2))
    monkeypatch.setattr(mmsa, "_read_npz", lambda path: pytest.fail(f"{path} was read back"))
    assert app_main(["convert-mmsa", str(pkl), str(tmp_path / "s.npz")]) == 0
    assert "(train: 4, valid: 3; feature sizes [5, 3, 2])" in capsys.readouterr().out
    monkeypatch.undo()
    assert {k: len(v["id"]) for k, v in load_mmsa(tmp_path / "s.npz").items()} == {"train": 4, "valid": 3}


def test_convert_command_line_and_bad_files(tmp_path, capsys):
    pkl = write_synthetic_mmsa(tmp_path / "s.pkl", splits={"train": 4, "valid": 3})
    assert app_main(["convert-mmsa", str(pkl), str(tmp_path / "s.npz")]) == 0
    assert "train: 4, valid: 3" in capsys.readouterr().out
    assert sorted(load_mmsa(tmp_path / "s.npz")) == ["train", "valid"]
    # a plain npz without the converter's marker, a missing file, an unknown suffix
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="convert-mmsa"):
        load_mmsa(tmp_path / "plain.npz")
    with pytest.raises(FileNotFoundError, match="missing.pkl not found: check the path"):
        load_mmsa(tmp_path / "missing.pkl", trust_pickle=True)
    with pytest.raises(ValueError, match="No MMSA feature file given: pass --data_path"):
        load_mmsa("", trust_pickle=True)  # the bundle's default data_path
    # damaged files name themselves and the fix instead of a pickle or zip traceback
    (tmp_path / "cut.pkl").write_bytes(pkl.read_bytes()[:200])
    (tmp_path / "text.pkl").write_text("garbage\n")
    for bad in ("cut.pkl", "text.pkl"):
        with pytest.raises(ValueError, match=f"{bad} cannot be read as a pickle .*download or export it again"):
            load_mmsa(tmp_path / bad, trust_pickle=True)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:300])
    (tmp_path / "text.npz").write_text("garbage")
    for bad in ("cut.npz", "text.npz"):
        with pytest.raises(ValueError, match=f"{bad} (is not a .npz archive|cannot be read).*convert-mmsa"):
            load_mmsa(tmp_path / bad)
    assert app_main(["convert-mmsa", str(tmp_path / "cut.pkl"), str(tmp_path / "c.npz")]) == 2
    # a pickle that names a module this environment lacks (e.g. numpy 2's numpy._core under numpy 1)
    (tmp_path / "module.pkl").write_bytes(b"\x80\x04\x8c\x0bnosuchmodxx\x94\x8c\x03Foo\x94\x93\x94.")
    with pytest.raises(ValueError, match="module.pkl needs Python code this environment lacks .*nosuchmodxx"):
        load_mmsa(tmp_path / "module.pkl", trust_pickle=True)
    assert "cut.pkl cannot be read as a pickle" in capsys.readouterr().err and not (tmp_path / "c.npz").exists()
    (tmp_path / "s.txt").write_text("x")
    with pytest.raises(ValueError, match="MMSA pickle"):
        load_mmsa(tmp_path / "s.txt")
    assert app_main(["convert-mmsa", str(tmp_path / "missing.pkl"), str(tmp_path / "m.npz")]) == 2


def test_missing_split_and_keys_give_clear_errors(tmp_path):
    data = make_synthetic_mmsa({"train": 4, "valid": 4})
    with pytest.raises(ValueError, match=r"available splits are \['train', 'valid'\]. .*--val_split"):
        MMSADataset(data, split="test")
    # loaded from a file, the dataset names that file
    npz = write_synthetic_mmsa(tmp_path / "two.npz", splits={"train": 4, "valid": 4})
    with pytest.raises(ValueError, match=f"not in {npz}"):
        MMSADataset(load_mmsa(npz), split="test")
    del data["train"]["audio"]
    with pytest.raises(ValueError, match="lacks \\['audio'\\]"):
        MMSADataset(data, split="train")


def test_mmsa_details_lengths_missing_modalities_and_classification(tmp_path):
    data = make_synthetic_mmsa({"train": 6}, layout="aligned", dims=(4, 3, 2), seq_len=5)
    split = data["train"]
    # MMSA's BERT text: row 1 of text_bert is the attention mask
    bert = np.zeros((6, 3, 5))
    bert[:, 1, :3] = 1
    split["text_bert"] = bert
    # MMSA stores original lengths, which may exceed the padding; 0 means the modality is missing
    split["audio_lengths"] = np.array([9, 5, 0, 2, 1, 5])
    split["audio"][:, :, 0] = -np.inf  # MOSEI has a few -inf audio values
    npz = save_mmsa_npz({"train": {k: v for k, v in split.items()}}, tmp_path / "x.npz")
    loaded = load_mmsa(npz)["train"]
    np.testing.assert_array_equal(loaded["text_lengths"], [3] * 6)
    np.testing.assert_array_equal(loaded["audio_lengths"], [5, 5, 0, 2, 1, 5])
    # word-aligned vision without its own lengths is padded where the text is
    np.testing.assert_array_equal(loaded["vision_lengths"], [3] * 6)
    assert np.isfinite(loaded["audio"]).all()
    ds = MMSADataset(npz, split="train", label_key="classification_labels")
    assert ds[2]["modality_mask"].tolist() == [True, False, True]
    assert ds[0]["label"].dtype == torch.int64 and ds[0]["label"].ndim == 0
    only_text = MMSADataset(npz, split="train", modalities=("text",))
    assert only_text[0]["modality_mask"].tolist() == [True, False, False]
    stats = feature_statistics(loaded)
    # statistics ignore padded steps: the text mean is over the first 3 steps only
    np.testing.assert_allclose(stats["text"][0], loaded["text"][:, :3].reshape(-1, 4).mean(0), rtol=1e-5)
    with pytest.raises(ValueError, match="label_key"):
        MMSADataset({"train": {k: v for k, v in split.items() if k != "classification_labels"}}, "train",
                    label_key="classification_labels")
    # class ids under the regression loss would broadcast instead of failing
    with pytest.raises(ValueError, match="does not fit task 'regression'.*'regression_labels'"):
        MMSADataset(npz, split="train", label_key="classification_labels", task="regression")
    assert MMSADataset(npz, split="train", label_key="classification_labels", task="classification")[0]["label"].ndim == 0


def test_synthetic_text_dominates():
    data = make_synthetic_mmsa({"train": 400}, seed=0)["train"]
    y = data["regression_labels"]
    corr = {}
    for m in MMSA_MODALITIES:
        x = data[m][:, 0].astype(np.float64)
        w, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)
        corr[m] = np.corrcoef(np.c_[x, np.ones(len(x))] @ w, y)[0, 1]
    assert corr["text"] > corr["vision"] > corr["audio"] > 0.2


def _split_with(tmp_path, **changes):
    """A synthetic train split with some fields replaced, as the bundle loads it."""
    data = make_synthetic_mmsa({"train": 6, "valid": 0}, layout="unaligned", dims=(4, 3, 2), seq_len=4)
    data["train"].update(changes)
    return data


def test_fields_with_the_wrong_count_are_refused(tmp_path):
    ids = [f"v{i}" for i in range(6)]
    for key, value in (("id", ids[:4]), ("raw_text", ["a"] * 7)):
        with pytest.raises(ValueError, match=f"train/{key} has {len(value)} entries for 6 samples"):
            MMSADataset(_split_with(tmp_path, **{key: value}), split="train")
    # ids written under Python 2 are bytes: read as text, not "b'...'"
    ds = MMSADataset(_split_with(tmp_path, id=[i.encode() for i in ids]), split="train")
    assert ds[0]["case"] == "v0"


class _Python2Pickler(pickle._Pickler):
    """Writes byte strings, and text, as Python 2 wrote its ``str``: (SHORT_)BINSTRING opcodes that
    Python 3 decodes as ASCII unless told otherwise."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj)

    dispatch[bytes] = _py2_str
    dispatch[str] = lambda self, obj: self._py2_str(obj.encode("utf-8"))


def test_python2_pickle_loads_with_its_ids_and_transcripts(tmp_path, capsys):
    """A pickle written by Python 2 (bc-LSTM / CMU-MultimodalSDK era) holds its array buffers as
    byte strings; it used to be refused as 'truncated or not an MMSA feature file'."""
    raw = make_synthetic_mmsa({"train": 6, "valid": 4}, layout="unaligned", dims=(5, 4, 3), seq_len=6, seed=2)
    for split in raw.values():
        split["id"] = [i.encode() for i in split["id"]]
        split["raw_text"] = [f"caf\u00e9 n\u00ba {i}".encode("utf-8") for i in range(len(split["id"]))]
    buf = io.BytesIO()
    _Python2Pickler(buf, protocol=2).dump(raw)
    pkl = tmp_path / "py2.pkl"
    pkl.write_bytes(buf.getvalue())
    with pytest.raises(UnicodeDecodeError):  # what a plain pickle.load makes of it
        pickle.loads(buf.getvalue())
    loaded = load_mmsa(pkl, trust_pickle=True)
    for name, split in raw.items():
        np.testing.assert_array_equal(loaded[name]["text"], split["text"])
        np.testing.assert_array_equal(loaded[name]["audio_lengths"], split["audio_lengths"])
        assert loaded[name]["id"].tolist() == [i.decode() for i in split["id"]]
        assert loaded[name]["raw_text"][1] == "caf\u00e9 n\u00ba 1"
    assert app_main(["convert-mmsa", str(pkl), str(tmp_path / "py2.npz")]) == 0
    assert load_mmsa(tmp_path / "py2.npz")["valid"]["id"][3] == "validvid0_3"


def test_non_finite_or_non_class_labels_are_refused(tmp_path):
    labels = np.linspace(-3, 3, 6).astype(np.float32)
    labels[4] = np.nan
    with pytest.raises(ValueError, match="train/regression_labels has 1 missing or infinite label.*sample 4"):
        MMSADataset(_split_with(tmp_path, regression_labels=labels), split="train")
    for classes, found in (([0, 1, 2, 1.9, 0, 1], "1.9"), ([0, 1, -1, 2, 0, 1], "-1")):
        with pytest.raises(ValueError, match=f"not class ids .*first: {found}"):
            MMSADataset(_split_with(tmp_path, classification_labels=np.asarray(classes)), split="train",
                        label_key="classification_labels")
    classes = np.asarray([0, 1, 2, 3, 0, 1])
    with pytest.raises(ValueError, match="class id 3, but the network has 3 classes .*--out_channels 4"):
        MMSADataset(_split_with(tmp_path, classification_labels=classes), split="train",
                    label_key="classification_labels", num_classes=3)
    assert len(MMSADataset(_split_with(tmp_path, classification_labels=classes), split="train",
                           label_key="classification_labels", num_classes=4)) == 6
    lengths = np.asarray([1.0, 2.0, np.nan, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="train/audio_lengths has 1 non-finite value.*sample 2"):
        MMSADataset(_split_with(tmp_path, audio_lengths=lengths), split="train")


def test_a_class_id_beyond_the_classes_names_the_evaluation_fix_too(tmp_path):
    """Evaluation builds the network with the checkpoint's classes: the error told an evaluating user to
    pass --out_channels 4, which then fails to load the 3-class checkpoint; it must say that the split
    does not fit such a checkpoint, besides the training fix."""
    classes = np.asarray([0, 1, 2, 3, 0, 1])
    with pytest.raises(ValueError, match="train with --out_channels 4 or more") as err:
        MMSADataset(_split_with(tmp_path, classification_labels=classes), split="train",
                    label_key="classification_labels", num_classes=3)
    assert "checkpoint trained with 3 classes cannot score this split" in str(err.value)


def test_labels_are_checked_only_where_they_are_used(tmp_path):
    """A test split with hidden (NaN) labels, or label ids in a key the run does not use (here sign
    labels -1/0/1), must not stop training on the other splits or keys."""
    data = make_synthetic_mmsa({"train": 6, "test": 4}, layout="unaligned", dims=(4, 3, 2), seq_len=4)
    data["test"]["regression_labels"] = np.full(4, np.nan, dtype=np.float32)
    data["train"]["classification_labels"] = np.sign(data["train"]["regression_labels"])
    npz = save_mmsa_npz({k: v for k, v in data.items()}, tmp_path / "hidden.npz")
    assert len(MMSADataset(npz, split="train")) == 6
    with pytest.raises(ValueError, match="test/regression_labels has 4 missing or infinite"):
        MMSADataset(npz, split="test")
    with pytest.raises(ValueError, match="train/classification_labels has .* not class ids .*first: -1"):
        MMSADataset(npz, split="train", label_key="classification_labels")
    # ids given as rows (e.g. [video, segment]) are one entry per sample
    data["train"]["id"] = [("vid", str(i)) for i in range(6)]
    assert MMSADataset(data, split="train")[2]["case"] == "('vid', '2')"


@pytest.mark.parametrize("labels,message", [
    # IEMOCAP-style one-hot class rows [N, C] beside the sentiment scores
    (lambda ids: np.eye(3)[ids],
     r"train/classification_labels has shape \(6, 3\), not one class id per sample.*labels\.argmax\(axis=1\)"),
    # emotion names, which refused the file with "holds <U3 values, not numbers"
    (lambda ids: np.asarray(["neu", "hap", "ang"])[ids],
     r"train/classification_labels holds values that are not numbers \(first: '(neu|hap|ang)'\)\. .*class id 0, 1, 2"),
], ids=["one_hot", "named"])
def test_class_labels_that_are_no_class_ids_stop_only_the_runs_that_read_them(labels, message, tmp_path):
    """Such labels beside the sentiment scores refused the whole file, so a regression run that never reads
    them could not train; a classification run gets the fix (class ids)."""
    data = make_synthetic_mmsa({"train": 6, "valid": 4}, layout="unaligned", dims=(4, 3, 2), seq_len=4)
    for split in data.values():
        split["classification_labels"] = labels(split["classification_labels"])
    npz = save_mmsa_npz(data, tmp_path / "labels.npz")
    for source in (data, npz):
        assert len(MMSADataset(source, split="train", task="regression")) == 6
        with pytest.raises(ValueError, match=message):
            MMSADataset(source, split="train", label_key="classification_labels", task="classification",
                        num_classes=3)


def test_a_label_count_that_is_not_the_sample_count_is_a_broken_split(tmp_path):
    """Whatever the run reads."""
    data = make_synthetic_mmsa({"train": 6, "valid": 4}, layout="unaligned", dims=(4, 3, 2), seq_len=4)
    data["valid"]["regression_labels"] = data["valid"]["regression_labels"][:3]
    with pytest.raises(ValueError, match="valid/regression_labels has shape"):
        load_mmsa(save_mmsa_npz(data, tmp_path / "short.npz"))["valid"]


def test_splits_with_other_feature_sizes_name_the_file_and_the_split(tmp_path):
    data = make_synthetic_mmsa({"train": 4, "valid": 4, "test": 4}, dims=(6, 5, 4))
    data["test"]["text"] = data["test"]["text"][..., :3]  # e.g. GloVe text in one split, BERT in the others
    npz = save_mmsa_npz(data, tmp_path / "mixed.npz")
    with pytest.raises(ValueError, match=rf"differ between the splits of {npz}: 'train' has text 6-d, audio 5-d, "
                                         r"vision 4-d, but split 'test': text 3-d\. .*extract them again"):
        feature_dims(load_mmsa(npz))


def test_empty_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Split 'valid' of the MMSA data has no samples"):
        MMSADataset(_split_with(tmp_path), split="valid")


def _split(text, text_lengths, audio_len=2, vision=None, n=2):
    """A normalised-looking split from hand-made arrays (audio: zeros of length ``audio_len`` with no steps)."""
    return {"text": np.asarray(text, dtype=np.float32), "text_lengths": np.asarray(text_lengths),
            "audio": np.zeros((n, audio_len, 1), dtype=np.float32), "audio_lengths": np.zeros(n, dtype=np.int64),
            "vision": np.asarray(vision, dtype=np.float32), "vision_lengths": np.ones(n, dtype=np.int64),
            "regression_labels": np.zeros(n, dtype=np.float32)}


def test_feature_statistics_by_hand():
    """Text steps counted: (1, 5), (3, 5) of sample 0 and (5, 5) of sample 1, not the zero padding:
    mean (3, 5); std of 1, 3, 5 is sqrt(8/3); the constant feature's std 0 becomes 1 (no division by
    0). Audio has no step at all: mean 0, std 1."""
    split = _split(text=[[[1, 5], [3, 5], [0, 0]], [[5, 5], [0, 0], [0, 0]]], text_lengths=[2, 1],
                   vision=[[[2.0]], [[4.0]]])
    stats = feature_statistics(split)
    np.testing.assert_allclose(stats["text"][0], [3.0, 5.0], rtol=1e-6)
    np.testing.assert_allclose(stats["text"][1], [np.sqrt(8 / 3), 1.0], rtol=1e-6)
    assert stats["audio"][0].tolist() == [0.0] and stats["audio"][1].tolist() == [1.0]
    np.testing.assert_allclose(stats["vision"][0], [3.0])
    np.testing.assert_allclose(stats["vision"][1], [1.0])


def test_feature_statistics_take_less_memory_than_the_modality():
    """The statistics of a long split are computed a block of utterances at a time: they took a float64 copy of
    every step and numpy's deviations from the mean beside it, over twice the modality (2.6 GiB for the 1.1 GiB
    of text of a MOSEI-sized training split), and must still equal those of all steps at once."""
    n, steps, dim = 4000, 16, 128
    x = np.random.default_rng(0).standard_normal((n, steps, dim), dtype=np.float32) * 3 + 1
    lengths = np.random.default_rng(1).integers(0, steps + 1, n)
    split = _split(text=x, text_lengths=lengths, vision=np.ones((n, 1, 1)), n=n)
    tracemalloc.start()
    try:
        stats = feature_statistics(split)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes, f"{peak / 2**20:.0f} MiB for a {x.nbytes / 2**20:.0f} MiB modality"
    every_step = x[np.arange(steps)[None, :] < lengths[:, None]].astype(np.float64)
    np.testing.assert_allclose(stats["text"][0], every_step.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats["text"][1], every_step.std(0), rtol=1e-6)


def test_bert_text_lengths_pad_only_modalities_of_the_texts_length(tmp_path):
    """Word-aligned features share the text's padded length; a modality with its own length (here
    vision, 4 steps against the text's 5) keeps all its steps."""
    bert = np.zeros((2, 3, 5))
    bert[:, 1, :3] = 1
    raw = {"text": np.ones((2, 5, 2)), "audio": np.ones((2, 5, 1)), "vision": np.ones((2, 4, 1)),
           "text_bert": bert, "regression_labels": np.zeros(2)}
    npz = save_mmsa_npz({"train": raw}, tmp_path / "x.npz")
    loaded = load_mmsa(npz)["train"]
    assert loaded["text_lengths"].tolist() == [3, 3] and loaded["audio_lengths"].tolist() == [3, 3]
    assert loaded["vision_lengths"].tolist() == [4, 4]


def test_utterance_digests_ignore_the_padding():
    """The same utterances padded to another length (a conversion with another maximum length) are
    the same utterances; another feature value is not."""
    from app.data.mmsa import utterance_digests

    short = _split(text=[[[1, 5], [3, 5]], [[5, 5], [0, 0]]], text_lengths=[2, 1], vision=[[[2.0]], [[4.0]]])
    short["id"] = np.asarray(["train_0", "train_1"])
    longer = {**short, "text": np.concatenate([short["text"], np.zeros((2, 3, 2), dtype=np.float32)], axis=1),
              "audio": np.zeros((2, 7, 1), dtype=np.float32)}
    assert utterance_digests(longer) == utterance_digests(short)
    changed = {**short, "vision": np.asarray([[[2.0]], [[4.5]]], dtype=np.float32)}
    assert utterance_digests(changed)[0] == utterance_digests(short)[0]
    assert utterance_digests(changed)[1] != utterance_digests(short)[1]
    # the same values under another modality (vision 4.0 given as audio, vision missing) differ too
    moved = {**short, "audio": np.asarray([[[0.0], [0.0]], [[4.0], [0.0]]], dtype=np.float32),
             "audio_lengths": np.asarray([0, 1]), "vision_lengths": np.asarray([1, 0])}
    assert utterance_digests(moved)[1] != utterance_digests(short)[1]


def test_a_sample_without_any_modality_is_refused_naming_it_and_the_fix():
    data = make_synthetic_mmsa({"train": 6}, layout="unaligned", dims=(4, 3, 4), seq_len=4)
    for m in MMSA_MODALITIES:
        data["train"][f"{m}_lengths"][2] = 0
    with pytest.raises(ValueError, match=r"1 sample\(s\) of split 'train' .* first: sample 2, id 'trainvid0_2'.*"
                                         r"drop them from the file or give each at least one modality"):
        MMSADataset(data, "train")
    # offering only the audio, which one sample lacks, names the offered modalities
    data = make_synthetic_mmsa({"train": 6}, layout="unaligned", dims=(4, 3, 4), seq_len=4)
    data["train"]["audio_lengths"][4] = 0
    with pytest.raises(ValueError, match=r"no modality among the offered modalities \['audio'\].*sample 4"):
        MMSADataset(data, "train", modalities=["audio"])


def test_non_finite_features_are_read_as_zero_and_said(tmp_path, caplog):
    """NaN features (a failed extraction) used to become zeros without a word; the load says which
    split and modality, how many, and how to mark the modality missing instead."""
    data = make_synthetic_mmsa({"train": 6, "valid": 4}, dims=(4, 3, 4))
    data["train"]["vision"][3, 0, 1] = np.nan
    data["train"]["vision"][5, 0, :] = np.inf
    with open(tmp_path / "nan.pkl", "wb") as f:
        pickle.dump(data, f)
    with caplog.at_level("WARNING", logger="app.data.mmsa"):
        loaded = load_mmsa(tmp_path / "nan.pkl", trust_pickle=True)
    assert np.isfinite(loaded["train"]["vision"]).all() and loaded["train"]["vision"][5].max() == 0
    warned = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].startswith(f"{tmp_path / 'nan.pkl'}: train/vision has 5 NaN or infinite value(s) in 2 sample(s) "
                                "(first: sample 3); they are read as 0.") and "vision_lengths to 0" in warned[0]


def test_sentiment_labels_outside_the_mosi_range_are_warned_about(caplog):
    """A split rated on another scale (1-7) trained and scored without a word; Acc-2 then calls every
    utterance positive and Acc-7 clips every label above 3."""
    data = make_synthetic_mmsa({"train": 6, "valid": 4}, dims=(4, 3, 4))
    with caplog.at_level("WARNING", logger="app.data.mmsa"):
        MMSADataset(data, "train")
    assert not [r for r in caplog.records if "outside the sentiment range" in r.getMessage()]
    data["valid"]["regression_labels"] = np.asarray([1.0, 7.0, 3.0, -3.4], dtype=np.float32)
    with caplog.at_level("WARNING", logger="app.data.mmsa"):
        MMSADataset(data, "valid")
    warned = [r.getMessage() for r in caplog.records if "outside the sentiment range" in r.getMessage()]
    assert len(warned) == 1
    assert "valid/regression_labels has 2 label(s) outside the sentiment range [-3, 3] (first: 7 at sample 1)" in warned[0]
    assert warned[0].endswith("rescale the labels to [-3, 3].")


@pytest.mark.parametrize("layout", ["utterance", "aligned"])
def test_feature_statistics_of_a_raw_split_match_the_datasets(layout):
    # raw MMSA splits carry no <m>_lengths: the statistics used to fail with KeyError 'text_lengths'
    data = make_synthetic_mmsa({"train": 12}, layout=layout, dims=(4, 3, 2), seq_len=3, seed=1)
    assert "text_lengths" not in data["train"]
    stats = feature_statistics(data["train"])
    expected = MMSADataset(data, "train").statistics()
    for m in ("text", "audio", "vision"):
        np.testing.assert_array_equal(stats[m][0], expected[m][0])
        np.testing.assert_array_equal(stats[m][1], expected[m][1])


@pytest.mark.parametrize("option", [{"dims": (4, 3)}, {"strengths": (2.0, 0.5)}, {"dims": (4, 3, 2, 1)}])
def test_synthetic_data_needs_one_size_and_strength_per_modality(option):
    # two sizes used to give data without vision, which failed later as a split lacking 'vision'
    with pytest.raises(ValueError, match="one value per modality"):
        make_synthetic_mmsa({"train": 4}, **option)


@pytest.mark.parametrize("name", ["mosi.pkl", "mosi.npz"])
def test_an_mmsa_file_that_is_a_named_pipe_is_refused_as_one(tmp_path, capsys, name):
    """A named pipe given as ``--data_path`` (or to convert-mmsa) was called "not found", although ``ls`` lists it:
    it is refused as what it is, before it is opened (a read would wait for a writer forever)."""
    pipe = tmp_path / name
    os.mkfifo(pipe)
    expected = (f"{pipe} is a named pipe, not a file: it is not read (reading it would wait or run forever). Pass "
                "the MMSA .pkl, or a .npz converted from one with python -m app convert-mmsa.")
    assert errors_of_call_on_pipe(lambda: load_mmsa(pipe, trust_pickle=True), pipe, "load_mmsa") == [expected]
    if name.endswith(".pkl"):
        codes = []
        assert errors_of_call_on_pipe(lambda: codes.append(app_main(["convert-mmsa", str(pipe),
                                                                     str(tmp_path / "out.npz")])),
                                      pipe, "convert-mmsa") == []
        assert codes == [2]
        assert capsys.readouterr().err == f"error: {expected}\n"
        assert not (tmp_path / "out.npz").exists()


def test_the_data_digest_follows_the_utterances_and_labels_not_the_file(tmp_path):
    """A resume records it: the .npz conversion of a pickle digests the same, another file (other labels; or, without
    ids, other features) does not, and nor does another split or label key."""
    from app.data.mmsa import mmsa_digest

    splits = {"train": 8, "valid": 4}
    pkl = write_synthetic_mmsa(tmp_path / "a.pkl", splits=splits, seed=0)
    npz = convert_mmsa(pkl, tmp_path / "a.npz")
    first = mmsa_digest(load_mmsa(pkl, trust_pickle=True), ["train", "valid"], "regression_labels")
    assert mmsa_digest(load_mmsa(npz), ["train", "valid"], "regression_labels") == first
    other = load_mmsa(write_synthetic_mmsa(tmp_path / "b.pkl", splits=splits, seed=1), trust_pickle=True)
    assert mmsa_digest(other, ["train", "valid"], "regression_labels") != first  # the same ids, other labels
    data = load_mmsa(pkl, trust_pickle=True)
    assert mmsa_digest(data, ["valid", "train"], "regression_labels") != first
    assert mmsa_digest(data, ["train", "valid"], "classification_labels") != first
    # without ids the positions are the ids: the features tell two files apart
    raw = make_synthetic_mmsa(splits=splits, seed=0)
    for split in raw.values():
        del split["id"]
    shifted = {name: {**split, "text": split["text"] + 1.0} for name, split in raw.items()}
    digests = []
    for name, content in (("c.pkl", raw), ("d.pkl", shifted)):
        with open(tmp_path / name, "wb") as f:
            pickle.dump(content, f)
        digests.append(mmsa_digest(load_mmsa(tmp_path / name, trust_pickle=True), ["train", "valid"],
                                   "regression_labels"))
    assert digests[0] != digests[1]


def test_a_feature_file_the_process_may_not_read_is_named_as_a_permission_problem(tmp_path, monkeypatch):
    """A pickle the user may not read ended the training in a PermissionError traceback, and such a .npz was called
    'not a .npz archive (truncated, or another format)', whose fix (convert it again) would be wrong. The tests may
    run as root, whom chmod does not stop: opening the file is refused instead."""
    import builtins

    files = [write_synthetic_mmsa(tmp_path / "s.pkl", splits={"train": 4}),
             write_synthetic_mmsa(tmp_path / "s.npz", splits={"train": 4})]
    real_open = builtins.open

    def refuse(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) in files:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    for path in files:
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is not readable by user id \d+: make it readable"):
            load_mmsa(path, trust_pickle=True)


def _damage_entry(src: Path, dst: Path, entry: str) -> None:
    """Copy the .npz ``src`` to ``dst`` with the data of ``entry`` (an ``.npy`` member) altered past its header."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info.filename, data)
    raw = bytearray(dst.read_bytes())
    with zipfile.ZipFile(dst) as z:
        info = z.getinfo(entry)
    # the member's data starts after its local header (30 bytes, the name, the extra field)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.file_size - 8] ^= 0xFF  # a value near the end: the .npy header stays readable
    dst.write_bytes(bytes(raw))


def test_an_npz_split_is_read_only_when_a_run_uses_it(tmp_path):
    """An evaluation of the test split held every split of the file, and a training the test split too: on a
    CMU-MOSEI-sized file, 3.17 GB of an evaluation's 4.14 GB peak. What runs across splits (the feature sizes, the
    data digest, the ids) reads the headers and ids only; a split's features are read when a dataset uses it."""
    from app.data.mmsa import _ids_identify, mmsa_digest

    splits = {"train": 6, "valid": 4, "test": 5}
    pkl = write_synthetic_mmsa(tmp_path / "s.pkl", splits=splits, layout="unaligned", dims=(4, 3, 400), seq_len=5)
    eager = load_mmsa(pkl, trust_pickle=True)
    npz = convert_mmsa(pkl, tmp_path / "s.npz")
    lazy = load_mmsa(npz)
    assert sorted(lazy) == sorted(splits) and len(lazy) == 3 and lazy.loaded() == []
    assert feature_dims(lazy) == [4, 3, 400] and _ids_identify(lazy) == _ids_identify(eager)
    for name in splits:
        np.testing.assert_array_equal(lazy.ids(name), eager[name]["id"])
        assert lazy.feature_sizes(name) == [4, 3, 400]
    assert lazy.loaded() == []
    assert mmsa_digest(lazy, ["train", "valid"], "regression_labels") == mmsa_digest(
        eager, ["train", "valid"], "regression_labels")
    assert sorted(lazy.loaded()) == ["train", "valid"]
    assert len(MMSADataset(lazy, "train")) == 6 and "test" not in lazy.loaded()
    _check_same(eager, lazy)  # reads the test split too, identical to the pickle's
    # a split whose data is damaged stops only the runs that read it, naming the file and the fix
    broken = tmp_path / "broken.npz"
    _damage_entry(npz, broken, "test/vision.npy")  # 40 kB: its header is read without reaching its checksum
    data = load_mmsa(broken)
    assert len(MMSADataset(data, "train")) == 6 and feature_dims(data) == [4, 3, 400]
    with pytest.raises(ValueError, match=r"broken\.npz cannot be read \(BadZipFile: .*\): it is truncated or damaged; "
                                         "convert the MMSA pickle again"):
        MMSADataset(data, "test")


def test_an_npz_that_changes_or_goes_before_a_split_is_read_is_named(tmp_path):
    npz = write_synthetic_mmsa(tmp_path / "s.npz", splits={"train": 4, "valid": 3})
    data = load_mmsa(npz)
    data["train"]
    os.utime(npz, ns=(0, 0))
    with pytest.raises(ValueError, match=r"s\.npz changed after it was opened, before its split 'valid' was read: run "
                                         "the command again"):
        data["valid"]
    data = load_mmsa(npz)
    npz.unlink()
    with pytest.raises(ValueError, match=r"s\.npz was removed after it was opened, before its split 'train' was read"):
        data["train"]


def test_features_of_another_shape_are_named_as_such_before_the_split_is_read(tmp_path):
    """The feature sizes and ids of a .npz come from its headers, whose last size was read as the feature size
    whatever the array's shape: an audio entry [N, L, D, 1] was 'audio 1-d' against the other splits, with the
    fix of extracting the features again, and a scalar text in a file without ids stopped the data digest with an
    IndexError traceback. Both are the shape error the split's reading gives."""
    from app.data.mmsa import mmsa_digest

    data = make_synthetic_mmsa({"train": 4, "valid": 3, "test": 2}, dims=(6, 5, 4))
    data["valid"]["audio"] = data["valid"]["audio"][..., None]
    npz = save_mmsa_npz(data, tmp_path / "deep.npz")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(npz))}: valid/audio must be \[N, L, D\] \(or \[N, D\]\), "
                                         r"got shape \(3, \d+, 5, 1\)\.$"):
        feature_dims(load_mmsa(npz))
    data = make_synthetic_mmsa({"train": 4, "valid": 3, "test": 2}, dims=(6, 5, 4))
    for split in data.values():
        del split["id"]
    data["test"]["text"] = np.float32(0.5)
    npz = save_mmsa_npz(data, tmp_path / "scalar.npz")
    with pytest.raises(ValueError, match=r"test/text must be \[N, L, D\] \(or \[N, D\]\), got shape \(\)"):
        mmsa_digest(load_mmsa(npz), ["train", "valid"], "regression_labels")


def test_an_npz_that_may_no_longer_be_read_is_named_as_a_permission_problem(tmp_path, monkeypatch):
    """A split read after the file's permissions changed was called 'truncated or damaged', whose fix (convert it
    again) would be wrong. The tests may run as root, whom chmod does not stop: opening the file is refused instead."""
    import builtins

    npz = write_synthetic_mmsa(tmp_path / "s.npz", splits={"train": 4, "valid": 3})
    data = load_mmsa(npz)
    real_open = builtins.open

    def refuse(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == npz:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(npz))} is not readable by user id \d+: make it readable"):
        data["train"]


def test_an_npz_replaced_as_it_is_opened_is_never_read_as_another_file(tmp_path, monkeypatch):
    """What a run knows of a .npz (its headers: feature sizes, sizes checked against the memory and the entries) and
    the splits it reads later must come from one file. The file was looked up by name again after its headers were
    read, and again before a split was read: a file replaced in between was read unchecked, with the feature sizes
    of the first (here text 3-d under a network built for 6)."""
    real_load = np.load

    def replaced(when: str):
        def load(*args, **kwargs):
            if when == "before" and other.exists():
                os.replace(other, npz)
            out = real_load(*args, **kwargs)
            if when == "after" and other.exists():
                os.replace(other, npz)
            return out
        return load

    for when in ("after", "before"):  # as the headers are read, as the split is read
        npz = write_synthetic_mmsa(tmp_path / f"{when}.npz", splits={"train": 4, "valid": 3}, dims=(6, 5, 4))
        other = write_synthetic_mmsa(tmp_path / f"{when}_other.npz", splits={"train": 4, "valid": 3}, dims=(3, 5, 4))
        if when == "after":
            monkeypatch.setattr(np, "load", replaced(when))
            data = load_mmsa(npz)
            monkeypatch.setattr(np, "load", real_load)
        else:
            data = load_mmsa(npz)
            monkeypatch.setattr(np, "load", replaced(when))
        assert feature_dims(data) == [6, 5, 4]
        try:
            train = data["train"]
        except ValueError as err:
            assert re.match(rf"{re.escape(str(npz))} changed after it was opened, before its split 'train' was read",
                            str(err)), err
        else:
            assert train["text"].shape[-1] == 6, f"{when}: read the file that replaced it"
        monkeypatch.setattr(np, "load", real_load)


def test_asking_whether_an_npz_has_a_split_does_not_read_it(tmp_path):
    """``name in data`` read the whole split (a Mapping asks by reading the item), and stopped on its damage or its
    size instead of answering: a run asking whether the file has a test split held it, or failed on it."""
    npz = write_synthetic_mmsa(tmp_path / "s.npz", splits={"train": 4, "test": 3})
    data = load_mmsa(npz)
    assert "test" in data and "valid" not in data and 7 not in data
    assert data.loaded() == []
