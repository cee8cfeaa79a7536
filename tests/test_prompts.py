"""``prompts.file``: user prompts from a .txt file (one per line) or a .jsonl file (a text field per line).

Reading is checked on files with known content; every bad file is a ConfigError naming ``prompts.file``
(and the line), raised while the config is parsed, before any model is loaded. The CLI end to end with
``prompts.file`` is covered by tests/test_provenance.py (its multirun probes a .jsonl prompt file).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from composed import composed
from residual_dynamics.errors import ConfigError
from residual_dynamics.pretrained.cli import prompt_texts
from residual_dynamics.pretrained.prompts import PromptsConfig, read_prompt_file
from residual_dynamics.spec import parse_probe


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def config_error(call) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        call()
    return caught.value


# --------------------------------------------------------------------------- reading


def test_txt_one_prompt_per_line_blank_lines_skipped(tmp_path):
    path = write(tmp_path / "p.txt", "first prompt\r\n\n  second, with leading spaces\n   \nthird\nfourth")
    assert read_prompt_file(path) == ["first prompt", "  second, with leading spaces", "third", "fourth"]
    assert read_prompt_file(path, n=2) == ["first prompt", "  second, with leading spaces"]


def test_jsonl_text_field(tmp_path):
    lines = [{"text": "alpha", "id": 1}, {"text": "beta\nwith a newline", "body": "other"}, {"text": "gamma"}]
    path = write(tmp_path / "p.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n\n")
    assert read_prompt_file(path) == ["alpha", "beta\nwith a newline", "gamma"]
    path = write(tmp_path / "q.jsonl", json.dumps({"body": "one"}) + "\n" + json.dumps({"body": "two"}) + "\n")
    assert read_prompt_file(path, "body", n=1) == ["one"]


def test_reading_stops_after_n_prompts(tmp_path):
    """Lines after the first n prompts are not read, so a bad line there does not matter."""
    path = write(tmp_path / "p.jsonl", '{"text": "a"}\n{"text": "b"}\nnot json\n')
    assert read_prompt_file(path, n=2) == ["a", "b"]
    assert "line 3" in str(config_error(lambda: read_prompt_file(path, n=3)))


BAD_FILES = [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "", "holds no prompt"),
    ("blank.jsonl", "\n  \n\n", "holds no prompt"),
    ("prompts.csv", "a,b\n", "expected a .txt file"),
    ("bad.jsonl", '{"text": "ok"}\n\n{"text": "unterminated\n', "line 3: not valid JSON"),
    ("list.jsonl", '["a", "b"]\n', "line 1: expected a JSON object, got list"),
    ("field.jsonl", '{"text": "ok"}\n{"body": "no text"}\n', "line 2: no field 'text'"),
    ("number.jsonl", '{"text": 3}\n', "line 1: field 'text' must be a string, got int"),
    ("emptytext.jsonl", '{"text": "  "}\n', "line 1: field 'text' is empty"),
]


@pytest.mark.parametrize("name,content,message", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_prompt_file_names_the_field_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    error = config_error(lambda: read_prompt_file(path))
    assert error.field == "prompts.file"
    assert message in str(error) and str(path) in str(error)


def test_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    error = config_error(lambda: read_prompt_file(path))
    assert error.field == "prompts.file" and "UTF-8" in str(error)


# --------------------------------------------------------------------------- the prompts config


def test_config_selects_the_file_source(tmp_path):
    path = write(tmp_path / "p.txt", "one\ntwo\nthree\n")
    config = PromptsConfig(file=str(path), n=2).validated()
    assert config.source == "file"
    assert config_error(lambda: PromptsConfig(source="file").validated()).field == "prompts.file"
    assert config_error(lambda: PromptsConfig(source="corpus", file=str(path)).validated()).field == "prompts.file"
    assert config_error(lambda: PromptsConfig(file=str(path), text_field="").validated()).field == "prompts.text_field"
    assert PromptsConfig(file="").validated().source == "default"  # an empty string counts as unset


def probe_cfg(tmp_path, *overrides):
    return composed("probe", ["pretrained@model=gpt2", "logger=none", f"paths.run_dir={tmp_path}/run",
                              f"paths.cache_dir={tmp_path}/cache", *overrides])


def test_prompt_file_through_the_parsed_spec(tmp_path):
    path = write(tmp_path / "p.jsonl", "".join(json.dumps({"prompt": f"text {i}"}) + "\n" for i in range(5)))
    spec = parse_probe(probe_cfg(tmp_path, f"prompts.file={path}", "prompts.text_field=prompt", "prompts.n=3"))
    assert spec.prompts.source == "file"
    assert prompt_texts(spec) == ["text 0", "text 1", "text 2"]


@pytest.mark.parametrize("content,message", [(None, "does not exist"), ('{"txt": "x"}\n', "line 1: no field")])
def test_bad_prompt_file_stops_the_parse(tmp_path, content, message):
    """parse_probe reads the file, so a bad one stops the run before the model is loaded."""
    path = tmp_path / "p.jsonl"
    if content is not None:
        write(path, content)
    error = config_error(lambda: parse_probe(probe_cfg(tmp_path, f"prompts.file={path}")))
    assert error.field == "prompts.file" and message in str(error)
