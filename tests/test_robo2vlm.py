"""Robo2VLM parquet discovery, schema checks, row decoding, and eager vs lazy reading."""
import io
import os
import pickle
import re

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlm_sft.data import robo2vlm
from vlm_sft.data.robo2vlm import Robo2VLMSource, RowError, check_schema, decode_row, find_parquet_files
from vlm_sft.demo import make_robo2vlm_dir

KEYS = dict(prompt_key="question", choice_key="choices", answer_key="correct_answer", image_keys=["image"])


def image_bytes(colour, fmt="PNG", size=(20, 10)):
    buf = io.BytesIO()
    PIL.Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def write_rows(path, rows, row_group_size=4):
    """Writes rows as given (column types inferred), for the shapes make_robo2vlm_dir does not produce."""
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return str(path)


def row(i=0, **overrides):
    r = {"id": f"r{i}", "question": f"q{i}?", "choices": "['Yes', 'No']", "correct_answer": 1,
         "image": {"bytes": image_bytes((200, 10, 10)), "path": None}}
    r.update(overrides)
    return r


# ---- find_parquet_files ----

def touch_parquet(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"x": [1]}), path)
    return str(path)


def test_one_folder_is_split_by_file_name(tmp_path):
    d = make_robo2vlm_dir(tmp_path / "data", n_train=12, n_test=6, train_files=3, test_files=2)
    train = find_parquet_files(str(d), "train")
    test = find_parquet_files(str(d), "test")
    assert [os.path.basename(f) for f in train] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert [os.path.basename(f) for f in test] == [f"test-0000{i}-of-00002.parquet" for i in range(2)]


def test_folder_without_split_names_serves_both_splits(tmp_path):
    files = [touch_parquet(tmp_path / n) for n in ("b.parquet", "a.parquet", "sub/c.parquet")]
    (tmp_path / "notes.json").write_text("{}")
    expected = [files[1], files[0], files[2]]  # sorted, recursive
    assert find_parquet_files(str(tmp_path), "train") == expected
    assert find_parquet_files(str(tmp_path), "test") == expected


def test_split_folders_and_validation_names(tmp_path):
    tr = touch_parquet(tmp_path / "train" / "part-0.parquet")
    va = touch_parquet(tmp_path / "validation-00000-of-00001.parquet")
    assert find_parquet_files(str(tmp_path), "train") == [tr]
    assert find_parquet_files(str(tmp_path), "test") == [va]


def test_comma_separated_paths_and_explicit_files(tmp_path):
    a = touch_parquet(tmp_path / "a" / "x.parquet")
    b = touch_parquet(tmp_path / "b" / "train-00000-of-00001.parquet")
    test_file = touch_parquet(tmp_path / "b" / "test-00000-of-00001.parquet")
    # A named file is taken whatever its name; a file named twice is read once.
    assert find_parquet_files(f"{tmp_path / 'a'}, {b},{b}", "test") == [a, b]
    assert find_parquet_files([str(tmp_path / "b"), a], "test") == [test_file, a]


def test_no_match_names_path_and_split(tmp_path):
    touch_parquet(tmp_path / "train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"no 'test' parquet files found in .*" + tmp_path.name):
        find_parquet_files(str(tmp_path), "test")
    with pytest.raises(ValueError, match="no such file or folder"):
        find_parquet_files(str(tmp_path / "missing"), "train")
    (tmp_path / "data.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="only .parquet"):
        find_parquet_files(str(tmp_path / "data.jsonl"), "train")
    with pytest.raises(ValueError, match="split must be"):
        find_parquet_files(str(tmp_path), "validation")


# ---- check_schema ----

def test_check_schema_accepts_the_hub_layout(tmp_path):
    d = make_robo2vlm_dir(tmp_path, n_train=4, n_test=2)
    check_schema(find_parquet_files(str(d), "train"), **KEYS)


def test_check_schema_names_file_missing_column_and_present_columns(tmp_path):
    f = write_rows(tmp_path / "x.parquet", [{"question": "q", "choices": "['a']", "answer": 0}])
    with pytest.raises(ValueError) as e:
        check_schema([f], **KEYS)
    msg = str(e.value)
    assert f in msg and "'correct_answer' (data.answer_key)" in msg and "'image' (data.image_keys[0])" in msg
    assert "columns present: ['question', 'choices', 'answer']" in msg


# ---- decode_row ----

def test_decode_row_hub_format_png_and_jpeg():
    red, blue = image_bytes((250, 0, 0), "PNG"), image_bytes((0, 0, 250), "JPEG")
    for data, colour in ((red, (250, 0, 0)), (blue, (0, 0, 250))):
        ex = decode_row(row(image={"bytes": data, "path": "x.png"}), "f.parquet:3", **KEYS)
        assert (ex.id, ex.question, ex.choices, ex.answer_index) == ("r0", "q0?", ["Yes", "No"], 1)
        assert ex.source == "f.parquet:3"
        [img] = ex.images
        assert img.mode == "RGB" and img.size == (20, 10)
        assert np.abs(np.asarray(img).astype(int) - colour).max() <= 8  # JPEG is lossy


def test_decode_row_grayscale_and_rgba_become_rgb():
    for mode in ("L", "RGBA", "P"):
        buf = io.BytesIO()
        PIL.Image.new(mode, (5, 4)).save(buf, format="PNG")
        ex = decode_row(row(image=buf.getvalue()), "f:0", **KEYS)  # raw bytes instead of a struct
        assert ex.images[0].mode == "RGB"


@pytest.mark.parametrize("answer,index", [("A", 0), ("b", 1), ("C.", 2), (" D) ", 3), (2, 2), (1.0, 1)])
def test_answer_as_index_or_letter(answer, index):
    ex = decode_row(row(choices="['w', 'x', 'y', 'z']", correct_answer=answer), "f:0", **KEYS)
    assert ex.answer_index == index


@pytest.mark.parametrize("answer,pattern", [
    ("E", r"f\.parquet:7: answer 'E' .* out of range for 4 choices"),
    (4, r"f\.parquet:7: answer 4 .* out of range for 4 choices"),
    (-1, r"answer -1 .* out of range"),
    ("AB", r"f\.parquet:7: unparsable answer 'AB'"),
    (None, r"unparsable answer None"),
    (True, r"unparsable answer True"),
])
def test_bad_answers_are_errors_never_a(answer, pattern):
    with pytest.raises(RowError, match=pattern):
        decode_row(row(choices="['w', 'x', 'y', 'z']", correct_answer=answer), "f.parquet:7", **KEYS)


def test_choices_as_list_or_literal():
    assert decode_row(row(choices=["Left", "Right"]), "f:0", **KEYS).choices == ["Left", "Right"]
    assert decode_row(row(choices='("it\'s", "no")'), "f:0", **KEYS).choices == ["it's", "no"]


@pytest.mark.parametrize("choices", ["['Yes', 'No'", "[]", "[1, 2]", "Yes, No", None, [], ["a", None]])
def test_bad_choices(choices):
    with pytest.raises(RowError, match=r"f:2: unparsable choices in column 'choices'"):
        decode_row(row(choices=choices), "f:2", **KEYS)


@pytest.mark.parametrize("image,pattern", [
    ({"bytes": b"\x89PNG\r\n\x1a\nnot really", "path": None}, r"f:5: undecodable image in column 'image'"),
    ({"bytes": None, "path": "a.png"}, r"f:5: image in column 'image' has no bytes \(path='a.png'\)"),
    (None, r"f:5: missing image in column 'image'"),
    ([], r"f:5: missing image in column 'image'"),
    ("a.png", r"f:5: image in column 'image' is str"),
])
def test_bad_images(image, pattern):
    with pytest.raises(RowError, match=pattern):
        decode_row(row(image=image), "f:5", **KEYS)


def test_several_image_keys_and_image_lists_keep_order():
    r = row(image=[image_bytes((255, 0, 0)), {"bytes": image_bytes((0, 255, 0)), "path": None}],
            wrist={"bytes": image_bytes((0, 0, 255)), "path": None})
    ex = decode_row(r, "f:0", **{**KEYS, "image_keys": ["image", "wrist"]})
    assert [img.getpixel((0, 0)) for img in ex.images] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_missing_id_uses_source_and_missing_question_is_an_error():
    r = row()
    del r["id"]
    assert decode_row(r, "f:9", **KEYS).id == "f:9"
    with pytest.raises(RowError, match="f:9: question in column 'question' is None"):
        decode_row(row(question=None), "f:9", **KEYS)


# ---- Robo2VLMSource ----

def test_lazy_and_eager_read_identical_examples(tmp_path):
    d = make_robo2vlm_dir(tmp_path, n_train=30, n_test=4, train_files=3, rows_per_group=4, image_format="mixed")
    files = find_parquet_files(str(d), "train")
    eager = Robo2VLMSource(files, lazy=False, **KEYS)
    lazy = Robo2VLMSource(files, lazy=True, **KEYS)
    assert len(eager) == len(lazy) == 30
    assert eager.row_groups() == lazy.row_groups() == [4, 4, 2, 4, 4, 2, 4, 4, 2]
    table = pa.concat_tables([pq.read_table(f) for f in files])
    # Backwards and jumping order exercises the lazy row-group cache across files.
    for i in [*range(29, -1, -1), 3, 25, 0, 14]:
        a, b = eager[i], lazy[i]
        assert a.id == b.id == table["id"][i].as_py()
        assert (a.question, a.choices, a.answer_index) == (b.question, b.choices, b.answer_index)
        assert [np.asarray(x).tolist() for x in a.images] == [np.asarray(x).tolist() for x in b.images]
    assert eager[10].source == f"{files[1]}:0" and lazy[29].source == f"{files[2]}:9"
    with pytest.raises(IndexError):
        lazy[30]


def test_lazy_reads_one_row_group_at_a_time(tmp_path, monkeypatch):
    d = make_robo2vlm_dir(tmp_path, n_train=16, n_test=2, train_files=1, rows_per_group=4)
    source = Robo2VLMSource(find_parquet_files(str(d), "train"), lazy=True, **KEYS)
    reads = []
    original = pq.ParquetFile.read_row_group

    def counting(self, i, columns=None, **kw):
        reads.append(i)
        assert set(columns) == {"id", "question", "choices", "correct_answer", "image"}
        return original(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    for i in [5, 6, 4, 7, 12, 13, 5, 0]:
        source[i]
    assert reads == [1, 3, 0]  # group 1 still cached when row 5 comes back


def test_sources_pickle_and_work_after_unpickling(tmp_path):
    d = make_robo2vlm_dir(tmp_path, n_train=10, n_test=2, rows_per_group=3)
    files = find_parquet_files(str(d), "train")
    for lazy in (False, True):
        source = Robo2VLMSource(files, lazy=lazy, **KEYS)
        expected = source[7].id  # opens a file handle and fills the cache first
        clone = pickle.loads(pickle.dumps(source))
        assert clone[7].id == expected and len(clone) == 10


def test_source_rows_raise_row_errors_naming_file_and_row(tmp_path):
    d = make_robo2vlm_dir(tmp_path, n_train=12, n_test=2, train_files=2, bad_rows={8: "answer"})
    files = find_parquet_files(str(d), "train")
    source = Robo2VLMSource(files, lazy=True, **KEYS)
    pattern = rf"^{re.escape(files[1])}:2: answer \d+ in column 'correct_answer' is out of range"
    with pytest.raises(RowError, match=pattern):
        source[8]


def test_source_without_id_column_and_with_custom_keys(tmp_path):
    rows = [{"prompt": f"q{i}", "options": ["a", "b", "c"], "label": "c", "img": image_bytes((1, 2, 3))}
            for i in range(5)]
    f = write_rows(tmp_path / "custom.parquet", rows, row_group_size=2)
    keys = dict(prompt_key="prompt", choice_key="options", answer_key="label", image_keys=["img"])
    check_schema([f], **keys)
    for lazy in (False, True):
        ex = Robo2VLMSource([f], lazy=lazy, **keys)[3]
        assert (ex.id, ex.question, ex.choices, ex.answer_index) == (f"{f}:3", "q3", ["a", "b", "c"], 2)


def test_split_regex_does_not_match_lookalikes():
    assert robo2vlm._split_of("training_notes.parquet") is None
    assert robo2vlm._split_of("testing/x.parquet") is None
    assert robo2vlm._split_of("eval.parquet") == "test"


def test_in_memory_bytes_from_footers_is_what_eager_loading_holds(tmp_path):
    """The eager-loading memory check reads sizes from parquet footers; they match the tables pyarrow builds."""
    data = make_robo2vlm_dir(tmp_path / "data", n_train=24, n_test=4, train_files=2, rows_per_group=5)
    files = robo2vlm.find_parquet_files(str(data), "train")
    source = robo2vlm.Robo2VLMSource(files)  # eager, default keys
    held = sum(t.nbytes for t in source._tables)
    estimate = robo2vlm.in_memory_bytes(files, prompt_key="question", choice_key="choices",
                                        answer_key="correct_answer", image_keys=["image"])
    assert 0.8 * held <= estimate <= 1.25 * held, (estimate, held)
    # Columns the trainer does not read cost nothing.
    table = pq.read_table(files[0])
    pq.write_table(table, tmp_path / "plain.parquet", row_group_size=5)
    pq.write_table(table.append_column("notes", pa.array(["x" * 10_000] * len(table))), tmp_path / "more.parquet",
                   row_group_size=5)
    sizes = [robo2vlm.in_memory_bytes([str(tmp_path / n)], prompt_key="question", choice_key="choices",
                                      answer_key="correct_answer", image_keys=["image"])
             for n in ("plain.parquet", "more.parquet")]
    assert sizes[0] == sizes[1] > 0
