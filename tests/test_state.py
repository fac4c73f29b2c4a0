"""StateDB's memory of the election term across restarts (election-v1 rule 12)."""

from __future__ import annotations

from pathlib import Path

from fednode.state import StateDB


def test_highest_term_survives_a_reopen_and_never_goes_down(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.sqlite")
    assert db.highest_term() == 0
    db.save_term(4)
    db.save_term(2)  # an older term heard late does not lower it
    db.touch_member("x" * 52, 1.0, federated_learning=True, term=3)
    db.close()
    again = StateDB(tmp_path / "state.sqlite")
    assert again.highest_term() == 4
    again.touch_member("y" * 52, 2.0, federated_learning=True, term=7)  # a member reported a newer term
    assert again.highest_term() == 7
    again.close()
