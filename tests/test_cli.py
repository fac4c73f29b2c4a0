from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from fednode.cli import EXIT_BROKEN_PIPE, main
from fednode.identity import load_key_file


def test_keygen_writes_0600_key_and_prints_node_id(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    key = tmp_path / "node.key"
    assert main(["keygen", str(key)]) == 0
    node_id = capsys.readouterr().out.strip()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert load_key_file(key).node_id == node_id
    assert main(["keygen", str(key)]) == 1  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


def test_python_dash_m_and_help_explain_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "fednode", "--help"], capture_output=True, text=True,
                         check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    for word in ("keygen", "config", "federated_learning"):
        assert word in out


def test_config_check_reports_errors_with_exit_1(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.toml"
    bad.write_text("[research]\nfederated_learning = 1\n")
    assert main(["config", "--check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "research.federated_learning" in err and str(bad) in err


def test_run_and_status_refuse_a_socket_path_too_long_naming_the_key(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    assert main(["init", str(deep)]) == 0
    capsys.readouterr()
    config = str(deep / "node.toml")
    for command in (["run", "--config", config], ["status", "--config", config]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert "control.socket" in err and "107-byte limit" in err and "Traceback" not in err


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """`fednode status | head` (or any command whose reader leaves): before, a BrokenPipeError
    traceback; now a quiet exit with the SIGPIPE convention's code."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        done = subprocess.run([sys.executable, "-m", "fednode", "config", "--example"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == EXIT_BROKEN_PIPE
    assert done.stderr == ""


def test_rounds_prints_records_as_written_and_names_a_field_a_file_lacks(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    data = Path(__file__).parent / "node" / "data"
    assert main(["init", str(tmp_path / "n")]) == 0
    config = tmp_path / "n" / "node.toml"
    rounds = tmp_path / "n" / "rounds"
    rounds.mkdir()
    for number, name in ((1, "round-record-published-v0.json"), (2, "round-record-failed-v0.json")):
        (rounds / f"round-{number}.json").write_text((data / name).read_text())
    capsys.readouterr()
    assert main(["rounds", "--config", str(config), "2"]) == 0
    assert capsys.readouterr().out == (data / "round-record-failed-v0.json").read_text()
    assert main(["rounds", "--config", str(config)]) == 0
    assert [r["state"] for r in json.loads(capsys.readouterr().out)] == ["published", "failed"]
    broken = json.loads((rounds / "round-2.json").read_text())
    del broken["final_term"]
    (rounds / "round-2.json").write_text(json.dumps(broken))
    assert main(["rounds", "--config", str(config)]) == 1
    assert "round-2.json: record.final_term: missing" in capsys.readouterr().err
