"""Your own data: JSONL / JSON rows with image files or base64, several images per row, and their bad input."""
import base64
import io
import json
import os
import pickle

import numpy as np
import PIL.Image
import pytest

from vlm_sft import main as main_lib
from vlm_sft import demo
from vlm_sft.config import ConfigError
from vlm_sft.data import jsonl, sources
from vlm_sft.data.loader import TrainLoader
from vlm_sft.data.robo2vlm import Robo2VLMSource, RowError, find_parquet_files
from configs_loader import load_config, override

KEYS = dict(prompt_key="question", choice_key="choices", answer_key="correct_answer", image_keys=["image"])


def png(colour, size=(20, 10)):
    buf = io.BytesIO()
    PIL.Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows, blank_lines=False):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n")
    return str(path)


def row(i=0, **overrides):
    r = {"id": f"r{i}", "question": f"q{i}?", "choices": ["Yes", "No"], "correct_answer": 1, "image": "a.png"}
    r.update(overrides)
    return r


def pixels(image):
    return np.asarray(image).tolist()


@pytest.fixture(scope="module")
def same_rows(tmp_path_factory):
    """The same 12 train rows as parquet, JSONL with image files, JSONL with base64 images and JSON."""
    root = tmp_path_factory.mktemp("same_rows")
    kw = dict(n_train=12, n_test=4, seed=3)
    return {"parquet": demo.make_robo2vlm_dir(root / "parquet", **kw),
            "jsonl": demo.make_json_dir(root / "jsonl", **kw),
            "base64": demo.make_json_dir(root / "base64", images="base64", **kw),
            "json": demo.make_json_dir(root / "json", file_format="json", **kw)}


@pytest.mark.parametrize("layout", ["jsonl", "base64", "json"])
@pytest.mark.parametrize("lazy", [False, True])
def test_json_layouts_give_the_parquet_rows(same_rows, layout, lazy):
    parquet = Robo2VLMSource(find_parquet_files(str(same_rows["parquet"]), "train"), **KEYS)
    files = sources.find_data_files(str(same_rows[layout]), "train")
    assert [os.path.basename(f) for f in files] == [f"train-0000{i}-of-00002.{'json' if layout == 'json' else 'jsonl'}"
                                                    for i in range(2)]
    sources.check_files(files, **KEYS)
    source = pickle.loads(pickle.dumps(sources.make_source(files, lazy=lazy, **KEYS)))  # as a worker gets it
    assert len(source) == len(parquet) == 12
    for i in range(12):
        ours, theirs = source[i], parquet[i]
        assert (ours.id, ours.question, ours.choices, ours.answer_index) == (
            theirs.id, theirs.question, theirs.choices, theirs.answer_index)
        assert [pixels(im) for im in ours.images] == [pixels(im) for im in theirs.images]
    name = source.source_of(7)  # row 1 of the second file: line 2 (JSONL) or item [1] (JSON)
    assert name == files[1] + ("[1]" if layout == "json" else ":2")
    assert sources.find_data_files(str(same_rows[layout]), "test")[0].endswith("test-00000-of-00001." +
                                                                              ("json" if layout == "json" else "jsonl"))


def test_image_values_paths_absolute_base64_lists_and_several_keys(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "red.png").write_bytes(png((200, 0, 0)))
    absolute = tmp_path / "green.png"
    absolute.write_bytes(png((0, 200, 0)))
    blue = {"bytes": base64.b64encode(png((0, 0, 200))).decode(), "path": "blue.png"}
    sub = tmp_path / "data"
    sub.mkdir()
    path = write_jsonl(sub / "rows.jsonl", [
        row(0, image="../imgs/red.png", wrist=str(absolute)),       # relative to the file, absolute
        row(1, image=["../imgs/red.png", blue], wrist=blue),         # a list in one key, then another key
        row(2, image={"bytes": None, "path": "../imgs/red.png"}, wrist=[str(absolute)]),
    ], blank_lines=True)
    source = jsonl.JsonlSource([path], **{**KEYS, "image_keys": ["image", "wrist"]}, lazy=True)
    colours = [[im.getpixel((0, 0)) for im in source[i].images] for i in range(3)]
    assert colours == [[(200, 0, 0), (0, 200, 0)], [(200, 0, 0), (0, 0, 200), (0, 0, 200)],
                       [(200, 0, 0), (0, 200, 0)]]
    assert [source.source_of(i) for i in range(3)] == [f"{path}:1", f"{path}:3", f"{path}:5"]  # blank lines skipped


def test_lazy_reads_lines_by_offset_not_the_whole_file(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "rows.jsonl", [row(i) for i in range(50)])
    source = jsonl.JsonlSource([path], **KEYS, lazy=True)
    assert source.row_groups() is None  # the loader shuffles rows freely: each read is one seek
    reads = []
    real_open = open

    class CountingFile:
        def __init__(self, f):
            self.f = f

        def seek(self, offset):
            return self.f.seek(offset)

        def readline(self):
            line = self.f.readline()
            reads.append(len(line))
            return line

    monkeypatch.setattr("builtins.open", lambda *a, **k: CountingFile(real_open(*a, **k)))
    assert [source.record(i)["id"] for i in (41, 3, 17)] == ["r41", "r3", "r17"]
    assert len(reads) == 3 and sum(reads) < os.path.getsize(path) / 10


def test_loader_over_jsonl_is_deterministic_and_resumable(same_rows):
    files = sources.find_data_files(str(same_rows["jsonl"]), "train")
    ids = lambda e: e.id  # noqa: E731
    loaders = [TrainLoader(sources.make_source(files, lazy=lazy, **KEYS), ids, list, global_batch_size=4,
                           micro_batch_size=2, seed=5, lazy=lazy) for lazy in (False, True)]
    runs = [[b.micro_batches for _, b in zip(range(5), loader)] for loader in loaders]
    assert runs[0] == runs[1]
    resumed = TrainLoader(sources.make_source(files, lazy=True, **KEYS), ids, list, global_batch_size=4,
                          micro_batch_size=2, seed=5, lazy=True, position={"epoch": 0, "offset": 8})
    assert [b.micro_batches for _, b in zip(range(3), resumed)] == runs[0][2:5]


# ---- bad input ----

def test_a_line_that_is_not_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [row(0), '{"id": "r1", "question": "q1?", "choi', row(2)])
    source = jsonl.JsonlSource([path], **KEYS)
    with pytest.raises(RowError, match=rf"^{path}:2: not valid JSON \(.* at column \d+\)") as e:
        source[1]
    assert e.value.reason == "json"
    path = write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(RowError, match=rf"{path}:1: a JSON list, expected an object"):
        jsonl.JsonlSource([path], **KEYS)[0]


def test_missing_image_file_names_row_and_path(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [row(0, image="imgs/nope.png")])
    with pytest.raises(RowError, match=rf"^{path}:1: image 'imgs/nope.png' in key 'image' not found "
                                       rf"\(looked for {tmp_path}/imgs/nope.png\)"):
        jsonl.JsonlSource([path], **KEYS)[0]


@pytest.mark.parametrize("value", [[], None, ""])
def test_a_row_without_images_is_named(tmp_path, value):
    record = row(0, image=value)
    path = write_jsonl(tmp_path / "rows.jsonl", [record])
    with pytest.raises(RowError, match=rf"^{path}:1: (missing image in column 'image'|"
                                       r"image in key 'image' is '', expected a file path)"):
        jsonl.JsonlSource([path], **KEYS)[0]


@pytest.mark.parametrize("value, match", [
    ({"bytes": "not base64!", "path": None}, "not valid base64"),
    ({"bytes": base64.b64encode(b"garbage").decode(), "path": None}, r"undecodable image in key 'image' \(base64\)"),
    (7, "image in key 'image' is 7, expected a file path"),
])
def test_bad_image_values_are_named(tmp_path, value, match):
    path = write_jsonl(tmp_path / "rows.jsonl", [row(0, image=value)])
    with pytest.raises(RowError, match=rf"^{path}:1: .*{match}"):
        jsonl.JsonlSource([path], **KEYS)[0]


@pytest.mark.parametrize("content, match", [
    ('{"question": "q"}', r"holds a JSON dict, expected a list of objects"),
    ('[{"question": "q"}, 3]', r"item \[1\] is a JSON int, expected a list of objects"),
    ('[{"question": "q"},', r"not valid JSON \(.* at line 1 column \d+\)"),
])
def test_a_json_file_that_is_not_a_list_of_objects(tmp_path, content, match):
    (tmp_path / "train.json").write_text(content)
    files = sources.find_data_files(str(tmp_path), "train")
    with pytest.raises(ValueError, match=rf"{tmp_path}/train.json: {match}"):
        sources.check_files(files, **KEYS)


def test_missing_keys_are_named_before_any_row_is_read(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["not json", row(0)])
    with pytest.raises(ValueError, match=rf"{path}:2: missing key\(s\) 'prompt' \(data.prompt_key\)"):
        sources.check_files([path], **{**KEYS, "prompt_key": "prompt", "image_keys": ["image"]})
    with pytest.raises(ValueError, match=r"'wrist' \(data.image_keys\[1\]\); keys present: \['choices'"):
        sources.check_files([path], **{**KEYS, "image_keys": ["image", "wrist"]})


def test_parquet_and_json_in_one_path_list_is_an_error_naming_both(tmp_path, same_rows):
    parquet = find_parquet_files(str(same_rows["parquet"]), "train")[0]
    json_file = sources.find_data_files(str(same_rows["jsonl"]), "train")[0]
    with pytest.raises(ValueError, match=rf"{parquet} and {json_file}: parquet and JSON files in one path list"):
        sources.find_data_files(f"{parquet},{json_file}", "train")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"only .parquet / .jsonl / .json files are supported"):
        sources.find_data_files(str(tmp_path / "notes.txt"), "train")


def test_generator_plants_each_bad_row_kind(tmp_path):
    kinds = {1: "image", 2: "answer", 3: "choices", 4: "missing_image", 5: "no_image", 6: "json", 7: "long"}
    d = demo.make_json_dir(tmp_path / "d", n_train=10, n_test=2, train_files=1, bad_rows=kinds,
                              images_per_row=(1, 3))
    source = jsonl.JsonlSource(sources.find_data_files(str(d), "train"), **KEYS)
    reasons = {}
    for i in range(10):
        try:
            example = source[i]
            reasons[i] = len(example.images)
        except RowError as e:
            reasons[i] = e.reason
    assert reasons == {0: 1, 1: "image", 2: "answer", 3: "choices", 4: "image", 5: "image", 6: "json", 7: 3, 8: 1,
                       9: 3}
    assert len(source[7].question) > 5000
    with pytest.raises(ValueError, match="'json' only with file_format='jsonl'"):
        demo.make_json_dir(tmp_path / "e", file_format="json", bad_rows={0: "json"})


def test_json_lists_too_big_for_memory_are_refused_even_when_lazy(same_rows):
    c = load_config()
    files = sources.find_data_files(str(same_rows["json"]), "train")
    need = sum(os.path.getsize(f) for f in files)
    for lazy in (False, True):
        config = override(load_config(), {"data.lazy_loading": lazy})
        match = (r"2 .json file\(s\) are read whole even with data.lazy_loading=True: .* Convert them to .jsonl"
                 if lazy else r"data.lazy_loading=False reads 2 JSON file\(s\) into memory: .*Set data.lazy_loading")
        with pytest.raises(ConfigError, match=match):
            main_lib.check_eager_loading_fits(config, files, local_processes=2, available=int(need / 0.8))
        main_lib.check_eager_loading_fits(config, files, local_processes=1, available=int(need / 0.8) + 8)
    jsonl_files = sources.find_data_files(str(same_rows["jsonl"]), "train")
    main_lib.check_eager_loading_fits(override(c, {"data.lazy_loading": True}), jsonl_files, local_processes=8,
                                      available=1)  # streamed: nothing held
