"""Every ProtocolError raised in ``cmcl/data/protocol.py``: the message names the file and the problem."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cmcl.cli import cli
from cmcl.data.protocol import load_protocol
from cmcl.errors import ProtocolError

STEP = '[[step]]\ndataset = "esc50"\nmodalities = ["text", "audio"]\n'

# name -> (file content, fragments the message must contain besides the file name)
BAD = {
    "not toml": ('[[step]\ndataset = "esc50"\n', ["not valid TOML"]),
    "not utf-8": (b'name = "\xff\xfe"\n' + STEP.encode(), ["not valid TOML"]),
    "unknown top-level key": ('steps = 3\n' + STEP, ["unknown top-level keys ['steps']"]),
    "datasets not a table": ('datasets = ["esc50"]\n' + STEP, ["[datasets] must be a table"]),
    "no steps": ('name = "x"\n', ["no [[step]] entries"]),
    "empty step list": ('step = []\n', ["no [[step]] entries"]),
    "step not a table": ('step = [1, 2]\n', ["step 1", "must be a table"]),
    "unknown step key": (STEP + 'epochs = 3\n', ["step 1", "unknown keys ['epochs']"]),
    "missing dataset": ('[[step]]\nmodalities = ["text", "audio"]\n',
                        ["step 1", "'dataset' must be a non-empty string"]),
    "empty dataset": ('[[step]]\ndataset = ""\nmodalities = ["text", "audio"]\n',
                      ["step 1", "'dataset' must be a non-empty string"]),
    "dataset not a string": ('[[step]]\ndataset = 3\nmodalities = ["text", "audio"]\n',
                             ["step 1", "'dataset' must be a non-empty string"]),
    "one modality": ('[[step]]\ndataset = "esc50"\nmodalities = ["text"]\n', ["step 1", "list of two names"]),
    "modalities not a list": ('[[step]]\ndataset = "esc50"\nmodalities = "text-audio"\n',
                              ["step 1", "list of two names"]),
    "repeated modality": ('[[step]]\ndataset = "esc50"\nmodalities = ["audio", "audio"]\n',
                          ["step 1", "['audio', 'audio'] repeats a modality"]),
    "bad modality name": ('[[step]]\ndataset = "esc50"\nmodalities = ["text", "Audio-1"]\n', ["step 1", "Audio-1"]),
    "unknown metric": (STEP + 'metrics = ["recall", "map"]\n',
                       ["step 1", "metrics must be a non-empty subset", "'map'"]),
    "empty metrics": (STEP + 'metrics = []\n', ["step 1", "metrics must be a non-empty subset"]),
    "metrics not a list": (STEP + 'metrics = "acc"\n', ["step 1", "metrics must be a non-empty subset"]),
    "bad dataset metrics": ('[datasets]\nesc50 = { metrics = ["top5"] }\n' + STEP, ["step 1", "'top5'"]),
    "dataset entry not a table": ('[datasets]\nesc50 = ["recall"]\n' + STEP, ["[datasets] esc50 must be a table"]),
    "metric not a string": (STEP + 'metrics = [["recall"]]\n', ["step 1", "metrics must be a non-empty subset"]),
    "error in the second step": (STEP + '[[step]]\ndataset = "clotho"\nmodalities = ["text"]\n',
                                 ["step 2", "list of two names"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_protocol_names_file_and_problem(tmp_path, case):
    content, fragments = BAD[case]
    path = tmp_path / "proto_under_test.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ProtocolError) as info:
        load_protocol(path)
    msg = str(info.value)
    assert msg.startswith(str(path) + ":"), msg
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_missing_protocol_file_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ProtocolError, match=r"nope\.toml: no such protocol file \(shipped protocols: paper11\)"):
        load_protocol(tmp_path / "nope.toml")
    with pytest.raises(ProtocolError, match="paper12: no such protocol file"):
        load_protocol("paper12")                            # a misspelt shipped name


def test_the_good_base_step_parses(tmp_path):
    """The cases above break a valid file, not an already broken one."""
    path = tmp_path / "ok.toml"
    path.write_text('[datasets]\nesc50 = { metrics = ["recall", "acc"] }\n' + STEP)
    p = load_protocol(path)
    assert [s.key for s in p.steps] == ["esc50:text-audio"] and p.steps[0].metrics == ("recall", "acc")


@pytest.mark.parametrize("case", ["not toml", "unknown step key", "unknown metric"])
def test_bad_protocol_through_the_cli(tmp_path, tiny_cache, case):
    content, fragments = BAD[case]
    path = tmp_path / "proto_under_test.toml"
    path.write_text(content)
    r = CliRunner().invoke(cli, ["train", "--features", str(tiny_cache), "--backbone", "synthetic", "--protocol",
                                 str(path), "--runs", str(tmp_path / "runs"), "-q"], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cmcl: error:"), r.output
    assert "proto_under_test.toml" in lines[0] and all(f in lines[0] for f in fragments), lines[0]
    assert not (tmp_path / "runs").exists()
