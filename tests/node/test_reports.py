"""Typed status and round records (fednode/node/reports.py): the JSON form is the one earlier
versions wrote (files in tests/node/data were written by the dict-building code these types replaced),
from_json names the field that is wrong, and mypy catches a consumer reading a renamed field."""

from __future__ import annotations

import copy
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fednode.consensus.round_state import Phase, Role
from fednode.errors import DecodeError, InvalidUpdate, LimitExceeded, TransferError
from fednode.node.reports import NodeStatus, RecordState, RejectionKind, ReportError, RoundRecord, TrainingState

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[2]


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / name).read_text())
    return data


@pytest.mark.parametrize("name", ["round-record-published-v0.json", "round-record-failed-v0.json"])
def test_a_record_written_before_the_types_loads_and_writes_back_the_same_json(name: str) -> None:
    data = _load(name)
    record = RoundRecord.from_json(data)
    assert record.to_json() == data
    assert record.round_number == data["round_number"] and record.state.value == data["state"]
    assert [a.node_id for a in record.accepted] == [a["node_id"] for a in data["accepted"]]
    assert record.created_at == data["manifest"]["created_at"]


def test_the_failed_record_keeps_its_rejections_and_conflicts() -> None:
    record = RoundRecord.from_json(_load("round-record-failed-v0.json"))
    assert record.state is RecordState.FAILED and not record.published
    assert [r.reason for r in record.rejected] == [RejectionKind.INVALID_UPDATE.value]
    assert record.outcome_conflicts[0].other.kind == "published" and record.outcome_conflicts[0].kept.term == 1


def test_a_record_without_conflicts_writes_no_conflicts_key() -> None:
    data = _load("round-record-published-v0.json")
    assert "outcome_conflicts" not in data and "outcome_conflicts" not in RoundRecord.from_json(data).to_json()


def test_a_status_written_before_the_types_loads_and_writes_back_the_same_json() -> None:
    data = _load("status-v0.json")
    status = NodeStatus.from_json(data)
    assert status.to_json() == data
    cur = status.progress.current_round
    assert cur is not None and cur.state is Phase.PUBLISHED and cur.role is Role.COORDINATOR
    assert status.progress.training is not None and status.progress.training.state is TrainingState.SUBMITTED
    assert status.progress.last_merged is not None and status.progress.last_merged.round_number == 1
    assert status.paused is None and len(status.alive_members()) == 2


def test_empty_progress_is_none_in_python_and_an_empty_object_on_the_wire() -> None:
    data = _load("status-v0.json")
    data.update(training={}, transfer={}, last_merged={}, current_round=None)
    status = NodeStatus.from_json(data)
    p = status.progress
    assert p.training is None and p.transfer is None and p.last_merged is None and p.current_round is None
    assert status.to_json() == data


def test_a_node_without_federated_learning_says_why_under_the_rounds_key() -> None:
    data = _load("status-v0.json")
    data["rounds"] = "disabled: [research] federated_learning = false in node.toml"
    status = NodeStatus.from_json(data)
    assert status.progress.disabled_reason.startswith("disabled:")
    assert status.to_json() == data


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["current_round"].update(submissions="3"), "status.current_round.submissions: expected int, got str"),
    (lambda d: d["bytes"].pop("blob_served"), "status.bytes.blob_served: missing"),
    (lambda d: d.pop("rounds_completed"), "status.rounds_completed: missing"),
    (lambda d: d["members"][1].update(alive="yes"), "status.members[1].alive: expected bool, got str"),
    (lambda d: d["current_round"].update(state="closing"), "status.current_round.state: 'closing' is not one of"),
    (lambda d: d.update(term=True), "status.term: expected int, got bool"),
    (lambda d: d["counters"]["accepted"].update(heartbeat=1.5), "status.counters.accepted.heartbeat: expected int"),
    (lambda d: d.update(paused=[]), "status.paused: expected an object (PauseStatus), got list"),
])
def test_a_bad_status_names_the_field(edit: Any, message: str) -> None:
    data = copy.deepcopy(_load("status-v0.json"))
    edit(data)
    with pytest.raises(ReportError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        NodeStatus.from_json(data)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("final_coordinator_node_id"), "record.final_coordinator_node_id: missing"),
    (lambda d: d.update(state="done"), "record.state: 'done' is not one of 'published', 'failed'"),
    (lambda d: d["accepted"][0].update(num_samples="17"), r"record.accepted\[0\].num_samples: expected int"),
    (lambda d: d.update(discarded_energy="none"), "record.discarded_energy: expected float, got str"),
])
def test_a_bad_record_names_the_field(edit: Any, message: str) -> None:
    data = copy.deepcopy(_load("round-record-published-v0.json"))
    edit(data)
    with pytest.raises(ReportError, match=message):
        RoundRecord.from_json(data)


def test_not_an_object_at_all() -> None:
    with pytest.raises(ReportError, match="record: expected an object, got list"):
        RoundRecord.from_json([])


def test_rejection_kind_follows_the_error_type_not_its_message() -> None:
    class OddLayout(InvalidUpdate):  # a subclass whose name does not contain "InvalidUpdate"
        pass

    assert RejectionKind.of(InvalidUpdate("norm 1e9 over max_update_norm")) is RejectionKind.INVALID_UPDATE
    assert RejectionKind.of(DecodeError("safetensors header is not JSON")) is RejectionKind.INVALID_UPDATE
    assert RejectionKind.of(OddLayout("lora_A shape")) is RejectionKind.INVALID_UPDATE
    # the old string match called these invalid: the peer's message mentioned a decode error
    assert RejectionKind.of(TransferError("peer said: DecodeError in request")) is RejectionKind.UNAVAILABLE
    assert RejectionKind.of(TimeoutError()) is RejectionKind.UNAVAILABLE
    assert RejectionKind.of(LimitExceeded("blob over max_blob_bytes")) is RejectionKind.UNAVAILABLE


def test_mypy_catches_a_renamed_status_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer that reads a field by a name the type does not have is a mypy error; the same
    consumer with the right name is clean (so the test can fail both ways)."""
    api = pytest.importorskip("mypy.api")
    body = """\
        from fednode.node.reports import NodeStatus, RoundRecord

        def show(status: NodeStatus, record: RoundRecord) -> str:
            cur = status.progress.current_round
            done = status.progress.{completed}
            return f"{{cur.submissions if cur else 0}} {{done}} {{record.{final}}}"
        """
    good = tmp_path / "good_consumer.py"
    bad = tmp_path / "bad_consumer.py"
    good.write_text(textwrap.dedent(body.format(completed="rounds_completed", final="final_coordinator_node_id")))
    bad.write_text(textwrap.dedent(body.format(completed="rounds_done", final="final_coordinator")))
    monkeypatch.setenv("MYPYPATH", str(REPO))  # where mypy finds this checkout's fednode
    out, err, code = api.run([str(good), str(bad), "--follow-imports=silent", "--ignore-missing-imports",
                              "--cache-dir", str(tmp_path / "cache"), "--no-error-summary",
                              "--config-file", str(REPO / "pyproject.toml")])
    lines = [line for line in out.splitlines() if ": error:" in line]
    assert not [line for line in lines if "good_consumer" in line], out + err
    assert any('"RoundProgress" has no attribute "rounds_done"' in line for line in lines), out + err
    assert any('"RoundRecord" has no attribute "final_coordinator"' in line for line in lines), out + err
    assert code == 1
