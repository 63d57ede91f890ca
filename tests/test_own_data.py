"""docs/own-data.md, followed word for word: the Python block, the saved TOML files, every command."""

from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pandas as pd
from click.testing import CliRunner

from cmcl.cli import cli
from tests.helpers import REPO, run_process

BLOCK = re.compile(r"(?:Save this as `(?P<name>[^`]+)`:\s*\n\s*)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def doc_steps():
    """The page's actions in order: ("python", code), ("save", name, text), ("cmcl", argv)."""
    text = (REPO / "docs" / "own-data.md").read_text()
    steps = []
    for m in BLOCK.finditer(text):
        lang, body = m.group("lang"), m.group("body")
        if lang == "python":
            steps.append(("python", body))
        elif lang == "toml":
            assert m.group("name"), "a TOML block must say which file to save it as"
            steps.append(("save", m.group("name"), body))
        elif lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    argv = shlex.split(line)
                    assert argv[0] == "cmcl", line
                    steps.append(("cmcl", argv[1:]))
    return steps


def test_the_page_has_every_stage():
    commands = [" ".join(s[1][:2]) for s in doc_steps() if s[0] == "cmcl"]
    for cmd in ("import --out", "train --features", "evaluate --runs", "export runs/mine/dns/seed-0",
                "index build", "index search"):
        assert any(c.startswith(cmd) for c in commands), cmd
    assert sum("--resume" in s[1] for s in doc_steps() if s[0] == "cmcl") == 1


def test_own_data_walkthrough(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    outputs = []
    for step in doc_steps():
        if step[0] == "python":
            proc = run_process(["-c", step[1]], cwd=tmp_path, timeout=120)
            assert proc.returncode == 0, proc.stderr
        elif step[0] == "save":
            (tmp_path / step[1]).write_text(step[2])
        else:
            res = runner.invoke(cli, step[1])
            assert res.exit_code == 0, f"cmcl {' '.join(step[1])}\n{res.output}"
            outputs.append(res.output)
    # Table 2 before and after the appended step, for both strategies and both seeds
    for report, steps in (("table2.csv", 3), ("table2-feb.csv", 4)):
        table = pd.read_csv(tmp_path / report)
        assert set(table["strategy"]) == {"vanilla", "dns"} and (table["n"] == 2).all()
        assert table[["Acc_mean", "R@1_mean", "R@10_mean", "BWT_R10_mean"]].notna().all().all()
    run = tmp_path / "runs" / "mine" / "dns" / "seed-0"
    header = json.loads((run / "config.json").read_text())
    assert len(header["protocol"]["steps"]) == 4 and header["history"][0]["finished_steps"] == 3
    assert "4/4 steps finished" in [o for o in outputs if "steps finished" in o][-1]
    adapter = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert adapter["step"] == 4 and adapter["backbone"] == "mine" and adapter["dim"] == 32
    hits = pd.read_csv(tmp_path / "hits.csv", dtype={"query_id": str, "hit_id": str})
    assert list(hits.columns) == ["query_id", "rank", "hit_id", "score"] and len(hits) == 100 * 5
    # the adapted space retrieves: the true partner is the top hit far more often than chance (1/100)
    top = hits[hits["rank"] == 1]
    assert (top["query_id"] == top["hit_id"]).mean() > 0.2
    assert np.all(np.diff(hits["score"].to_numpy().reshape(100, 5), axis=1) <= 1e-6)
