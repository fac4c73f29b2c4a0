"""One owner for the next-round rule: the node's cheap early-out (`RoundDriver.maybe_start_round`,
which spares the sqlite reads) asks the round book's `may_open_next`, the same condition
`next_round` starts from, so the two can never disagree."""

from __future__ import annotations

from fednode.consensus import CoordinatorChanged
from fednode.consensus.round_book import History, RoundBook, RoundPolicy
from tests.consensus.helpers import EPOCH, identity, manifest

X, Y = identity(0), identity(1)
HISTORY = History(live_federated=1, highest_round_number=0, published=0, last_finished_at=None)


def test_may_open_next_is_exactly_when_next_round_can_say_yes() -> None:
    book = RoundBook(X.node_id, policy=RoundPolicy())
    assert not book.may_open_next() and book.next_round(EPOCH, HISTORY, force=True) is None  # nobody elected
    book.coordinator_changed(CoordinatorChanged(1, Y.node_id, EPOCH))
    assert not book.may_open_next() and book.next_round(EPOCH, HISTORY, force=True) is None  # someone else
    book.coordinator_changed(CoordinatorChanged(2, X.node_id, EPOCH))
    assert book.may_open_next()
    plan = book.next_round(EPOCH, HISTORY, force=True)
    assert plan is not None
    book.open(manifest(X, round_id=plan.round_id, term=plan.term, round_number=plan.round_number), EPOCH)
    assert not book.may_open_next() and book.next_round(EPOCH, HISTORY, force=True) is None  # one is open

